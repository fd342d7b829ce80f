"""Rendering rows of a report as a text table, markdown, JSON or CSV.

Tools build a list of column names and a list of row dicts (plus optional
totals and notes); this module prints them in the format the user chose.
"""
import csv
import io
import json

FORMATS = ("table", "markdown", "json", "csv")


def _cell(value):
    if isinstance(value, (list, tuple)):
        if value and all(isinstance(v, (list, tuple)) for v in value):
            return " ".join("x".join(str(d) for d in v) if v else "()" for v in value)
        return ",".join(str(v) for v in value)
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return "" if value is None else str(value)


def render(columns, rows, fmt="table", totals=None, notes=(), extra=None):
    """columns: [(key, title)]; rows: [dict]; totals: dict or None; notes: lines printed after."""
    if fmt == "json":
        doc = {"rows": rows}
        if totals is not None:
            doc["totals"] = totals
        if notes:
            doc["notes"] = list(notes)
        if extra:
            doc.update(extra)
        return json.dumps(doc, indent=2) + "\n"
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow([key for key, _ in columns])
        for r in rows:
            w.writerow([_csv(r.get(key)) for key, _ in columns])
        if totals is not None:
            w.writerow([_csv(totals.get(key, "")) for key, _ in columns])
        return buf.getvalue()
    table = [[title for _, title in columns]]
    table += [[_cell(r.get(key)) for key, _ in columns] for r in rows]
    if totals is not None:
        table.append([_cell(totals.get(key, "")) for key, _ in columns])
    numeric = [all(_is_number(r.get(key)) for r in rows if r.get(key) not in (None, "")) for key, _ in columns]
    if fmt == "markdown":
        out = ["| " + " | ".join(_md(c) for c in table[0]) + " |"]
        out.append("|" + "|".join("---:" if n else "---" for n in numeric) + "|")
        for line in table[1:]:
            out.append("| " + " | ".join(_md(c) for c in line) + " |")
        text = "\n".join(out) + "\n"
    elif fmt == "table":
        widths = [max(len(line[i]) for line in table) for i in range(len(columns))]

        def fmt_line(line):
            cells = [c.rjust(w) if n else c.ljust(w) for c, w, n in zip(line, widths, numeric)]
            return "  ".join(cells).rstrip()

        out = [fmt_line(table[0]), "  ".join("-" * w for w in widths)]
        body = table[1:]
        if totals is not None:
            out += [fmt_line(line) for line in body[:-1]]
            out.append("  ".join("-" * w for w in widths))
            out.append(fmt_line(body[-1]))
        else:
            out += [fmt_line(line) for line in body]
        text = "\n".join(out) + "\n"
    else:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if notes:
        text += "\n" + "\n".join(notes) + "\n"
    return text


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _csv(v):
    if isinstance(v, (list, tuple)):
        return _cell(v)
    return "" if v is None else v


def _md(text):
    return text.replace("|", "\\|")

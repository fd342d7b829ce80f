"""`caffeish offsets`: where each layer puts the input's pixels, and the Crop offsets that follow.

    caffeish offsets NET.prototxt [--from BLOB] [--to BLOB] [--all-layers]
                     [--format table|markdown|json|csv] [--phase TRAIN|TEST] [--input-shape NAME=N,C,H,W]
    caffeish offsets NET.prototxt --check
    caffeish offsets NET.prototxt --fix OUT.prototxt

The analysis, the table rows, --check and --fix are caffeish.apps.offsets (see
its docstring for the coordinate maps); this module is the command line: the
arguments, the table rendering (caffeish.tools.report) and the messages.

--check compares every Crop's offset with the computed one (exit 1, one line per
mismatch); --fix OUT writes the net with the computed offsets, editing only those
values in the text (comments and formatting are kept).
"""
from caffeish.formats.io import printable, printable_cells
from caffeish.tools import report
from caffeish.tools.options import add_allow_python_layers_option, add_net_state_options
from caffeish.apps.offsets import COLUMNS, analyze, display_row, fix_file, fmt_offsets, global_notes, sections


# -- rendering ------------------------------------------------------------------------------------------------


def _columns(rows):
    dilated = any(r.get("dilation") and any(d != 1 for d in r["dilation"]) for r in rows)
    return [c for c in COLUMNS if c[0] != "dilation" or dilated]


def render(analysis, secs, fmt="table"):
    notes = global_notes(analysis, secs)
    if fmt in ("json", "csv"):
        rows = []
        for sec in secs:
            name = sec["crop"].name if sec["crop"] is not None else sec["parts"][0]["to"]
            for part in sec["parts"]:
                rows += [{"section": name, "path": part["label"], **display_row(r)} for r in part["rows"]]
            notes += [n for part in sec["parts"] for n in part["notes"]]
        columns = [("section", "section"), ("path", "path"), ("input", "input"), ("output", "output")]
        columns += [c for c in COLUMNS]
        extra = {"crops": [s["crop"].as_dict() for s in secs if s["crop"] is not None]}
        return report.render(columns, rows, fmt, notes=notes, extra=extra)
    md = fmt == "markdown"
    out = []
    for sec in secs:
        title = printable(sec["title"])  # names from the net, escaped
        out.append(f"### {title}\n" if md else f"{title}\n")
        for part in sec["parts"]:
            out.append(f"{part['label']} path: '{printable(part['from'])}' -> '{printable(part['to'])}'\n"
                       + ("\n" if md else ""))
            rows = [printable_cells(display_row(r)) for r in part["rows"]]
            if rows:
                out.append(report.render(_columns(part["rows"]), rows, fmt) + ("\n" if md and part["notes"] else ""))
            else:
                out.append("(no layer with a spatial effect)\n")
            out.extend(f"note: {printable(n)}\n" for n in part["notes"])
            out.append("\n")
        crop = sec["crop"]
        if crop is not None:
            out.append(printable(_crop_line(crop)) + "\n\n")
    text = "".join(out)
    if notes:
        text += "".join(f"note: {printable(n)}\n" for n in notes)
    return text


def _crop_line(crop):
    if crop.error is not None:
        return f"offset: cannot be computed: {crop.error}"
    computed = fmt_offsets(crop.computed, crop.axis)
    if crop.agrees:
        return f"offset: {computed} (the Crop says {fmt_offsets(crop.written, crop.axis)}: agrees)"
    return f"offset: {computed} (the Crop says {fmt_offsets(crop.written, crop.axis)}: MISMATCH)"


# -- the command ------------------------------------------------------------------------------------------------


def add_arguments(p):
    p.add_argument("net", help="net definition (.prototxt; a .caffemodel also works for the table)")
    p.add_argument("--from", dest="start", metavar="BLOB", help="start the paths at this blob")
    p.add_argument("--to", metavar="BLOB", help="show the path to this blob instead of the Crops'")
    p.add_argument("--all-layers", action="store_true", help="also list pointwise layers (identity maps)")
    p.add_argument("--format", choices=report.FORMATS, default="table", help="output format (default table)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true",
                      help="compare every Crop's offset with the computed one; exit 1 on any mismatch")
    mode.add_argument("--fix", metavar="OUT", help="write the net with computed Crop offsets to OUT")
    add_net_state_options(p, input_help="shape of an input blob, for the Pooling rounding notes (repeatable)")
    add_allow_python_layers_option(p)


def run(args):
    shapes = dict(args.input_shape) if args.input_shape else None
    kw = dict(phase=args.phase, level=args.level, stages=args.stage, input_shapes=shapes,
              allow_python_layers=args.allow_python_layers)
    if args.fix:
        changes = fix_file(args.net, args.fix, **kw)
        if changes:
            done = "; ".join(f"Crop '{n}' {fmt_offsets(old, axis)} -> {fmt_offsets(new, axis)}"
                             for n, axis, old, new in changes)
            print(f"wrote {args.fix}: {done}{_excluded(analyze(args.net, **kw), args.phase)}")
        else:
            print(f"wrote {args.fix}: every Crop offset was already right (an unchanged copy)"
                  f"{_excluded(analyze(args.net, **kw), args.phase)}")
        return 0
    a = analyze(args.net, start=args.start, **kw)
    if args.check:
        problems = [c.problem() for c in a.crops if not c.agrees]
        for line in problems:
            print(f"{args.net}: {printable(line)}")
        if not problems:
            print(f"{args.net}: {len(a.crops)} Crop offset(s) agree with the computed ones"
                  f"{_excluded(a, args.phase)}")
        return 1 if problems else 0
    print(render(a, sections(a, args.to, args.all_layers), args.format), end="")
    return 0


def _excluded(a, phase):
    if not a.excluded_crops:
        return ""
    return f" (not in phase {phase}, left alone: {', '.join(a.excluded_crops)}; see --phase)"

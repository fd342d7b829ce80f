"""Edit protobuf text (prototxt) in place: positions of fields, not a re-serialisation.

`tokenize(text)` splits protobuf text format into tokens with their character
positions (comments dropped); `parse_fields(tokens)` builds the tree of fields
and messages with the spans each covers.  The text helpers (_line_start,
_indent, _insert_lines, _unit, ...) compute edits -- (start, end, new text) --
that change a value or add fields while keeping comments, indentation and
layout, as `caffeish offsets --fix` does for Crop offsets.

Imports only caffeish.errors.
"""
import ast
import re

from caffeish.errors import CaffeishError

_TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<comment>\#[^\n]*)
  | (?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
  | (?P<word>[-+\w.]+)
  | (?P<punct>[{}<>\[\]:,;])
""", re.X)


class _Tok:
    def __init__(self, kind, text, start, end):
        self.kind, self.text, self.start, self.end = kind, text, start, end


class _Msg:
    def __init__(self, open_tok):
        self.open = open_tok
        self.close = None
        self.fields = []


class _Field:
    def __init__(self, name_tok):
        self.name = name_tok.text
        self.start = name_tok.start
        self.end = name_tok.end
        self.message = None  # a _Msg for message fields
        self.values = []  # value tokens (a list field has several)


def tokenize(text):
    """Protobuf text-format tokens with their character positions (comments dropped)."""
    toks, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            raise CaffeishError(f"cannot tokenize the prototxt at character {pos}: {text[pos:pos + 20]!r}")
        if m.lastgroup not in ("ws", "comment"):
            toks.append(_Tok(m.lastgroup, m.group(), m.start(), m.end()))
        pos = m.end()
    return toks


def parse_fields(toks, i=0, closer=None):
    """(fields, next index): the fields up to `closer` ('}' or '>'), as a tree with positions."""
    fields = []
    while i < len(toks) and toks[i].text != closer:
        tok = toks[i]
        if tok.kind != "word":
            raise CaffeishError(f"unexpected '{tok.text}' at character {tok.start} of the prototxt")
        field = _Field(tok)
        i += 1
        if i < len(toks) and toks[i].text == ":":
            i += 1
        if i >= len(toks):
            raise CaffeishError(f"field '{field.name}' has no value")
        tok = toks[i]
        if tok.text in ("{", "<"):
            field.message, i = _parse_message(toks, i)
            field.end = field.message.close.end
        elif tok.text == "[":
            i += 1
            while toks[i].text != "]":
                if toks[i].text in ("{", "<"):
                    msg, i = _parse_message(toks, i)
                    field.end = msg.close.end
                elif toks[i].text != ",":
                    field.values.append(toks[i])
                    i += 1
                else:
                    i += 1
            field.end = toks[i].end
            i += 1
        else:
            field.values.append(tok)
            i += 1
            while tok.kind == "string" and i < len(toks) and toks[i].kind == "string":  # "a" "b"
                field.values[-1] = _Tok("string", tok.text, tok.start, toks[i].end)
                i += 1
            field.end = field.values[-1].end
        if i < len(toks) and toks[i].text in (",", ";"):
            i += 1
        fields.append(field)
    return fields, i


def _parse_message(toks, i):
    msg = _Msg(toks[i])
    closer = "}" if toks[i].text == "{" else ">"
    msg.fields, i = parse_fields(toks, i + 1, closer)
    if i >= len(toks):
        raise CaffeishError(f"unclosed '{msg.open.text}' at character {msg.open.start} of the prototxt")
    msg.close = toks[i]
    return msg, i + 1


def _unquote(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text[1:-1]


def _line_start(text, pos):
    return text.rfind("\n", 0, pos) + 1


def _line_end(text, pos):
    end = text.find("\n", pos)
    return len(text) if end < 0 else end


def _indent(text, pos):
    start = _line_start(text, pos)
    line = text[start:_line_end(text, pos)]
    return line[:len(line) - len(line.lstrip())]


def _starts_line(text, pos):
    return not text[_line_start(text, pos):pos].strip()


def _same_line(text, a, b):
    return "\n" not in text[a:b]


def _insert_lines(text, msg, lines):
    """An edit adding `lines` (field texts) as the last fields of `msg`."""
    last = msg.fields[-1].end if msg.fields else msg.open.end
    if _same_line(text, last, msg.close.start):
        pos = msg.close.start
        pre = "" if text[pos - 1:pos].isspace() else " "
        return pos, pos, pre + " ".join(lines) + " "
    if msg.fields and _starts_line(text, msg.fields[-1].start):
        indent = _indent(text, msg.fields[-1].start)
    else:
        indent = _indent(text, msg.close.start) + "  "
    pos = _line_end(text, last)
    return pos, pos, "".join("\n" + indent + line for line in lines)


def _unit(text, msg, layer_indent):
    """The indentation step the file uses inside a layer (default two spaces)."""
    for f in msg.fields:
        if _starts_line(text, f.start):
            ind = _indent(text, f.start)
            if ind.startswith(layer_indent) and len(ind) > len(layer_indent):
                return ind[len(layer_indent):]
    return "  "


"""`caffeish upgrade OLD NEW`: write a legacy (V0/V1) prototxt or caffemodel in the current format.

The output has the same kind as the input (text for a prototxt, binary for a
caffemodel, judged by content); every change is listed on stdout.
"""
from caffeish import io
from caffeish.errors import CaffeishError


def upgrade_file(src, dst):
    """Upgrade `src` into `dst` (atomically); returns the list of changes."""
    if io.is_binary_file(src):
        model = io.read_caffemodel(src)
        io.write_caffemodel(dst, model.net, model.blobs, inputs=[src])
        return model.changes
    net, changes = io.read_prototxt(src)
    io.write_prototxt(dst, net, inputs=[src])
    return changes


def add_arguments(p):
    p.add_argument("src", help="legacy .prototxt or .caffemodel")
    p.add_argument("dst", help="where to write the upgraded file (never the input)")


def run(args):
    if args.src == args.dst:
        raise CaffeishError(f"{args.dst}: refusing to overwrite the input; give another output path")
    changes = upgrade_file(args.src, args.dst)
    for line in changes:
        print(line)
    print(f"wrote {args.dst}: {len(changes)} change(s)" if changes else
          f"wrote {args.dst}: already in the current format, nothing changed")
    return 0

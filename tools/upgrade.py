"""`caffeish upgrade OLD NEW`: write a legacy (V0/V1) prototxt or caffemodel in the current format.

The output has the same kind as the input (text for a prototxt, binary for a
caffemodel, judged by content); every change is listed on stdout.  A solver
prototxt is upgraded too (solver_type -> type), with the nets written inside it.
"""
from caffeish.formats import io
from caffeish.errors import CaffeishError, ParseError
from caffeish.formats.schema import pb
from caffeish.formats.upgrade import upgrade_net, upgrade_solver

SOLVER_NETS = ("net_param", "train_net_param")


def _upgrade_solver_file(src):
    solver, _ = io.read_prototxt(src, message=pb.SolverParameter())
    solver, changes = upgrade_solver(solver)
    nets = [(f, getattr(solver, f)) for f in SOLVER_NETS if solver.HasField(f)]
    nets += [(f"test_net_param[{i}]", n) for i, n in enumerate(solver.test_net_param)]
    for where, net in nets:
        upgraded, net_changes, _ = upgrade_net(net)
        net.CopyFrom(upgraded)
        changes += [f"{where}: {c}" for c in net_changes]
    return solver, changes


def upgrade_file(src, dst):
    """Upgrade `src` into `dst` (atomically); returns the list of changes."""
    if io.is_binary_file(src):
        model = io.read_caffemodel(src)
        io.write_caffemodel(dst, model.net, model.blobs, inputs=[src])
        return model.changes
    try:
        net, changes = io.read_prototxt(src)
    except ParseError as e:
        if "solver" not in str(e):
            raise
        net, changes = _upgrade_solver_file(src)
    if isinstance(net, pb.NetParameter):
        io.check_has_layers(net, src)  # an empty or comment-only file is not a net to upgrade
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
        print(io.printable(line))
    print(f"wrote {args.dst}: {len(changes)} change(s)" if changes else
          f"wrote {args.dst}: already in the current format, nothing changed")
    return 0

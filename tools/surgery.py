"""`caffeish surgery`: net surgery as checked commands (DIGITS' FCN-Alexnet recipe without a Caffe build).

    caffeish surgery convolutionalize IN.prototxt [IN.caffemodel] -o OUT.prototxt [OUT.caffemodel]
                     [--input-shape NAME=N,C,H,W] [--no-verify]
    caffeish surgery transplant SRC.prototxt SRC.caffemodel DST.prototxt -o OUT.caffemodel
                     [--map OLD=NEW ...] [--allow-partial]
    caffeish surgery bilinear NET.prototxt [WEIGHTS.caffemodel] -o OUT.caffemodel [--layers PATTERN]
                     [--form auto|caffe|diagonal]
    caffeish surgery fcn CLASSIFIER.prototxt [CLASSIFIER.caffemodel|none] --classes K -o OUT.prototxt [OUT.caffemodel]
                     [--skip pool4,pool3] [--pad 100] [--upscore-kernel N] [--keep-classes] [--dataset DIR]
                     [--mean FILE|none | --mean-value B,G,R] [--ignore-label N|none] [--train-val PATH]

convolutionalize: every InnerProduct becomes the equivalent Convolution (kernel =
its input's H x W, 1 x 1 after another InnerProduct), weights reshaped, Flatten/
Reshape layers that only fed them removed; then both nets run on one random
input and must agree within 1e-5 relative (--no-verify skips it).

transplant: copy parameters by layer name; equal element counts with other
shapes (fc -> conv) are reshaped; a count mismatch is an error naming the layer
and both shapes unless --allow-partial.  Destination layers with no source get
their fillers' values: the report names them, and a warning on stderr names
each whose weights stay at a constant filler (its outputs ignore its input).

bilinear: Deconvolution weights for bilinear upsampling, f = ceil(K/2),
c = (K-1)/(2f), w(y, x) = (1 - |x/f - c|)(1 - |y/f - c|); K = 4 gives the outer
product of [0.25 0.75 0.75 0.25].  --form caffe writes it into every (in, out)
slot (Caffe's filler; needs group = channels), diagonal into the (i, i) slots
(FCN's interp, for a dense deconvolution); auto picks by the blob's shape.

fcn: a segmentation FCN from a classifier (pad the first convolution,
convolutionalize, K-way score_fr, bilinear upscore with stride = the net's
stride, Crop with the computed offset; --skip for FCN-16s/8s), written as a
deploy net, a train/val net reading DATASET/train_db and val_db, and weights
(`none` for the classifier's weights: random ones from the layers' fillers,
--seed, for training from scratch).

Missing folders of the -o paths are created, as `segment -o` does.

Outputs: every output path is checked against every input and against the
other outputs before anything is computed (an output inside an input folder,
such as fcn's --dataset, is refused too); the files are then staged as
temporary files beside their destinations, all written and synced, and only
then renamed into place one after the other, so a refused or failed run leaves
no new file behind.  (Only a rename itself failing after an earlier one, which
a full disk cannot cause, would leave the earlier files in place.)
"""
import sys

from caffeish.apps import surgery
from caffeish.apps.surgery_files import (bilinear_file, convolutionalize_files, fcn_files, output_paths,
                                         transplant_file)
from caffeish.apps.surgery_fcn import UINT32_MAX
from caffeish.errors import CaffeishError
from caffeish.formats import io
from caffeish.tools import report
from caffeish.tools.options import (add_ignore_label_option, add_mean_options, input_shape_arg, int_arg,
                                    mean_from_args)

SEED = int_arg(0, 2**32 - 1)  # numpy's seeds are non-negative


def _common(p, shapes_help="shape of an input blob at the classifier's size, e.g. data=1,3,227,227 (repeatable)"):
    p.add_argument("--input-shape", action="append", type=input_shape_arg, default=[], metavar="NAME=N,C,H,W",
                   help=shapes_help)
    p.add_argument("--format", choices=report.FORMATS, default="table", help="output format (default table)")


def add_arguments(p):
    sub = p.add_subparsers(dest="operation", metavar="OPERATION")
    sub.required = True

    c = sub.add_parser("convolutionalize", help="turn InnerProduct layers into equivalent Convolutions")
    c.add_argument("net", help="classifier prototxt (V0/V1 upgraded)")
    c.add_argument("weights", nargs="?", help="its caffemodel (V0/V1 upgraded)")
    c.add_argument("-o", "--output", nargs="+", required=True, metavar="OUT",
                   help="OUT.prototxt [OUT.caffemodel] (the caffemodel defaults to OUT's name with .caffemodel)")
    c.add_argument("--no-verify", action="store_true", help="skip the equivalence check (faster)")
    c.add_argument("--seed", type=SEED, default=0, help="seed of the random check input (default 0)")
    _common(c)

    t = sub.add_parser("transplant", help="copy parameters by layer name, reshaping fc -> conv")
    t.add_argument("src_net", help="source prototxt")
    t.add_argument("src_weights", help="source caffemodel")
    t.add_argument("dst_net", help="destination prototxt")
    t.add_argument("-o", "--output", required=True, metavar="OUT.caffemodel", help="the destination's weights")
    t.add_argument("--map", action="append", default=[], metavar="OLD=NEW",
                   help="copy source layer OLD into destination layer NEW (repeatable)")
    t.add_argument("--allow-partial", action="store_true",
                   help="skip blobs whose element counts differ (they keep their fillers) instead of stopping")
    t.add_argument("--seed", type=SEED, default=0, help="seed of the random fillers (default 0)")
    _common(t, "shape of a destination input blob (repeatable)")

    b = sub.add_parser("bilinear", help="bilinear upsampling weights for Deconvolution layers")
    b.add_argument("net", help="prototxt")
    b.add_argument("weights", nargs="?", help="caffemodel whose other layers are kept")
    b.add_argument("-o", "--output", required=True, metavar="OUT.caffemodel")
    b.add_argument("--layers", action="append", default=[], metavar="PATTERN",
                   help="Deconvolution layer names or globs, comma-separated or repeated (default: all)")
    b.add_argument("--form", choices=surgery.FORMS, default="auto",
                   help="caffe: every (in, out) slot (group = channels); diagonal: (i, i) slots (dense); "
                        "auto (default): by the blob's shape")
    _common(b, "shape of an input blob (repeatable)")

    f = sub.add_parser("fcn", help="build a segmentation FCN (deploy + train/val + weights) from a classifier")
    f.add_argument("net", help="classifier prototxt (deploy)")
    f.add_argument("weights", nargs="?", help="classifier caffemodel (without it only the nets are written; "
                                              "'none': random weights from the layers' fillers, --seed)")
    f.add_argument("--classes", type=int_arg(1, UINT32_MAX), required=True, metavar="K",
                   help="number of segmentation classes")
    f.add_argument("-o", "--output", nargs="+", required=True, metavar="OUT",
                   help="OUT.prototxt (deploy) [OUT.caffemodel]")
    f.add_argument("--skip", default="", metavar="POOLS",
                   help="pool blobs to fuse, comma-separated (FCN-16s: pool4; FCN-8s: pool4,pool3)")
    f.add_argument("--pad", type=int_arg(0, UINT32_MAX), default=100,
                   help="pad of the first Convolution (default 100)")
    f.add_argument("--upscore-kernel", type=int_arg(1, UINT32_MAX), default=None, metavar="K",
                   help="kernel of the final upsampling (default 2S or 2S-1, whichever gives a whole crop offset)")
    f.add_argument("--keep-classes", action="store_true",
                   help="keep the classifier's weights for its first classes and add the new ones (expand_score)")
    f.add_argument("--dataset", default=None, metavar="DIR",
                   help="dataset folder the train/val net reads (DIR/train_db/features, ...; see caffeish dataset); "
                        "its mean (dataset.json: mean_file, else mean_value; --mean none for none) goes into the "
                        "Data layers, and a class count other than --classes is warned about")
    f.add_argument("--train-val", default=None, metavar="PATH",
                   help="train/val prototxt path (default: beside OUT, 'deploy' -> 'train_val')")
    f.add_argument("--batch-size", type=int_arg(1, UINT32_MAX), default=1, help="train/val batch size (default 1)")
    add_ignore_label_option(f, 255, "label ignored by the loss and accuracy (default 255; 'none' or -1 for none)")
    add_mean_options(f, "mean file of the train/val Data layers (default: the dataset's, see --dataset; 'none' "
                        "for no mean)", "per-channel mean values of the train/val Data layers, e.g. 104,117,123")
    f.add_argument("--no-mean", action="store_true", help="the same as --mean none")
    f.add_argument("--no-verify", action="store_true", help="skip the convolutionalize equivalence check")
    f.add_argument("--seed", type=SEED, default=0, help="seed of the random initialisations (default 0)")
    _common(f)


def _shapes(args):
    return dict(args.input_shape) if args.input_shape else None


def _human(fmt):
    """Notes, check tables and 'wrote ...' lines only in the human formats (not in json/csv)."""
    return fmt in ("table", "markdown")


def _print_report(rep, fmt, totals=None, extra=None):
    if fmt == "json":
        extra = dict(extra or {}, checks=rep.checks) if rep.checks else extra
    rows = rep.rows if fmt in ("json", "csv") else [io.printable_cells(r) for r in rep.rows]
    print(report.render(rep.columns, rows, fmt, totals=totals, notes=rep.notes if fmt == "json" else (),
                        extra=extra if fmt == "json" else None), end="")
    if _human(fmt):
        for note in rep.notes:
            print(f"note: {io.printable(note)}")


def _print_checks(rep, fmt):
    if not rep.checks or not _human(fmt):
        return
    rows = [dict(r, rel_diff="" if r["rel_diff"] is None else f"{r['rel_diff']:.2e}", ok="yes" if r["ok"] else "NO")
            for r in rep.checks]
    columns = [("blob", "blob"), ("classifier", "classifier"), ("converted", "converted"),
               ("rel_diff", "max rel diff"), ("ok", "agrees")]
    print(report.render(columns, rows, fmt), end="")


def run_convolutionalize(args):
    proto_out, model_out = output_paths(args.output, args.weights is not None, "input")
    rep = convolutionalize_files(args.net, args.weights, proto_out, model_out, input_shapes=_shapes(args),
                                 verify=not args.no_verify, seed=args.seed)
    _print_report(rep, args.format, totals={"layer": "total (net)", "params": rep.params_after})
    _print_checks(rep, args.format)
    if _human(args.format):
        print(f"wrote {proto_out}" + (f" and {model_out}" if model_out else ""))
    return 0


def _warn(lines):
    for line in lines:
        print(f"warning: {io.printable(line)}", file=sys.stderr)


def run_transplant(args):
    mapping = surgery.parse_map(args.map)
    rep = transplant_file(args.src_net, args.src_weights, args.dst_net, args.output, mapping=mapping,
                          allow_partial=args.allow_partial, input_shapes=_shapes(args), seed=args.seed)
    _warn(rep.warnings)
    _print_report(rep, args.format)
    if _human(args.format):
        print(f"wrote {args.output}")
    return 0


def run_bilinear(args):
    patterns = [p.strip() for item in args.layers for p in item.split(",") if p.strip()]
    rep = bilinear_file(args.net, args.weights, args.output, layers=patterns or None, form=args.form,
                        input_shapes=_shapes(args))
    _print_report(rep, args.format)
    if _human(args.format):
        print(f"wrote {args.output}")
    return 0


def run_fcn(args):
    proto_out, model_out = output_paths(args.output, args.weights is not None, "classifier")
    skips = [s for s in args.skip.split(",") if s.strip()]
    mean_file, mean_value, no_mean = mean_from_args(args)
    if args.no_mean and (mean_file or mean_value is not None):
        raise CaffeishError("--no-mean and a --mean/--mean-value: give one of them")
    random = args.weights is not None and args.weights.strip().lower() == "none"
    fcn, train_val_out = fcn_files(args.net, None if random else args.weights, proto_out, model_out,
                                   train_val_out=args.train_val, dataset=args.dataset, classes=args.classes,
                                   skips=skips, pad=args.pad, upscore_kernel=args.upscore_kernel,
                                   keep_classes=args.keep_classes, input_shapes=_shapes(args),
                                   verify=not args.no_verify, batch_size=args.batch_size,
                                   mean_file=None if no_mean or args.no_mean else mean_file or "auto",
                                   mean_value=mean_value, ignore_label=args.ignore_label, seed=args.seed,
                                   random_weights=random)
    _warn(fcn.warnings)
    if fcn.conv_report is not None and _human(args.format):
        _print_checks(fcn.conv_report, args.format)
        for note in fcn.conv_report.notes:
            print(f"note: {io.printable(note)}")
    conv = fcn.conv_report
    _print_report(fcn.report, args.format, extra={"convolutionalize": {"rows": conv.rows, "notes": conv.notes,
                                                                       "checks": conv.checks}} if conv else None)
    if _human(args.format):
        print(f"wrote {proto_out}, {train_val_out}" + (f" and {model_out}" if model_out else ""))
    return 0


RUNNERS = {
    "convolutionalize": run_convolutionalize,
    "transplant": run_transplant,
    "bilinear": run_bilinear,
    "fcn": run_fcn,
}


def run(args):
    return RUNNERS[args.operation](args)


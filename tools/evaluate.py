"""caffeish evaluate: run a net's TEST phase like `caffe test`, or score a segmentation net.

  caffeish evaluate NET.prototxt WEIGHTS [--iterations 50] [--db DATASET] [--gpu]
  caffeish evaluate segmentation NET.prototxt WEIGHTS [--db DATASET | --images DIR --labels DIR]
                    [--ignore-label N|none] [--mean FILE|none | --mean-value B,G,R] [--scale S]
                    [--format table|json|csv] [--confusion FILE.csv]

The command-line face: options, checks of the arguments and of --confusion
against every input before any work, and the results printed as a table,
markdown, JSON or CSV.  The confusion matrix is written only with --confusion
FILE.  What the two forms compute is caffeish.apps.evaluate (test_net,
evaluate_segmentation, write_confusion), callable from Python.  `evaluate segmentation ... --ray
[ADDRESS]` scores the --db or --images/--labels pairs on a Ray cluster and sums the workers'
confusion matrices (caffeish.apps.distributed): the same metrics.
"""
import sys

from caffeish.apps import distributed
from caffeish.apps.evaluate import (_label_range, evaluate_segmentation, segmentation_warnings, stage_databases,
                                    test_net, write_confusion)
from caffeish.apps.inference import terminated_as_exit
from caffeish.data import dataset_meta
from caffeish.errors import CaffeishError
from caffeish.formats import io
from caffeish.tools.options import (IGNORE_LABEL_FROM_NET, add_gpu_option, add_ignore_label_option, add_mean_options,
                                    add_ray_options, device_from_args, finite_float, mean_from_args, ray_from_args)
from caffeish.tools.report import FORMATS, render


def add_arguments(p):
    p.usage = "%(prog)s [segmentation] NET WEIGHTS [options]"
    p.add_argument("words", nargs="+", metavar="[segmentation] NET WEIGHTS",
                   help="the net (train/val or deploy prototxt) and its caffemodel; start with 'segmentation' "
                        "for segmentation metrics")
    p.add_argument("--iterations", type=int, default=None,
                   help="forward passes (caffe test: default 50; segmentation: one pass over the database)")
    p.add_argument("--db", metavar="DIR", help="a dataset folder (or a stage folder with features/ and labels/, "
                                              "or one LMDB) to read instead of the Data layers' sources")
    p.add_argument("--stage", action="append", default=None, help="net state stage (repeatable)")
    p.add_argument("--level", type=int, default=0, help="net state level (default 0)")
    add_gpu_option(p)
    seg = p.add_argument_group("segmentation")
    seg.add_argument("--images", metavar="DIR", help="folder of images (with --labels)")
    seg.add_argument("--labels", metavar="DIR", help="folder of label images, paired with --images by file stem")
    seg.add_argument("--color-map", metavar="FILE", help="DIGITS colour map for RGB label images")
    add_ignore_label_option(seg, IGNORE_LABEL_FROM_NET,
                            help="a label value not scored (default: the loss layer's ignore_label, else the "
                                 "dataset's; labels outside [0, classes) are never scored, as in score.py); "
                                 "'none' for none (-1 too)")
    seg.add_argument("--score", metavar="BLOB", help="the score blob (default: the loss or accuracy layer's "
                                                   "first bottom, else the net's one output)")
    seg.add_argument("--label", metavar="BLOB", help="the net's label blob (default: the loss layer's second bottom)")
    add_mean_options(seg, file_help="subtract this mean.binaryproto instead of the data layer's ('none': no mean; "
                                    "--mean-file is the same option). Default with --db and a deploy net: the "
                                    "dataset's mean (unless --mean-value or --scale is given)",
                     value_help="subtract these per-channel values instead of the data layer's mean")
    seg.add_argument("--scale", type=finite_float, help="multiply the input by this, after the mean (deploy nets)")
    seg.add_argument("--confusion", metavar="FILE.csv", default=None,
                     help="also write the confusion matrix to FILE as CSV (replaced if it exists; never an input, "
                          "nor inside an input folder such as the dataset: checked before evaluating). Without "
                          "it, no file is written ('none' is the same)")
    p.add_argument("--format", choices=FORMATS, default="table", help="output format (default table)")
    add_ray_options(p)


def run(args):
    words = list(args.words)
    segmentation = words[0] == "segmentation"
    if segmentation:
        words = words[1:]
    if len(words) != 2:
        form = "evaluate segmentation NET WEIGHTS" if segmentation else "evaluate NET WEIGHTS"
        raise CaffeishError(f"usage: caffeish {form} [options]; got {len(words)} positional argument(s)")
    net_path, weights = words
    device = device_from_args(args)
    cluster = ray_from_args(args)
    if cluster is not None and not segmentation:
        raise CaffeishError("--ray runs 'caffeish evaluate segmentation' (image/label pairs); caffe test's "
                            "iterations run without it")
    if segmentation:
        if bool(args.images) != bool(args.labels):
            raise CaffeishError("give --images and --labels together")
        if args.db and args.images:
            raise CaffeishError("give --db or --images/--labels, not both")
        confusion = args.confusion if (args.confusion or "none").lower() != "none" else None
        mean_file, mean_value, no_mean = mean_from_args(args)
        inputs = run_inputs(net_path, weights, args, mean_file) if confusion else []
        if confusion:  # never an input, nor inside an input folder (a dataset is never written into)
            io.check_outputs([("--confusion", confusion)], inputs)
        ignore = args.ignore_label
        ignore = None if ignore is IGNORE_LABEL_FROM_NET else -1 if ignore is None else ignore  # library: -1 none
        with terminated_as_exit():
            return _segmentation(args, net_path, weights, device, ignore, mean_file, mean_value, no_mean,
                                 confusion, inputs, cluster)
    result = test_net(net_path, weights, iterations=50 if args.iterations is None else args.iterations,
                      db=args.db, stages=args.stage, level=args.level, device=device)
    sys.stdout.write(format_test(result, args.format))
    return 0


def _segmentation(args, net_path, weights, device, ignore, mean_file, mean_value, no_mean, confusion, inputs,
                  cluster=None):
    """Evaluate, print the notes and warnings, write --confusion FILE, print the results."""
    common = dict(db=args.db, images=args.images, labels=args.labels, color_map=args.color_map,
                  ignore_label=ignore, score=args.score, label=args.label, stages=args.stage, level=args.level,
                  mean_value=None if mean_value is None else list(mean_value),
                  mean_file="none" if no_mean else mean_file, scale=args.scale)
    if cluster is None:
        result = evaluate_segmentation(net_path, weights, device=device, iterations=args.iterations, **common)
    else:  # the same metrics: the workers' confusion matrices summed
        result, ray_report = distributed.evaluate_segmentation(cluster, net_path, weights,
                                                               gpu=True if args.gpu is not None else None, **common)
        for line in ray_report.lines():
            print(f"caffeish evaluate: {line}", file=sys.stderr)
    for line in result.get("notes", ()):
        print(f"note: {io.printable(line)}", file=sys.stderr)
    for line in segmentation_warnings(result):
        print(f"warning: {io.printable(line)}", file=sys.stderr)
    if confusion:
        write_confusion(confusion, result, inputs=[path for _, path in inputs])
        if args.format in ("csv", "markdown"):  # table and json name it in their output
            print(f"confusion matrix: {confusion}", file=sys.stderr)
    sys.stdout.write(format_segmentation(result, args.format, confusion))
    return 0


def run_inputs(net_path, weights, args, mean_file=None):
    """Every file and folder a segmentation run reads, as (option, path) pairs: the net, the weights,
    --db (and the dataset folder holding it), --images, --labels, --color-map, --mean, and the
    net's own data sources (and their dataset folders) -- nothing may be written over or inside them."""
    pairs = [("NET", net_path), ("WEIGHTS", None if weights == "none" else weights), ("--db", args.db),
             ("--images", args.images), ("--labels", args.labels), ("--color-map", args.color_map),
             ("--mean", mean_file)]
    if args.db:
        root = dataset_meta.dataset_root(stage_databases(args.db)[0])
        pairs.append(("{} (the dataset of --db)", root))
    try:
        net = io.read_net(net_path)
    except CaffeishError:
        net = None  # evaluating says what is wrong with it
    for layer in net.layer if net is not None else ():
        sources = [layer.data_param.source, layer.image_data_param.source, layer.hdf5_data_param.source,
                   layer.transform_param.mean_file]
        for source in filter(None, sources):
            pairs.append((f"layer '{layer.name}'", source))
            if layer.type == "Data" and source == layer.data_param.source:
                pairs.append((f"{{}} (the dataset layer '{layer.name}' reads)", dataset_meta.dataset_root(source)))
    return [(option, path) for option, path in pairs if path]


def format_test(result, fmt):
    notes = [f"{name}: not a scalar (shape {shape}), not averaged" for name, shape in result["skipped"].items()]
    if fmt == "table":
        lines = [f"iterations: {result['iterations']}", f"Loss: {result['loss']:.6g}"]
        for r in result["outputs"]:
            line = f"{r['output']} = {r['mean']:.6g}"
            if r["loss_weight"]:
                line += f" (* {r['loss_weight']:g} = {r['loss_weight'] * r['mean']:.6g} loss)"
            lines.append(line)
        return "\n".join(lines + notes) + "\n"
    columns = [("output", "output"), ("mean", "mean"), ("loss_weight", "loss weight")]
    return render(columns, result["outputs"], fmt, notes=notes,
                  extra={"iterations": result["iterations"], "loss": result["loss"]})


def _unscored_detail(result):
    extra = result.get("out_of_range_pixels") or 0
    if not extra:
        return ""
    low, high = result["out_of_range_labels"]
    return (f" ({extra:,} of them with labels {_label_range(low, high)}, not classes of the "
            f"{len(result['classes'])}-channel score blob)")


def format_segmentation(result, fmt, confusion_path=None):
    """score.py's numbers: per-class rows, then the overall ones."""
    rows = [{k: c[k] for k in ("class", "name", "pixels", "accuracy", "iu")} for c in result["classes"]]
    rows += [
        {"class": "overall", "name": "pixel accuracy", "accuracy": result["pixel_accuracy"]},
        {"class": "mean", "name": "mean accuracy / mean IU", "accuracy": result["mean_accuracy"],
         "iu": result["mean_iu"]},
        {"class": "fw", "name": "frequency-weighted IU", "iu": result["fwavacc"]},
    ]
    if fmt == "json":
        doc = {k: v for k, v in result.items() if k != "confusion"}
        doc["confusion"] = result["confusion"].tolist()
        doc["confusion_csv"] = confusion_path
        import json

        return json.dumps(doc, indent=2) + "\n"
    if fmt in ("table", "markdown"):
        for r in rows:
            for k in ("accuracy", "iu"):
                if isinstance(r.get(k), float):
                    r[k] = f"{r[k]:.4f}"
    notes = []
    if fmt == "table":
        notes = [f"{result['images']:,} images; score blob '{result['score']}'"
                 + (f", label blob '{result['label']}'" if result["label"] else "")
                 + (f"; ignore label {result['ignore_label']}" if result["ignore_label"] is not None else "")
                 + f"; {result['ignored_pixels']:,} pixels not scored" + _unscored_detail(result)]
        if confusion_path:
            notes.append(f"confusion matrix: {confusion_path}")
    columns = [("class", "class"), ("name", "name"), ("pixels", "pixels"), ("accuracy", "accuracy"),
               ("iu", "IU")]
    return render(columns, rows, fmt, notes=notes)

"""caffeish dataset: build and inspect DIGITS-style LMDB datasets of Caffe Datums.

  caffeish dataset segmentation --images DIR --labels DIR -o OUT [--color-map FILE]
        [--class-names FILE [--allow-extra-classes]] [--ignore-label N|none]
        [--val-fraction 0.1 | --val-images DIR --val-labels DIR] [--resize WxH] [--encoding png|none]
  caffeish dataset classification --images DIR -o OUT [--resize WxH] [--val-fraction 0.1]
  caffeish dataset show DB [--dump N DIR]

The command-line face: options, and `show` rendered as a table, markdown,
JSON or CSV.  What the datasets hold, how they are built and checked, is
caffeish.apps.dataset (build_segmentation, build_classification,
inspect_dataset), callable from Python.
"""
import json
import sys

from caffeish.apps.dataset import (DEFAULT_IGNORE_LABEL, build_classification, build_segmentation,
                                   default_workers, format_summary, inspect_dataset)
from caffeish.errors import CaffeishError
from caffeish.formats.datum import ENCODINGS
from caffeish.formats.io import printable, printable_cells
from caffeish.tools.options import add_ignore_label_option, wxh_arg
from caffeish.tools.report import FORMATS, render


# ---------------------------------------------------------------------------- arguments


def fraction_arg(text):
    import argparse

    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"--val-fraction must be in [0, 1), got {text}")
    return value


def add_arguments(p):
    sub = p.add_subparsers(dest="dataset_command", metavar="COMMAND")
    sub.required = True
    seg = sub.add_parser("segmentation", help="images + label images -> DIGITS segmentation LMDBs",
                         description=build_segmentation.__doc__)
    seg.add_argument("--images", required=True, help="folder of input images")
    seg.add_argument("--labels", required=True, help="folder of label images (same file stems)")
    seg.add_argument("-o", "--output", required=True, help="dataset folder to create")
    seg.add_argument("--color-map", help='DIGITS colour map: one "R G B [name]" line per class')
    seg.add_argument("--class-names", help="class names, one per line (DIGITS' class labels file); a label value "
                                           "past them is an error naming it with its pixel count")
    seg.add_argument("--allow-extra-classes", action="store_true",
                     help="name label values past --class-names class5, class6, ... (a warning) instead of stopping")
    seg.add_argument("--val-fraction", type=fraction_arg, default=0.1,
                     help="share of the pairs that go to val_db (default 0.1; at least 1 pair when "
                          "above 0 and there are 2 or more)")
    seg.add_argument("--val-images", help="a separate folder of validation images")
    seg.add_argument("--val-labels", help="the label images of --val-images")
    add_ignore_label_option(seg, DEFAULT_IGNORE_LABEL, "a label value that is not a class (default 255, as PASCAL "
                                                       "VOC); 'none' (or -1) for none")
    _common_options(seg, default_encoding="png")
    cls = sub.add_parser("classification", help="one subfolder per class -> LMDBs, labels, mean",
                         description=build_classification.__doc__)
    cls.add_argument("--images", required=True, help="folder with one subfolder of images per class")
    cls.add_argument("-o", "--output", required=True, help="dataset folder to create")
    cls.add_argument("--val-fraction", type=fraction_arg, default=0.1,
                     help="share of the images that go to val_db (default 0.1; at least 1 image when "
                          "above 0 and there are 2 or more)")
    _common_options(cls, default_encoding="none")
    show = sub.add_parser("show", help="records, shapes, encodings, labels and class frequencies of a database",
                          description=show_dataset.__doc__)
    show.add_argument("db", metavar="DB", help="an LMDB database or a dataset folder")
    show.add_argument("--dump", nargs=2, metavar=("N", "DIR"),
                      help="write the first N records of each database as PNGs into DIR (labels colourized)")
    show.add_argument("--format", choices=FORMATS, default="table", help="output format (default table)")


def _common_options(p, default_encoding):
    p.add_argument("--resize", type=wxh_arg, metavar="WxH",
                   help="resize images to WIDTHxHEIGHT as convert_imageset (OpenCV bilinear), "
                        "label images with OpenCV's nearest neighbour")
    p.add_argument("--encoding", choices=ENCODINGS, default=default_encoding,
                   help=f"how records hold pixels: png/jpg-encoded or raw (none); default {default_encoding}")
    p.add_argument("--channels", type=int, choices=(1, 3), default=3,
                   help="3: colour (stored BGR, as Caffe), 1: greyscale (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffle and of the val split (default 0)")
    p.add_argument("--txn-records", type=int, default=256, help="records per LMDB transaction (default 256)")
    p.add_argument("--workers", type=int, default=None,
                   help=f"threads decoding and encoding images (default {default_workers()})")
    p.add_argument("--force", action="store_true",
                   help="replace OUT if it is an existing dataset folder (never one holding an input, "
                        "nor the current folder)")


def run(args):
    if args.dataset_command == "segmentation":
        if bool(args.val_images) != bool(args.val_labels):
            raise CaffeishError("give --val-images and --val-labels together")
        summary = build_segmentation(
            args.images, args.labels, args.output, color_map=args.color_map, class_names=args.class_names,
            val_fraction=args.val_fraction, val_images=args.val_images, val_labels=args.val_labels,
            resize=args.resize, encoding=args.encoding, channels=args.channels, seed=args.seed,
            ignore_label=args.ignore_label, txn_records=args.txn_records, force=args.force, workers=args.workers,
            allow_extra_classes=args.allow_extra_classes)
        for line in summary["warnings"]:
            print(f"warning: {printable(line)}", file=sys.stderr)
    elif args.dataset_command == "classification":
        summary = build_classification(
            args.images, args.output, val_fraction=args.val_fraction, resize=args.resize,
            encoding=args.encoding, channels=args.channels, seed=args.seed, txn_records=args.txn_records,
            force=args.force, workers=args.workers)
    else:
        dump = None
        if args.dump:
            try:
                dump = (int(args.dump[0]), args.dump[1])
            except ValueError:
                raise CaffeishError(f"--dump N DIR: N must be a number, got '{args.dump[0]}'") from None
        sys.stdout.write(show_dataset(args.db, dump=dump, fmt=args.format))
        return 0
    sys.stdout.write(format_summary(summary))
    return 0


# ---------------------------------------------------------------------------- show


def show_dataset(path, dump=None, fmt="table"):
    """Print each database's record count, shapes, encoding and label histogram; class frequencies
    (pixel shares) for label databases; with --dump N DIR, write sample images (labels colourized)."""
    report = inspect_dataset(path, dump)
    columns = [("db", "database"), ("records", "records"), ("shape", "shape (C x H x W)"),
               ("encoding", "encoding"), ("labels", "Datum labels")]
    if fmt == "json":
        return json.dumps(report, indent=2) + "\n"
    rows, class_rows, notes = report["databases"], report["class_frequencies"], report["notes"]
    if fmt != "csv":  # names from the dataset's files (labels.txt) reach the terminal escaped
        rows, class_rows = [printable_cells(r) for r in rows], [printable_cells(r) for r in class_rows]
        notes = [printable(n) for n in notes]
    text = render(columns, rows, fmt)
    if class_rows:
        text += "\nclass frequencies (label pixels)\n" if fmt == "table" else "\n"
        text += render([("db", "database"), ("class", "class"), ("name", "name"), ("pixels", "pixels"),
                        ("share", "share")], class_rows, fmt)
    if notes and fmt == "table":
        text += "\n" + "\n".join(notes) + "\n"
    return text


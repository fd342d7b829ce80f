"""`caffeish classify`: the top classes of images with a trained net, as Caffe's classify.py.

    caffeish classify deploy.prototxt weights.caffemodel cat.jpg photos/ [--labels synset_words.txt]
                      [--top-k 5] [--batch-size 16] [--format table|json|csv] [--blob prob]
                      [--mean mean.binaryproto | --mean-value 104,117,123] [--scale S] [--oversample] [--gpu]

Folders are searched recursively for images (files without an image extension
are skipped with a note).  Images are preprocessed as Caffe's Data layer
would (BGR, 0..255, minus the mean, times --scale; see caffeish/data/preprocess.py),
resized to the net input and batched.  The probabilities come from the last
Softmax (or --blob).  `--format json` writes JSON Lines, one object per image,
as each batch finishes.  An image that cannot be read or run is named on
stderr; the others go on (a batch that fails is run again image by image),
and the exit status is 1 with a count at the end; a failure of the net itself
(a blank image fails the same way) is said once and stops the run.  WEIGHTS
'none' with layers left at a constant weight filler is warned about.  --ray [ADDRESS] runs the same
batches through a pool of actors on a Ray cluster (caffeish.apps.distributed): the same output.
"""
import sys

from caffeish.apps import distributed
from caffeish.apps.classify import ResultWriter, classify_images, value_key_of
from caffeish.apps.inference import Classifier, constant_weight_warning, find_images, open_net
from caffeish.data import palette
from caffeish.errors import CaffeishError
from caffeish.tools import report
from caffeish.tools.options import (add_gpu_option, add_images_argument, add_preprocess_options, add_ray_options,
                                    device_from_args, int_arg, preprocess_from_args, ray_from_args)

FORMATS = ("table", "json", "csv")


def add_arguments(p):
    p.add_argument("net", metavar="NET.prototxt", help="deploy prototxt (an Input layer or input fields)")
    p.add_argument("weights", metavar="WEIGHTS", help="caffemodel, or 'none' for the layers' fillers (--seed)")
    add_images_argument(p)
    p.add_argument("--labels", metavar="FILE", help="class names, one per line (synset_words.txt, labels.txt)")
    p.add_argument("--top-k", type=int_arg(1), default=5, help="classes shown per image (default 5)")
    p.add_argument("--batch-size", type=int_arg(1), default=16,
                   help="images per forward pass (default 16)")
    p.add_argument("--format", choices=FORMATS, default="table",
                   help="table, json (JSON Lines: one object per image) or csv (default table)")
    p.add_argument("--blob", help="output blob to read (default: the last Softmax's top)")
    p.add_argument("--oversample", action="store_true",
                   help="average the 10 crops (corners, centre, mirrored) as Caffe's classify.py")
    p.add_argument("--seed", type=int_arg(0, 2**32 - 1), default=0,
                   help="filler seed when WEIGHTS is 'none'")
    add_preprocess_options(p)
    add_gpu_option(p)
    add_ray_options(p)


def run(args):
    cluster = ray_from_args(args)
    images, notes = find_images(args.images)
    for note in notes:
        print(f"caffeish classify: note: {note}", file=sys.stderr)
    if not images:
        raise CaffeishError("no images to classify in " + ", ".join(args.images))
    labels = palette.read_labels(args.labels) if args.labels else None
    spec = preprocess_from_args(args)
    weights = None if args.weights.lower() == "none" else args.weights
    net = open_net(args.net, weights, None if cluster else device_from_args(args), seed=args.seed)
    warning = constant_weight_warning(net, weights is not None)
    if warning:
        print(f"caffeish classify: warning: {warning}", file=sys.stderr)
    clf = Classifier(net, spec, args.blob, args.oversample)
    writer = ResultWriter(args.format, labels, value_key_of(clf))
    if cluster is None:
        failed = classify_images(clf, images, writer, args.batch_size, args.top_k)
    else:  # the same batches and results, from a pool of actors on a Ray cluster
        failed, ray_report = distributed.classify_images(
            cluster, args.net, weights, args.seed, spec, args.blob, args.oversample, images, writer, args.batch_size,
            args.top_k, gpu=True if args.gpu is not None else None)
        for line in ray_report.lines():
            print(f"caffeish classify: {line}", file=sys.stderr)
    if args.format == "table" and writer.table:
        writer.out.write(report.render(writer.columns, writer.table, "table"))
    if failed:
        print(f"caffeish classify: {failed} of {len(images)} images could not be classified (named above)",
              file=sys.stderr)
        return 1
    return 0

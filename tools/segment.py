"""`caffeish segment`: per-pixel classes of images with a fully convolutional net, as pictures.

    caffeish segment fcn.prototxt fcn.caffemodel photo.jpg photos/ -o OUTDIR
                     [--palette pascal|COLORMAP.txt|DATASET] [--labels labels.txt]
                     [--overlay 0.6] [--legend] [--npy] [--tile WxH | --max-memory 4G] [--gpu]

For each image the net is reshaped to the image's size, run forward, and the
argmax over the score blob's channels (the last Softmax, else 'score', else
the output of the input's size; or --blob) gives each pixel's class.  Written
to OUTDIR, mirroring the folders given:
  NAME.png          mode P PNG of class indices, colored by the palette (beyond
                    256 classes: a 16-bit gray PNG of the indices)
  NAME_overlay.png  the image blended with the class colors (--legend adds the
                    classes present, with their names and shares)
  NAME.npy          the raw scores, C x H x W float32 (--npy)
Palettes: PASCAL VOC's (its scheme continued past 256 classes), a DIGITS
color-map file (one 'R G B' line per class) or a dataset folder's palette.txt
(and labels.txt).  Images whose blobs would pass --max-memory are run in tiles
that give exactly the untiled classes.  Each tile carries the net's receptive-field
margin, so a --tile too small for the net (costing more than twice the untiled
work) is refused with the smallest sensible size; a bar shows the tiles.
Everything is written to a temporary folder first and moved into OUTDIR at the
end, so OUTDIR never holds a half-written run; input files are never replaced.
Output names never collide (a.png and a_overlay.png: the second is written as
a_overlay_png.png and a_overlay_png_overlay.png).  OUTDIR is never searched
for images, and it gets a hidden marker file, .caffeish-segment (unless it
holds input images): folders holding it are skipped when searching folders,
so pictures written inside an input folder are never taken for photos.
An image that cannot be read or run (a bad file, a size the net refuses) is
named on stderr, the others go on, and the exit status is 1 with a count at
the end; a failure of the net itself is said once and stops the run.  WEIGHTS
'none' with layers left at a constant weight filler is warned about.  Ctrl-C
and SIGTERM leave OUTDIR as it was.  --resume skips the images whose outputs all exist in OUTDIR.
--ray [ADDRESS] runs the images through a pool of actors on a Ray cluster (caffeish.apps.distributed):
the same files, each renamed into place as it is written (so an interrupted run is continued with
--resume), and a summary on stderr.
"""
import sys
import time

from caffeish.apps.inference import (DEFAULT_MAX_MEMORY, Segmenter, constant_weight_warning, find_images, open_net,
                                     terminated_as_exit)
from caffeish.apps import distributed
from caffeish.apps.segment import STAGES, check_outdir, segment_images
from caffeish.data import palette as palettes
from caffeish.errors import CaffeishError
from caffeish.tools import report
from caffeish.tools.options import (add_gpu_option, add_images_argument, add_preprocess_options, add_ray_options,
                                    device_from_args, finite_float, int_arg, preprocess_from_args, ray_from_args)
from caffeish.tools.report import FORMATS
from caffeish.values import parse_wxh


def add_arguments(p):
    p.add_argument("net", metavar="NET.prototxt", help="fully convolutional deploy prototxt")
    p.add_argument("weights", metavar="WEIGHTS", help="caffemodel, or 'none' for the layers' fillers (--seed)")
    add_images_argument(p)
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="folder for the pictures")
    p.add_argument("--palette", default="pascal", metavar="pascal|FILE|DATASET",
                   help="class colors: 'pascal' (default), a DIGITS color-map file, or a dataset folder")
    p.add_argument("--labels", metavar="FILE", help="class names, one per line (default: the dataset's)")
    p.add_argument("--overlay", type=finite_float, default=0.6, metavar="ALPHA",
                   help="opacity of the class colors in NAME_overlay.png (default 0.6; 0: no overlay)")
    p.add_argument("--legend", action="store_true", help="add a legend of the classes present to the overlay")
    p.add_argument("--npy", action="store_true", help="also write the raw scores as NAME.npy (C x H x W)")
    p.add_argument("--blob", help="score blob (default: last Softmax, else 'score', else the output "
                                  "of the input's size)")
    p.add_argument("--tile", metavar="WxH", help="run in tiles of WxH input pixels (same result as untiled; "
                                                 "refused when too small for the net's receptive field)")
    p.add_argument("--max-memory", default=None, metavar="SIZE",
                   help=f"tile images whose blobs would pass SIZE (default {DEFAULT_MAX_MEMORY >> 30}G)")
    p.add_argument("--seed", type=int_arg(0, 2**32 - 1), default=0,
                   help="filler seed when WEIGHTS is 'none'")
    p.add_argument("--timings", action="store_true",
                   help="print the time spent in decode, preprocess, forward, argmax and write on stderr")
    p.add_argument("--format", choices=FORMATS, default="table", help="summary format (default table)")
    add_preprocess_options(p, keep_size=True)
    add_gpu_option(p)
    add_ray_options(p, resume=True)


def run(args):
    cluster = ray_from_args(args)
    check_outdir(args.output)
    images, notes = find_images(args.images, exclude=[args.output])
    for note in notes:
        print(f"caffeish segment: note: {note}", file=sys.stderr)
    if not images:
        raise CaffeishError("no images to segment in " + ", ".join(args.images))
    if not 0 <= args.overlay <= 1:
        raise CaffeishError(f"--overlay is an opacity between 0 and 1, got {args.overlay}")
    labels = palettes.read_labels(args.labels) if args.labels else None
    spec = preprocess_from_args(args, keep_size=True)
    tile = parse_wxh(args.tile, "--tile")[::-1] if args.tile else None  # (height, width)
    weights = None if args.weights.lower() == "none" else args.weights
    t0 = time.perf_counter()
    net = open_net(args.net, weights, None if cluster else device_from_args(args), seed=args.seed)
    warning = constant_weight_warning(net, weights is not None)
    if warning:
        print(f"caffeish segment: warning: {warning}", file=sys.stderr)
    seg = Segmenter(net, spec, args.blob, tile, args.max_memory,
                    warn=lambda message: print(f"caffeish segment: note: {message}", file=sys.stderr))
    if tile is not None:  # a tile too small for the net: refused before any image runs
        seg.score_blob(tile)
        seg.check_tile()
    setup = time.perf_counter() - t0
    with terminated_as_exit():
        if cluster is None:
            rows, failed, seconds = segment_images(seg, images, args.output, args.palette, labels, args.overlay,
                                                   args.legend, args.npy, resume=args.resume)
        else:  # the same outputs, from a pool of actors on a Ray cluster
            rows, failed, seconds, ray_report = distributed.segment_images(
                cluster, args.net, weights, args.seed, spec, args.blob, tile, args.max_memory, images, args.output,
                args.palette, labels, args.overlay, args.legend, args.npy, args.resume,
                gpu=True if args.gpu is not None else None)
            for line in ray_report.lines() if ray_report else ():
                print(f"caffeish segment: {line}", file=sys.stderr)
    columns = [("image", "image"), ("size", "size"), ("classes", "classes present"), ("outputs", "outputs")]
    sys.stdout.write(report.render(columns, rows, args.format))
    if args.timings:
        total = sum(seconds.values())
        print(f"timing: setup {setup:.3f} s (net build, not counted below)", file=sys.stderr)
        for stage in STAGES:
            share = 100.0 * seconds[stage] / total if total else 0.0
            print(f"timing: {stage} {seconds[stage]:.3f} s ({share:.1f}%)", file=sys.stderr)
        done = len(rows)
        rate = done / total if total else 0.0
        print(f"timing: total {total:.3f} s for {done} images ({rate:.3f} images/s), overhead "
              f"{100.0 * (total - seconds['forward']) / total if total else 0.0:.1f}%", file=sys.stderr)
    if failed:
        print(f"caffeish segment: {failed} of {len(images)} images could not be segmented (named above)",
              file=sys.stderr)
        return 1
    return 0

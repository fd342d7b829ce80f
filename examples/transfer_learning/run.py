"""Transfer learning for segmentation, at a size a laptop trains in minutes (the DIGITS
semantic-segmentation tutorial's finding: FCN-Alexnet from scratch ~35% pixel accuracy on
SYNTHIA, from ImageNet weights over 90%).

    python examples/transfer_learning/run.py --out OUT [--quick] [--iterations N] [--lr LR]
                                             [--fillers alexnet|msra] [--seed S] [--force]

Everything after the world's generation goes through the `caffeish` command line, as a user
would type it (each command and its log are in OUT/logs/):

1. world.py draws a small synthetic street world (sky, road, building, car, pedestrian):
   train and val scenes with palette label PNGs, and square crops of other scenes, one folder
   per class (labelled by the crop's centre pixel).
2. `caffeish dataset segmentation` (scenes) and `caffeish dataset classification` (crops).
3. A mini AlexNet (3 Convolution/ReLU/Pooling blocks, then fc6, fc7, fc8 InnerProducts with
   Dropout) pretrained on the crops with `caffeish train`; its val accuracy by `caffeish evaluate`.
4. `caffeish surgery fcn` turns it into an FCN twice: (a) `none` as the weights (every layer's
   fillers, --seed: training from scratch) and (b) the pretrained classifier's weights.
5. One solver file (SGD, fixed lr, momentum 0.9, weight decay) trains both with `caffeish train`,
   run from each FCN's folder, on the train/val net surgery wrote, unedited.
6. `caffeish evaluate segmentation --format json` scores the weights before and after training
   on the val scenes; OUT/comparison.png draws both runs' curves (from their curves.csv);
   OUT/results.json and OUT/results.md hold the numbers, and the table is printed.
7. `caffeish segment` on four val scenes with both nets: OUT/examples.png (image, ground truth, (a), (b)).

A stage that fails stops the run with its command's log (exit status 1).
"""
import argparse
import csv
import json
import math
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import world

# The two sizes.  Full: a few minutes on 2 CPU cores; quick: seconds (CI).
CONFIGS = {
    "full": {"train_scenes": 300, "val_scenes": 60, "crops_per_class": 1000, "cls_iterations": 1000,
             "cls_batch": 64, "cls_lr": 0.001, "iterations": 1000, "test_interval": 100, "lr": 1e-7},
    "quick": {"train_scenes": 8, "val_scenes": 3, "crops_per_class": 24, "cls_iterations": 20,
              "cls_batch": 16, "cls_lr": 0.001, "iterations": 20, "test_interval": 10, "lr": 1e-7},
}
FCN_PAD = 16  # enough for this classifier's receptive field (AlexNet's FCN uses 100): crop offset 2


class StageError(RuntimeError):
    pass


class Runner:
    """Runs `caffeish ...` commands, logging each to OUT/logs/NN_name.log."""

    def __init__(self, out, verbose=False):
        self.out = out
        self.logs = os.path.join(out, "logs")
        os.makedirs(self.logs, exist_ok=True)
        self.count = 0
        self.verbose = verbose
        self.exe = self._find_caffeish()
        self.commands = []

    @staticmethod
    def _find_caffeish():
        beside = os.path.join(os.path.dirname(sys.executable), "caffeish")  # the same environment
        found = beside if os.path.isfile(beside) else shutil.which("caffeish")
        if not found:
            raise StageError("the `caffeish` command is not on PATH (pip install caffeish, or activate its venv)")
        return found

    def __call__(self, name, args, cwd=None, stdout_json=False):
        self.count += 1
        log = os.path.join(self.logs, f"{self.count:02d}_{name}.log")
        shown = "caffeish " + " ".join(_quote(a) for a in args)
        where = f" (in {os.path.relpath(cwd, self.out)})" if cwd else ""
        self.commands.append({"stage": name, "cwd": os.path.relpath(cwd, self.out) if cwd else ".", "command": shown})
        print(f"[{name}] {shown}{where}", flush=True)
        start = time.monotonic()
        with open(log, "w", encoding="utf-8") as f:
            f.write(f"$ {shown}{where}\n")
            f.flush()
            proc = subprocess.run([self.exe, *args], cwd=cwd or self.out, stdout=subprocess.PIPE, check=False,
                                  stderr=subprocess.STDOUT if not stdout_json else f, text=True)
            f.write(proc.stdout if not stdout_json else "")
        seconds = time.monotonic() - start
        if proc.returncode != 0:
            with open(log, encoding="utf-8") as f:
                tail = f.read()[-3000:]
            raise StageError(f"[{name}] failed (exit {proc.returncode}); {log}:\n{tail}")
        if self.verbose and not stdout_json:
            print(proc.stdout)
        return proc.stdout, seconds


def _quote(arg):
    return arg if arg and all(c.isalnum() or c in "-_./=,:" for c in arg) else repr(arg)


# ---------------------------------------------------------------------------- the classifier


# Two sets of initial weights (the fillers `surgery fcn ... none` also uses for training from scratch):
# "alexnet": BVLC AlexNet's (gaussian 0.01 convolutions, 0.005 fc6/fc7, 0.01 fc8, biases 0 or 0.1), as in
# the seed's FCN-Alexnet; "msra": He/Glorot scaling (conv1's gaussian sized for 0..255 pixels less the
# mean, msra convolutions, xavier fc6/fc7), which keeps every layer's outputs near unit scale.
FILLERS = {
    "alexnet": {"conv1": (0.01, 0), "conv2": (0.01, 0.1), "conv3": (0.01, 0.1),
                "fc6": (0.005, 0.1), "fc7": (0.005, 0.1), "fc8": (0.01, 0)},
    "msra": {"conv1": (0.003, 0), "conv2": ("msra", 0), "conv3": ("msra", 0),
             "fc6": ("xavier", 0), "fc7": ("xavier", 0), "fc8": (0.01, 0)},
}


def _filler(spec):
    weight, bias = spec
    w = f'type: "{weight}"' if isinstance(weight, str) else f'type: "gaussian" std: {weight:g}'
    return f"weight_filler {{ {w} }}\n    bias_filler {{ type: \"constant\" value: {bias:g} }}"


def _conv(name, bottom, outputs, kernel, pad, filler):
    return f"""layer {{
  name: "{name}"  type: "Convolution"  bottom: "{bottom}"  top: "{name}"
  param {{ lr_mult: 1 decay_mult: 1 }}
  param {{ lr_mult: 2 decay_mult: 0 }}
  convolution_param {{
    num_output: {outputs}  kernel_size: {kernel}  pad: {pad}  stride: 1
    {_filler(filler)}
  }}
}}
layer {{ name: "relu_{name}"  type: "ReLU"  bottom: "{name}"  top: "{name}" }}
"""


def _pool(name, bottom):
    return f"""layer {{
  name: "{name}"  type: "Pooling"  bottom: "{bottom}"  top: "{name}"
  pooling_param {{ pool: MAX  kernel_size: 3  stride: 2 }}
}}
"""


def _fc(name, bottom, outputs, filler, relu_dropout=True):
    text = f"""layer {{
  name: "{name}"  type: "InnerProduct"  bottom: "{bottom}"  top: "{name}"
  param {{ lr_mult: 1 decay_mult: 1 }}
  param {{ lr_mult: 2 decay_mult: 0 }}
  inner_product_param {{
    num_output: {outputs}
    {_filler(filler)}
  }}
}}
"""
    if relu_dropout:
        text += (f'layer {{ name: "relu_{name}"  type: "ReLU"  bottom: "{name}"  top: "{name}" }}\n'
                 f'layer {{ name: "drop_{name}"  type: "Dropout"  bottom: "{name}"  top: "{name}"\n'
                 f'  dropout_param {{ dropout_ratio: 0.5 }} }}\n')
    return text


def classifier_body(classes, fillers="alexnet"):
    """A mini AlexNet for 32x32 crops of 0..255 BGR pixels less the mean (Caffe's convention, so that
    the FCN's Data layers, which take the dataset's mean and no scale, feed it what it learned on):
    three Convolution/ReLU/MAX-Pooling blocks (16, 32, 64 channels; stride 8 in all), then fc6, fc7
    (128, ReLU, Dropout) and fc8 (the classes) InnerProducts."""
    f = FILLERS[fillers]
    return (_conv("conv1", "data", 16, 5, 2, f["conv1"]) + _pool("pool1", "conv1")
            + _conv("conv2", "pool1", 32, 5, 2, f["conv2"]) + _pool("pool2", "conv2")
            + _conv("conv3", "pool2", 64, 3, 1, f["conv3"]) + _pool("pool3", "conv3")
            + _fc("fc6", "pool3", 128, f["fc6"])
            + _fc("fc7", "fc6", 128, f["fc7"])
            + _fc("fc8", "fc7", classes, f["fc8"], relu_dropout=False))


def classifier_deploy(classes, size, fillers):
    return (f'name: "street_classifier"\n'
            f'layer {{ name: "data"  type: "Input"  top: "data"\n'
            f'  input_param {{ shape {{ dim: 1 dim: 3 dim: {size} dim: {size} }} }} }}\n'
            + classifier_body(classes, fillers)
            + 'layer { name: "prob"  type: "Softmax"  bottom: "fc8"  top: "prob" }\n')


def classifier_train_val(classes, dataset, train_batch, val_batch, fillers):
    data = ""
    for phase, db, batch, mirror in (("TRAIN", "train_db", train_batch, "true"), ("TEST", "val_db", val_batch, "false")):
        data += f"""layer {{
  name: "data"  type: "Data"  top: "data"  top: "label"
  include {{ phase: {phase} }}
  transform_param {{ mean_file: "{os.path.join(dataset, 'mean.binaryproto')}"  mirror: {mirror} }}
  data_param {{ source: "{os.path.join(dataset, db)}"  batch_size: {batch}  backend: LMDB }}
}}
"""
    return ('name: "street_classifier"\n' + data + classifier_body(classes, fillers)
            + 'layer { name: "loss"  type: "SoftmaxWithLoss"  bottom: "fc8"  bottom: "label"  top: "loss" }\n'
            + 'layer { name: "accuracy"  type: "Accuracy"  bottom: "fc8"  bottom: "label"  top: "accuracy"\n'
            + '  include { phase: TEST } }\n')


def solver_text(net, lr, iterations, test_iter, test_interval, prefix, seed, display, average_loss=1, type_="SGD"):
    extra = "momentum2: 0.999\n" if type_ == "Adam" else ""
    return f"""net: "{net}"
test_iter: {test_iter}
test_interval: {test_interval}
test_initialization: true
type: "{type_}"
base_lr: {lr:g}
lr_policy: "fixed"
momentum: 0.9
{extra}weight_decay: 0.0005
display: {display}
average_loss: {average_loss}
max_iter: {iterations}
snapshot: {iterations}
snapshot_prefix: "{prefix}"
random_seed: {seed}
"""


# ---------------------------------------------------------------------------- results


def read_curves(path):
    """{column: [(iteration, value)]} of a curves.csv."""
    series = {}
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            it = int(row["iteration"])
            for key, value in row.items():
                if key != "iteration" and value not in ("", None):
                    series.setdefault(key, []).append((it, float(value)))
    return series


def plot(runs, path, pixels, title):
    """Both runs' train loss (per pixel) and val pixel accuracy in one PNG (Figure + Agg, no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.6), dpi=100)
    FigureCanvasAgg(fig)
    ax_loss, ax_acc = fig.subplots(1, 2)
    for (label, series), color in zip(runs, ("C3", "C0")):
        loss = [(i, v / pixels) for i, v in series.get("train_loss", []) if math.isfinite(v)]
        if loss:
            ax_loss.plot(*zip(*loss), color=color, linewidth=1.0, label=label)
        acc = [(i, v) for i, v in series.get("test_accuracy", []) if math.isfinite(v)]
        if acc:
            ax_acc.plot(*zip(*acc), "o-", color=color, markersize=4, label=label)
    ax_loss.set_title("train loss (SoftmaxWithLoss per pixel, smoothed)")
    ax_loss.set_xlabel("iteration")
    ax_loss.set_yscale("log")
    ax_acc.set_title("val pixel accuracy (Accuracy layer, test passes)")
    ax_acc.set_xlabel("iteration")
    ax_acc.set_ylim(0, 1)
    for ax in (ax_loss, ax_acc):
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, format="png")


def examples(path, names, images, labels, predictions, scale=2):
    """A grid: one row per scene, columns image | ground truth | (a) | (b) (palette PNGs as colours)."""
    from PIL import Image

    tiles = []
    for name in names:
        row = [Image.open(os.path.join(images, name)).convert("RGB"),
               Image.open(os.path.join(labels, name)).convert("RGB")]
        row += [Image.open(os.path.join(folder, os.path.splitext(name)[0] + ".png")).convert("RGB")
                for folder in predictions]
        tiles.append(row)
    w, h = tiles[0][0].size
    gap = 4
    grid = Image.new("RGB", (len(tiles[0]) * (w + gap) - gap, len(tiles) * (h + gap) - gap), (255, 255, 255))
    for i, row in enumerate(tiles):
        for j, tile in enumerate(row):
            grid.paste(tile, (j * (w + gap), i * (h + gap)))
    grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST).save(path)


def markdown_table(results):
    rows = ["| run | pixel accuracy | mean IU | before training (pixel acc. / mean IU) | iterations | train time |",
            "|---|---|---|---|---|---|"]
    for key in ("scratch", "transfer"):
        r = results["runs"][key]
        rows.append(f"| {r['label']} | {r['pixel_accuracy']:.3f} | {r['mean_iu']:.3f} | "
                    f"{r['initial']['pixel_accuracy']:.3f} / {r['initial']['mean_iu']:.3f} | "
                    f"{r['iterations']} | {r['train_seconds']:.0f} s |")
    return "\n".join(rows)


# ---------------------------------------------------------------------------- the experiment


def main(argv=None):
    p = argparse.ArgumentParser(description="FCN from scratch vs transfer learning on a synthetic street world")
    p.add_argument("--out", required=True, help="output folder (made; must be empty or absent)")
    p.add_argument("--quick", action="store_true", help="a tiny run (seconds), for CI")
    p.add_argument("--iterations", type=int, default=None, help="FCN training iterations (both runs)")
    p.add_argument("--lr", type=float, default=None, help="the FCN solver's base_lr (both runs)")
    p.add_argument("--fillers", choices=sorted(FILLERS), default="alexnet",
                   help="the classifier's fillers, which the from-scratch FCN starts from (default alexnet)")
    p.add_argument("--seed", type=int, default=0, help="seed of the world, datasets, fillers and solvers")
    p.add_argument("--force", action="store_true", help="replace an existing OUT")
    args = p.parse_args(argv)
    cfg = dict(CONFIGS["quick" if args.quick else "full"])
    if args.iterations is not None:
        if args.iterations < 1:
            p.error("--iterations must be at least 1")
        cfg["iterations"] = args.iterations
        cfg["test_interval"] = min(cfg["test_interval"], args.iterations)
    if args.lr is not None:
        cfg["lr"] = args.lr
    out = os.path.abspath(args.out)
    if os.path.exists(out) and os.listdir(out):
        if not args.force:
            p.error(f"{out} exists and is not empty (--force replaces it)")
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
    try:
        results = experiment(out, cfg, args.seed, "quick" if args.quick else "full", args.fillers)
    except StageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print()
    print(results["table"])
    print(f"\nwrote {out}/results.json, results.md, comparison.png, examples.png "
          f"({results['wall_seconds']:.0f} s in all)")
    return 0


def experiment(out, cfg, seed, size, fillers="alexnet"):
    t0 = time.monotonic()
    run = Runner(out)
    seed_s = str(seed)
    classes = len(world.CLASSES)
    crop = 32

    # 1. the world
    start = time.monotonic()
    world_dir = os.path.join(out, "world")
    info = world.generate(world_dir, cfg["train_scenes"], cfg["val_scenes"], cfg["crops_per_class"], seed, crop)
    print(f"[world] {cfg['train_scenes']} train + {cfg['val_scenes']} val scenes (128x96), "
          f"{cfg['crops_per_class']} crops per class ({time.monotonic() - start:.1f} s); pixel shares "
          + ", ".join(f"{k} {v:.1%}" for k, v in info["pixel_shares"].items()), flush=True)

    # 2. datasets
    seg = os.path.join(out, "datasets", "street")
    crops = os.path.join(out, "datasets", "crops")
    os.makedirs(os.path.dirname(seg))
    run("dataset_segmentation", ["dataset", "segmentation",
                                 "--images", os.path.join(world_dir, "train", "images"),
                                 "--labels", os.path.join(world_dir, "train", "labels"),
                                 "--val-images", os.path.join(world_dir, "val", "images"),
                                 "--val-labels", os.path.join(world_dir, "val", "labels"),
                                 "--class-names", os.path.join(world_dir, "classes.txt"),
                                 "--seed", seed_s, "-o", seg])
    run("dataset_classification", ["dataset", "classification", "--images", os.path.join(world_dir, "crops"),
                                   "--val-fraction", "0.1", "--seed", seed_s, "-o", crops])
    with open(os.path.join(crops, "dataset.json"), encoding="utf-8") as f:
        crop_meta = json.load(f)
    crop_val = crop_meta["splits"]["val"]["records"]

    # 3. the classifier, pretrained on the crops
    cls_dir = os.path.join(out, "classifier")
    os.makedirs(os.path.join(cls_dir, "snapshots"))
    deploy = os.path.join(cls_dir, "classifier.deploy.prototxt")
    train_val = os.path.join(cls_dir, "classifier.train_val.prototxt")
    with open(deploy, "w", encoding="utf-8") as f:
        f.write(classifier_deploy(classes, crop, fillers))
    val_batch = min(100, crop_val)
    val_iters = math.ceil(crop_val / val_batch)  # the last batch wraps around, as Caffe's Data layer does
    with open(train_val, "w", encoding="utf-8") as f:
        f.write(classifier_train_val(classes, crops, cfg["cls_batch"], val_batch, fillers))
    cls_iters = cfg["cls_iterations"]
    with open(os.path.join(cls_dir, "solver.prototxt"), "w", encoding="utf-8") as f:
        f.write(solver_text("classifier.train_val.prototxt", cfg["cls_lr"], cls_iters, val_iters,
                            max(cls_iters // 5, 1), "snapshots/classifier", seed, max(cls_iters // 30, 1),
                            type_="Adam"))
    _, cls_seconds = run("train_classifier", ["train", "--solver", "solver.prototxt", "-o", "."], cwd=cls_dir)
    cls_weights = os.path.join(cls_dir, "snapshots", f"classifier_iter_{cls_iters}.caffemodel")
    text, _ = run("evaluate_classifier", ["evaluate", train_val, cls_weights,
                                          "--iterations", str(val_iters)])
    cls_accuracy = next(float(line.split("=")[1]) for line in text.splitlines() if line.startswith("accuracy ="))
    print(f"  classifier: val accuracy {cls_accuracy:.3f} on {crop_val} crops after {cls_iters} iterations "
          f"({cls_seconds:.0f} s)", flush=True)

    # 4. surgery: (a) from scratch, (b) the transplanted classifier
    runs = {"scratch": {"label": "(a) from scratch", "weights": "none"},
            "transfer": {"label": "(b) transfer learning", "weights": cls_weights}}
    for key, r in runs.items():
        folder = os.path.join(out, f"fcn_{key}")
        r["folder"] = folder
        r["deploy"] = os.path.join(folder, "fcn.deploy.prototxt")
        r["init"] = os.path.join(folder, "fcn.caffemodel")
        run(f"surgery_{key}", ["surgery", "fcn", deploy, r["weights"], "--classes", str(classes),
                               "--dataset", seg, "--pad", str(FCN_PAD), "--seed", seed_s,
                               "-o", r["deploy"], r["init"],
                               "--train-val", os.path.join(folder, "fcn.train_val.prototxt")])
        os.makedirs(os.path.join(folder, "snapshots"))

    # 5. one solver for both (paths relative to the run's folder, as `caffe train` reads them)
    iters = cfg["iterations"]
    solver = os.path.join(out, "fcn_solver.prototxt")
    with open(solver, "w", encoding="utf-8") as f:
        f.write(solver_text("fcn.train_val.prototxt", cfg["lr"], iters, cfg["val_scenes"], cfg["test_interval"],
                            "snapshots/fcn", seed, max(iters // 50, 1), average_loss=max(min(iters // 50, 20), 1)))
    for key, r in runs.items():
        _, r["train_seconds"] = run(f"train_{key}", ["train", "--solver", "../fcn_solver.prototxt",
                                                     "--weights", "fcn.caffemodel", "-o", "."], cwd=r["folder"])
        r["final"] = os.path.join(r["folder"], "snapshots", f"fcn_iter_{iters}.caffemodel")

    # 6. scores before and after training on the val scenes
    for key, r in runs.items():
        for when, weights in (("initial", r["init"]), ("after", r["final"])):
            text, _ = run(f"evaluate_{key}_{when}", ["evaluate", "segmentation", r["deploy"], weights,
                                                     "--db", seg, "--format", "json"], stdout_json=True)
            scores = json.loads(text)
            r[when] = {k: scores[k] for k in ("pixel_accuracy", "mean_accuracy", "mean_iu", "fwavacc")}
            r[when]["class_iu"] = {c["name"]: c["iu"] for c in scores["classes"]}
        print(f"  {r['label']}: pixel accuracy {r['after']['pixel_accuracy']:.3f}, mean IU "
              f"{r['after']['mean_iu']:.3f} (before training {r['initial']['pixel_accuracy']:.3f} / "
              f"{r['initial']['mean_iu']:.3f})", flush=True)

    # 7. a few val scenes segmented by both (caffeish segment), side by side with the ground truth
    val_images = os.path.join(world_dir, "val", "images")
    shown = sorted(os.listdir(val_images))[:4]
    for key, r in runs.items():
        r["segment"] = os.path.join(r["folder"], "segment")
        run(f"segment_{key}", ["segment", r["deploy"], r["final"]] + [os.path.join(val_images, n) for n in shown]
            + ["-o", r["segment"], "--palette", seg, "--mean", os.path.join(seg, "mean.binaryproto"),
               "--overlay", "0"])
    examples(os.path.join(out, "examples.png"), shown, val_images, os.path.join(world_dir, "val", "labels"),
             [r["segment"] for r in runs.values()])

    width, height = info["size"]
    curves = [(r["label"], read_curves(os.path.join(r["folder"], "curves.csv"))) for r in runs.values()]
    plot(curves, os.path.join(out, "comparison.png"), width * height,
         f"FCN from scratch vs from a pretrained classifier: same solver (lr {cfg['lr']:g}), {iters} iterations")

    results = {
        "size": size,
        "seed": seed,
        "world": info,
        "classifier": {"val_accuracy": cls_accuracy, "iterations": cls_iters, "train_seconds": cls_seconds,
                       "val_crops": crop_val, "train_crops": crop_meta["splits"]["train"]["records"]},
        "solver": {"base_lr": cfg["lr"], "lr_policy": "fixed", "momentum": 0.9, "weight_decay": 0.0005,
                   "iterations": iters, "batch_size": 1, "test_interval": cfg["test_interval"]},
        "fcn_pad": FCN_PAD,
        "runs": {key: {"label": r["label"], "iterations": iters, "train_seconds": r["train_seconds"],
                       "pixel_accuracy": r["after"]["pixel_accuracy"], "mean_iu": r["after"]["mean_iu"],
                       "after": r["after"], "initial": r["initial"],
                       "weights": os.path.relpath(r["final"], out)} for key, r in runs.items()},
        "commands": run.commands,
        "wall_seconds": time.monotonic() - t0,
    }
    results["table"] = markdown_table(results)
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(out, "results.md"), "w", encoding="utf-8") as f:
        f.write(f"# Transfer learning on the street world ({size} run, seed {seed})\n\n")
        f.write(results["table"] + "\n\n")
        f.write(f"Classifier (pretraining): val accuracy {cls_accuracy:.3f} on {crop_val} crops, {cls_iters} "
                f"iterations, {cls_seconds:.0f} s. Whole run: {results['wall_seconds']:.0f} s.\n\n")
        names = list(results["runs"]["scratch"]["after"]["class_iu"])
        f.write("Per-class IU after training:\n\n| run | " + " | ".join(names) + " |\n|---|"
                + "---|" * len(names) + "\n")
        for r in results["runs"].values():
            f.write(f"| {r['label']} | " + " | ".join(f"{r['after']['class_iu'][n]:.3f}" for n in names) + " |\n")
        f.write("\n![curves](comparison.png)\n\nVal scenes: image, ground truth, (a), (b):\n\n"
                "![examples](examples.png)\n")
    return results


if __name__ == "__main__":
    sys.exit(main())

"""What the pages show and do, as plain functions over the workspace: each calls the library the CLI
calls (caffeish.apps.summary, offsets, surgery_files, inference, dataset, download) and returns
data for a template or bytes for a picture.  Nothing here knows HTTP (caffeish.web.app does).

Inputs are never modified: surgery, offset fixes, imports and dataset builds write a new model or
dataset folder, built beside its place (`staging.build_folder`) and moved in whole (`staging.swap_in`).
"""
import collections
import io as pyio
import json
import os
import shutil
import threading
import warnings

import numpy as np

from caffeish.apps import dataset as datasets
from caffeish.apps import download, inference, offsets, store, surgery_files, train_val
from caffeish.apps.summary import fmt_shape, summarize
from caffeish.data import palette as palettes
from caffeish.data.preprocess import Preprocess, load_mean, parse_values
from caffeish.errors import CaffeishError
from caffeish.formats import io, staging
from caffeish.formats.datum import LmdbReader, datum_array
from caffeish.formats.io import printable
from caffeish.graph.graph import filter_net, make_state
from caffeish.web import pictures

DEFAULT_MAX_PIXELS = 64_000_000  # uploads: 64 megapixels (8000x8000); bigger ones are refused unread
UPLOAD_FORMATS = {"PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM"}


class Cache:
    """A small LRU of computed things keyed by what they were computed from."""

    def __init__(self, size=8):
        self.size, self._d, self._lock = size, collections.OrderedDict(), threading.Lock()

    def get(self, key, make):
        with self._lock:
            if key in self._d:
                self._d.move_to_end(key)
                return self._d[key]
        value = make()
        with self._lock:
            self._d[key] = value
            while len(self._d) > self.size:
                self._d.popitem(last=False)
        return value


_summaries, _svgs, _nets = Cache(16), Cache(16), Cache(2)


# ---------------------------------------------------------------------------- models


def model_summary(model):
    """apps.summary's rows (with each layer's LayerParameter as 'param'), totals, notes, and the task
    (segmentation or classification), inputs and classes as the store describes them."""
    if model.deploy is None:
        raise CaffeishError(f"model '{model.name}': {model.problem}")

    def make():
        try:
            s = summarize(model.deploy)
        except CaffeishError as e:  # shapes that do not infer: the layers still show, and the error
            return _unshaped(model, e)
        graph = s.pop("graph")
        params = {n.name: n.param for n in graph.nodes}
        for r in s["rows"]:
            r["param"] = params.get(r["name"])
            r["shapes_text"] = " ".join(fmt_shape(x) for x in r["top_shapes"]) if isinstance(
                r["top_shapes"], list) else "?"
        s["task"], s["inputs"], s["classes"] = store.describe_graph(graph)
        return s

    return _summaries.get(("summary",) + model.stamp(), make)


def _unshaped(model, error):
    """The summary of a net whose shapes do not infer (a Crop past its reference...): its TEST layers
    without shapes or counts, and the error; a prototxt that does not parse stays an error."""
    net = io.read_net(model.deploy)
    layers = filter_net(net, make_state(net, "TEST")).layer
    rows = [{"name": l.name, "type": l.type, "bottoms": list(l.bottom), "tops": list(l.top), "top_shapes": "?",
             "shapes_text": "?", "params": None, "weight_params": None, "bias_params": None, "macs": None,
             "macs_per_image": None, "param": l} for l in layers]
    return {"rows": rows, "totals": {}, "notes": [f"shapes unknown: {printable(str(error))}"], "error": printable(str(error)),
            "task": "unknown", "inputs": {}, "classes": None}


def model_svg(model, link):
    s = model_summary(model)
    return _svgs.get(("svg",) + model.stamp(), lambda: pictures.net_svg(s["rows"], link, model.name))


def offsets_view(model):
    """The offset table's sections (apps.offsets), each row as text, with each Crop's check; or a note."""
    try:
        a = offsets.analyze(model.deploy)
        secs = offsets.sections(a)
    except CaffeishError as e:
        return {"sections": [], "notes": [printable(str(e))], "crops": []}
    out = []
    for sec in secs:
        parts = [{"label": p["label"], "from": p["from"], "to": p["to"], "notes": p["notes"],
                  "rows": [offsets.display_row(r) for r in p["rows"]]} for p in sec["parts"]]
        out.append({"title": sec["title"], "parts": parts, "crop": _crop_check(sec["crop"])})
    return {"sections": out, "notes": offsets.global_notes(a, secs), "columns": offsets.COLUMNS,
            "crops": [c for c in (s["crop"] for s in out) if c]}


def _crop_check(crop):
    if crop is None:
        return None
    if crop.error is not None:
        return {"name": crop.name, "ok": False, "text": f"cannot be computed: {crop.error}"}
    computed, written = offsets.fmt_offsets(crop.computed, crop.axis), offsets.fmt_offsets(crop.written, crop.axis)
    return {"name": crop.name, "ok": bool(crop.agrees), "computed": computed, "written": written,
            "text": f"computed {computed}, the Crop says {written}: {'agrees' if crop.agrees else 'MISMATCH'}"}


def layer_text(param):
    """A layer's definition as prototxt text."""
    from google.protobuf import text_format

    return text_format.MessageToString(param)


def open_model_net(model):
    """(Net, lock) of a model, cached: the net the inference pages run (keep=False, as the CLI's)."""
    def make():
        return inference.open_net(model.deploy, model.weights), threading.Lock()

    return _nets.get(("net",) + model.stamp(), make)


def layer_blobs(model, row):
    """[(label, array)] of a layer's parameters in the model's net (its weights, or its fillers')."""
    net, _ = open_model_net(model)
    params = net.params[row["name"]] if row["name"] in net.params else []
    return pictures.blob_kinds(row["type"], [p.data for p in params])


def first_conv(model):
    """The row index of the first Convolution with 4-D weights, or None."""
    for i, r in enumerate(model_summary(model)["rows"]):
        if r["type"] == "Convolution" and r.get("params"):
            return i
    return None


# ---------------------------------------------------------------------------- inference


def decode_upload(data, name, max_pixels=DEFAULT_MAX_PIXELS):
    """A Pillow image of uploaded bytes, read safely: the size is checked from the header before any
    pixel is decoded (decompression bombs refused), only image formats, truncated files refused."""
    from PIL import Image

    shown = printable(name or "upload")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(pyio.BytesIO(data))
            if img.format not in UPLOAD_FORMATS:
                raise CaffeishError(f"{shown}: {img.format} is not an image format this app reads")
            w, h = img.size
            if w * h > max_pixels or w < 1 or h < 1:
                raise CaffeishError(f"{shown}: {w}x{h} pixels is over the limit of {max_pixels:,} pixels "
                                    f"(a decompression bomb, or an image too large for this server)")
            img.load()
            return img
    except CaffeishError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise CaffeishError(f"{shown}: refused: {e}") from None
    except Image.UnidentifiedImageError:
        raise CaffeishError(f"{shown}: not an image file (no format this app reads recognizes it)") from None
    except Exception as e:  # Pillow: truncated data, broken chunks, ...
        raise CaffeishError(f"{shown}: not a readable image ({type(e).__name__}: {printable(str(e))[:200]})") from None


def preprocess_for(model, mean="auto", mean_value=""):
    """The Preprocess of the inference form: the model's mean.binaryproto ('auto'), values, or none."""
    if mean == "values" and mean_value.strip():
        return Preprocess(mean=np.array(parse_values(mean_value, "mean values"), np.float32),
                          mean_source="mean values")
    if mean == "auto" and model.mean:
        return Preprocess(mean=load_mean(model.mean), mean_source=f"mean file {os.path.basename(model.mean)}")
    return Preprocess()


def model_labels(model):
    return palettes.read_labels(model.labels) if model.labels else None


class Results:
    """Finished inference results, in memory (the last `size`)."""

    def __init__(self, size=16):
        self._cache = Cache(size)
        self._lock = threading.Lock()
        self._n = 0

    def add(self, result):
        with self._lock:
            self._n += 1
            ident = str(self._n)
        self._cache.get(ident, lambda: result)
        return ident

    def get(self, ident):
        with self._cache._lock:
            return self._cache._d.get(ident)


def run_inference(task, model, images, preprocess, visualize=False, tile=None):
    """Segment or classify [(name, PIL image)] with the model's net -> a result dict (pictures as PNG)."""
    summary = model_summary(model)
    net, lock = open_model_net(model)
    labels = model_labels(model)
    notes = []
    items = []
    with lock:
        if summary["task"] == "segmentation":
            seg = inference.Segmenter(net, preprocess, tile=tile, warn=notes.append)
            base, names = palettes.load_palette(model.palette or "pascal")
            labels = labels or names
            for k, (name, img) in enumerate(images):
                task._progress(f"image {k + 1} of {len(images)}", k, len(images), "img")
                shown, x = seg.prepare(img)
                classes, _ = seg.run(x, keep_scores=False)
                colors = inference.class_colors(model.palette or "pascal", base, seg.n_classes)
                item = _segmentation_item(name, shown, classes, colors, labels)
                if visualize:
                    item["activations"] = _activations(net, seg.input, x, seg.tile_size(tuple(x.shape[1:])), notes)
                items.append(item)
            kind = "segmentation"
        else:
            clf = inference.Classifier(net, preprocess)
            for k, (name, img) in enumerate(images):
                task._progress(f"image {k + 1} of {len(images)}", k, len(images), "img")
                x = clf.prepare(img)
                probs = clf.predict([x])
                top, values = inference.top_classes(probs, 5)
                shown = np.clip(clf.load(img), 0, 255).astype(np.uint8)
                item = {"name": printable(name), "image": pictures.png(_rgb(shown)), "top": [
                    {"index": int(c), "name": labels[c] if labels and c < len(labels) else f"class {c}",
                     "p": float(v)} for c, v in zip(top[0], values[0])]}
                if visualize:
                    item["activations"] = _activations(net, clf.input, x, None, notes)
                items.append(item)
            kind = "classification"
        task._progress("done", len(images), len(images), "img")
    return {"kind": kind, "model": model.name, "items": items, "notes": list(dict.fromkeys(notes))}


def _rgb(shown):
    from PIL import Image

    return Image.fromarray(shown if shown.shape[2] == 3 else np.repeat(shown, 3, axis=2)[:, :, :3])


def _segmentation_item(name, shown, classes, colors, labels):
    counts = np.bincount(classes.ravel(), minlength=len(colors))
    total = max(classes.size, 1)
    legend = [{"index": int(c), "name": labels[c] if labels and c < len(labels) and labels[c] else f"class {c}",
               "color": "#%02x%02x%02x" % tuple(int(v) for v in colors[c]), "share": 100.0 * counts[c] / total,
               "pixels": int(counts[c])} for c in np.flatnonzero(counts)]
    wide = classes.max(initial=0) >= 256
    return {"name": printable(name), "width": int(classes.shape[1]), "height": int(classes.shape[0]),
            "image": pictures.png(_rgb(shown)),
            "classmap": pictures.png(inference.label_picture(classes, colors).convert("RGB")),
            "classes": np.ascontiguousarray(classes, dtype="<u2" if wide else np.uint8).tobytes(),
            "class_bytes": 2 if wide else 1, "legend": legend,
            "names": {str(c): e["name"] for c, e in zip([e["index"] for e in legend], legend)}}


MAX_THUMBNAILS = 64


def _activations(net, input_name, x, tile, notes):
    """Per-blob thumbnails and statistics of one forward with every blob kept (DIGITS' visualizations)."""
    if tile is not None:
        notes.append("activations are not shown for an image run in tiles (too large to keep every blob)")
        return []
    splits = {t for n in net.nodes if n.type == "Split" for t in n.tops}  # copies Caffe inserted
    blobs = [b for b in net.graph.blob_shapes if b != input_name and b not in splits]
    arrays = net.forward_outputs({input_name: x[np.newaxis]}, blobs=blobs)
    out = []
    for b in blobs[:MAX_THUMBNAILS]:
        a = np.asarray(arrays[b])
        out.append({"blob": printable(b), "shape": fmt_shape(a.shape), "stats": pictures.stats(a),
                    "png": pictures.thumbnail_png(a)})
    del arrays
    return out


def dataset_image(ws, dataset, split, index):
    """(name, Pillow image) of one record of a dataset's features, for the inference form."""
    root = ws.dataset(dataset)
    db = os.path.join(root, f"{_split(split)}_db", "features")
    key = (datasets.KEY_FORMAT % int(index)).encode()
    if not os.path.isdir(db):  # a classification dataset: one database, keys "%08d_<path>" (convert_imageset's)
        db = os.path.join(root, f"{_split(split)}_db")
        key = _nth_key(db, int(index), split)
    ref = inference.record_ref(db, key)
    return f"{dataset}/{split}/{index}", inference.read_record(ref)


def _nth_key(db, index, split):
    with LmdbReader(db) as reader:
        if not 0 <= index < len(reader):
            raise CaffeishError(f"record {index}: the {split} split has {len(reader)} records")
        for k, key in enumerate(reader.keys()):
            if k == index:
                return key
    raise CaffeishError(f"record {index}: not in the {split} split")


def _split(split):
    if split not in ("train", "val", "test"):
        raise CaffeishError(f"split '{printable(split)}': train, val or test")
    return split


# ---------------------------------------------------------------------------- new model folders


def _new_folder(target, write):
    """Build a model folder beside `target` with write(tmp), then move it into place whole."""
    return staging.write_folder(target, write)


def _copy_extras(model, tmp, names=("labels.txt", "mean.binaryproto", "palette.txt")):
    for name in names:
        src = os.path.join(model.folder, name)
        if getattr(model, {"labels.txt": "labels", "mean.binaryproto": "mean", "palette.txt": "palette"}[name]):
            shutil.copyfile(src, os.path.join(tmp, name), follow_symlinks=False)


def _link_or_copy(src, dst):
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copyfile(src, dst, follow_symlinks=False)


def convolutionalize(ws, model, new_name, task=None):
    target = ws.new_model_path(new_name)

    def write(tmp):
        proto, weights = os.path.join(tmp, "deploy.prototxt"), os.path.join(tmp, "weights.caffemodel")
        rep = surgery_files.convolutionalize_files(model.deploy, model.weights, proto,
                                                   weights if model.weights else None)
        _copy_extras(model, tmp)
        _write_note(tmp, "convolutionalize", model, rep.notes)

    return _new_folder(target, write)


def build_fcn(ws, model, new_name, classes, skips=(), task=None):
    target = ws.new_model_path(new_name)

    def write(tmp):
        proto, weights = os.path.join(tmp, "deploy.prototxt"), os.path.join(tmp, "weights.caffemodel")
        fcn, _ = surgery_files.fcn_files(model.deploy, model.weights, proto, weights, classes=classes,
                                         skips=list(skips), mean_file=model.mean, random_weights=model.weights is None)
        _copy_extras(model, tmp, ("mean.binaryproto",))
        _write_note(tmp, "fcn", model, fcn.report.notes + fcn.warnings)

    return _new_folder(target, write)


def fix_offsets(ws, model, new_name):
    target = ws.new_model_path(new_name)

    def write(tmp):
        offsets.fix_file(model.deploy, os.path.join(tmp, "deploy.prototxt"))
        if model.weights:
            _link_or_copy(model.weights, os.path.join(tmp, os.path.basename(model.weights)))
        _copy_extras(model, tmp)
        _write_note(tmp, "offsets --fix", model, [])

    return _new_folder(target, write)


def publish_snapshot(ws, job, model, new_name):
    """A job's snapshot as ROOT/models/NEW: its deploy net, the snapshot's weights, the dataset's labels,
    palette and mean, and a readme saying where it came from."""
    target = ws.new_model_path(new_name)

    def write(tmp):
        shutil.copyfile(model.deploy, os.path.join(tmp, "deploy.prototxt"), follow_symlinks=False)
        _link_or_copy(model.weights, os.path.join(tmp, "weights.caffemodel"))
        for name in ("labels.txt", "palette.txt", "mean.binaryproto"):
            src = job.file(name)
            if src:
                shutil.copyfile(src, os.path.join(tmp, name), follow_symlinks=False)
        cfg = job.config
        with open(os.path.join(tmp, "readme.md"), "w", encoding="utf-8") as f:
            f.write(f"---\nname: {new_name}\ndescription: {model.title}, trained by caffeish serve's job "
                    f"{job.name} (network {cfg.get('network')}, dataset {cfg.get('dataset')})\n"
                    f"caffemodel: weights.caffemodel\n---\n")

    return _new_folder(target, write)


def _write_note(tmp, what, model, notes):
    with open(os.path.join(tmp, "readme.md"), "w", encoding="utf-8") as f:
        f.write(f"---\nname: {model.name} ({what})\ndescription: made by caffeish serve: {what} of "
                f"model {model.name}\n---\n\n" + "".join(f"- {printable(n)}\n" for n in notes))


def import_model(ws, location, name, new_name, allow_python_layers=False):
    """Pull model `name` of a store into ROOT/models/NEW (download.pull: resumable, checked, all or
    nothing); the download's bytes show as the task's progress."""
    target = ws.new_model_path(new_name)
    return download.pull(location, name, target, allow_python_layers=allow_python_layers, timeout=30.0,
                         retries=3)


def store_models(location):
    index = download.read_index(location, timeout=10.0, retries=1)
    return [dict(m, size=store.human_size(sum(f["size"] for f in m["files"]))) for m in index["models"]]


# ---------------------------------------------------------------------------- datasets


def build_dataset(ws, name, images, labels, val_fraction=0.1, resize=None, color_map=None):
    """datasets.build_segmentation from two workspace folders into ROOT/datasets/NAME."""
    target = ws.new_dataset_path(name)
    return datasets.build_segmentation(images, labels, target, color_map=color_map, val_fraction=val_fraction,
                                       resize=resize)


def dataset_view(root):
    with open(os.path.join(root, "dataset.json"), encoding="utf-8") as f:
        meta = json.load(f)
    if not isinstance(meta, dict):
        raise CaffeishError("dataset.json is not an object")
    names = [str(n) for n in meta.get("classes") or []]
    splits = {}
    for split, info in (meta.get("splits") or {}).items():
        if split in ("train", "val", "test") and isinstance(info, dict):
            splits[split] = {"records": int(info.get("records", 0)), "shape": info.get("shape")}
    pixels = np.zeros(len(names), np.int64)
    for info in (meta.get("splits") or {}).values():
        counts = info.get("label_pixels") or [] if isinstance(info, dict) else []
        for i, c in enumerate(counts[:len(names)]):
            pixels[i] += int(c)
    return {"type": meta.get("type", "?"), "classes": names, "splits": splits, "pixels": pixels.tolist(),
            "total_pixels": int(pixels.sum())}


def training_datasets(ws):
    """[{name, kind, train, val}] of the workspace's datasets a training job can use (train and val splits)."""
    out = []
    for name in ws.datasets():
        try:
            d = train_val.Dataset(ws.dataset(name))
        except CaffeishError:
            continue
        out.append({"name": name, "kind": d.kind, "train": d.records("train"), "val": d.records("val")})
    return out


def dataset_palette(root, n):
    return datasets.read_palette(root, n)


def distribution_png(root):
    v = dataset_view(root)
    colors = dataset_palette(root, len(v["classes"]))
    return pictures.distribution_png(v["classes"], v["pixels"], colors)


def dataset_sample(root, split, index, kind):
    """PNG of record `index` of a split: the image, its label map in colours, or the overlay."""
    from PIL import Image

    stage = os.path.join(root, f"{_split(split)}_db")
    key = (datasets.KEY_FORMAT % int(index)).encode()
    image = inference.read_record(inference.record_ref(os.path.join(stage, "features"), key)).convert("RGB")
    if kind == "image":
        return pictures.png(image)
    with LmdbReader(os.path.join(stage, "labels")) as reader:
        datum = reader.get(key)
        if datum is None:
            raise CaffeishError(f"{split} record {index}: no label")
        label = datum_array(datum, None, reader.where(key))[0]
    colors = dataset_palette(root, int(label.max(initial=0)) + 1)
    if kind == "label":
        return pictures.png(palettes.label_image(label, colors[:256]).convert("RGB"))
    return pictures.png(Image.fromarray(palettes.blend(np.asarray(image), label, colors, 0.5)))

"""Dataset: build and inspect DIGITS-style LMDB datasets of Caffe Datums (the library side of
`caffeish dataset`; the command-line face is tools/dataset.py).

Segmentation (DIGITS 5's segmentation dataset): images and label images pair
by file stem.  A label image is a palette PNG (the index is the class; every
palette must agree), a greyscale image (the value is the class), or an RGB
image whose colours a DIGITS colour map (--color-map: one "R G B" line per
class, optionally followed by the class name) maps to classes.  The output:
OUT/train_db/{features,labels} and OUT/val_db/{features,labels} (LMDBs with
the same keys, "%08d", in the same order; features BGR as Caffe stores them,
labels 1-channel), labels.txt, palette.txt, mean.binaryproto (mean of the
training features, when they share one size), train.txt / val.txt (key and
files) and dataset.json.

Classification (Caffe's convert_imageset + compute_image_mean): one subfolder
per class; OUT/train_db and OUT/val_db, labels.txt, mean.binaryproto.

--resize WxH resizes images as Caffe's convert_imageset --resize_width/height
(cv::resize INTER_LINEAR, bit-exact) and label images with cv::resize
INTER_NEAREST (classes stay classes).

Pairs stream one at a time into batched LMDB transactions, so memory does not
grow with the dataset.  The output is built in a temporary folder beside OUT
and renamed into place at the end: a failed run leaves nothing behind.
--force replaces an existing dataset folder, never one that holds an input
(images, labels, colour map, class names), the current folder or a parent of
it, a file, or a non-empty folder that does not look like a dataset.

inspect_dataset scans a database or a dataset folder (records, shapes,
encodings, labels, class frequencies) and returns rows; `caffeish dataset
show` renders them.
"""
import json
import os
import shutil
import threading

import numpy as np

from caffeish.data import dataset_meta
from caffeish.formats import io, staging
from caffeish.apps import progress
from caffeish.data import palette as palettes
from caffeish.runtime.data_transform import resize_linear, resize_nearest
from caffeish.formats.datum import (LmdbReader, LmdbWriter, check_pair, datum_array, datum_encoding,
                                    encoded_shape, make_datum)
from caffeish.errors import CaffeishError
from caffeish.formats.images import IMAGE_EXTENSIONS, decode_8bit, is_image_name

KEY_FORMAT = "%08d"
DEFAULT_IGNORE_LABEL = 255


class DatasetError(CaffeishError):
    """An input that cannot go into a dataset (the message names the file)."""


# ---------------------------------------------------------------------------- files


def image_files(folder, what="--images"):
    """{stem: path} of the image files directly in `folder` (an error for a stem seen twice)."""
    if not os.path.isdir(folder):
        raise DatasetError(f"{what} {folder}: not a folder")
    found = {}
    for name in sorted(os.listdir(folder)):
        stem = os.path.splitext(name)[0]
        path = os.path.join(folder, name)
        if not is_image_name(name) or not os.path.isfile(path):
            continue
        if stem in found:
            raise DatasetError(f"{path}: two images with the stem '{stem}' in {folder} ({os.path.basename(found[stem])})")
        found[stem] = path
    if not found:
        raise DatasetError(f"{what} {folder}: no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return found


def pair_folders(images, labels, what=("--images", "--labels")):
    """[(stem, image path, label path)] sorted by stem; an image without a label is an error."""
    imgs = image_files(images, what[0])
    labs = image_files(labels, what[1])
    missing = [s for s in imgs if s not in labs]
    if missing:
        shown = ", ".join(os.path.basename(imgs[s]) for s in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise DatasetError(f"{len(missing)} image(s) in {images} have no label image of the same stem in "
                           f"{labels}: {shown}")
    return [(s, imgs[s], labs[s]) for s in sorted(imgs)]


# ---------------------------------------------------------------------------- label images


class LabelDecoder:
    """Turns label image files into H x W uint8 class maps, checking what DIGITS users trip on.

    * palette ('P') images: the index is the class; without a colour map every
      palette must match the first one's (on the entries both have);
    * greyscale ('L', '1'): the value is the class;
    * RGB(A): each colour is looked up in the colour map; a colour that is not
      there is an error with its pixel count; RGBA alpha must be opaque.
    With a colour map, palette images are mapped by colour too.
    """

    def __init__(self, color_map=None):
        self.colors = None
        if color_map is not None:
            self.colors = np.asarray(color_map, dtype=np.uint8)
            keys = palettes.pack_rgb(self.colors)
            self._order = np.argsort(keys)
            self._sorted = keys[self._order]
        self.palette = None  # (K, 3) of the first palette image (no colour map)
        self.palette_file = None
        self._lock = threading.Lock()  # decoders run in several threads
        self.kinds = set()

    def __call__(self, path):
        from PIL import Image

        try:
            with Image.open(path) as img:
                img.load()
                return self._decode(img, path)
        except DatasetError:
            raise
        except (OSError, ValueError) as e:
            raise DatasetError(f"{path}: cannot read the label image ({e})") from None

    def _decode(self, img, path):
        mode = img.mode
        if mode == "P":
            self.kinds.add("palette")
            if self.colors is not None:
                return self._map_colors(np.asarray(img.convert("RGB")), path)
            self._check_palette(img, path)
            return np.asarray(img, dtype=np.uint8)
        if mode in ("L", "1"):
            self.kinds.add("grayscale")
            return np.asarray(img.convert("L"), dtype=np.uint8)
        if mode.startswith("I"):
            arr = np.asarray(img)
            if arr.min() < 0 or arr.max() > 255:
                raise DatasetError(f"{path}: a {mode} label image with values outside 0-255 "
                                   f"({arr.min()}..{arr.max()}); Caffe label Datums hold 8-bit classes")
            self.kinds.add("grayscale")
            return arr.astype(np.uint8)
        if mode in ("LA", "RGBA", "PA"):
            rgba = np.asarray(img.convert("RGBA" if mode != "LA" else "LA"))
            alpha = rgba[..., -1]
            clear = int((alpha < 255).sum())
            if clear:
                raise DatasetError(
                    f"{path}: {mode} label image with real transparency ({clear:,} of {alpha.size:,} pixels "
                    f"have alpha < 255); save labels without an alpha channel"
                )
            if mode == "LA":
                self.kinds.add("grayscale")
                return np.ascontiguousarray(rgba[..., 0])
            rgb = rgba[..., :3]
        elif mode == "RGB":
            rgb = np.asarray(img)
        else:
            rgb = np.asarray(img.convert("RGB"))
        self.kinds.add("rgb")
        if self.colors is None:
            raise DatasetError(
                f"{path}: an RGB label image, but no colour map was given; pass --color-map FILE (one "
                f"'R G B' line per class), or save labels as palette or greyscale PNGs"
            )
        return self._map_colors(rgb, path)

    def _map_colors(self, rgb, path):
        keys = palettes.pack_rgb(rgb).ravel()
        pos = np.searchsorted(self._sorted, keys)
        pos = np.minimum(pos, len(self._sorted) - 1)
        found = self._sorted[pos] == keys
        if not found.all():
            bad, counts = np.unique(keys[~found], return_counts=True)
            order = np.argsort(-counts)
            shown = ", ".join(f"({k >> 16}, {(k >> 8) & 255}, {k & 255}): {c:,} pixels"
                              for k, c in zip(bad[order][:5], counts[order][:5]))
            more = f" and {len(bad) - 5} more colours" if len(bad) > 5 else ""
            raise DatasetError(
                f"{path}: {int((~found).sum()):,} pixels have colours that are not in the colour map: "
                f"{shown}{more}"
            )
        return self._order[pos].astype(np.uint8).reshape(rgb.shape[:2])

    def _check_palette(self, img, path):
        values = img.getpalette() or []
        pal = np.array(values[: len(values) // 3 * 3], dtype=np.uint8).reshape(-1, 3)
        with self._lock:
            if self.palette is None:
                self.palette, self.palette_file = pal, path
                return
        n = min(len(pal), len(self.palette))
        diff = np.nonzero((pal[:n] != self.palette[:n]).any(axis=1))[0]
        if diff.size:
            i = int(diff[0])
            raise DatasetError(
                f"{path}: its palette differs from that of {self.palette_file} ({diff.size} entries, first at "
                f"index {i}: {tuple(int(v) for v in pal[i])} vs {tuple(int(v) for v in self.palette[i])}); "
                f"palette indices are classes, so all label images need one palette (or pass --color-map to "
                f"map them by colour)"
            )


# ---------------------------------------------------------------------------- images


def load_image(path, channels=3, resize=None):
    """An image file as C x H x W uint8 in Caffe's order (BGR) and its (W, H) before resizing.

    The pixels are classify's and segment's (caffeish.formats.images.decode_8bit:
    what OpenCV's imread gives convert_imageset, 16-bit images included).
    With resize=(W, H) they are resized as convert_imageset does
    (cv::resize INTER_LINEAR, see caffeish.runtime.data_transform.resize_linear).
    """
    arr = decode_8bit(path, gray=channels != 3)
    size = (arr.shape[1], arr.shape[0])
    arr = arr[:, :, 0] if channels != 3 else arr
    if resize and tuple(resize) != size:
        arr = resize_linear(arr, resize[1], resize[0])
    arr = arr[np.newaxis] if arr.ndim == 2 else arr[:, :, ::-1].transpose(2, 0, 1)
    return np.ascontiguousarray(arr), size


def image_size(path):
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.size
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path}: cannot read the image ({e})") from None


def resize_labels(labels, resize):
    """An H x W class map resized to (W, H) with cv::resize INTER_NEAREST (no blended classes)."""
    if not resize or (labels.shape[1], labels.shape[0]) == tuple(resize):
        return labels
    return np.ascontiguousarray(resize_nearest(labels, resize[1], resize[0]))


# ---------------------------------------------------------------------------- the output folder


def _inside(path, folder):
    """True when `path` is `folder` or lies inside it (both real paths)."""
    try:
        return os.path.commonpath([path, folder]) == folder
    except ValueError:  # different drives
        return False


def check_output(path, inputs=(), force=False):
    """Refuse an output folder that would destroy an input or the user's files.

    `inputs` are (option, path) pairs.  Whatever --force says: an input equal
    to or inside the output, an output inside an input folder, an output that
    is the current folder or one of its parents, and an output that is a file
    are errors.  An existing non-empty folder needs --force, and --force only
    replaces a folder that looks like a dataset (dataset.json, train_db or val_db).
    """
    real = os.path.realpath(path)
    for option, value in inputs:
        if not value:
            continue
        src = os.path.realpath(value)
        if _inside(src, real):
            raise DatasetError(f"-o {path}: {option} {value} is inside it; the dataset would replace its own "
                               f"input (choose an -o outside the input folders)")
        if os.path.isdir(src) and _inside(real, src):
            raise DatasetError(f"-o {path}: it lies inside {option} {value}; write the dataset outside the "
                               f"input folders")
    if not os.path.lexists(path):
        return
    if not os.path.isdir(real):
        raise DatasetError(f"-o {path}: is a file, not a folder; remove it or choose another -o")
    if _inside(os.path.realpath(os.getcwd()), real):
        raise DatasetError(f"-o {path}: is the current folder or a parent of it; choose a new folder for the "
                           f"dataset")
    entries = os.listdir(real)
    if not entries:
        return
    if not force:
        raise DatasetError(f"{path}: already exists; choose another -o or pass --force to replace it")
    if not dataset_meta.is_dataset(real):
        raise DatasetError(f"-o {path}: not a dataset folder (no {', '.join(dataset_meta.MARKERS)}); --force only "
                           f"replaces datasets: remove it yourself or choose another -o")


DATASET_ENTRIES = frozenset({"train_db", "val_db", "test_db", "labels.txt", "palette.txt", "mean.binaryproto",
                             "train.txt", "val.txt", "dataset.json"})


def _earlier_build(folder):
    """Whether a marker-less `.NAME.tmp-PID` folder holds only what a dataset build writes (earlier
    versions left such folders behind when killed)."""
    try:
        return set(os.listdir(folder)) <= DATASET_ENTRIES
    except OSError:
        return False


class OutputFolder:
    """A dataset folder built beside its final place and swapped into it on success (see check_output).

    The build goes into `.OUT.tmp-PID`; once complete it takes OUT's place in one step
    (caffeish.formats.staging.swap_in), so a kill at any moment leaves the old dataset or the new one,
    and what killed runs left beside OUT (their build folders, a swap half done) is finished or
    removed by the next run (staging.recover_folder) before it starts."""

    def __init__(self, path, force=False, inputs=()):
        self.path = os.path.abspath(path)
        parent = os.path.dirname(self.path)
        if os.path.isdir(parent):
            staging.recover_folder(self.path, looks_ours=_earlier_build)
        check_output(path, inputs, force)
        if not os.path.isdir(parent):  # made, as surgery and segment make their output folders
            try:
                os.makedirs(parent)
            except OSError as e:
                raise DatasetError(f"{path}: cannot make the folder {parent}: {e.strerror or e}") from None
        self.tmp = staging.build_folder(self.path)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        try:
            staging.swap_in(self.tmp, self.path)
        except OSError as e:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise DatasetError(f"{self.path}: cannot put the dataset in place: {e.strerror or e}") from None
        return False

    def join(self, *parts):
        return os.path.join(self.tmp, *parts)


class MeanAccumulator:
    """Running sum of same-sized C x H x W images (compute_image_mean); None once sizes differ."""

    def __init__(self):
        self.sum = None
        self.count = 0
        self.varies = None  # (first shape, other shape, file) once sizes differ

    def add(self, array, path):
        if self.varies:
            return
        if self.sum is None:
            self.sum = np.zeros(array.shape, dtype=np.int64)
            self.first = path
        elif self.sum.shape != array.shape:
            self.varies = (self.sum.shape, array.shape, path)
            self.sum = None
            return
        self.sum += array
        self.count += 1

    def mean(self):
        return None if self.sum is None or not self.count else (self.sum / self.count).astype(np.float32)


def write_text(path, lines):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(f"{line}\n" for line in lines)


# ---------------------------------------------------------------------------- segmentation


def val_count(n, val_fraction):
    """floor(n * fraction) records go to val (DIGITS), but at least 1 when the fraction is above 0 and
    n >= 2, so that a small dataset still gets the val_db a train/val net reads."""
    n_val = int(np.floor(n * val_fraction))
    if val_fraction > 0 and n >= 2:
        n_val = max(n_val, 1)
    return n_val


def split_pairs(pairs, val_fraction, seed):
    """DIGITS' split: shuffle with the seed, val_count(n) pairs to val; val then in stem order."""
    order = np.random.default_rng(seed).permutation(len(pairs))
    n_val = val_count(len(pairs), val_fraction)
    val = sorted(pairs[i] for i in order[:n_val])
    train = [pairs[i] for i in order[n_val:]]
    return train, val


def split_note(n, val_fraction, n_val, what="pairs"):
    """A line on how the split came out when it is not what the fraction alone says, else None."""
    if val_fraction > 0 and n_val == 0:
        return f"no val_db: only {n} {what[:-1] if n == 1 else what}, none left for validation"
    if val_fraction > 0 and n_val != int(np.floor(n * val_fraction)):
        return (f"--val-fraction {val_fraction:g} of {n} {what} rounds down to 0; {n_val} went to val_db so "
                f"that there is one")
    if val_fraction == 0:
        return "no val_db (--val-fraction 0)"
    return None


def build_segmentation(images, labels, output, color_map=None, class_names=None, val_fraction=0.1,
                       val_images=None, val_labels=None, resize=None, encoding="png", channels=3, seed=0,
                       ignore_label=DEFAULT_IGNORE_LABEL, txn_records=256, force=False, workers=None,
                       allow_extra_classes=False):
    """Build a DIGITS segmentation dataset from a folder of images and a folder of label images.

    Pairs are matched by file stem.  Labels: palette PNGs (index = class),
    greyscale (value = class) or RGB with --color-map (colour -> class).
    Errors name the file: image and label sizes differ, a label colour is not
    in the colour map (with its pixel count), palettes differ, RGBA labels have
    transparent pixels.  Writes train_db/ and val_db/ (features and labels
    LMDBs), labels.txt, palette.txt, mean.binaryproto, train.txt, val.txt and
    dataset.json.  Returns a summary dict.

    class_names (a file, one name per line) names classes 0, 1, ...: a label
    value beyond them (the ignore label aside) is an error naming the values
    and their pixel counts, unless allow_extra_classes (then they are named
    classN and the summary's "warnings" say so, with the counts).  Every named
    class is a class, also one that no label holds.
    """
    if encoding not in ("png", "none"):
        raise DatasetError(f"--encoding {encoding}: segmentation datasets use png or none (labels must be lossless)")
    inputs = [("--images", images), ("--labels", labels), ("--val-images", val_images),
              ("--val-labels", val_labels), ("--color-map", color_map), ("--class-names", class_names)]
    check_output(output, inputs, force)  # before reading anything: a refused -o costs nothing
    colors, names = (palettes.read_colormap(color_map, "--color-map") if color_map else (None, None))
    if class_names:
        names = palettes.read_labels(class_names, "--class-names")
    pairs = pair_folders(images, labels)
    note = None
    if val_images:
        train, val = split_pairs(pairs, 0.0, seed)[0], pair_folders(val_images, val_labels,
                                                                     ("--val-images", "--val-labels"))
    else:
        train, val = split_pairs(pairs, val_fraction, seed)
        note = split_note(len(pairs), val_fraction, len(val))
    decoder = LabelDecoder(colors)
    first = (train or val)[0][2] if (train or val) else None
    if first:
        decoder(first)  # the first label (in writing order) sets the reference palette, before any thread
    out = OutputFolder(output, force, inputs)
    stats = {}
    with out:
        mean = MeanAccumulator()
        for split, items in (("train", train), ("val", val)):
            if not items:
                continue
            stats[split] = write_segmentation_split(out, split, items, decoder, resize, encoding, channels,
                                                    txn_records, mean if split == "train" else None,
                                                    workers or default_workers())
        hist = sum(s["label_histogram"] for s in stats.values())
        classes = class_count(hist, colors, ignore_label)
        warnings = []
        if class_names:
            problem = extra_classes(hist, len(names), ignore_label, f"--class-names {class_names}")
            if problem and not allow_extra_classes:
                raise DatasetError(f"{problem}; add their names to {class_names}, or pass --allow-extra-classes "
                                   f"to name them class{len(names)}..class{classes - 1}")
            if problem:
                warnings.append(f"{problem}; they are named class{len(names)}..class{classes - 1} "
                                f"(--allow-extra-classes)")
            classes = max(classes, len(names))  # a named class no label holds is still a class
        palette = dataset_palette(classes, colors, decoder.palette)
        names = list(names or [])[:classes] + [f"class{i}" for i in range(len(names or []), classes)]
        write_text(out.join("labels.txt"), names)
        palettes.write_colormap(out.join("palette.txt"), palette)
        mean_info = write_mean(out, mean)
        meta = {
            "type": "segmentation",
            "created_by": "caffeish dataset segmentation",
            "key_format": KEY_FORMAT,
            "encoding": encoding,
            "channels": channels,
            "channel_order": "BGR" if channels == 3 else "gray",
            "resize": list(resize) if resize else None,
            "label_format": sorted(decoder.kinds),
            "color_map": os.path.abspath(color_map) if color_map else None,
            "ignore_label": ignore_label,
            "classes": names,
            "palette": palette.tolist(),
            "seed": seed,
            "splits": {k: {"records": v["records"], "shape": v["shape"], "label_pixels": v["label_histogram"][:max(
                classes, 1)].tolist(), "images": v["images"], "labels": v["labels"]} for k, v in stats.items()},
            "split_note": note,
            **mean_info,
        }
        with open(out.join("dataset.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
    meta["output"] = out.path
    meta["warnings"] = warnings
    return meta


def ordered_map(fn, items, workers):
    """fn over items in a few threads, results in order, at most 2 x workers in flight (bounded memory).

    Pillow and zlib release the GIL while decoding and encoding, which is where
    the time goes.  The first error stops the rest and is raised in order.
    """
    if workers <= 1:
        yield from map(fn, items)
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(workers)
    inflight = deque()
    try:
        for item in items:
            inflight.append(pool.submit(fn, item))
            if len(inflight) >= 2 * workers:
                yield inflight.popleft().result()
        while inflight:
            yield inflight.popleft().result()
    finally:
        for f in inflight:
            f.cancel()
        pool.shutdown(wait=True)


def default_workers():
    return max(1, min(4, os.cpu_count() or 1))


def encode_pair(item, decoder, resize, encoding, channels):
    """One image/label pair -> (image array, serialized feature and label Datums, label histogram)."""
    _, image_path, label_path = item
    labels = decoder(label_path)
    size = image_size(image_path)
    if size != (labels.shape[1], labels.shape[0]):
        raise DatasetError(
            f"{image_path} is {size[0]}x{size[1]} but its label image {label_path} is "
            f"{labels.shape[1]}x{labels.shape[0]} (WxH); image and label sizes must match"
        )
    image, _ = load_image(image_path, channels, resize)
    labels = resize_labels(labels, resize)
    return (image, make_datum(image, 0, encoding).SerializeToString(),
            make_datum(labels[np.newaxis], 0, encoding).SerializeToString(),
            np.bincount(labels.ravel(), minlength=256))


def write_segmentation_split(out, split, items, decoder, resize, encoding, channels, txn_records, mean,
                             workers=1):
    """One stage: <split>_db/features and <split>_db/labels, record by record, plus <split>.txt."""
    os.makedirs(out.join(f"{split}_db"))
    hist = np.zeros(256, dtype=np.int64)
    shapes = set()
    encoded = ordered_map(lambda item: encode_pair(item, decoder, resize, encoding, channels), items, workers)
    with LmdbWriter(out.join(f"{split}_db", "features"), txn_records=txn_records) as features, \
            LmdbWriter(out.join(f"{split}_db", "labels"), txn_records=txn_records) as label_db, \
            open(out.join(f"{split}.txt"), "w", encoding="utf-8") as listing:
        bar = progress.bar(total=len(items), desc=split, unit="pair")
        for i, ((_, image_path, label_path), (image, feature, label, counts)) in enumerate(zip(items, encoded)):
            key = (KEY_FORMAT % i).encode()
            features.put(key, feature)
            label_db.put(key, label)
            hist += counts
            shapes.add(image.shape)
            if mean is not None:
                mean.add(image, image_path)
            listing.write(f"{key.decode()} {os.path.abspath(image_path)} {os.path.abspath(label_path)}\n")
            bar.update()
        bar.close()
    return {"records": len(items), "shape": list(next(iter(shapes))) if len(shapes) == 1 else None,
            "label_histogram": hist, "images": os.path.dirname(os.path.abspath(items[0][1])),
            "labels": os.path.dirname(os.path.abspath(items[0][2]))}


def class_count(hist, colors, ignore_label):
    """The number of classes: the colour map's, else one past the largest label value seen
    (the ignore label aside)."""
    if colors is not None:
        return len(colors)
    seen = np.nonzero(hist)[0]
    if ignore_label is not None:
        seen = seen[seen != ignore_label]
    return int(seen.max()) + 1 if seen.size else 1


def extra_classes(hist, named, ignore_label, what):
    """The label values at or past `named` (the ignore label aside) with their pixel counts, as one
    sentence for an error or a warning; None when every value is named."""
    values = [int(v) for v in np.nonzero(hist)[0] if v >= named and v != ignore_label]
    if not values:
        return None
    shown = ", ".join(f"{v} ({int(hist[v]):,} pixel{'' if hist[v] == 1 else 's'})" for v in values[:12])
    more = f" and {len(values) - 12} more" if len(values) > 12 else ""
    span = f"0..{named - 1}" if named else "none"
    return (f"{what} names {named} class{'' if named == 1 else 'es'} ({span}) but the labels hold "
            f"{'value' if len(values) == 1 else 'values'} {shown}{more}"
            + (f" (the ignore label {ignore_label} aside)" if ignore_label is not None else ""))


def dataset_palette(classes, colors, palette):
    """K x 3 colours: the colour map, else the labels' palette, padded with PASCAL VOC's colours."""
    return palettes.pad_with_pascal(colors if colors is not None else palette, classes)


def write_mean(out, mean):
    """mean.binaryproto (1 x C x H x W float, as compute_image_mean) and the per-channel means."""
    value = mean.mean()
    if value is None:
        note = None
        if mean.varies:
            a, b, path = mean.varies
            note = (f"no mean.binaryproto: training images differ in size ({a} and {b} at {path}); "
                    f"use --resize for a mean image")
        return {"mean_file": None, "mean_value": None, "mean_note": note}
    io.write_binaryproto(out.join("mean.binaryproto"), value[np.newaxis])
    return {"mean_file": "mean.binaryproto", "mean_value": [float(v) for v in value.mean(axis=(1, 2))],
            "mean_note": None}


def format_summary(meta):
    lines = [f"wrote {meta['output']} ({meta['type']})"]
    for split, s in meta["splits"].items():
        shape = "x".join(str(d) for d in s["shape"]) if s["shape"] else "varies"
        lines.append(f"  {split}: {s['records']:,} record{'' if s['records'] == 1 else 's'}, {shape}")
    if meta.get("classes"):
        lines.append(f"  classes: {len(meta['classes'])}")
    for key in ("split_note", "mean_note"):
        if meta.get(key):
            lines.append(f"  note: {meta[key]}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- classification


def class_folders(images):
    """[(class name, [image paths])] of the subfolders of `images`, sorted by name (label = index)."""
    if not os.path.isdir(images):
        raise DatasetError(f"--images {images}: not a folder")
    classes = []
    for name in sorted(os.listdir(images)):
        folder = os.path.join(images, name)
        if not os.path.isdir(folder):
            continue
        files = []
        for root, dirs, names in os.walk(folder, followlinks=True):
            dirs.sort()
            files += [os.path.join(root, n) for n in sorted(names) if is_image_name(n)]
        if files:
            classes.append((name, files))
    if len(classes) < 1:
        raise DatasetError(f"--images {images}: no subfolders with images (one subfolder per class)")
    return classes


def build_classification(images, output, val_fraction=0.1, resize=None, encoding="none", channels=3, seed=0,
                         txn_records=256, force=False, workers=None):
    """Build a classification dataset (Caffe's convert_imageset and compute_image_mean, DIGITS' layout).

    One subfolder of --images per class, sorted by name: the label is its
    index.  Writes train_db and val_db (Datums with labels; keys
    "%08d_<path>" as convert_imageset), labels.txt, train.txt / val.txt
    ("path label", convert_imageset's list format), mean.binaryproto and
    dataset.json.  All images must share one size (or pass --resize).
    """
    check_output(output, [("--images", images)], force)
    classes = class_folders(images)
    items = [(path, label) for label, (_, files) in enumerate(classes) for path in files]
    train, val = split_pairs(items, val_fraction, seed)
    note = split_note(len(items), val_fraction, len(val), "images")
    out = OutputFolder(output, force, [("--images", images)])
    stats = {}
    with out:
        mean = MeanAccumulator()
        for split, entries in (("train", train), ("val", val)):
            if entries:
                stats[split] = write_classification_split(out, split, entries, images, resize, encoding,
                                                          channels, txn_records, mean if split == "train" else None,
                                                          workers or default_workers())
        if mean.varies:
            a, b, path = mean.varies
            raise DatasetError(f"{path} is {b[2]}x{b[1]} but earlier images are {a[2]}x{a[1]} (WxH); Caffe's "
                               f"Data layer batches need one size: pass --resize WxH")
        names = [name for name, _ in classes]
        write_text(out.join("labels.txt"), names)
        mean_info = write_mean(out, mean)
        meta = {
            "type": "classification",
            "created_by": "caffeish dataset classification",
            "encoding": encoding,
            "channels": channels,
            "channel_order": "BGR" if channels == 3 else "gray",
            "resize": list(resize) if resize else None,
            "classes": names,
            "seed": seed,
            "splits": {k: {"records": v["records"], "shape": v["shape"], "label_counts": v["counts"]}
                       for k, v in stats.items()},
            "split_note": note,
            **mean_info,
        }
        with open(out.join("dataset.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
    meta["output"] = out.path
    return meta


def write_classification_split(out, split, entries, root, resize, encoding, channels, txn_records, mean,
                               workers=1):
    counts = {}
    shapes = set()

    def encode(entry):
        image, _ = load_image(entry[0], channels, resize)
        return image, make_datum(image, entry[1], encoding).SerializeToString()

    with LmdbWriter(out.join(f"{split}_db"), txn_records=txn_records) as db, \
            open(out.join(f"{split}.txt"), "w", encoding="utf-8") as listing:
        bar = progress.bar(total=len(entries), desc=split, unit="img")
        for i, ((path, label), (image, value)) in enumerate(zip(entries, ordered_map(encode, entries, workers))):
            rel = os.path.relpath(path, root)
            db.put(f"{KEY_FORMAT % i}_{rel}".encode("utf-8", "surrogateescape"), value)
            counts[label] = counts.get(label, 0) + 1
            shapes.add(image.shape)
            if mean is not None:
                mean.add(image, path)
            listing.write(f"{rel} {label}\n")
            bar.update()
        bar.close()
    return {"records": len(entries), "shape": list(next(iter(shapes))) if len(shapes) == 1 else None,
            "counts": {str(k): v for k, v in sorted(counts.items())}}


# ---------------------------------------------------------------------------- show


def find_databases(path):
    """([(name, LMDB path)], dataset folder) of a database or of the databases of a dataset folder.

    Every database a dataset folder has is listed, a broken one included (a stage folder without
    data.mdb, a database that is a plain file, a data.mdb that links to a device): reading it then
    says what is wrong, rather than `show` leaving it out.  A stage with features but no labels (or
    the reverse) is an error here."""
    path = os.path.abspath(path)
    if os.path.lexists(os.path.join(path, "data.mdb")) or not os.path.isdir(path):
        return [(os.path.basename(path), path)], os.path.dirname(path)
    found = []
    stages = [(split, os.path.join(path, split)) for split in ("train_db", "val_db", "test_db")]
    stages += [("", path)]
    for split, folder in stages:
        parts = [p for p in ("features", "labels") if os.path.lexists(os.path.join(folder, p))]
        if split and not os.path.lexists(folder):
            continue
        if split and (not os.path.isdir(folder) or os.path.lexists(os.path.join(folder, "data.mdb")) or not parts):
            found.append((split, folder))  # a classification database (or not a database: LmdbReader says)
            continue
        if len(parts) == 1:
            missing = "labels" if parts[0] == "features" else "features"
            raise CaffeishError(f"{os.path.join(folder, parts[0])}: has no '{missing}' database beside it; a "
                                f"segmentation stage holds both features and labels")
        found += [(f"{split}/{part}" if split else part, os.path.join(folder, part)) for part in parts]
    if not found:
        LmdbReader(path)  # raises the error that says what is there
    return found, path


def stage_pairs(databases):
    """[(features, labels)] of the stages whose two databases are both listed."""
    paths = {name: db for name, db in databases}
    pairs = []
    for name, db in databases:
        if name.endswith("features") and name[:-len("features")] + "labels" in paths:
            pairs.append((db, paths[name[:-len("features")] + "labels"]))
    return pairs


def read_palette(root, n):
    """palette.txt of a dataset folder (K x 3), padded with PASCAL VOC's colours up to max(n, 256)."""
    path = os.path.join(root, "palette.txt") if root else None
    colors = palettes.read_colormap(path, "--color-map")[0] if path and os.path.isfile(path) else None
    return palettes.pad_with_pascal(colors, max(n, 256))


def scan_database(path, is_label_db):
    """Record count, shapes, encodings, Datum labels and (for a label database) class pixel counts."""
    shapes, encodings, labels = {}, {}, {}
    pixels = np.zeros(256, dtype=np.int64)
    with LmdbReader(path) as reader:
        total = len(reader)
        for key, datum in progress.bar(reader.datums(), total=total, desc=os.path.basename(path), unit="rec"):
            enc = datum_encoding(datum)
            encodings[enc] = encodings.get(enc, 0) + 1
            labels[datum.label] = labels.get(datum.label, 0) + 1
            if is_label_db:
                arr = datum_array(datum, None, reader.where(key))
                shape = arr.shape
                if arr.dtype == np.uint8:
                    pixels += np.bincount(arr.ravel(), minlength=256)
            elif datum.encoded:
                shape = encoded_shape(datum.data, reader.where(key))
            else:
                shape = (datum.channels, datum.height, datum.width)
            shapes[shape] = shapes.get(shape, 0) + 1
    return {"records": total, "shapes": shapes, "encodings": encodings, "labels": labels,
            "pixels": pixels if is_label_db else None}


def inspect_dataset(path, dump=None):
    """Each database's record count, shapes, encoding and Datum label histogram; class frequencies
    (pixel shares) for label databases; with dump=(N, DIR), write sample images (labels colourized).
    Returns {"databases": rows, "class_frequencies": rows, "notes": lines} (show_dataset renders them)."""
    databases, root = find_databases(path)
    root = root if os.path.isfile(os.path.join(root, "labels.txt")) else dataset_meta.dataset_root(databases[0][1])
    names = palettes.read_labels(os.path.join(root, "labels.txt")) if root and os.path.isfile(
        os.path.join(root, "labels.txt")) else []
    try:
        ignore = dataset_meta.read(root).ignore_label if root else None
    except RecursionError:
        raise CaffeishError(f"{os.path.join(root, 'dataset.json')}: nested too deeply to be a dataset's record") from None
    for features, labels in stage_pairs(databases):
        check_pair(features, labels)  # records pair by position: a lost one would shift every later pair
    rows, class_rows, notes = [], [], []
    for name, db in databases:
        is_label_db = os.path.basename(db) == "labels"
        info = scan_database(db, is_label_db)
        shapes = sorted(info["shapes"].items(), key=lambda kv: -kv[1])
        shape_text = ", ".join("x".join(map(str, s)) + (f" ({n:,})" if len(shapes) > 1 else "") for s, n in shapes[:3])
        if len(shapes) > 3:
            shape_text += f", ... ({len(shapes)} sizes)"
        label_text = "-" if is_label_db or os.path.basename(db) == "features" else ", ".join(
            f"{_name(names, k)}: {v:,}" for k, v in sorted(info["labels"].items())[:12])
        rows.append({"db": name, "records": info["records"], "shape": shape_text,
                     "encoding": ", ".join(f"{k}" + (f" ({v:,})" if len(info["encodings"]) > 1 else "")
                                           for k, v in info["encodings"].items()),
                     "labels": label_text})
        if is_label_db:
            pixels = info["pixels"]
            total = int(pixels.sum())
            for cls in np.nonzero(pixels)[0]:
                class_rows.append({"db": name, "class": int(cls), "name": "(ignored)" if cls == ignore else _name(names, int(cls), ""),
                                   "pixels": int(pixels[cls]),
                                   "share": f"{100 * pixels[cls] / total:.1f}%" if total else ""})
        if dump:
            count, folder = dump
            written = dump_records(db, name, count, folder, is_label_db, root)
            notes.append(f"wrote {written} image(s) of {name} into {folder}")
    return {"databases": rows, "class_frequencies": class_rows, "notes": notes}


def _name(names, index, default=None):
    if 0 <= index < len(names):
        return names[index]
    return str(index) if default is None else default


def dump_records(db, name, count, folder, is_label_db, root):
    """Write the first `count` records as PNGs: images in RGB, label maps colourized with the palette."""
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    prefix = name.replace("/", "_")
    written = 0
    palette = read_palette(root, 256) if is_label_db else None
    with LmdbReader(db) as reader:
        for key, datum in reader.datums():
            if written >= count:
                break
            arr = datum_array(datum, None, reader.where(key))
            if arr.dtype != np.uint8:
                arr = np.clip(arr, 0, 255).astype(np.uint8)
            stem = key.decode("ascii", "replace").replace("/", "_")
            target = os.path.join(folder, f"{prefix}_{stem}.png")
            if is_label_db and arr.shape[0] == 1:
                img = Image.fromarray(arr[0], "P")
                img.putpalette(palette[:256].ravel().tolist())
            elif arr.shape[0] == 1:
                img = Image.fromarray(arr[0], "L")
            else:
                img = Image.fromarray(np.ascontiguousarray(arr[[2, 1, 0]].transpose(1, 2, 0)), "RGB")
            img.save(target)
            written += 1
    return written


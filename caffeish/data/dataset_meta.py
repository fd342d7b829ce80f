"""What a dataset folder records: its classes, ignore label and mean (read by surgery fcn and evaluate).

A folder written by `caffeish dataset` holds dataset.json with "classes" (the
names), "ignore_label", "mean_file" (a name inside the folder, or null when the
training images differ in size and no mean image exists), "mean_value" (the
per-channel means, or null) and "mean_note" (why there is no mean).  A DIGITS
dataset folder has no dataset.json: labels.txt names the classes and
mean.binaryproto, when present, is the mean.

A folder is a dataset when it holds one of MARKERS: dataset.json (ours) or
train_db / val_db (ours and every DIGITS dataset).  labels.txt alone is not a
marker: DIGITS model folders and caffeish model stores hold one too, and
`dataset --force` must never take such a folder for a dataset to replace.
"""
import json
import os

from caffeish.data import palette
from caffeish.errors import CaffeishError

MARKERS = ("dataset.json", "train_db", "val_db")


class DatasetMeta:
    """The facts of one dataset folder; every field None when the folder does not say."""

    def __init__(self, root):
        self.root = root
        self.meta_path = None  # dataset.json when present
        self.record = {}  # what dataset.json says (type, splits, channels, ...), {} without one
        self.classes = None  # class count
        self.classes_from = None  # the file that says so
        self.names = []
        self.ignore_label = None
        self.mean_file = None  # absolute path of an existing mean.binaryproto
        self.mean_value = None  # per-channel means (when there is no mean file or it is missing)
        self.mean_note = None  # why there is no mean, when the dataset says or the file is missing


def is_dataset(folder):
    return os.path.isdir(folder) and any(os.path.exists(os.path.join(folder, m)) for m in MARKERS)


def dataset_root(db_path, levels=3):
    """The dataset folder holding a database (where labels.txt, palette.txt and the mean are), or None.

    Looks at the database's parent and up to `levels` folders in all: a
    classification LMDB lies in OUT/, a segmentation one in OUT/<split>_db/.
    """
    folder = os.path.dirname(os.path.abspath(db_path))
    for _ in range(levels):
        if is_dataset(folder):
            return folder
        folder = os.path.dirname(folder)
    return None


def check_folder(folder, option="--dataset"):
    """Refuse a path that is not an existing dataset folder (one line)."""
    if not os.path.isdir(folder):
        what = "is a file" if os.path.exists(folder) else "no such folder"
        raise CaffeishError(f"{option} {folder}: {what}; give the folder `caffeish dataset` wrote")
    if not is_dataset(folder):
        raise CaffeishError(f"{option} {folder}: not a dataset folder (no {', '.join(MARKERS)})")


def read(root):
    """A DatasetMeta of the folder `root` (unreadable files are treated as absent)."""
    meta = DatasetMeta(root)
    record = {}
    path = os.path.join(root, "dataset.json")
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                loaded = json.load(f)
            if isinstance(loaded, dict):
                record, meta.meta_path, meta.record = loaded, path, loaded
        except (OSError, ValueError):
            pass
    meta.ignore_label = record.get("ignore_label")
    if isinstance(record.get("classes"), list) and record["classes"]:
        meta.names = [str(n) for n in record["classes"]]
        meta.classes, meta.classes_from = len(meta.names), path
    labels = os.path.join(root, "labels.txt")
    if os.path.isfile(labels):
        names = palette.read_labels(labels)
        if meta.classes is None and names:
            meta.classes, meta.classes_from = len(names), labels
        if names:
            meta.names = names
    _read_mean(meta, record)
    return meta


def _read_mean(meta, record):
    name = record.get("mean_file", "mean.binaryproto") if meta.meta_path else "mean.binaryproto"
    if name:
        mean_file = os.path.join(meta.root, name)
        if os.path.isfile(mean_file):
            meta.mean_file = mean_file
            return
        if meta.meta_path:
            meta.mean_note = f"{meta.meta_path} names the mean {mean_file}, which does not exist"
    values = record.get("mean_value")
    if isinstance(values, list) and values and all(isinstance(v, (int, float)) for v in values):
        meta.mean_value = [float(v) for v in values]
        return
    if meta.mean_note is None:
        meta.mean_note = record.get("mean_note") or f"the dataset {meta.root} records no mean"

"""A train/val net for a `caffeish dataset` folder: LMDB Data layers in front of a net, a loss and an
accuracy behind it.  What DIGITS adds to a "custom network" before it trains, what `surgery fcn
--dataset` writes beside its deploy net, and what a training job of `caffeish serve` runs.

`wrap(...)` puts the layers around a list of body layers: per phase (TRAIN reads DATASET/train_db,
TEST DATASET/val_db), a segmentation dataset gets two Data layers (`features` -> the data blob,
`labels` -> `label`), a classification dataset one Data layer with both tops; then the body, a
SoftmaxWithLoss `loss` and an Accuracy `accuracy` (TEST only) on the score blob and `label`.

`from_deploy(deploy, dataset)` does it for a deploy net as `caffeish surgery` or a model store
writes it: its single Input is the data blob; its single output is the score (a final Softmax, the
`prob` of a classifier's deploy net, is dropped, as DIGITS does); a net that reads or writes files
itself (Data, ImageData, HDF5Data/Output, WindowData, MemoryData, DummyData) or runs code (Python)
is refused, so that the result reads the dataset and nothing else.
"""
import os

from caffeish.data import dataset_meta
from caffeish.errors import CaffeishError
from caffeish.formats.io import printable
from caffeish.formats.schema import TEST, TRAIN, pb
from caffeish.graph.graph import filter_net, make_state

SEGMENTATION, CLASSIFICATION = "segmentation", "classification"
DATA_TYPES = {"Data", "ImageData", "HDF5Data", "WindowData", "MemoryData", "DummyData", "AnnotatedData"}
FILE_OR_CODE_TYPES = DATA_TYPES | {"HDF5Output", "Python"}
DROPPED_AT_END = {"Softmax"}


def data_layer(name, tops, phase, source, batch_size, mean=None, crop_size=0, mirror=False):
    """An LMDB Data layer; mean: ("file", path), ("values", [...]) or None."""
    layer = pb.LayerParameter(name=name, type="Data")
    layer.top.extend([tops] if isinstance(tops, str) else tops)
    layer.include.add().phase = phase
    if mean is not None:
        kind, value = mean
        if kind == "file":
            layer.transform_param.mean_file = value
        else:
            layer.transform_param.mean_value.extend(value)
    if crop_size:
        layer.transform_param.crop_size = int(crop_size)
    if mirror:
        layer.transform_param.mirror = True
    dp = layer.data_param
    dp.source = source
    dp.batch_size = batch_size
    dp.backend = pb.DataParameter.LMDB
    return layer


def wrap(name, body, data_blob, score_blob, dataset_root, kind=SEGMENTATION, mean=None, batch_size=1,
         val_batch_size=None, ignore_label=None, normalize=False, crop_size=0, mirror=False):
    """The train/val NetParameter: Data layers, `body` (LayerParameters, no input layers), loss, accuracy.

    dataset_root: the folder (sources are dataset_root/train_db/..., "" gives relative paths);
    mean as data_layer's; normalize: the loss's loss_param.normalize; crop_size and mirror: the Data
    layers' transform_param (mirror at TRAIN only; a segmentation dataset's features and labels share
    their crops and flips, see layers/data.py)."""
    root = dataset_root or ""
    val_batch_size = val_batch_size or batch_size
    out = []
    for phase, db, n in ((TRAIN, "train_db", batch_size), (TEST, "val_db", val_batch_size)):
        flip = mirror and phase == TRAIN
        if kind == SEGMENTATION:
            out.append(data_layer(data_blob, data_blob, phase, os.path.join(root, db, "features"), n, mean,
                                  crop_size, flip))
            out.append(data_layer("label", "label", phase, os.path.join(root, db, "labels"), n, None, crop_size,
                                  flip))
        else:
            out.append(data_layer(data_blob, [data_blob, "label"], phase, os.path.join(root, db), n, mean, crop_size,
                                  flip))
    out += list(body)
    loss = pb.LayerParameter(name="loss", type="SoftmaxWithLoss")
    loss.bottom.extend([score_blob, "label"])
    loss.top.append("loss")
    loss.loss_param.normalize = bool(normalize)
    acc = pb.LayerParameter(name="accuracy", type="Accuracy")
    acc.bottom.extend([score_blob, "label"])
    acc.top.append("accuracy")
    acc.include.add().phase = TEST
    if ignore_label is not None:
        loss.loss_param.ignore_label = int(ignore_label)
        acc.accuracy_param.ignore_label = int(ignore_label)
    out += [loss, acc]
    net = pb.NetParameter(name=name)
    for layer in out:
        net.layer.add().CopyFrom(layer)
    return net


class Dataset:
    """What a train/val net needs of a dataset folder: its kind, classes, ignore label, mean, sizes."""

    def __init__(self, root):
        dataset_meta.check_folder(root, "dataset")
        self.root = root
        self.meta = dataset_meta.read(root)
        record = self.meta.record
        features = os.path.join(root, "train_db", "features")
        self.kind = record.get("type") if record.get("type") in (SEGMENTATION, CLASSIFICATION) else (
            SEGMENTATION if os.path.isdir(features) else CLASSIFICATION)
        self.splits = {}
        for split, info in (record.get("splits") or {}).items():
            if isinstance(info, dict) and isinstance(info.get("records"), int):
                self.splits[split] = {"records": info["records"], "shape": info.get("shape")}
        channels = record.get("channels")
        self.channels = channels if isinstance(channels, int) and channels > 0 else None
        for split in ("train", "val"):
            if split not in self.splits and not os.path.isdir(os.path.join(root, f"{split}_db")):
                raise CaffeishError(f"dataset {printable(root)} has no {split} split ({split}_db); a training job "
                                    f"needs both (build it with a val fraction above 0)")
        if self.splits.get("val", {}).get("records") == 0:
            raise CaffeishError(f"dataset {printable(root)} has an empty val split; a training job tests on it "
                                f"(build it with a val fraction above 0)")

    def records(self, split):
        return self.splits.get(split, {}).get("records")

    def image_hw(self, split="train"):
        """(H, W) of the split's images when they share one size (dataset.json's C x H x W), else None."""
        shape = self.splits.get(split, {}).get("shape")
        if isinstance(shape, list) and len(shape) in (2, 3) and all(isinstance(v, int) and v > 0 for v in shape):
            return tuple(shape[-2:])
        return None

    def mean(self):
        """("file", path) or ("values", [...]) or None, and a note when there is none."""
        if self.meta.mean_file:
            return ("file", self.meta.mean_file), None
        if self.meta.mean_value:
            return ("values", self.meta.mean_value), None
        return None, f"mean: none ({self.meta.mean_note})"


def from_deploy(deploy, dataset, batch_size=1, val_batch_size=None, normalize=True, crop_size=0, mirror=False,
                name=None):
    """(train/val NetParameter, notes) for a deploy NetParameter and a Dataset (see the module doc)."""
    net = filter_net(deploy, make_state(deploy, "TEST"))
    inputs = list(net.input)
    body = []
    for layer in net.layer:
        if layer.type in FILE_OR_CODE_TYPES:
            raise CaffeishError(
                f"layer '{printable(layer.name)}' is a {printable(layer.type)} layer: the network "
                + ("runs Python code" if layer.type == "Python" else "reads or writes files of its own")
                + "; a training job runs a deploy net (an Input layer) on a workspace dataset")
        if layer.type == "Input":
            inputs += list(layer.top)
        else:
            body.append(layer)
    if len(inputs) != 1:
        raise CaffeishError(f"the network has {len(inputs)} inputs ({', '.join(map(printable, inputs)) or 'none'}); "
                            f"a training job feeds it one image blob")
    data_blob = inputs[0]
    score, body = _score(body)
    notes = []
    mean, note = dataset.mean()
    if note:
        notes.append(note)
    ignore = dataset.meta.ignore_label if dataset.kind == SEGMENTATION else None
    if dataset.kind == SEGMENTATION and ignore is None:
        ignore = 255  # caffeish dataset's default, and DIGITS' and FCN's
    out = wrap(name or deploy.name or "net", body, data_blob, score, dataset.root, dataset.kind, mean, batch_size,
               val_batch_size, ignore, normalize, crop_size, mirror)
    return out, notes, score


def _score(body):
    """(the score blob, the body without a final Softmax): the net's single output."""
    produced, used = [], set()
    for layer in body:
        used.update(b for b in layer.bottom)
        for t in layer.top:
            if t not in produced:
                produced.append(t)
    sinks = [t for t in produced if t not in used or _in_place_only(body, t)]
    if len(sinks) != 1:
        raise CaffeishError(f"the network has {len(sinks)} outputs ({', '.join(map(printable, sinks)) or 'none'}); "
                            f"a training job puts its loss on one score blob")
    score = sinks[0]
    last = [l for l in body if score in l.top]
    if len(last) == 1 and last[0].type in DROPPED_AT_END and len(last[0].bottom) == 1 and last[0].top[0] != \
            last[0].bottom[0]:
        body = [l for l in body if l is not last[0]]
        score = last[0].bottom[0]
    return score, body


def _in_place_only(body, blob):
    """True when every layer that reads `blob` writes it in place too (a ReLU after the output)."""
    readers = [l for l in body if blob in l.bottom]
    return bool(readers) and all(blob in l.top for l in readers)

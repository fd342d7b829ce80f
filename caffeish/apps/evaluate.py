"""Evaluate: run a net's TEST phase like `caffe test` (test_net), or score a segmentation net
(evaluate_segmentation); the library side of `caffeish evaluate`, whose command-line face is
tools/evaluate.py.

test_net (`caffeish evaluate NET WEIGHTS`) is `caffe test`: it builds the net
at TEST, runs --iterations forward passes (its Data layers read the next batch
each time, wrapping around at the end of the database) and reports the mean of
every scalar output over the iterations, a loss output with its weight as
Caffe does ("loss = 0.7 (* 1 = 0.7 loss)"), then their weighted sum.  --db
fills in the sources of the Data layers from a dataset folder, as DIGITS does
when it runs a job's net (DIGITS' prototxts leave `source` empty): the layer
whose top is 'label' reads val_db/labels, the others val_db/features (a
classification val_db for all).  A DIGITS net with 'val' stage rules gets the
stage 'val' unless --stage says otherwise.

evaluate_segmentation (`caffeish evaluate segmentation`) runs the net on
image/label pairs and reports score.py's metrics (fcn.berkeleyvision.org):
pixel accuracy, mean class accuracy, mean IU, frequency-weighted IU and each
class's IU; the confusion matrix goes to a CSV file only when asked for:
--confusion FILE (replaced if it exists; 'none' is accepted and writes
nothing).  Before any work, FILE is checked against every input
(io.check_outputs, in tools/evaluate.py): it may not be the net, the weights,
--color-map or --mean, nor lie inside --db's dataset folder, --images,
--labels or a folder the net's data layers read; nor be a folder, or lie in a
folder that does not exist.  When the dataset's class count
(dataset.json / labels.txt, or the colour map) differs from the score blob's
channels, or labels hold values the score blob has no class for, a warning on
stderr says so.  Pairs come from the net's own TEST Data layers, or from --db
(a dataset folder or a stage folder with features/ and labels/) or --images /
--labels folders, fed one pair at a time through the data layer's
transform_param (or --mean-value / --mean / --scale for a deploy net); labels
are cropped like the images.  A deploy net fed from --db with none of those
options subtracts the dataset's mean (its mean.binaryproto, else the
per-channel mean dataset.json records), as the dataset's train/val net does,
and says so on stderr; --mean none turns it off.  A relative transform_param
mean_file is looked up as Caffe users expect (`resolve_mean_file`): with --db
in the dataset folder, then beside the net, then in the current folder;
without --db in the current folder (where caffe runs), then in the folder of
the dataset the layer reads, then beside the net.

The score blob is the loss or accuracy layer's first bottom, else the net's one
4-D output.  An ArgMax over the channels (a deploy net ending in a label map)
is walked back to the scores it reads, with a note; any other blob of one
channel is refused (its argmax is class 0 at every pixel).
"""
import contextlib
import math
import os

import numpy as np

from caffeish.data import dataset_meta
from caffeish.formats import io
from caffeish.apps import progress
from caffeish.apps.inference import channel_argmax
from caffeish.data import palette as palettes
from caffeish.errors import CaffeishError, InputShapeRequired
from caffeish.data.metrics import ConfusionMatrix
from caffeish.formats.schema import TEST, pb

LOSS_TYPES_WITH_LABEL = ("SoftmaxWithLoss", "Accuracy")


# ---------------------------------------------------------------------------- the net


def uses_stage(net, stage):
    rules = [r for layer in net.layer for r in list(layer.include) + list(layer.exclude)]
    return any(stage in r.stage or stage in r.not_stage for r in rules)


def net_state(net, stages):
    """The stages to build with: the user's, else DIGITS' 'val' when the net's rules name it."""
    if stages is not None:
        return list(stages)
    return ["val"] if uses_stage(net, "val") else []


def stage_databases(db):
    """(features, labels) LMDB paths of a dataset folder, a stage folder or one LMDB (labels may be None)."""
    db = os.path.abspath(db)
    if os.path.isfile(os.path.join(db, "data.mdb")):
        return db, None
    stage = db
    for name in ("val_db", "test_db", "train_db"):
        if os.path.isdir(os.path.join(db, name)):
            stage = os.path.join(db, name)
            break
    if os.path.isfile(os.path.join(stage, "data.mdb")):
        return stage, None
    features, labels = os.path.join(stage, "features"), os.path.join(stage, "labels")
    if not os.path.isdir(features):
        raise CaffeishError(f"--db {db}: not an LMDB, a dataset folder (val_db/) or a stage folder (features/, labels/)")
    return features, labels if os.path.isdir(labels) else None


def set_sources(net, db):
    """Point the net's Data layers at a dataset's databases (DIGITS' convention); returns the count."""
    features, labels = stage_databases(db)
    count = 0
    for layer in net.layer:
        if layer.type != "Data":
            continue
        is_label = layer.name == "label" or (len(layer.top) == 1 and layer.top[0] == "label")
        if is_label and labels is None:
            raise CaffeishError(f"--db {db}: layer '{layer.name}' reads labels, but there is no labels database")
        layer.data_param.source = labels if is_label else features
        layer.data_param.backend = pb.DataParameter.LMDB
        count += 1
    if not count:
        raise CaffeishError(f"--db {db}: the net has no Data layers to read it")
    return count


def _dataset_folder(db):
    """The folder a relative mean_file is looked up in for --db: the dataset folder holding its databases
    (else the --db folder itself)."""
    return dataset_meta.dataset_root(stage_databases(db)[0]) or os.path.abspath(db)


def resolve_mean_file(path, layer, net_path, db=None, hint=None):
    """Where a data layer's relative transform_param.mean_file is, as Caffe users expect: with --db in the
    dataset folder (where `caffeish dataset` writes mean.binaryproto), then beside the net, then in the
    current folder; without --db in the current folder (where caffe runs), then in the folder of the dataset
    the layer reads, then beside the net.  Absolute paths are kept; a file found nowhere is an error naming
    every place tried and what to pass instead."""
    if not path or os.path.isabs(path):
        return path
    beside_net = os.path.dirname(os.path.abspath(net_path))
    if db:
        folders = [_dataset_folder(db), beside_net, os.getcwd()]
    else:
        source = layer.data_param.source if layer.type == "Data" else ""
        folders = [os.getcwd(), dataset_meta.dataset_root(source) if source else None, beside_net]
    tried = []
    for folder in folders:
        candidate = os.path.normpath(os.path.join(folder, path)) if folder else None
        if candidate and candidate not in tried:
            if os.path.isfile(candidate):
                return candidate
            tried.append(candidate)
    hint = hint or ("pass --mean FILE (or --mean none)" if db else
                    "pass --db DATASET (the folder holding it), or --mean FILE with --db / --images")
    raise CaffeishError(f"layer '{layer.name}': transform_param mean_file '{path}' not found (looked for "
                        f"{', '.join(tried)}); {hint}")


def resolve_mean_files(net, net_path, db=None, stages=None, level=0):
    """resolve_mean_file for every data layer of a NetParameter that runs at TEST (in place)."""
    from caffeish.graph.graph import layer_included, make_state

    state = make_state(net, TEST, level, net_state(net, stages))
    hint = "give its full path in the net's transform_param" + ("" if db else ", or pass --db DATASET")
    for layer in net.layer:
        if layer.transform_param.mean_file and layer_included(layer, state):
            layer.transform_param.mean_file = resolve_mean_file(layer.transform_param.mean_file, layer, net_path,
                                                                db, hint)


def build_net(net_path, weights, stages=None, level=0, device=None, db=None, input_shapes=None, runnable=True):
    """A caffeish Net at TEST with the right stages and sources; refuses one whose data layers cannot run."""
    from caffeish.runtime.net import Net

    net = io.read_net(net_path)
    if db:
        set_sources(net, db)
    resolve_mean_files(net, net_path, db, stages, level)
    stages = net_state(net, stages)
    try:
        built = Net(net, weights=None if weights in (None, "none") else weights, phase=TEST, level=level,
                    stages=stages, device=device, input_shapes=input_shapes, keep=False)
    except InputShapeRequired as e:
        raise CaffeishError(f"{net_path}: {e}; to read a dataset, pass --db DATASET") from None
    built.source = net_path
    if runnable:
        fed = [t for t in built.input_names]
        if fed:
            raise CaffeishError(
                f"{net_path}: the TEST net has inputs {fed} that nothing reads (Input layers, or data layers "
                f"whose files are not here); evaluate needs Data layers that read a database (--db DATASET)"
            )
    return built


def output_loss_weights(net):
    """{output blob: loss weight} as Caffe's Net assigns them (a loss layer's first top: 1)."""
    weights = {}
    for node in net.nodes:
        for j, top in enumerate(node.tops):
            if j < len(node.param.loss_weight):
                w = node.param.loss_weight[j]
            else:
                w = 1.0 if node.type.endswith("Loss") and j == 0 else 0.0
            weights[top] = float(w)
    return weights


# ---------------------------------------------------------------------------- caffe test


def test_net(net_path, weights, iterations=50, db=None, stages=None, level=0, device=None):
    """`caffe test`: the mean of each scalar output over `iterations` TEST forward passes."""
    if iterations < 1:
        raise CaffeishError("--iterations must be at least 1")
    net = build_net(net_path, weights, stages, level, device, db)
    outputs = list(net.outputs)
    sums = {name: 0.0 for name in outputs}
    skipped = {}
    for _ in progress.bar(range(iterations), total=iterations, desc="test", unit="batch"):
        out = net.forward()
        for name in outputs:
            value = np.asarray(out[name])
            if value.size != 1:
                skipped[name] = tuple(value.shape)
                continue
            sums[name] += float(value.reshape(()))
    loss_weights = output_loss_weights(net)
    rows = []
    loss = 0.0
    for name in outputs:
        if name in skipped:
            continue
        mean = sums[name] / iterations
        w = loss_weights.get(name, 0.0)
        loss += w * mean
        rows.append({"output": name, "mean": mean, "loss_weight": w})
    return {"net": net_path, "weights": weights, "iterations": iterations, "outputs": rows, "loss": loss,
            "skipped": skipped}


# ---------------------------------------------------------------------------- segmentation


def find_blobs(net, score=None, label=None, notes=None):
    """(score blob, label blob or None, layer reading the label) from the loss/accuracy layer or the outputs.

    A score blob that an ArgMax over the channels wrote (a label map) is replaced by the ArgMax's bottom,
    with a line in `notes`; any other score blob of one channel is refused."""
    scorer = next((n for n in net.nodes if n.type in LOSS_TYPES_WITH_LABEL and len(n.bottoms) >= 2), None)
    if label is None and scorer is not None:
        label = scorer.bottoms[1]
    given = score is not None
    if score is None:
        if scorer is not None:
            score = scorer.bottoms[0]
        else:
            outs = [o for o in net.outputs if len(net.blob_shape(o)) == 4]
            if len(outs) != 1:
                raise CaffeishError(f"cannot tell the score blob among the outputs {net.outputs}; pass --score BLOB")
            score = outs[0]
    known = set(net.graph.blob_shapes)
    for what, blob in (("score", score), ("label", label)):
        if blob is not None and blob not in known:
            raise CaffeishError(f"--{what} {blob}: no such blob in the TEST net")
    return _class_scores(net, score, given, notes), label, scorer


def _class_scores(net, score, given, notes):
    """The blob to take the argmax of: `score`, or the bottom of the ArgMax that wrote it; never one of
    a single channel (its argmax is 0 everywhere: every pixel would be scored as class 0)."""
    node = channel_argmax(net, score)
    if node is not None:
        bottom = _root_blob(net, node.bottoms[0])[0]
        if notes is not None:
            notes.append(f"'{score}' is a label map (ArgMax '{node.name}' over the channels): scoring the "
                         f"{net.blob_shape(node.bottoms[0])[1]}-channel blob '{bottom}' it reads, whose argmax "
                         f"it is")
        return node.bottoms[0]
    shape = net.blob_shape(score)
    if len(shape) < 2 or shape[1] == 1:
        how = "--score" if given else "the score blob"
        raise CaffeishError(f"{how} '{score}' has one channel ({'x'.join(map(str, shape))}): its argmax is class 0 "
                            f"at every pixel; pass --score BLOB naming the blob with one channel per class")
    return score


def _root_blob(net, blob):
    """Follow Split layers back to the blob a data layer produced."""
    producers = {t: n for n in net.nodes for t in n.tops}
    node = producers.get(blob)
    while node is not None and node.type == "Split":
        blob = node.bottoms[0]
        node = producers.get(blob)
    return blob, node


def default_ignore(scorer):
    if scorer is None:
        return None
    p = scorer.param
    if scorer.type == "SoftmaxWithLoss" and p.loss_param.HasField("ignore_label"):
        return p.loss_param.ignore_label
    if scorer.type == "Accuracy" and p.accuracy_param.HasField("ignore_label"):
        return p.accuracy_param.ignore_label
    return None


def evaluate_segmentation(net_path, weights, db=None, images=None, labels=None, color_map=None,
                          ignore_label=None, score=None, label=None, stages=None, level=0, device=None,
                          iterations=None, mean_value=None, mean_file=None, scale=None):
    """score.py's metrics of a segmentation net over a dataset; returns a dict with the confusion matrix."""
    if db or images:
        return _evaluate_pairs(net_path, weights, db, images, labels, color_map, ignore_label, score, label,
                               stages, level, device, mean_value, mean_file, scale)
    net = build_net(net_path, weights, stages, level, device)
    notes = []
    score, label, scorer = find_blobs(net, score, label, notes)
    if label is None:
        raise CaffeishError(f"{net_path}: no label blob (no SoftmaxWithLoss/Accuracy layer); pass --label BLOB, "
                            f"or --db / --images with --labels")
    _, label_node = _root_blob(net, label)
    total = None
    if label_node is not None and label_node.type == "Data":
        from caffeish.formats.datum import LmdbReader

        with LmdbReader(label_node.param.data_param.source) as reader:
            total = len(reader)
    batch = net.blob_shape(label)[0]
    if iterations is None:
        if total is None:
            raise CaffeishError(f"cannot tell how many records the label blob '{_root_blob(net, label)[0]}' has "
                                f"(it is not read by a Data layer); pass --iterations N")
        iterations = math.ceil(total / batch)
    items = total if total is not None and iterations * batch >= total else iterations * batch
    source = label_node.param.data_param.source if label_node is not None and label_node.type == "Data" else None
    meta = dataset_of(source)
    known = dataset_info(meta)
    ignore = pick_ignore(ignore_label, scorer, known[2])
    n = net.blob_shape(score)[1]
    cm = ConfusionMatrix(n, ignore)
    extra = OutOfRange()
    done = 0
    for _ in progress.bar(range(iterations), total=iterations, desc="evaluate", unit="batch"):
        out = net.forward(blobs=[score, label])
        scores, labs = np.asarray(out[score]), np.asarray(out[label])
        for i in range(scores.shape[0]):
            if done == items:
                break
            _update(cm, scores[i], labs[i], f"record {done}", extra)
            done += 1
    names = meta.names if meta else []
    result = _result(cm, names, done, net_path, _root_blob(net, score)[0], _root_blob(net, label)[0], extra,
                     known)
    result["notes"] = notes
    return result


class OutOfRange:
    """Label pixels that are neither the ignore label nor a class of the score blob (score.py drops them)."""

    def __init__(self):
        self.pixels = 0
        self.low = self.high = None

    def add(self, label, n, ignore):
        bad = (label < 0) | (label >= n)
        if ignore is not None:
            bad &= label != ignore
        count = int(np.count_nonzero(bad))
        if count:
            values = label[bad]
            low, high = float(values.min()), float(values.max())
            self.pixels += count
            self.low = low if self.low is None else min(self.low, low)
            self.high = high if self.high is None else max(self.high, high)


def _update(cm, scores, label, where, out_of_range=None):
    pred = scores.argmax(axis=0)
    label = np.asarray(label)
    if label.ndim == 3:
        label = label[0]
    if label.shape != pred.shape:
        raise CaffeishError(f"{where}: the score blob is {pred.shape[0]}x{pred.shape[1]} but its label is "
                            f"{label.shape[0]}x{label.shape[1]} (HxW); crop the scores to the input (a Crop layer)")
    cm.update(label, pred)
    if out_of_range is not None:
        out_of_range.add(label, cm.n, cm.ignore_label)


def dataset_of(db_path):
    """The DatasetMeta of the dataset folder holding the database db_path, or None (none, or no such folder)."""
    root = dataset_meta.dataset_root(db_path) if db_path else None
    return dataset_meta.read(root) if root else None


def dataset_info(meta):
    """What a dataset says (a DatasetMeta or None): (class count, the file that says so, its ignore label).

    The count is dataset.json's classes, else labels.txt's lines (DIGITS); the
    ignore label is dataset.json's.  (None, None, None) outside a dataset folder.
    """
    if meta is None:
        return None, None, None
    return meta.classes, meta.classes_from, meta.ignore_label


def pick_ignore(ignore_label, scorer, dataset_ignore=None):
    """--ignore-label (negative: none), else the loss/accuracy layer's ignore_label, else the dataset's."""
    if ignore_label is not None:
        return None if ignore_label < 0 else ignore_label
    net_ignore = default_ignore(scorer)
    return net_ignore if net_ignore is not None else dataset_ignore


def _source_layers(net):
    """The filtered net's layers without bottoms that produce data, in order."""
    return [layer for layer in net.layer if not len(layer.bottom) and len(layer.top) and layer.type in (
        "Input", "Data", "ImageData", "HDF5Data", "MemoryData", "WindowData", "DummyData", "Python")]


def _pairs_from_db(db, features, labels):
    """(image C x H x W, label H x W, where) from a features and a labels database (of --db), key by key."""
    from caffeish.formats.datum import LmdbReader

    if labels is None:
        raise CaffeishError(f"--db {db}: no labels database beside {features}")
    with LmdbReader(features) as fr, LmdbReader(labels) as lr:
        _check_db_counts(db, features, labels, fr, lr)
        yield len(fr)
        for i, ((fkey, fdatum), (lkey, ldatum)) in enumerate(zip(fr.datums(), lr.datums())):
            _check_db_keys(db, i, fkey, lkey)
            yield _db_pair(fr, lr, fkey, fdatum, ldatum)


def _check_db_counts(db, features, labels, fr, lr):
    if len(fr) != len(lr):
        raise CaffeishError(f"--db {db}: {features} holds {len(fr):,} records but {labels} holds {len(lr):,}")


def _check_db_keys(db, i, fkey, lkey):
    if fkey != lkey:
        raise CaffeishError(f"--db {db}: record {i} has key {fkey!r} in features but {lkey!r} in labels; "
                            f"the two databases are not aligned")


def _db_pair(fr, lr, key, fdatum, ldatum):
    """(image loader, label H x W, where) of one record of --db's features and labels databases."""
    from caffeish.formats.datum import datum_array

    return (lambda color, fd=fdatum, k=key: datum_array(fd, color, fr.where(k)),
            datum_array(ldatum, None, lr.where(key))[0], lr.where(key))


def _db_keys(db, features, labels):
    """The record keys of --db's databases, in order, checked as _pairs_from_db checks them."""
    from caffeish.formats.datum import LmdbReader

    if labels is None:
        raise CaffeishError(f"--db {db}: no labels database beside {features}")
    with LmdbReader(features) as fr, LmdbReader(labels) as lr:
        _check_db_counts(db, features, labels, fr, lr)
        keys = []
        for i, ((fkey, _), (lkey, _)) in enumerate(zip(fr.items(), lr.items())):
            _check_db_keys(db, i, fkey, lkey)
            keys.append(fkey)
    return keys


def _pairs_from_folders(images, labels, color_map):
    from caffeish.apps.dataset import LabelDecoder, pair_folders

    colors = palettes.read_colormap(color_map, "--color-map")[0] if color_map else None
    decoder = LabelDecoder(colors)
    pairs = pair_folders(images, labels)
    yield len(pairs)
    for _, image_path, label_path in pairs:
        yield _folder_pair(decoder, image_path, label_path)


def _folder_pair(decoder, image_path, label_path):
    """(image loader, label H x W, where) of one --images/--labels pair."""
    from caffeish.apps.dataset import load_image

    lab = decoder(label_path)

    def image(color, path=image_path, shape=lab.shape, label_path=label_path):
        arr, size = load_image(path, 1 if color is False else 3)
        if (size[1], size[0]) != shape:
            raise CaffeishError(f"{path} is {size[0]}x{size[1]} but its label image {label_path} is "
                                f"{shape[1]}x{shape[0]} (WxH)")
        return arr

    return image, lab, label_path


def _evaluate_pairs(net_path, weights, db, images, labels, color_map, ignore_label, score, label, stages,
                    level, device, mean_value, mean_file, scale):
    """Feed image/label pairs one at a time through the net's data inputs and score the predictions."""
    scoring = PairScoring(net_path, weights, db, images, labels, color_map, ignore_label, score, label, stages,
                          level, device, mean_value, mean_file, scale)
    pairs = scoring.pairs()
    total = next(pairs)
    for image_of, lab, where in progress.bar(pairs, total=total, desc="evaluate", unit="img"):
        scoring.add(image_of, lab, where)
    return scoring.result()


class PairScoring:
    """Scoring image/label pairs (--db, or --images/--labels): set up once from the net and the options
    (its data layer, the transform_param or the mean options, the dataset's classes), then `add` one pair
    at a time (the net is built at the first pair, with its shapes) and `result()`.

    `pair_refs()` names every pair and `reader()` reads a pair from its name, so that other processes
    score parts of a run (caffeish.apps.distributed): a copy sent to one (pickled) leaves the net, the
    counts and the label decoder behind, keeping the palette the first label image set, and `merge`
    adds the counts that come back."""

    def __init__(self, net_path, weights, db, images, labels, color_map, ignore_label, score, label, stages,
                 level, device, mean_value, mean_file, scale):
        from caffeish.runtime.data_transform import DataTransformer
        from caffeish.graph.graph import filter_net, make_state

        param = io.read_net(net_path)
        stages = net_state(param, stages)
        filtered = filter_net(param, make_state(param, TEST, level, stages))
        scorer = next((layer for layer in filtered.layer if layer.type in LOSS_TYPES_WITH_LABEL
                       and len(layer.bottom) >= 2), None)
        label_blob = label or (scorer.bottom[1] if scorer is not None else None)
        sources = _source_layers(filtered)
        data_layer = next((layer for layer in sources if label_blob not in layer.top), None)
        if data_layer is None:
            raise CaffeishError(f"{net_path}: no data input layer (Input or Data) at TEST")
        self.data_blob = data_layer.top[0]
        self.label_fed = any(label_blob in layer.top for layer in sources)
        tp = pb.TransformationParameter()
        if data_layer.type != "Input":
            tp.CopyFrom(data_layer.transform_param)
        no_mean = isinstance(mean_file, str) and mean_file.lower() == "none"
        if no_mean:
            mean_file = None
        notes = []
        self.databases = stage_databases(db) if db else None
        meta = dataset_of(self.databases[0]) if db else None
        if data_layer.type == "Input" and db and mean_value is None and mean_file is None and scale is None \
                and not no_mean:
            mean_file, mean_value, note = dataset_mean(meta, data_layer.name)
            notes += [note] if note else []
        if no_mean or mean_value is not None or mean_file is not None:
            tp.ClearField("mean_value")
            tp.ClearField("mean_file")
            if mean_value is not None:
                tp.mean_value.extend(mean_value)
            if mean_file is not None:
                tp.mean_file = mean_file
        if scale is not None:
            tp.scale = scale
        if tp.mirror:  # Caffe mirrors at random at TEST too; a score needs each label on its own image
            tp.mirror = False
            notes.append(f"layer '{data_layer.name}': transform_param mirror ignored: images are scored unflipped")
        if tp.mean_file and mean_file is None:  # the data layer's own: found as Caffe users expect
            tp.mean_file = resolve_mean_file(tp.mean_file, data_layer, net_path, db)
        self.transform = DataTransformer(tp, TEST, f"layer '{data_layer.name}' transform_param")
        color = self.transform.color
        if color is None and data_layer.type == "Input" and len(data_layer.input_param.shape):
            dims = data_layer.input_param.shape[0].dim
            color = (dims[1] == 3) if len(dims) > 1 and dims[1] in (1, 3) else None
        known = dataset_info(meta)
        map_names = None
        if color_map:
            colors, map_names = palettes.read_colormap(color_map, "--color-map")
            known = (len(colors), color_map, None)
        if db:
            self.names = meta.names if meta else []
        elif color_map:
            self.names = map_names or []
        else:
            self.names = []
        self.param, self.stages, self.color, self.known, self.notes = param, stages, color, known, notes
        self.label_blob = label_blob
        self.net_path, self.weights, self.db, self.images, self.labels = net_path, weights, db, images, labels
        self.color_map, self.ignore_label, self.score, self.level, self.device = (color_map, ignore_label, score,
                                                                                  level, device)
        self.net = self.cm = self.score_blob = self._decoder = None
        self._palette = None  # (palette, file) the first label image set, for the copies sent elsewhere
        self.extra = OutOfRange()
        self.count = 0

    def __getstate__(self):
        state = dict(self.__dict__)
        decoder = state.pop("_decoder")
        if decoder is not None and decoder.palette is not None:
            state["_palette"] = (decoder.palette, decoder.palette_file)
        state.update(net=None, cm=None, score_blob=None, _decoder=None, extra=OutOfRange(), count=0)
        # protobuf messages travel as their bytes (the generated classes do not pickle)
        state["param"] = self.param.SerializeToString()
        state["transform"] = dict(self.transform.__dict__, param=self.transform.param.SerializeToString())
        return state

    def __setstate__(self, state):
        from caffeish.runtime.data_transform import DataTransformer

        param = pb.NetParameter()
        param.ParseFromString(state["param"])
        tp = pb.TransformationParameter()
        tp.ParseFromString(state["transform"]["param"])
        transform = DataTransformer.__new__(DataTransformer)  # the mean stays the one read here, not read again
        transform.__dict__.update(state["transform"], param=tp)
        self.__dict__.update(state, param=param, transform=transform)

    def pairs(self):
        """The pairs, one at a time, after their count."""
        if self.db:
            return _pairs_from_db(self.db, *self.databases)
        return _pairs_from_folders(self.images, self.labels, self.color_map)

    def pair_refs(self):
        """[a name for each pair, in order]: a record key of --db, or the (image, label) paths."""
        from caffeish.apps.dataset import pair_folders

        if self.db:
            return _db_keys(self.db, *self.databases)
        return [(image, label) for _, image, label in pair_folders(self.images, self.labels)]

    @contextlib.contextmanager
    def reader(self):
        """A function: a name from pair_refs -> (image loader, label H x W, where), as pairs() yields them."""
        if self.db:
            from caffeish.formats.datum import LmdbReader

            features, labels = self.databases
            with LmdbReader(features) as fr, LmdbReader(labels) as lr:
                def read(key):
                    fdatum, ldatum = fr.get(key), lr.get(key)
                    if fdatum is None or ldatum is None:
                        raise CaffeishError(f"{(fr if fdatum is None else lr).where(key)}: no such record "
                                            f"(the database changed during the run)")
                    return _db_pair(fr, lr, key, fdatum, ldatum)

                yield read
            return
        if self._decoder is None:
            from caffeish.apps.dataset import LabelDecoder

            colors = palettes.read_colormap(self.color_map, "--color-map")[0] if self.color_map else None
            self._decoder = LabelDecoder(colors)
            if self._palette is not None:
                self._decoder.palette, self._decoder.palette_file = self._palette
        yield lambda ref: _folder_pair(self._decoder, *ref)

    def prepare(self, image_of, lab, where):
        """(the net's inputs, the label cropped as the image) of one pair."""
        x = self.transform(image_of(self.color), where)
        y = self.transform.crop(lab)
        feed = {self.data_blob: x[np.newaxis]}
        if self.label_fed:
            feed[self.label_blob] = y[np.newaxis, np.newaxis].astype(np.float32)
        return feed, y

    def build(self, feed):
        """The net at the shapes of `feed`, its score blob and an empty confusion matrix."""
        from caffeish.runtime.net import Net

        shapes = {k: v.shape for k, v in feed.items()}
        try:
            self.net = Net(self.param, weights=None if self.weights in (None, "none") else self.weights,
                           phase=TEST, level=self.level, stages=self.stages, device=self.device,
                           input_shapes=shapes, keep=False)
        except InputShapeRequired as e:
            raise CaffeishError(f"{self.net_path}: {e}") from None
        self.score_blob, _, node = find_blobs(self.net, self.score, self.label_blob if self.label_fed else None,
                                              self.notes)
        ignore = pick_ignore(self.ignore_label, node, self.known[2])
        self.cm = ConfusionMatrix(self.net.blob_shape(self.score_blob)[1], ignore)

    def add(self, image_of, lab, where):
        """Score one pair."""
        feed, y = self.prepare(image_of, lab, where)
        if self.net is None:
            self.build(feed)
        out = self.net.forward(blobs=[self.score_blob], **feed)
        _update(self.cm, np.asarray(out[self.score_blob])[0], y, where, self.extra)
        self.count += 1

    def take_counts(self):
        """What `merge` adds: (confusion matrix, pixels not scored, out-of-range pixels, their lowest and
        highest label, pairs); the counts then start again from zero."""
        counts = (self.cm.hist.copy(), self.cm.ignored, self.extra.pixels, self.extra.low, self.extra.high,
                  self.count)
        self.cm = ConfusionMatrix(self.cm.n, self.cm.ignore_label)
        self.extra = OutOfRange()
        self.count = 0
        return counts

    def merge(self, counts):
        """Add the take_counts() of a copy that scored other pairs (the confusion matrices are summed)."""
        hist, ignored, pixels, low, high, count = counts
        if hist.shape != self.cm.hist.shape:
            raise CaffeishError(f"a worker scored {hist.shape[0]} classes, this net {self.cm.n}")
        self.cm.hist += hist
        self.cm.ignored += ignored
        self.count += count
        if pixels:
            self.extra.pixels += pixels
            self.extra.low = low if self.extra.low is None else min(self.extra.low, low)
            self.extra.high = high if self.extra.high is None else max(self.extra.high, high)

    def result(self):
        if self.cm is None:
            raise CaffeishError("no image/label pairs to evaluate")
        result = _result(self.cm, self.names, self.count, self.net_path, _root_blob(self.net, self.score_blob)[0],
                         self.label_blob if self.label_fed else None, self.extra, self.known)
        result["notes"] = self.notes
        return result


def dataset_mean(known, input_name):
    """(mean_file, mean_value, note) for a deploy net fed from --db (`known`: the DatasetMeta of its folder,
    or None): the mean the dataset's train/val net subtracts (its mean.binaryproto, else the per-channel
    mean_value dataset.json records), since a deploy net's Input layer has no transform_param to say it;
    (None, None, None) when it has none."""
    if known is None:
        return None, None, None
    tail = (f", as the dataset's train/val net does (the deploy net's Input layer '{input_name}' has no "
            f"transform_param); --mean none for no mean")
    if known.mean_file:
        return known.mean_file, None, f"subtracting the dataset's mean {known.mean_file}" + tail
    if known.mean_value:
        values = ",".join(f"{v:g}" for v in known.mean_value)
        return None, known.mean_value, f"subtracting the dataset's per-channel mean {values}" + tail
    return None, None, None


def _result(cm, names, count, net_path, score, label, out_of_range=None, known=(None, None, None)):
    s = cm.scores()
    classes = []
    for i in range(cm.n):
        classes.append({"class": i, "name": names[i] if i < len(names) else str(i), "pixels": int(s["pixels"][i]),
                        "predicted": int(s["predicted"][i]), "accuracy": _num(s["class_accuracy"][i]),
                        "iu": _num(s["iu"][i])})
    return {"net": net_path, "score": score, "label": label, "images": count, "classes": classes,
            "pixel_accuracy": _num(s["pixel_accuracy"]), "mean_accuracy": _num(s["mean_accuracy"]),
            "mean_iu": _num(s["mean_iu"]), "fwavacc": _num(s["fwavacc"]), "ignored_pixels": cm.ignored,
            "ignore_label": cm.ignore_label, "confusion": cm.hist,
            "out_of_range_pixels": out_of_range.pixels if out_of_range else 0,
            "out_of_range_labels": [out_of_range.low, out_of_range.high] if out_of_range and out_of_range.pixels
            else None,
            "dataset_classes": known[0], "dataset_classes_from": known[1]}


def _label_range(low, high):
    text = [f"{v:g}" for v in (low, high)]
    return text[0] if low == high else f"{text[0]}..{text[1]}"


def segmentation_warnings(result):
    """Lines for stderr: the dataset's class count differs from the score blob's channels, or labels hold
    values that are no class of the score blob (so they go unscored)."""
    n = len(result["classes"])
    lines = []
    known = result.get("dataset_classes")
    if known is not None and known != n:
        lines.append(f"the dataset has {known} classes ({result['dataset_classes_from']}) but the score blob "
                     f"'{result['score']}' has {n} channels; labels {n} and above are not scored, and the "
                     f"metrics are not those of the dataset's classes")
    elif result.get("out_of_range_pixels"):
        low, high = result["out_of_range_labels"]
        line = (f"{result['out_of_range_pixels']:,} label pixels have values {_label_range(low, high)}, which "
                f"the score blob '{result['score']}' ({n} channels) has no class for; they are not scored")
        if low == high == 255 and result["ignore_label"] is None:
            line += " (if 255 marks borders, as in PASCAL VOC, say so with --ignore-label 255)"
        lines.append(line)
    return lines


def _num(v):
    v = float(v)
    return None if math.isnan(v) else v


def write_confusion(path, result, inputs=()):
    """The confusion matrix as CSV, written atomically to `path` (replaced if it exists; never one of
    `inputs`): one row per label class, one column per predicted class.  Returns the path."""
    import csv
    import io as pyio

    names = [c["name"] for c in result["classes"]]
    buf = pyio.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["label \\ predicted"] + names)
    for name, row in zip(names, result["confusion"]):
        w.writerow([name] + [int(v) for v in row])
    with io.atomic_output(path, inputs) as f:
        f.write(buf.getvalue().encode("utf-8"))
    return path

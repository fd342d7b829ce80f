"""Build a segmentation FCN from a classifier: the DIGITS 5 post's FCN-Alexnet recipe, and FCN-16s/8s.

`build_fcn(classifier, model, classes=K)`:

1. Convolutionalize (caffeish.apps.surgery.convolutionalize, equivalence checked).
2. Keep the layers that compute the classifier's last layer (its input blobs'
   ancestors), with the net's data layers turned into Input layers; drop what
   follows (Softmax "prob", losses, accuracy).
3. Pad the first Convolution (100 by default, as DIGITS and FCN do), so that
   any input size gives a score map that covers the image.
4. Replace the last classifier layer by `score_fr`, a K-way Convolution of the
   same geometry: its weights are kept when K equals the classifier's class
   count, else msra-initialised; with keep_classes the first classes keep the
   classifier's weights (fcn.berkeleyvision.org's expand_score).
5. `upscore`: a Deconvolution with stride S = the net's total stride at
   score_fr, kernel 2S or 2S-1 (the first that makes the Crop offset a whole
   number: 63 for AlexNet, 64 for VGG-16), group K, no bias, lr_mult 0 and
   bilinear weights; then the Crop `score` to the data blob, its offset
   computed by caffeish.apps.offsets (18 for AlexNet).
6. skips (e.g. ("pool4", "pool3")): FCN-16s/8s.  Per pool, coarse to fine: a x2
   (or xF) Deconvolution of the current scores, a zero-initialised 1x1 `score_<pool>`
   Convolution on the pool, a Crop `score_<pool>c` of it to the upsampled
   scores (offset computed) and an Eltwise SUM `fuse_<pool>`; the last fuse is
   upsampled to the input (`upscore8` for FCN-8s).  Names follow voc-fcn8s.

Both a deploy net and a train/val net are built.  The train/val net reads the
dataset layout of `caffeish dataset` (DATASET/train_db/features and labels,
val_db/...) with Data layers and ends with SoftmaxWithLoss (normalize: false)
and Accuracy (TEST phase).  Its mean is the dataset's own: the mean_file that
DATASET/dataset.json names, else the per-channel mean_value it records, else
none (a dataset of mixed-size images has no mean image) with a note saying so.
A class count that differs from the dataset's gets a warning (FCN.warnings):
the loss and evaluate stop at the first label outside the net's classes.

Without classifier weights, `random_weights=True` writes weights for training
from scratch: every layer's own fillers (seeded; score_fr msra when K differs,
upscore bilinear, score_<pool> zeros).  A classifier layer whose weights a
constant filler gives (constant, or no filler: zeros) gets a warning, as in
transplant: it would start with every output alike.
"""
import os
from fractions import Fraction

import numpy as np

from caffeish.apps import train_val
from caffeish.data import dataset_meta
from caffeish.runtime import fillers
from caffeish.errors import CaffeishError, GraphError, ShapeError
from caffeish.graph.graph import Graph
from caffeish.formats.schema import TEST, TRAIN, pb
from caffeish.apps.surgery import (Report, bilinear_weights, blob_lists, convolutionalize, graph_nodes, load_model,
                                   load_net, seeded_rng)

UINT32_MAX = 2**32 - 1  # num_output, pad, kernel_size and batch_size are uint32 fields
INT32_MAX = 2**31 - 1  # ignore_label is an int32


class FCN:
    """The result of build_fcn: deploy and train/val NetParameters, weights, and what was done."""

    def __init__(self, deploy, train_val, blobs, report, conv_report, data_blob, stride, offsets):
        self.deploy = deploy
        self.train_val = train_val
        self.blobs = blobs  # aligned with deploy.layer (None without classifier weights)
        self.report = report
        self.conv_report = conv_report
        self.data_blob = data_blob
        self.stride = stride
        self.offsets = offsets  # {Crop name: offset}
        self.warnings = []  # lines for stderr (the dataset disagrees with the net)

    def arrays(self):
        """{layer name: [array, ...]} of the weights."""
        if self.blobs is None:
            return {}
        return {l.name: b for l, b in zip(self.deploy.layer, self.blobs) if b}


# -- layer builders ---------------------------------------------------------------------------------


def _score_conv(name, bottom, classes, filler="constant"):
    """A 1x1 K-way Convolution with FCN's param specs (lr 1/2, decay 1/0)."""
    layer = pb.LayerParameter(name=name, type="Convolution")
    layer.bottom.append(bottom)
    layer.top.append(name)
    for lr, decay in ((1, 1), (2, 0)):
        spec = layer.param.add()
        spec.lr_mult, spec.decay_mult = lr, decay
    cp = layer.convolution_param
    cp.num_output = classes
    cp.kernel_size.append(1)
    cp.weight_filler.type = filler
    cp.bias_filler.type = "constant"
    return layer


def _deconv(name, bottom, classes, kernel, stride):
    """A per-class bilinear upsampling: group = num_output = K, no bias, lr_mult 0."""
    layer = pb.LayerParameter(name=name, type="Deconvolution")
    layer.bottom.append(bottom)
    layer.top.append(name)
    layer.param.add().lr_mult = 0
    cp = layer.convolution_param
    cp.num_output = classes
    cp.group = classes
    cp.bias_term = False
    cp.kernel_size.append(kernel)
    cp.stride.append(stride)
    cp.weight_filler.type = "bilinear"
    return layer


def _crop(name, data, reference, offset=0):
    layer = pb.LayerParameter(name=name, type="Crop")
    layer.bottom.extend([data, reference])
    layer.top.append(name)
    layer.crop_param.axis = 2
    layer.crop_param.offset.append(offset)
    return layer


def _fuse(name, a, b):
    layer = pb.LayerParameter(name=name, type="Eltwise")
    layer.bottom.extend([a, b])
    layer.top.append(name)
    layer.eltwise_param.operation = pb.EltwiseParameter.SUM
    return layer


def _net(name, layers):
    net = pb.NetParameter(name=name)
    for layer in layers:
        net.layer.add().CopyFrom(layer)
    return net


# -- geometry through the offsets tool --------------------------------------------------------------------


def _stride(net, blob):
    """The total stride S of `blob` relative to the net input (the offsets tool's cumulative scaling 1/S)."""
    from caffeish.apps import offsets

    rows = offsets.offset_table(net, to=blob)
    if not rows:
        return 1
    scales = set(rows[-1]["cum_scale"])
    if len(scales) != 1:
        raise ShapeError(f"blob '{blob}' has different strides along its spatial axes "
                         f"({', '.join(str(1 / s) for s in rows[-1]['cum_scale'])}); an FCN needs one stride")
    stride = 1 / Fraction(scales.pop())
    if stride.denominator != 1 or stride < 1:
        raise ShapeError(f"blob '{blob}' is at scale {1 / stride} of the input, not a whole stride")
    return int(stride)


def _crop_result(net, crop_name):
    """(computed offset or None, error or None) of one Crop, from the offsets tool."""
    from caffeish.apps import offsets

    analysis = offsets.analyze(net)
    for crop in analysis.crops:
        if crop.name == crop_name:
            if crop.error is not None:
                return None, crop.error
            values = set(crop.computed)
            if len(values) != 1:
                return None, f"the offsets differ per axis ({', '.join(str(v) for v in crop.computed)})"
            return values.pop(), None
    raise GraphError(f"internal: Crop '{crop_name}' not found")


def _choose_kernel(layers, make_deconv, crop, factor, fixed=None):
    """Add the deconvolution whose kernel (2F, then 2F-1, or `fixed`) gives `crop` a whole offset.

    layers: the net so far; make_deconv(kernel) -> the Deconvolution; crop: the
    Crop layer that follows it (offset filled in).  Returns (deconv, crop, kernel, offset).
    """
    candidates = [fixed] if fixed is not None else [2 * factor, 2 * factor - 1]
    errors = []
    for k in candidates:
        deconv = make_deconv(k)
        trial = _net("trial", layers + [deconv, crop])
        offset, error = _crop_result(trial, crop.name)
        if error is None:
            done = pb.LayerParameter()
            done.CopyFrom(crop)
            done.crop_param.offset[:] = [offset]
            return deconv, done, k, offset
        errors.append(f"kernel {k}: {error}")
    raise ShapeError(f"Crop '{crop.name}' after Deconvolution '{make_deconv(candidates[0]).name}' (stride {factor}): "
                     f"no kernel gives a whole crop offset: " + "; ".join(errors)
                     + ("" if fixed is not None else " (choose one with --upscore-kernel)"))


# -- the builder ------------------------------------------------------------------------------------------------


def _ancestors(layers, blobs):
    """The layers (in order) needed to compute `blobs` (in-place layers included)."""
    needed, keep = set(blobs), []
    for layer in reversed(layers):
        if any(t in needed for t in layer.top):
            keep.append(layer)
            needed.update(layer.bottom)
    return keep[::-1]


def _input_layer(layer, tops, shapes):
    """An Input layer for a data layer's used tops, with the graph's shapes."""
    if layer.type == "Input" and list(layer.top) == list(tops):
        out = pb.LayerParameter()
        out.CopyFrom(layer)
        del out.include[:]
        del out.exclude[:]
        return out
    out = pb.LayerParameter(name=layer.name, type="Input")
    out.top.extend(tops)
    for t in tops:
        out.input_param.shape.add().dim.extend(shapes[t])
    return out


def _classifier_layer(graph):
    nodes = graph_nodes(graph)
    last = None
    for layer in graph.filtered.layer:
        node = nodes.get(layer.name)
        if node is not None and node.type == "Convolution" and node.param_shapes:
            last = layer
    if last is None:
        raise GraphError("the classifier has no Convolution or InnerProduct layer to turn into the score layer")
    return last, nodes[last.name]


def _pad_first_conv(body, pad, report):
    for layer in body:
        if layer.type == "Convolution":
            cp = layer.convolution_param
            old = list(cp.pad) or ([cp.pad_h, cp.pad_w] if cp.HasField("pad_h") or cp.HasField("pad_w") else [0])
            del cp.pad[:]
            cp.ClearField("pad_h")
            cp.ClearField("pad_w")
            cp.pad.append(pad)
            report.rows.append({"step": "pad", "layer": layer.name,
                                "detail": f"pad {','.join(str(p) for p in old)} -> {pad}"})
            return layer.name
    raise GraphError("the classifier has no Convolution layer to pad")


def _score_weights(cls_arrays, shapes, classes, old_classes, keep_classes, rng):
    """score_fr's blobs: the classifier's (K equal), msra (else), or expanded (keep_classes)."""
    w_shape = shapes[0]
    if classes == old_classes and cls_arrays is not None:
        return [np.asarray(a) for a in cls_arrays], "kept the classifier's weights"
    msra = pb.FillerParameter(type="msra")
    weights = [fillers.fill(msra, w_shape, rng, what="score_fr weights")]
    weights += [np.zeros(s, np.float32) for s in shapes[1:]]
    if keep_classes and cls_arrays is not None:
        if classes < old_classes:
            raise CaffeishError(f"--keep-classes: {classes} classes are fewer than the classifier's {old_classes}; "
                                f"keeping classes only adds new ones after the old ones")
        for new, old in zip(weights, cls_arrays):
            new[:old_classes] = np.asarray(old).reshape((old_classes,) + new.shape[1:])
        return weights, f"classes 0-{old_classes - 1} from the classifier, {classes - old_classes} new (msra)"
    return weights, "msra weights, zero bias"


def build_fcn(classifier, model=None, classes=None, skips=(), pad=100, upscore_kernel=None, keep_classes=False,
              input_shapes=None, verify=True, dataset=None, mean_file="auto", batch_size=1, ignore_label=255,
              seed=0, mean_value=None, random_weights=False):
    """A segmentation FCN from a classifier (see the module docstring); returns an FCN.

    classifier: prototxt path or NetParameter; model: caffemodel path/Model or
    None (then only the nets are built, no weights).  classes: K (default: the
    classifier's class count).  skips: pool blobs for FCN-16s/8s.  pad: the first
    Convolution's pad (None leaves it).  upscore_kernel: the final
    Deconvolution's kernel instead of 2S / 2S-1.  dataset: the folder the
    train/val net's Data layers read (None: paths relative to where Caffe runs);
    it must be a dataset folder.  mean_file: "auto" (the dataset's mean: the
    mean_file dataset.json names, else its mean_value, else none; without a
    dataset, 'mean.binaryproto'), a path, or None (no mean); mean_value:
    per-channel values instead (1 or one per input channel).
    random_weights: without `model`, weights from every layer's fillers (seed)
    for training from scratch, with warnings for constant classifier weights.
    ignore_label: for the loss and accuracy (None: none).  Out-of-range numbers
    (classes, upscore_kernel, batch_size < 1, pad < 0) raise CaffeishError.
    """
    _check_numbers(classes, pad, upscore_kernel, batch_size, ignore_label)
    if mean_value is not None and mean_file not in (None, "auto"):
        raise CaffeishError("give the train/val net's mean as a file or as values, not both")
    if random_weights and model is not None:
        raise CaffeishError("random weights are for a classifier without weights; this one has a caffemodel")
    known = None
    if dataset is not None:
        dataset_meta.check_folder(dataset)
        known = dataset_meta.read(dataset)
    src = load_net(classifier)
    model = load_model(model)
    rng = seeded_rng(seed)
    report = Report([("step", "step"), ("layer", "layer"), ("detail", "detail")])
    has_ip = any(n.type == "InnerProduct" for n in Graph(src, TEST, input_shapes=input_shapes).nodes)
    if has_ip:
        net, blobs, conv_report = convolutionalize(src, model, input_shapes=input_shapes, verify=verify, seed=seed)
        for r in conv_report.rows:
            report.rows.append({"step": "convolutionalize", "layer": r["layer"],
                                "detail": f"{r['kernel']} kernel, {r['old'][0]} -> {r['new'][0]}"})
    else:
        net, conv_report = src, None
        blobs = None if model is None else blob_lists(net, model.layer_blobs())
    arrays = {} if blobs is None else {l.name: list(b) for l, b in zip(net.layer, blobs) if b}
    graph = Graph(net, TEST, input_shapes=input_shapes)
    cls, cls_node = _classifier_layer(graph)
    old_classes = cls.convolution_param.num_output
    classes = old_classes if classes is None else int(classes)
    layers = list(graph.filtered.layer)
    index = [i for i, l in enumerate(layers) if l.name == cls.name][0]
    body_src = _ancestors(layers[:index], cls.bottom)
    names = {l.name for l in body_src} | {t for l in body_src for t in l.top}
    taken = [n for n in ("score_fr", "upscore", "score") if n in names]
    if taken:
        raise GraphError(f"the classifier already has layers or blobs named {', '.join(taken)}: is it an FCN already?")

    # Inputs: data layers become Input layers with the graph's shapes; the body is copied.
    body, inputs = [], []
    needed = {b for l in body_src for b in l.bottom}
    for layer in body_src:
        copy = pb.LayerParameter()
        copy.CopyFrom(layer)
        if not layer.bottom:
            tops = [t for t in layer.top if t in needed]
            copy = _input_layer(layer, tops, graph.blob_shapes)
            inputs += tops
        body.append(copy)
    first_conv = _pad_first_conv(body, pad, report) if pad is not None else None

    # score_fr: the classifier layer with K outputs.
    score = pb.LayerParameter()
    score.CopyFrom(cls)
    score.name = "score_fr"
    del score.top[:]
    score.top.append("score_fr")
    score.convolution_param.num_output = classes
    if classes != old_classes:
        score.convolution_param.weight_filler.CopyFrom(pb.FillerParameter(type="msra"))
        score.convolution_param.bias_filler.CopyFrom(pb.FillerParameter(type="constant"))
    score_shapes = [(classes,) + tuple(cls_node.param_shapes[0][1:])] + [(classes,)] * (len(cls_node.param_shapes) - 1)
    cls_arrays = arrays.get(cls.name)
    if model is not None:
        arrays["score_fr"], how = _score_weights(cls_arrays, score_shapes, classes, old_classes, keep_classes, rng)
    else:
        how = "weights from its fillers when loaded" if classes != old_classes else "classifier layer renamed"
    report.rows.append({"step": "score", "layer": "score_fr",
                        "detail": f"{classes}-way Convolution replacing '{cls.name}' ({old_classes} classes): {how}"})
    arrays.pop(cls.name, None)
    layers_out = body + [score]

    probe = _net("probe", layers_out)
    data_blob = _data_blob(probe, inputs)
    stride = _stride(probe, "score_fr")
    current, current_stride = "score_fr", stride
    offsets = {}
    skip_blobs = _skip_blobs(skips, body, probe)
    for i, pool in enumerate(skip_blobs):
        pool_stride = _stride(probe, pool)
        factor = Fraction(current_stride, pool_stride)
        if factor.denominator != 1 or factor <= 1:
            raise ShapeError(f"--skip {pool}: its stride {pool_stride} does not divide the current stride "
                             f"{current_stride} of '{current}' into a whole factor above 1")
        factor = int(factor)
        tag = pool.replace("/", "_")
        up_name = f"upscore{factor}" if i == 0 else f"upscore_{_tag(skip_blobs[i - 1])}"
        score_pool = _score_conv(f"score_{tag}", pool, classes)
        crop = _crop(f"score_{tag}c", score_pool.name, up_name)
        deconv, crop, k, off = _choose_kernel(layers_out + [score_pool],
                                              lambda k, c=current, n=up_name, f=factor: _deconv(n, c, classes, k, f),
                                              crop, factor)
        layers_out += [deconv, score_pool, crop, _fuse(f"fuse_{tag}", up_name, crop.name)]
        offsets[crop.name] = off
        c_in = graph.blob_shapes[pool][1]
        if model is not None:
            arrays[up_name] = [bilinear_weights((classes, 1, k, k), "caffe")]
            arrays[score_pool.name] = [np.zeros((classes, c_in, 1, 1), np.float32), np.zeros(classes, np.float32)]
        report.rows.append({"step": "skip", "layer": up_name,
                            "detail": f"x{factor} Deconvolution, kernel {k}, stride {factor}, group {classes}, bilinear"})
        report.rows.append({"step": "skip", "layer": score_pool.name,
                            "detail": f"{classes}-way 1x1 Convolution on '{pool}' ({c_in} channels), zero-initialised"})
        report.rows.append({"step": "skip", "layer": crop.name, "detail": f"Crop to '{up_name}', offset {off}"})
        report.rows.append({"step": "skip", "layer": f"fuse_{tag}", "detail": f"Eltwise SUM of '{up_name}' and '{crop.name}'"})
        current, current_stride = f"fuse_{tag}", pool_stride
    final_name = "upscore" if not skip_blobs else f"upscore{current_stride}"
    crop = _crop("score", final_name, data_blob)
    deconv, crop, k, off = _choose_kernel(layers_out, lambda k: _deconv(final_name, current, classes, k, current_stride),
                                          crop, current_stride, fixed=upscore_kernel)
    layers_out += [deconv, crop]
    offsets["score"] = off
    if model is not None:
        arrays[final_name] = [bilinear_weights((classes, 1, k, k), "caffe")]
    report.rows.append({"step": "upsample", "layer": final_name,
                        "detail": f"x{current_stride} Deconvolution, kernel {k}, stride {current_stride}, "
                                  f"group {classes}, no bias, lr_mult 0, bilinear"})
    report.rows.append({"step": "crop", "layer": "score", "detail": f"Crop to '{data_blob}', offset {off}"})

    name = f"FCN-{src.name}" if src.name else "FCN"
    deploy = _net(name, layers_out)
    deploy_graph = _check(deploy, data_blob, classes, input_shapes)
    if mean_value is not None:
        channels = graph.blob_shapes[data_blob][1]
        if len(mean_value) not in (1, channels):
            raise CaffeishError(f"--mean-value gives {len(mean_value)} values but '{data_blob}' has {channels} "
                                f"channels (give 1 value or {channels})")
        mean = ("values", [float(v) for v in mean_value])
    else:
        mean = _mean(mean_file, known, report)
    train_val = _train_val(name, layers_out, inputs, data_blob, graph.blob_shapes, dataset, mean, batch_size,
                           ignore_label)
    warnings = []
    if known is not None and known.classes is not None and known.classes != classes:
        warnings.append(
            f"the net has {classes} classes but the dataset has {known.classes} ({known.classes_from}); "
            + (f"labels {classes} and above are outside the net's classes, so training and evaluate stop at "
               f"the first one" if known.classes > classes else
               f"the net's classes {known.classes} and above never occur in the labels"))
    out_blobs = blob_lists(deploy, arrays) if model is not None else None
    if random_weights:
        zero_by_design = {f"score_{_tag(p)}" for p in skip_blobs}  # FCN's skip scores start at zero
        out_blobs, constant = _random_weights(deploy, deploy_graph, seed, zero_by_design)
        report.rows.append({"step": "weights", "layer": "",
                            "detail": f"random from the layers' fillers (seed {seed}), for training from scratch"})
        for layer, how in constant:
            warnings.append(f"layer '{layer}' starts at a constant filler ({how}): every output of it is alike, "
                            f"so training from scratch cannot tell its channels apart; give it a random "
                            f"weight_filler (gaussian, xavier, msra) in the classifier prototxt")
    if first_conv is not None:
        report.notes.append(f"first Convolution '{first_conv}' padded by {pad}")
    report.notes.append(f"total stride {stride} at score_fr; crop offsets: "
                        + ", ".join(f"{n} {o}" for n, o in offsets.items()))
    fcn = FCN(deploy, train_val, out_blobs, report, conv_report, data_blob, stride, offsets)
    fcn.warnings = warnings
    return fcn


def _random_weights(deploy, graph, seed, skip):
    """(blob lists from every layer's fillers, [(layer, constant filler)] for WEIGHT_TYPES layers not in
    `skip` whose weights a constant filler gives)."""
    rng = seeded_rng(seed)
    arrays, constant = {}, []
    for name, node in graph_nodes(graph).items():
        if not node.param_shapes:
            continue
        specs = node.layer.fillers()
        arrays[name] = [fillers.fill(specs[i] if i < len(specs) else None, shape, rng, what=f"layer '{name}' blob {i}")
                        for i, shape in enumerate(node.param_shapes)]
        how = fillers.constant_weights(node)
        if how is not None and name not in skip:
            constant.append((name, how))
    return blob_lists(deploy, arrays), constant


def _whole(value, what, minimum, maximum=UINT32_MAX):
    """value as an int in [minimum, maximum] (a protobuf field's range), else a CaffeishError naming it."""
    try:
        whole = not isinstance(value, bool) and int(value) == value
    except (TypeError, ValueError, OverflowError):
        whole = False
    if not whole:
        raise CaffeishError(f"{what} must be a whole number, got {value!r}")
    if not minimum <= value <= maximum:
        raise CaffeishError(f"{what} must be " + (f"at least {minimum}" if value < minimum else f"at most {maximum}")
                            + f", got {value}")
    return int(value)


def _check_numbers(classes, pad, upscore_kernel, batch_size, ignore_label):
    """The numeric arguments of build_fcn, checked before any work (the CLI's option names)."""
    if classes is not None:
        _whole(classes, "--classes", 1)
    if pad is not None:
        _whole(pad, "--pad (the first Convolution's pad)", 0)
    if upscore_kernel is not None:
        _whole(upscore_kernel, "--upscore-kernel", 1)
    _whole(batch_size, "--batch-size", 1)
    if ignore_label is not None:
        _whole(ignore_label, "--ignore-label", -INT32_MAX - 1, INT32_MAX)


def _tag(blob):
    return blob.replace("/", "_")


def _data_blob(net, inputs):
    """The net input that score_fr's coordinates come from (the Crop's reference)."""
    from caffeish.apps import offsets

    a = offsets.analyze(net)
    target = a.blob_id("score_fr")
    root = a.name(a.preferred_root(target))
    if root not in inputs:
        raise ShapeError(f"the scores' coordinates trace back to '{root}', not to a net input: "
                         f"{a.root_reason.get(a.preferred_root(target))}")
    return root


def _skip_blobs(skips, body, probe):
    """The --skip blobs (layer names accepted), coarse to fine, each computed by the body."""
    blobs = []
    tops = {t for l in body for t in l.top}
    by_layer = {l.name: l.top[0] for l in body if l.top}
    for s in skips or ():
        s = s.strip()
        if not s:
            continue
        blob = s if s in tops else by_layer.get(s)
        if blob is None:
            raise GraphError(f"--skip {s}: no blob or layer of that name before the classifier layer")
        if blob in blobs:
            raise GraphError(f"--skip names '{blob}' twice")
        blobs.append(blob)
    strides = {b: _stride(probe, b) for b in blobs}
    return sorted(blobs, key=lambda b: -strides[b])


def _check(deploy, data_blob, classes, input_shapes):
    """The deploy net builds, its Crop offsets agree with the offsets tool, and `score` is N x K x H x W."""
    from caffeish.apps import offsets

    problems = offsets.check(deploy)
    if problems:
        raise ShapeError("internal: the built FCN's crop offsets disagree: " + "; ".join(problems))
    graph = Graph(deploy, TEST, input_shapes=input_shapes)
    data, score = graph.blob_shapes[data_blob], graph.blob_shapes["score"]
    if tuple(score) != (data[0], classes) + tuple(data[2:]):
        raise ShapeError(f"internal: the score is {score} for data {data}")
    return graph


def _mean(mean_file, known, report):
    """The train/val net's mean: ("file", path), ("values", [...]) or None (see build_fcn)."""
    if mean_file is None:
        return None
    if mean_file != "auto":
        return "file", os.fspath(mean_file)
    if known is None:
        return "file", "mean.binaryproto"  # no dataset: relative to where Caffe runs, as DIGITS writes it
    if known.mean_file:
        return "file", known.mean_file
    if known.mean_value:
        report.notes.append(f"mean: the dataset has no mean image; the train/val net subtracts its per-channel "
                            f"mean_value {', '.join(f'{v:g}' for v in known.mean_value)}")
        return "values", known.mean_value
    report.notes.append(f"mean: none in the train/val net ({known.mean_note})")
    return None


def _train_val(name, layers, inputs, data_blob, shapes, dataset, mean, batch_size, ignore_label):
    """The train/val net: LMDB Data layers (dataset layout), the FCN, SoftmaxWithLoss and Accuracy."""
    if [t for t in inputs if t != data_blob]:
        raise GraphError(f"the classifier has several inputs ({', '.join(inputs)}); the train/val net reads one image")
    net = train_val.wrap(name, [l for l in layers if l.bottom], data_blob, "score", dataset or "",
                         train_val.SEGMENTATION, mean, batch_size, ignore_label=ignore_label, normalize=False)
    n, c, h, w = shapes[data_blob]
    sizes = {data_blob: (batch_size, c, h, w), "label": (batch_size, 1, h, w)}
    for phase in (TRAIN, TEST):
        Graph(net, phase, input_shapes=sizes)
    return net


def default_train_val_path(deploy_path):
    """fcn.deploy.prototxt -> fcn.train_val.prototxt; fcn.prototxt -> fcn_train_val.prototxt."""
    folder, base = os.path.split(os.fspath(deploy_path))
    stem = base[:-len(".prototxt")] if base.endswith(".prototxt") else base
    if stem.endswith("deploy"):
        stem = stem[:-len("deploy")] + "train_val"
    else:
        stem += "_train_val"
    return os.path.join(folder, stem + ".prototxt")

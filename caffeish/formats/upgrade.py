"""Legacy net and solver upgrades: our restatement of Caffe's `UpgradeNetAsNeeded`.

Every net Caffe reads (prototxt or caffemodel) goes through these steps, in this order:

1. V0 -> V1, when any `layers` entry holds a V0 `layer` message: V0 "padding" layers are folded
   into their conv/pool consumer, and each flat V0 field is routed into the right `*_param`
   (transform fields into `transform_param`, whatever the type). Only name, input, input_dim and
   force_backward survive at net level.
2. Data-transform upgrade: on V1 DATA / IMAGE_DATA / WINDOW_DATA layers, scale, mean_file,
   crop_size and mirror move from the layer's own data parameter into `transform_param`.
3. V1 -> current: `layers` (V1LayerParameter, enum type) become `layer` (LayerParameter, string
   type); blobs_lr / weight_decay / param names / blob_share_mode become `param { ... }` entries.
4. Input fields (`input` + `input_shape` or `input_dim`) become an `Input` layer named "input"
   at the front of the net. Bare `input` names without any shape (old caffemodels) are dropped.
5. BatchNorm layers declaring exactly three `param` entries get lr_mult 0 and decay_mult 0 on
   all three (the other ParamSpec fields are left alone), as Caffe's UpgradeNetBatchNorm does.

Caffe's fatal checks raise `UpgradeError`; the problems Caffe only logs ("not fully compatible")
are reported as lines in the returned change list and the upgrade continues.
"""
from caffeish.errors import UpgradeError
from caffeish.formats.schema import pb

__all__ = [
    "LEGACY_TYPES", "V1_TO_CURRENT", "V0_TO_V1", "SOLVER_TYPES",
    "upgrade_net", "needs_upgrade", "upgrade_solver",
]

# (V1 enum name, V1 enum number, current type string, V0 type string or None).
# The same table as ../shared/caffe/legacy_type_map.tsv, kept here so that the code
# does not need the shared folder.
LEGACY_TYPES = [
    ("NONE", 0, "", None),
    ("ABSVAL", 35, "AbsVal", None),
    ("ACCURACY", 1, "Accuracy", "accuracy"),
    ("ARGMAX", 30, "ArgMax", None),
    ("BNLL", 2, "BNLL", "bnll"),
    ("CONCAT", 3, "Concat", "concat"),
    ("CONTRASTIVE_LOSS", 37, "ContrastiveLoss", None),
    ("CONVOLUTION", 4, "Convolution", "conv"),
    ("DECONVOLUTION", 39, "Deconvolution", None),
    ("DATA", 5, "Data", "data"),
    ("DROPOUT", 6, "Dropout", "dropout"),
    ("DUMMY_DATA", 32, "DummyData", None),
    ("EUCLIDEAN_LOSS", 7, "EuclideanLoss", "euclidean_loss"),
    ("ELTWISE", 25, "Eltwise", None),
    ("EXP", 38, "Exp", None),
    ("FLATTEN", 8, "Flatten", "flatten"),
    ("HDF5_DATA", 9, "HDF5Data", "hdf5_data"),
    ("HDF5_OUTPUT", 10, "HDF5Output", "hdf5_output"),
    ("HINGE_LOSS", 28, "HingeLoss", None),
    ("IM2COL", 11, "Im2col", "im2col"),
    ("IMAGE_DATA", 12, "ImageData", "images"),
    ("INFOGAIN_LOSS", 13, "InfogainLoss", "infogain_loss"),
    ("INNER_PRODUCT", 14, "InnerProduct", "innerproduct"),
    ("LRN", 15, "LRN", "lrn"),
    ("MEMORY_DATA", 29, "MemoryData", None),
    ("MULTINOMIAL_LOGISTIC_LOSS", 16, "MultinomialLogisticLoss", "multinomial_logistic_loss"),
    ("MVN", 34, "MVN", None),
    ("POOLING", 17, "Pooling", "pool"),
    ("POWER", 26, "Power", None),
    ("RELU", 18, "ReLU", "relu"),
    ("SIGMOID", 19, "Sigmoid", "sigmoid"),
    ("SIGMOID_CROSS_ENTROPY_LOSS", 27, "SigmoidCrossEntropyLoss", None),
    ("SILENCE", 36, "Silence", None),
    ("SOFTMAX", 20, "Softmax", "softmax"),
    ("SOFTMAX_LOSS", 21, "SoftmaxWithLoss", "softmax_loss"),
    ("SPLIT", 22, "Split", "split"),
    ("SLICE", 33, "Slice", None),
    ("TANH", 23, "TanH", "tanh"),
    ("WINDOW_DATA", 24, "WindowData", "window_data"),
    ("THRESHOLD", 31, "Threshold", None),
]
V1_TO_CURRENT = {number: string for _, number, string, _ in LEGACY_TYPES}
V1_NAME = {number: name for name, number, _, _ in LEGACY_TYPES}
V0_TO_V1 = {v0: number for _, number, _, v0 in LEGACY_TYPES if v0 is not None}

# SolverParameter.solver_type enum name -> SolverParameter.type string.
SOLVER_TYPES = {
    "SGD": "SGD", "NESTEROV": "Nesterov", "ADAGRAD": "AdaGrad",
    "RMSPROP": "RMSProp", "ADADELTA": "AdaDelta", "ADAM": "Adam",
}

# V0 field -> {V0 type: (V1 sub-message, field in it)}. "*" means any type.
V0_ROUTES = {
    "num_output": {"conv": ("convolution_param", "num_output"),
                   "innerproduct": ("inner_product_param", "num_output")},
    "biasterm": {"conv": ("convolution_param", "bias_term"),
                 "innerproduct": ("inner_product_param", "bias_term")},
    "weight_filler": {"conv": ("convolution_param", "weight_filler"),
                      "innerproduct": ("inner_product_param", "weight_filler")},
    "bias_filler": {"conv": ("convolution_param", "bias_filler"),
                    "innerproduct": ("inner_product_param", "bias_filler")},
    "pad": {"conv": ("convolution_param", "pad"), "pool": ("pooling_param", "pad")},
    "kernelsize": {"conv": ("convolution_param", "kernel_size"),
                   "pool": ("pooling_param", "kernel_size")},
    "group": {"conv": ("convolution_param", "group")},
    "stride": {"conv": ("convolution_param", "stride"), "pool": ("pooling_param", "stride")},
    "pool": {"pool": ("pooling_param", "pool")},
    "dropout_ratio": {"dropout": ("dropout_param", "dropout_ratio")},
    "local_size": {"lrn": ("lrn_param", "local_size")},
    "alpha": {"lrn": ("lrn_param", "alpha")},
    "beta": {"lrn": ("lrn_param", "beta")},
    "k": {"lrn": ("lrn_param", "k")},
    "source": {"data": ("data_param", "source"), "hdf5_data": ("hdf5_data_param", "source"),
               "images": ("image_data_param", "source"),
               "window_data": ("window_data_param", "source"),
               "infogain_loss": ("infogain_loss_param", "source")},
    "scale": {"*": ("transform_param", "scale")},
    "meanfile": {"*": ("transform_param", "mean_file")},
    "batchsize": {"data": ("data_param", "batch_size"),
                  "hdf5_data": ("hdf5_data_param", "batch_size"),
                  "images": ("image_data_param", "batch_size"),
                  "window_data": ("window_data_param", "batch_size")},
    "cropsize": {"*": ("transform_param", "crop_size")},
    "mirror": {"*": ("transform_param", "mirror")},
    "rand_skip": {"data": ("data_param", "rand_skip"),
                  "images": ("image_data_param", "rand_skip")},
    "shuffle_images": {"images": ("image_data_param", "shuffle")},
    "new_height": {"images": ("image_data_param", "new_height")},
    "new_width": {"images": ("image_data_param", "new_width")},
    "concat_dim": {"concat": ("concat_param", "concat_dim")},
    "det_fg_threshold": {"window_data": ("window_data_param", "fg_threshold")},
    "det_bg_threshold": {"window_data": ("window_data_param", "bg_threshold")},
    "det_fg_fraction": {"window_data": ("window_data_param", "fg_fraction")},
    "det_context_pad": {"window_data": ("window_data_param", "context_pad")},
    "det_crop_mode": {"window_data": ("window_data_param", "crop_mode")},
    "hdf5_output_param": {"hdf5_output": ("hdf5_output_param", None)},  # whole message
}
# V0 fields handled outside the routing table; any other V0 field (new_num, new_channels)
# has no destination and Caffe drops it silently.
V0_DIRECT = ("name", "type", "blobs", "blobs_lr", "weight_decay")
# NetParameter fields the V0 upgrade keeps (UpgradeV0Net rebuilds the net from scratch).
V0_NET_KEPT = ("name", "input", "input_dim", "force_backward", "layers")

# V1 data layer type -> its own parameter message, for the data-transform upgrade.
V1_DATA_PARAMS = {
    pb.V1LayerParameter.DATA: "data_param",
    pb.V1LayerParameter.IMAGE_DATA: "image_data_param",
    pb.V1LayerParameter.WINDOW_DATA: "window_data_param",
}
TRANSFORM_FIELDS = ("scale", "mean_file", "crop_size", "mirror")

# V1 fields copied one-to-one into LayerParameter (the *_param messages), as UpgradeV1LayerParameter.
V1_PARAM_FIELDS = tuple(f.name for f in pb.V1LayerParameter.DESCRIPTOR.fields
                        if f.name.endswith("_param"))


def _fmt_num(x):
    """A number as a user wrote it: 1.0 -> '1', 0.5 -> '0.5'."""
    return f"{x:g}" if isinstance(x, float) else str(x)


def _fmt_list(values):
    return "[" + ", ".join(_fmt_num(v) for v in values) + "]"


def _label(name, index, what="layer"):
    """How a layer is named in messages: its name, or its index when it has none."""
    return f"{what} '{name}'" if name else f"{what} #{index}"


def _copy_field(src, src_field, dst, dst_field):
    """Copy one set field (scalar, repeated or message) from src into dst, keeping presence.

    A scalar copied into a repeated field is appended (V0 pad/kernelsize/stride into the
    repeated ConvolutionParameter fields); into a scalar field it is assigned.
    """
    value = getattr(src, src_field)
    src_repeated = src.DESCRIPTOR.fields_by_name[src_field].is_repeated
    fd = dst.DESCRIPTOR.fields_by_name[dst_field]
    if fd.is_repeated:
        target = getattr(dst, dst_field)
        if src_repeated:
            target.extend(value)
        else:
            target.append(value)
    elif fd.message_type is not None:
        sub = getattr(dst, dst_field)
        sub.SetInParent()
        sub.CopyFrom(value)
    else:
        setattr(dst, dst_field, value)


# --------------------------------------------------------------------------------------------
# Step 1: V0 -> V1

def _needs_v0(net):
    return any(conn.HasField("layer") for conn in net.layers)


def _fold_v0_padding(net, changes):
    """Caffe's UpgradeV0PaddingLayers: drop "padding" layers, moving their pad into the consumer.

    Returns [(original index, V1LayerParameter copy)] for the layers kept.
    """
    producer = {name: None for name in net.input}   # blob -> index of its last producer (None: net input)
    kept = []
    for i, conn in enumerate(net.layers):
        v0 = conn.layer
        label = _label(v0.name, i, "V0 layer")
        if v0.type != "padding":
            copy = pb.V1LayerParameter()
            copy.CopyFrom(conn)
            kept.append((i, copy))
        for j, blob in enumerate(conn.bottom):
            if blob not in producer:
                raise UpgradeError(f"{label}: bottom '{blob}' is neither a net input nor the top "
                                   f"of an earlier layer (Caffe: 'Unknown blob input')")
            src = producer[blob]
            if src is None:
                continue
            pad_conn = net.layers[src]
            if pad_conn.layer.type != "padding":
                continue
            pad_label = _label(pad_conn.layer.name, src, "padding layer")
            if v0.type not in ("conv", "pool"):
                raise UpgradeError(f"{pad_label} feeds {label} of type '{v0.type}'; a V0 padding "
                                   f"layer can only feed a 'conv' or 'pool' layer")
            if len(conn.bottom) != 1:
                raise UpgradeError(f"{pad_label} feeds {label}, which has {len(conn.bottom)} bottoms; "
                                   f"the consumer of a padding layer must have exactly 1")
            if len(pad_conn.bottom) != 1 or len(pad_conn.top) != 1:
                raise UpgradeError(f"{pad_label} has {len(pad_conn.bottom)} bottoms and "
                                   f"{len(pad_conn.top)} tops; it must have exactly 1 of each")
            consumer = kept[-1][1]
            consumer.layer.pad = pad_conn.layer.pad
            consumer.bottom[j] = pad_conn.bottom[0]
            consumer_name = f"'{v0.name}'" if v0.name else f"#{i}"
            changes.append(f"{_label(pad_conn.layer.name, src)} (V0 padding) folded into "
                           f"{consumer_name} (pad {pad_conn.layer.pad})")
        for blob in conn.top:
            producer[blob] = i
    return kept


def _upgrade_v0_layer(conn, index, changes):
    """Caffe's UpgradeV0LayerParameter: one V0 connection -> one V1LayerParameter."""
    out = pb.V1LayerParameter()
    out.bottom.extend(conn.bottom)
    out.top.extend(conn.top)
    if not conn.HasField("layer"):
        label = _label(conn.name, index)
        changes.append(f"{label}: not fully compatible: no V0 'layer' message in a V0 net; "
                       f"only bottom and top are kept (as Caffe does)")
        return out
    v0 = conn.layer
    label = _label(v0.name, index)
    if v0.HasField("name"):
        out.name = v0.name
    v0_type = v0.type
    if v0.HasField("type"):
        if v0_type not in V0_TO_V1:
            raise UpgradeError(f"{label}: unknown V0 layer type '{v0_type}' (known: "
                               f"{', '.join(sorted(V0_TO_V1))})")
        out.type = V0_TO_V1[v0_type]
        changes.append(f"{label}: V0 type '{v0_type}' -> V1 {V1_NAME[out.type]}")
    out.blobs.extend(v0.blobs)
    out.blobs_lr.extend(v0.blobs_lr)
    out.weight_decay.extend(v0.weight_decay)

    moved = {}       # destination sub-message -> [V0 field names]
    for fd, _ in v0.ListFields():
        field = fd.name
        if field in V0_DIRECT:
            continue
        routes = V0_ROUTES.get(field)
        if routes is None:
            changes.append(f"{label}: not fully compatible: V0 field '{field}' has no "
                           f"equivalent; dropped (Caffe ignores it)")
            continue
        route = routes.get("*") or routes.get(v0_type)
        if route is None:
            changes.append(f"{label}: not fully compatible: V0 field '{field}' does not apply "
                           f"to type '{v0_type}'; dropped")
            continue
        sub_name, sub_field = route
        sub = getattr(out, sub_name)
        if sub_field is None:
            sub.SetInParent()
            sub.CopyFrom(getattr(v0, field))
        elif field == "pool":
            sub.pool = pb.PoolingParameter.PoolMethod.Value(
                pb.V0LayerParameter.PoolMethod.Name(v0.pool))
        else:
            _copy_field(v0, field, sub, sub_field)
        moved.setdefault(sub_name, []).append(field)
    for sub_name, fields in moved.items():
        changes.append(f"{label}: V0 {', '.join(fields)} -> {sub_name}")
    return out


def _upgrade_v0_net(net, changes):
    """Caffe's UpgradeV0Net. Returns (V1 net, origin indices into net.layers)."""
    changes.append("net: V0 format (layers { layer { ... } }) upgraded to V1")
    kept = _fold_v0_padding(net, changes)
    out = pb.NetParameter()
    if net.HasField("name"):
        out.name = net.name
    origin = []
    for index, conn in kept:
        out.layers.append(_upgrade_v0_layer(conn, index, changes))
        origin.append(index)
    out.input.extend(net.input)
    out.input_dim.extend(net.input_dim)
    if net.HasField("force_backward"):
        out.force_backward = net.force_backward
    for fd, _ in net.ListFields():
        if fd.name not in V0_NET_KEPT:
            changes.append(f"net: not fully compatible: net-level field '{fd.name}' dropped by "
                           f"the V0 upgrade (Caffe keeps only name, input, input_dim, force_backward)")
    return out, origin


# --------------------------------------------------------------------------------------------
# Step 2: data-transform fields of V1 data layers

def _needs_data_upgrade(net):
    for conn in net.layers:
        param_name = V1_DATA_PARAMS.get(conn.type)
        if param_name and any(getattr(conn, param_name).HasField(f) for f in TRANSFORM_FIELDS):
            return True
    return False


def _upgrade_data_transform(net, changes):
    """Caffe's UpgradeNetDataTransformation (applied to every V1 data layer once any needs it)."""
    for i, conn in enumerate(net.layers):
        param_name = V1_DATA_PARAMS.get(conn.type)
        if not param_name:
            continue
        # Caffe touches (creates) both messages on every data layer of these types.
        src = getattr(conn, param_name)
        src.SetInParent()
        conn.transform_param.SetInParent()
        for field in TRANSFORM_FIELDS:
            if src.HasField(field):
                setattr(conn.transform_param, field, getattr(src, field))
                src.ClearField(field)
                changes.append(f"{_label(conn.name, i)}: {param_name}.{field} -> "
                               f"transform_param.{field}")


# --------------------------------------------------------------------------------------------
# Step 3: V1 -> current

def _param_spec(layer, i):
    while len(layer.param) <= i:
        layer.param.add()
    return layer.param[i]


def _upgrade_v1_layer(conn, index, changes):
    """Caffe's UpgradeV1LayerParameter: one V1LayerParameter -> one LayerParameter."""
    label = _label(conn.name, index)
    out = pb.LayerParameter()
    out.bottom.extend(conn.bottom)
    out.top.extend(conn.top)
    if conn.HasField("name"):
        out.name = conn.name
    out.include.extend(conn.include)
    out.exclude.extend(conn.exclude)
    if conn.HasField("type"):
        if conn.type not in V1_TO_CURRENT:
            raise UpgradeError(f"{label}: unknown V1 layer type enum value {conn.type}")
        out.type = V1_TO_CURRENT[conn.type]
        changes.append(f"{label}: V1 type {V1_NAME[conn.type]} -> '{out.type}'")
    out.blobs.extend(conn.blobs)
    for i, name in enumerate(conn.param):
        _param_spec(out, i).name = name
    if conn.param:
        changes.append(f"{label}: param names {list(conn.param)} -> param {{ name }}")
    for i, mode in enumerate(conn.blob_share_mode):
        try:
            mode_name = pb.V1LayerParameter.DimCheckMode.Name(mode)
            _param_spec(out, i).share_mode = pb.ParamSpec.DimCheckMode.Value(mode_name)
        except ValueError:
            raise UpgradeError(f"{label}: unknown blob_share_mode value {mode}") from None
    if conn.blob_share_mode:
        names = [pb.V1LayerParameter.DimCheckMode.Name(m) for m in conn.blob_share_mode]
        changes.append(f"{label}: blob_share_mode [{', '.join(names)}] -> param {{ share_mode }}")
    for i, lr in enumerate(conn.blobs_lr):
        _param_spec(out, i).lr_mult = lr
    if conn.blobs_lr:
        changes.append(f"{label}: blobs_lr {_fmt_list(conn.blobs_lr)} -> param {{ lr_mult }}")
    for i, decay in enumerate(conn.weight_decay):
        _param_spec(out, i).decay_mult = decay
    if conn.weight_decay:
        changes.append(f"{label}: weight_decay {_fmt_list(conn.weight_decay)} -> "
                       f"param {{ decay_mult }}")
    out.loss_weight.extend(conn.loss_weight)
    for field in V1_PARAM_FIELDS:
        if conn.HasField(field):
            _copy_field(conn, field, out, field)
    if conn.HasField("layer"):
        changes.append(f"{label}: not fully compatible: leftover V0 'layer' message ignored")
    return out


def _check_not_mixed(net):
    """Caffe's UpgradeV1Net refuses a net holding both `layer` and `layers` entries.

    We refuse V0 nets with `layer` entries too: there Caffe's V0 step silently drops the
    `layer` entries (it rebuilds the net from scratch), which would hide part of the net.
    """
    if len(net.layer) and len(net.layers):
        raise UpgradeError(
            f"net has both current 'layer' entries ({len(net.layer)}) and legacy 'layers' entries "
            f"({len(net.layers)}); Caffe refuses to upgrade such a net. Rewrite the "
            f"'layers {{ type: ENUM }}' entries as 'layer {{ type: \"String\" }}'")


def _upgrade_v1_net(net, changes):
    """Caffe's UpgradeV1Net: `layers` -> `layer`, everything else at net level kept."""
    _check_not_mixed(net)
    out = pb.NetParameter()
    out.CopyFrom(net)
    out.ClearField("layers")
    changes.append(f"net: {len(net.layers)} V1 'layers' entries -> 'layer'")
    for i, conn in enumerate(net.layers):
        out.layer.append(_upgrade_v1_layer(conn, i, changes))
    return out


# --------------------------------------------------------------------------------------------
# Step 4: input fields -> Input layer

def _upgrade_input(net, changes):
    """Caffe's UpgradeNetInput. Returns True when an Input layer was inserted at the front."""
    n = len(net.input)
    has_shape = len(net.input_shape) > 0
    has_dim = len(net.input_dim) > 0
    inserted = False
    if has_shape or has_dim:
        shapes = []
        if has_shape:
            if len(net.input_shape) < n:
                raise UpgradeError(f"net declares {n} inputs {list(net.input)} but only "
                                   f"{len(net.input_shape)} input_shape entries")
            if len(net.input_shape) > n:
                changes.append(f"net: not fully compatible: {len(net.input_shape) - n} extra "
                               f"input_shape entries without an input name dropped")
            if has_dim:
                changes.append("net: not fully compatible: input_dim ignored because "
                               "input_shape is given")
            shapes = [list(net.input_shape[i].dim) for i in range(n)]
        else:
            if len(net.input_dim) != 4 * n:
                raise UpgradeError(f"net declares {n} inputs {list(net.input)} with "
                                   f"{len(net.input_dim)} input_dim values; expected 4 per "
                                   f"input ({4 * n})")
            shapes = [list(net.input_dim[4 * i:4 * i + 4]) for i in range(n)]
        layer = pb.LayerParameter(name="input", type="Input")
        layer.top.extend(net.input)
        for dims in shapes:
            layer.input_param.shape.add().dim.extend(dims)
        layer.input_param.SetInParent()
        layers = [layer] + list(net.layer)
        net.ClearField("layer")
        net.layer.extend(layers)
        inserted = True
        for name, dims in zip(net.input, shapes):
            changes.append(f"input '{name}' ({','.join(str(d) for d in dims)}) -> "
                           f"Input layer 'input'")
    else:
        for name in net.input:
            changes.append(f"input '{name}' has no input_shape/input_dim: dropped "
                           f"(as Caffe does for old caffemodels)")
    net.ClearField("input")
    net.ClearField("input_shape")
    net.ClearField("input_dim")
    return inserted


# --------------------------------------------------------------------------------------------
# Step 5: BatchNorm param entries

def _batchnorm_param_is_fixed(spec):
    return (spec.HasField("lr_mult") and spec.lr_mult == 0
            and spec.HasField("decay_mult") and spec.decay_mult == 0)


def _batchnorm_needs_change(layer):
    return (layer.type == "BatchNorm" and len(layer.param) == 3
            and not all(_batchnorm_param_is_fixed(p) for p in layer.param))


def _upgrade_batchnorm(net, changes):
    """Caffe's UpgradeNetBatchNorm: 3 declared params -> lr_mult 0, decay_mult 0 on each."""
    for i, layer in enumerate(net.layer):
        if layer.type == "BatchNorm" and len(layer.param) == 3:
            if _batchnorm_needs_change(layer):
                before = [(_fmt_num(p.lr_mult), _fmt_num(p.decay_mult)) for p in layer.param]
                changes.append(f"{_label(layer.name, i)}: BatchNorm with 3 param entries "
                               f"(lr_mult, decay_mult) {before} -> lr_mult 0, decay_mult 0 "
                               f"on all three")
            for spec in layer.param:
                spec.lr_mult = 0.0
                spec.decay_mult = 0.0


# --------------------------------------------------------------------------------------------

def needs_upgrade(net) -> bool:
    """True iff `upgrade_net` would change the net (Caffe's NetNeedsUpgrade, except that a BatchNorm
    layer whose three params already have lr_mult 0 and decay_mult 0 does not count)."""
    return (len(net.layers) > 0 or len(net.input) > 0
            or any(_batchnorm_needs_change(layer) for layer in net.layer))


def upgrade_net(net: pb.NetParameter) -> tuple:
    """Return (upgraded copy, changes, origin). The input message is not modified.

    changes: one human-readable line per change made (warnings contain "not fully compatible").
             Empty list when the net was already current.
    origin: for each layer of the result, the index of the layer it came from in the input's
            `layers` (V0/V1) or `layer` list, or None for an inserted layer (the Input layer).
    """
    changes = []
    work = pb.NetParameter()
    work.CopyFrom(net)
    _check_not_mixed(work)
    if _needs_v0(work):
        work, origin = _upgrade_v0_net(work, changes)
    elif len(work.layers):
        origin = list(range(len(work.layers)))
    else:
        origin = list(range(len(work.layer)))
    if _needs_data_upgrade(work):
        _upgrade_data_transform(work, changes)
    if len(work.layers):
        work = _upgrade_v1_net(work, changes)
    if len(work.input):
        if _upgrade_input(work, changes):
            origin = [None] + origin
    _upgrade_batchnorm(work, changes)
    return work, changes, origin


def upgrade_solver(solver: pb.SolverParameter) -> tuple:
    """Caffe's UpgradeSolverAsNeeded: the enum `solver_type` becomes the string `type`.

    Returns (upgraded copy, changes). Setting both fields is an error, as in Caffe.
    Nets embedded in the solver (net_param, train_net_param, test_net_param) are left as they
    are: Caffe does not upgrade them either.
    """
    out = pb.SolverParameter()
    out.CopyFrom(solver)
    changes = []
    if out.HasField("solver_type"):
        if out.HasField("type"):
            raise UpgradeError(
                f"solver sets both the deprecated enum solver_type "
                f"({pb.SolverParameter.SolverType.Name(out.solver_type)}) and the string "
                f"type ('{out.type}'); remove solver_type")
        enum_name = pb.SolverParameter.SolverType.Name(out.solver_type)
        out.type = SOLVER_TYPES[enum_name]
        out.ClearField("solver_type")
        changes.append(f"solver_type {enum_name} -> type '{out.type}'")
    return out, changes

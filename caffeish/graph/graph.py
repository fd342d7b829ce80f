"""The layer graph: what Caffe's Net::Init does before allocating anything.

1. Filter layers by NetStateRule (phase, level, stage, not_stage).
2. Insert Split layers where a blob has several consumers (Caffe's InsertSplits,
   with its names: `<blob>_<layer>_<top>_split_<k>`).
3. Wire blobs in order: a bottom must be available; top j is in place only when
   bottom j has the same name; any other re-produced name is an error.
4. Infer every blob's shape with the layers' `reshape`, refusing blobs larger
   than a memory cap before anything is allocated.

The result, `Graph`, lists the layers with their bottoms, tops and shapes, the
net inputs (Input layers' tops) and outputs (blobs nobody consumed).
"""
import os

from caffeish.graph import registry
from caffeish.errors import GraphError, MemoryCapError, ShapeError
from caffeish.formats.schema import TEST, TRAIN, pb
from caffeish.values import parse_bytes

# Caffe refuses blobs with more than INT_MAX elements; we also cap bytes.
INT_MAX = 2**31 - 1
MAX_BLOB_AXES = 32  # Caffe's kMaxBlobAxes
# The name Caffe gives tops it creates itself (loss layers given no top).
AUTOMATIC = "(automatic)"
DEFAULT_MAX_BLOB_BYTES = 8 * 2**30  # unless CAFFEISH_MAX_BLOB_BYTES says otherwise (e.g. 16G)


def default_max_blob_bytes():
    """The blob cap: CAFFEISH_MAX_BLOB_BYTES (read when a graph is built) or 8 GiB."""
    value = os.environ.get("CAFFEISH_MAX_BLOB_BYTES")
    if value is None:
        return DEFAULT_MAX_BLOB_BYTES
    return parse_bytes(value, "CAFFEISH_MAX_BLOB_BYTES")


def phase_value(phase):
    """Accept TRAIN/TEST as the enum value or a case-insensitive name."""
    if isinstance(phase, str):
        key = phase.upper()
        if key not in ("TRAIN", "TEST"):
            raise GraphError(f"phase must be TRAIN or TEST, not '{phase}'")
        return TRAIN if key == "TRAIN" else TEST
    if phase not in (TRAIN, TEST):
        raise GraphError(f"phase must be TRAIN (0) or TEST (1), not {phase!r}")
    return phase


# --------------------------------------------------------------------------- rules


def rule_met(rule, state):
    """Caffe's StateMeetsRule."""
    if rule.HasField("phase") and rule.phase != state.phase:
        return False
    if rule.HasField("min_level") and state.level < rule.min_level:
        return False
    if rule.HasField("max_level") and state.level > rule.max_level:
        return False
    stages = set(state.stage)
    if any(s not in stages for s in rule.stage):
        return False
    if any(s in stages for s in rule.not_stage):
        return False
    return True


def layer_included(layer, state):
    if len(layer.include) and len(layer.exclude):
        raise GraphError(
            f"layer '{layer.name}': has both include and exclude rules; Caffe allows only one kind"
        )
    if len(layer.include):
        return any(rule_met(r, state) for r in layer.include)
    return not any(rule_met(r, state) for r in layer.exclude)


def make_state(net, phase=TEST, level=0, stages=()):
    """The NetState Caffe uses for Net(file, phase, level, stages)."""
    state = pb.NetState()
    state.CopyFrom(net.state)
    state.phase = phase_value(phase)
    state.level = level
    state.stage.extend(stages)
    return state


def filter_net(net, state):
    """A copy of `net` with only the layers the state includes (FilterNet)."""
    out = pb.NetParameter()
    out.CopyFrom(net)
    del out.layer[:]
    for layer in net.layer:
        if layer_included(layer, state):
            out.layer.add().CopyFrom(layer)
    return out


# --------------------------------------------------------------------------- splits


def split_layer_name(blob, layer, top_index):
    return f"{blob}_{layer}_{top_index}_split"


def split_blob_name(blob, layer, top_index, k):
    return f"{split_layer_name(blob, layer, top_index)}_{k}"


def insert_splits(net, explain_missing=None):
    """Caffe's InsertSplits: a Split layer after each top that has several consumers.

    explain_missing(blob) may return extra words for the unknown-bottom error.
    """
    last_producer = {}  # blob name -> (layer index, top index)
    source_of = {}  # (layer, bottom index) -> (layer, top index)
    consumers = {}  # (layer, top index) -> count
    loss_weight = {}
    for i, layer in enumerate(net.layer):
        for j, blob in enumerate(layer.bottom):
            if blob not in last_producer:
                extra = explain_missing(blob) if explain_missing else ""
                raise GraphError(
                    f"layer '{layer.name}' ({layer.type}): unknown bottom blob '{blob}' "
                    f"(bottom {j}); no earlier layer produces it{extra}"
                )
            src = last_producer[blob]
            source_of[(i, j)] = src
            consumers[src] = consumers.get(src, 0) + 1
        for j, blob in enumerate(layer.top):
            last_producer[blob] = (i, j)
        for j in range(min(len(layer.loss_weight), len(layer.top))):
            loss_weight[(i, j)] = layer.loss_weight[j]
            if layer.loss_weight[j]:
                consumers[(i, j)] = consumers.get((i, j), 0) + 1

    out = pb.NetParameter()
    out.CopyFrom(net)
    del out.layer[:]
    next_split = {}
    for i, layer in enumerate(net.layer):
        new = out.layer.add()
        new.CopyFrom(layer)
        for j, blob in enumerate(layer.bottom):
            src = source_of[(i, j)]
            if consumers.get(src, 0) > 1:
                k = next_split.get(src, 0)
                next_split[src] = k + 1
                new.bottom[j] = split_blob_name(blob, net.layer[src[0]].name, src[1], k)
        for j, blob in enumerate(layer.top):
            count = consumers.get((i, j), 0)
            if count <= 1:
                continue
            split = out.layer.add()
            split.name = split_layer_name(blob, layer.name, j)
            split.type = "Split"
            split.bottom.append(blob)
            weight = loss_weight.get((i, j), 0.0)
            for k in range(count):
                split.top.append(split_blob_name(blob, layer.name, j, k))
                if weight:
                    split.loss_weight.append(weight if k == 0 else 0.0)
            if weight:
                del new.loss_weight[:]
                next_split[(i, j)] = 1
    return out


# --------------------------------------------------------------------------- graph


class Node:
    """One layer of the built graph."""

    def __init__(self, param, layer):
        self.param = param
        self.layer = layer
        self.name = param.name
        self.type = param.type
        self.bottoms = list(param.bottom)
        self.tops = list(param.top)
        self.in_place = [j < len(self.bottoms) and self.bottoms[j] == t for j, t in enumerate(self.tops)]
        self.auto_tops = 0
        self.bottom_shapes = []
        self.top_shapes = []
        self.param_shapes = []
        self.macs = 0

    @property
    def param_count(self):
        return sum(_count(s) for s in self.param_shapes)

    def __repr__(self):
        return f"Node({self.name!r}, {self.type!r}, {self.bottoms} -> {self.tops})"


def _count(shape):
    n = 1
    for d in shape:
        n *= d
    return n


class Graph:
    """A filtered, split-inserted, wired and shape-inferred net.

    net: an upgraded pb.NetParameter.  phase/level/stages: the NetState.
    input_shapes: {blob name: shape} overriding the shapes of data-layer tops
    (Input layers included).  max_blob_bytes: refuse any blob (float32) larger.
    """

    def __init__(self, net, phase=TEST, level=0, stages=(), input_shapes=None, max_blob_bytes=None):
        if len(net.layers):
            raise GraphError("this net still has V1 'layers'; read it with caffeish.formats.io (which upgrades it)")
        self.name = net.name
        self.state = make_state(net, phase, level, stages)
        self.phase = self.state.phase
        self.max_blob_bytes = default_max_blob_bytes() if max_blob_bytes is None else max_blob_bytes
        self.input_shapes = {k: tuple(v) for k, v in (input_shapes or {}).items()}
        self.filtered = filter_net(net, self.state)
        self.net = insert_splits(self.filtered, self._explain_missing(net))
        self.nodes = []
        self.blob_shapes = {}
        self.inputs = []  # tops of Input layers (pycaffe's net.inputs)
        self.sources = []  # tops of every data layer (Input, Data, DummyData, ...)
        self._build()

    # -- building ----------------------------------------------------------------
    def _explain_missing(self, net):
        excluded = {}
        for layer in net.layer:
            if not layer_included(layer, self.state):
                for top in layer.top:
                    excluded.setdefault(top, []).append(layer.name)

        def explain(blob):
            if blob not in excluded:
                return ""
            stages = ", ".join(self.state.stage) or "none"
            phase = "TRAIN" if self.state.phase == TRAIN else "TEST"
            names = ", ".join(f"'{n}'" for n in excluded[blob])
            return (f"; it is produced only by layer(s) {names}, which the net state "
                    f"(phase {phase}, level {self.state.level}, stages {stages}) excludes: "
                    f"choose the phase or stages with --phase/--stage/--level")

        return explain

    def _build(self):
        available = []  # ordered set of blobs not yet consumed
        produced = set()
        used_overrides = set()
        for param in self.net.layer:
            layer = registry.create(param, self.phase)
            node = Node(param, layer)
            layer.input_shapes = self.input_shapes
            auto = layer.auto_tops(len(node.tops))
            if auto:
                # Caffe's loss layers create the tops they need but were not given:
                # anonymous blobs that no other layer can use and that are not net outputs.
                # (Added to our working copy of the layer, so the layer sees its top count.)
                node.auto_tops = auto
                param.top.extend([AUTOMATIC] * node.auto_tops)
                node.tops += [AUTOMATIC] * node.auto_tops
                node.in_place += [False] * node.auto_tops
            layer.check_counts(len(node.bottoms), len(node.tops))
            for j, blob in enumerate(node.bottoms):
                if blob not in available:
                    if blob in produced:
                        raise GraphError(
                            f"layer '{node.name}' ({node.type}): bottom blob '{blob}' (bottom {j}) was "
                            f"already consumed by an earlier layer"
                        )
                    raise GraphError(
                        f"layer '{node.name}' ({node.type}): unknown bottom blob '{blob}' (bottom {j}); "
                        f"no earlier layer produces it"
                    )
                available.remove(blob)
            for j, blob in enumerate(node.tops):
                if blob == AUTOMATIC:
                    continue
                if node.in_place[j]:
                    if not layer.allows_in_place:
                        raise GraphError(
                            f"layer '{node.name}' ({node.type}): cannot work in place "
                            f"(top '{blob}' is also its bottom); give the top another name"
                        )
                elif blob in produced:
                    raise GraphError(
                        f"layer '{node.name}' ({node.type}): top blob '{blob}' is produced by multiple "
                        f"sources (a top may only reuse the name of the bottom at the same index)"
                    )
                produced.add(blob)
                available.append(blob)
            # Python layers without bottoms are user data layers (FCN's voc_layers, ...).
            if not node.bottoms and (layer.is_data or node.type == "Python"):
                self.sources += node.tops
                if node.type == "Input":
                    self.inputs += node.tops
            self._infer(node, used_overrides)
            self.nodes.append(node)
        unused = set(self.input_shapes) - used_overrides
        if unused:
            raise GraphError(
                f"--input-shape names {sorted(unused)}, but the net's input blobs are {self.sources}"
            )
        self.outputs = available

    def _infer(self, node, used_overrides):
        layer = node.layer
        node.bottom_shapes = [self.blob_shapes[b] for b in node.bottoms]
        for b in node.tops:
            if b in self.input_shapes and not node.bottoms:
                used_overrides.add(b)
        if node.type == "Input":
            shapes = [self.input_shapes.get(t) for t in node.tops]
            if all(s is not None for s in shapes):
                tops = shapes
            else:
                tops = [s if s is not None else t for s, t in zip(shapes, layer.reshape([]))]
        else:
            tops = layer.reshape(node.bottom_shapes)
        tops = [tuple(int(d) for d in s) for s in tops]
        if len(tops) != len(node.tops):
            raise ShapeError(
                f"layer '{node.name}' ({node.type}): produced {len(tops)} top shapes for {len(node.tops)} tops"
            )
        for blob, shape in zip(node.tops, tops):
            self._check_size(node, blob, shape)
        node.top_shapes = tops
        node.param_shapes = [tuple(int(d) for d in s) for s in layer.param_shapes(node.bottom_shapes)]
        for i, shape in enumerate(node.param_shapes):
            self._check_size(node, f"parameter {i}", shape)
        node.macs = int(layer.macs(node.bottom_shapes, tops))
        for blob, shape in zip(node.tops, tops):
            if blob != AUTOMATIC:
                self.blob_shapes[blob] = shape

    def _check_size(self, node, what, shape):
        if any(d < 0 for d in shape):
            raise ShapeError(f"layer '{node.name}' ({node.type}): {what} has a negative dimension {shape}")
        count = _count(shape)
        if count > INT_MAX or count * 4 > self.max_blob_bytes:
            raise MemoryCapError(
                f"layer '{node.name}' ({node.type}): {what} of shape {shape} would need "
                f"{count * 4:,} bytes, over the cap of {self.max_blob_bytes:,} bytes"
                + (" and Caffe's INT_MAX elements" if count > INT_MAX else "")
                + "; refusing before allocating (raise the cap with --max-blob-bytes or CAFFEISH_MAX_BLOB_BYTES)"
            )

    # -- queries -------------------------------------------------------------------
    def node(self, name):
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    @property
    def param_count(self):
        return sum(n.param_count for n in self.nodes)

    @property
    def macs(self):
        return sum(n.macs for n in self.nodes)

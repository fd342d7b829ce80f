"""The Net's backward pass: which layers and bottoms need diffs, and running them in reverse.

Caffe decides once, when the net is built, which layers run backward and which
bottoms receive a diff (`plan`: ../shared/caffe/training.md 9.2, passes A, B
and C, quirks included), then `Backward` walks the layers from last to first
(9.3).  Here the Net keeps:

* blob diffs by blob name (arrays of the net's backend).  A layer returns fresh
  bottom diffs (or views of its top diffs where Caffe shares the memory), and
  the name is rebound, so an in-place chain, whose layers all name one blob,
  ends with the diff with respect to the chain's first input, as Caffe's one
  shared array does.  Diffs are never reset between passes, as in Caffe: a
  loss-weighted top holds its weight (the backward seed, written when the diff
  is made) until some layer overwrites it.
* parameter diffs by (layer, index); a parameter shared by name (`param { name }`)
  uses its owner's diff array, so every user adds into one.  They accumulate
  over backward passes until `clear_param_diffs`.

The pycaffe face (`net.backward(...)`, `net._backward`, `forward_backward_all`,
`clear_param_diffs`, `blob.diff`, `param.diff`) is the mixin below.
"""
import itertools
from collections import OrderedDict

import numpy as np

from caffeish.errors import ArgumentError, GraphError, UnknownBlobError
from caffeish.formats.schema import pb
from caffeish.graph.graph import AUTOMATIC
from caffeish.runtime import backend as backends


class Plan:
    """What Caffe's Net::Init decided: per layer index, whether it runs backward (`layer`), for
    each bottom whether it gets a diff (`bottoms`), for each parameter whether it gets one
    (`params`); and each top's loss weight (`loss_weights`)."""

    def __init__(self, layer, bottoms, params, loss_weights):
        self.layer = layer
        self.bottoms = bottoms
        self.params = params
        self.loss_weights = loss_weights


def plan(nodes, force_backward, loss_weight):
    """Caffe's need-backward analysis over the graph's nodes (training.md 9.2).

    loss_weight(node, j) gives top j's loss weight."""
    default_spec = pb.ParamSpec()
    blob_need = {}
    layer, bottoms, params, weights = [], [], [], []
    # Pass A, in forward order.
    for node in nodes:
        propagate = node.param.propagate_down
        if len(propagate) and len(propagate) != len(node.bottoms):
            raise GraphError(
                f"layer '{node.name}' ({node.type}): propagate_down has {len(propagate)} entries for "
                f"{len(node.bottoms)} bottom(s); give one per bottom (Caffe: propagate_down param must be "
                f"specified either 0 or bottom_size times)")
        need = False
        flags = []
        for j, b in enumerate(node.bottoms):
            flag = blob_need.get(b, False)
            flags.append(bool(propagate[j]) if len(propagate) else flag)
            need |= flag
        # The net's own ParamSpecs (BatchNorm's added lr_mult 0 is the layer's copy, not seen here).
        specs = node.param.param
        wanted = [(specs[j] if j < len(specs) else default_spec).lr_mult != 0 for j in range(len(node.param_shapes or ()))]
        need |= any(wanted)
        for t in node.tops:
            if t == AUTOMATIC:
                continue
            if need:
                blob_need[t] = True
            else:
                blob_need.setdefault(t, False)
        layer.append(need)
        bottoms.append(flags)
        params.append(wanted)
        weights.append([loss_weight(node, j) for j in range(len(node.tops))])
    # Pass B, in reverse order.
    under_loss, skip = set(), set()
    for i in range(len(nodes) - 1, -1, -1):
        node = nodes[i]
        contributes = any(w != 0 for w in weights[i]) or any(t in under_loss for t in node.tops)
        skip_all = all(t in skip for t in node.tops)
        if layer[i] and skip_all:
            layer[i] = False
            bottoms[i] = [False] * len(node.bottoms)
        if not contributes:
            layer[i] = False
        for j, b in enumerate(node.bottoms):
            if contributes:
                under_loss.add(b)
            else:
                bottoms[i][j] = False
            if not bottoms[i][j]:
                skip.add(b)
    # Pass C: force_backward.
    if force_backward:
        for i, node in enumerate(nodes):
            layer[i] = True
            for j in range(len(node.bottoms)):
                bottoms[i][j] = bottoms[i][j] or bool(node.layer.allow_force_backward(j))
            params[i] = [True] * len(params[i])
    return Plan(layer, bottoms, params, weights)


class BackwardMixin:
    """Backward for caffeish.runtime.net.Net, and its pycaffe face."""

    def _init_backward(self):
        self._plan = plan(self.nodes, self.graph.net.force_backward, self._loss_weight)
        for node, need in zip(self.nodes, self._plan.layer):
            node.layer.needs_backward = need
        self._bdiffs = {}  # blob name -> diff array
        self._auto_diffs = {}  # (layer index, top index) of "(automatic)" loss tops -> diff array
        self._pdiffs = {}  # layer name -> [diff array, ...] (sharers hold their owner's arrays)
        # The backward seed of each loss-weighted top, set when its diff is made (Caffe's SetLossWeights).
        self._seeds = {}
        for i, node in enumerate(self.nodes):
            for j, t in enumerate(node.tops):
                if self._plan.loss_weights[i][j] and t != AUTOMATIC:
                    self._seeds[t] = self._plan.loss_weights[i][j]

    # -- diff arrays -----------------------------------------------------------------------
    def blob_diff(self, name):
        """The diff array of blob `name` on the net's backend: made (zeros, or the loss weight of a
        loss-weighted top) on first use, and remade when the blob's shape changed (Caffe's Reshape
        keeps the values while the count does not grow)."""
        shape = tuple(self.blob_shape(name))
        diff = self._bdiffs.get(name)
        if diff is None or tuple(diff.shape) != shape:
            count = int(np.prod(shape, dtype=np.int64))
            if diff is not None and count <= diff.size:
                diff = diff.reshape(-1)[:count].reshape(shape).copy()
            elif diff is None and name in self._seeds:
                diff = self.xp.full(shape, np.float32(self._seeds[name]), dtype=np.float32)
            else:
                diff = self.xp.zeros(shape, dtype=np.float32)
            self._bdiffs[name] = diff
        return diff

    def param_diff(self, layer, index):
        """The diff array of parameter `index` of `layer` (zeros until a backward adds into it).  A
        parameter shared by name has its owner's array; a Python layer's are its blobs' own."""
        diffs = self._pdiffs.get(layer)
        params = self._params.get(layer, [])
        if diffs is None or len(diffs) != len(params) or any(
                d is None or tuple(d.shape) != tuple(p.shape) for d, p in zip(diffs, params)):
            diffs = self._make_param_diffs(layer)
        return diffs[index]

    def _make_param_diffs(self, layer):
        python = self._python_blobs.get(layer)
        params = self._params.get(layer, [])
        old = self._pdiffs.get(layer) or []
        diffs = []
        for j, p in enumerate(params):
            if python is not None:
                diffs.append(python[j].diff)
                continue
            owner = self._param_owner.get((layer, j))
            if owner is not None and owner != (layer, j):
                d = self.param_diff(*owner)
                diffs.append(d if tuple(d.shape) == tuple(p.shape) else d.reshape(p.shape))
                continue
            d = old[j] if j < len(old) and old[j] is not None and tuple(old[j].shape) == tuple(p.shape) else None
            diffs.append(d if d is not None else self.xp.zeros(p.shape, dtype=np.float32))
        self._pdiffs[layer] = diffs
        return diffs

    def _top_diff(self, i, j, name, shape):
        if name != AUTOMATIC:
            return self.blob_diff(name)
        key = (i, j)
        diff = self._auto_diffs.get(key)
        if diff is None or tuple(diff.shape) != tuple(shape):
            diff = self._auto_diffs[key] = self.xp.full(shape, np.float32(self._plan.loss_weights[i][j]),
                                                        dtype=np.float32)
        return diff

    def clear_param_diffs(self):
        """Zero every parameter's diff (Caffe's ClearParamDiffs; sharers share the owner's)."""
        self._sync_host()
        for layer in self._params:
            for j in range(len(self._params[layer])):
                self.param_diff(layer, j)[...] = 0

    # -- the pass ----------------------------------------------------------------------------
    def backward_from_to(self, start, end):
        """Caffe's BackwardFromTo: layers start down to end (indices, inclusive) that need backward."""
        self._sync_host()
        plan_ = self._plan
        xp = self.xp
        for i in range(start, end - 1, -1):
            if not plan_.layer[i]:
                continue
            node = self.nodes[i]
            if node.name in self._fed_nodes:
                continue  # data layers: Caffe's no-op Backward
            bottoms = [self._backward_data(node, b) for b in node.bottoms]
            tops = [self._backward_data(node, t) if t != AUTOMATIC else None for t in node.tops]
            top_diffs = [self._top_diff(i, j, t, node.top_shapes[j]) for j, t in enumerate(node.tops)]
            params = self._params.get(node.name, [])
            param_diffs = [self.param_diff(node.name, j) if plan_.params[i][j] else None
                           for j in range(len(params))]
            propagate = list(plan_.bottoms[i])
            if node.type != "Python":  # (its bottoms' diffs are its own blobs')
                # The last backward's diff of a bottom this layer rewrites goes before the layer
                # makes the new one, so that the two are never alive together: the pass then needs
                # no more memory than the first one did (whose heap later passes reuse).
                for b, p in zip(node.bottoms, propagate):
                    if p and b not in node.tops:
                        self._bdiffs.pop(b, None)
            diffs = node.layer.backward(xp, top_diffs, tops, bottoms, params, propagate, param_diffs)
            if diffs is None or len(diffs) != len(node.bottoms):
                raise GraphError(f"layer '{node.name}' ({node.type}): backward gave "
                                 f"{'nothing' if diffs is None else len(diffs)} diffs for {len(node.bottoms)} "
                                 f"bottom(s)")
            for b, x, d in zip(node.bottoms, bottoms, diffs):
                if d is None:
                    continue
                if tuple(d.shape) != tuple(x.shape):
                    raise GraphError(f"layer '{node.name}' ({node.type}): backward gave a diff of shape "
                                     f"{tuple(d.shape)} for bottom '{b}' of shape {tuple(x.shape)}")
                if d.dtype != np.float32:
                    d = d.astype(np.float32)
                self._bdiffs[b] = d

    def _backward_data(self, node, name):
        """Blob `name`'s data for the backward of `node`: what the last forward left (zeros for a
        blob no forward has written yet, as Caffe's blobs start)."""
        array = self._arrays.get(name)
        if array is None:
            if name in self._freed:
                raise GraphError(
                    f"backward: layer '{node.name}' ({node.type}) needs blob '{name}', which was freed after "
                    f"its last use in forward (this Net was built with keep=False or a list of names); build "
                    f"it with keep=True, the default, to run backward")
            array = self._arrays[name] = self.xp.zeros(self.blob_shape(name), dtype=np.float32)
        return array

    # -- pycaffe's face ------------------------------------------------------------------------
    def _backward(self, start, end):
        """pycaffe's net._backward(start, end): layer indices, start >= end."""
        count = len(self.nodes)
        for what, i in (("start", start), ("end", end)):
            if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < count:
                raise ArgumentError(f"_backward: {what} {i!r} is not a layer index (0..{count - 1})")
        self.backward_from_to(int(start), int(end))

    def backward(self, diffs=None, start=None, end=None, **kwargs):
        """pycaffe's backward: output diffs as keyword arrays (all of the outputs, or none: then
        net.blobs[...].diff as they are), from layer `start` down to `end` (names).

        Returns {blob: diff} for the net's inputs (with `end`: that layer's bottoms) and the
        blobs named in `diffs`."""
        diffs = list(diffs or [])
        start_ind = len(self.nodes) - 1 if start is None else self._layer_index(start)
        if end is not None:
            end_ind = self._layer_index(end)
            outputs = set(list(self.nodes[end_ind].bottoms) + diffs)
        else:
            end_ind = 0
            outputs = set(self.inputs + diffs)
        if kwargs:
            if set(kwargs) != set(self.outputs):
                raise ArgumentError(
                    f"backward: top diff arguments {sorted(kwargs)} do not match the net's outputs "
                    f"{sorted(self.outputs)} (pycaffe: Top diff arguments do not match net outputs)")
            for top, value in kwargs.items():
                value = np.asarray(value)
                shape = tuple(self.blob_shape(top))
                if value.ndim == 0 or value.shape[0] != shape[0]:
                    raise ArgumentError(f"backward: the diff for '{top}' has shape {value.shape}, but the blob "
                                        f"is {shape}: its first axis must be the batch size (pycaffe: Diff is "
                                        f"not batch sized)")
                self.host_diff(top)[...] = value
        unknown = [o for o in outputs if o not in self._shapes]
        if unknown:
            raise UnknownBlobError(f"backward: no blob named {sorted(unknown)} in net '{self.name}'")
        self._backward(start_ind, end_ind)
        return {out: self.host_diff(out) for out in outputs}

    def forward_backward_all(self, blobs=None, diffs=None, **kwargs):
        """pycaffe's forward_backward_all: forward and backward over inputs (and output diffs) of any
        batch size, a net batch at a time (the last padded with zeros, the padding dropped).
        Returns (outputs, diffs), each {blob: array}."""
        outs = OrderedDict((name, []) for name in dict.fromkeys(self.outputs + list(blobs or [])))
        grads = OrderedDict((name, []) for name in dict.fromkeys(self.inputs + list(diffs or [])))
        forward = self._batches({k: kwargs[k] for k in self.inputs if k in kwargs})
        backward = self._batches({k: kwargs[k] for k in self.outputs if k in kwargs})
        for fb, bb in itertools.zip_longest(forward, backward, fillvalue={}):
            for name, value in self.forward(blobs=blobs, **fb).items():
                outs.setdefault(name, []).extend(np.array(value, copy=True))
            for name, value in self.backward(diffs=diffs, **bb).items():
                grads.setdefault(name, []).extend(np.array(value, copy=True))
        total = len(next(iter(kwargs.values()))) if kwargs else None
        result = []
        for table in (outs, grads):
            packed = OrderedDict()
            for name, items in table.items():
                array = np.asarray(items)
                packed[name] = array[:total] if total is not None and len(array) > total else array
            result.append(packed)
        return result[0], result[1]

    def _batches(self, blobs):
        """pycaffe's _batch: net-batch-sized chunks of `blobs`, the last padded with zeros."""
        if not blobs:
            return []
        num = len(next(iter(blobs.values())))
        batch = self.blob_shape(self._blob_names[0])[0]
        out = []
        for lo in range(0, num - num % batch, batch):
            out.append({k: np.asarray(v[lo:lo + batch]) for k, v in blobs.items()})
        rest = num % batch
        if rest:
            out.append({k: np.concatenate([np.asarray(v[num - rest:]),
                                           np.zeros((batch - rest,) + np.shape(v)[1:], np.float32)])
                        for k, v in blobs.items()})
        return out

    # -- host copies (GPU) ---------------------------------------------------------------------
    def host_diff(self, name):
        """The diff of blob `name` as a numpy array: the live one on the CPU; on the GPU a host copy,
        synced back before the net next runs (as host_data)."""
        if self.xp is np:
            return self.blob_diff(name)
        key = ("bdiff", name)
        if key not in self._host:
            self._host[key] = np.array(backends.to_numpy(self.blob_diff(name)), dtype=np.float32, copy=True)
        return self._host[key]

    def host_param_diff(self, layer, index):
        """The diff of parameter `index` of `layer` as a numpy array (as host_diff)."""
        diff = self.param_diff(layer, index)
        if self.xp is np or backends.is_host(diff):
            return diff
        key = ("pdiff", layer, index)
        if key not in self._host:
            self._host[key] = np.array(backends.to_numpy(diff), dtype=np.float32, copy=True)
        return self._host[key]


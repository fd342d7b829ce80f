"""Where each layer puts the input's pixels, and the Crop offsets that follow (`caffeish offsets`).

Every layer maps an input coordinate x to an output coordinate a*x + b (per
spatial axis, exact fractions, pycaffe's coord_map.py):

* Convolution, Pooling, Im2col: scaling 1/S, offset (P - (K-1)/2)/S, with K the
  dilated kernel (K-1)*d + 1.
* Deconvolution: scaling S, offset (K-1)/2 - P.
* Crop: scaling 1, offset -offset.
* Pointwise layers (ReLU, LRN, Dropout, Eltwise, Concat over channels, ...):
  the identity; they are listed only with --all-layers (all_layers=True).

For each Crop (or for a given blob), `sections` / `offset_table` follow the path
from the net input and give per layer: stride, pad, kernel, scaling 1/S, the
cumulative scaling (input to this layer's output), the offset, the cumulative
offset (this layer's input to the end of the path, composed backward from the
last layer), the receptive field and the effective stride, as exact Fractions
(`display_row` writes them as text).  The Crop offset is where the data
bottom's coordinates land in the reference's, as Caffe's coord_map.crop() says:
for FCN-AlexNet the first row's cumulative offset, 18.

`analyze(net)` gives the Analysis (its `crops`: one CropResult per Crop);
`crop_offsets(net)` the computed offsets; `check(net)` one line per Crop whose
offset differs from the computed one; `fix_text` / `fix_file` write the net
with the computed offsets, editing only those values in the text (comments and
formatting are kept; the text editing is caffeish.formats.prototxt_edit).
"""
import os
from fractions import Fraction

from caffeish.graph import geometry, registry
from caffeish.formats import io
from caffeish.errors import CaffeishError, GraphError, ShapeError
from caffeish.graph.graph import Graph, layer_included, make_state
from caffeish.formats.prototxt_edit import (_indent, _insert_lines, _line_end, _line_start, _same_line,
                                            _starts_line, _unit, _unquote, parse_fields, tokenize)
from caffeish.formats.schema import TEST, pb
from caffeish.formats.upgrade import upgrade_net

IDENTITY = geometry.identity()


# -- looking at a net without running its code ------------------------------------------------------


def runs_python(layer, input_shapes):
    """Whether building this layer runs code from the user's files: a Python layer does (its module is
    imported, its setup() and reshape() run), unless it is a data layer whose tops all have shapes given
    with --input-shape (then its tops are inputs and its code does not run)."""
    if layer.type != "Python":
        return False
    fed = not len(layer.bottom) and len(layer.top) and all(t in (input_shapes or {}) for t in layer.top)
    return not fed


def without_python_layers(net, phase=TEST, level=0, stages=(), input_shapes=None):
    """(net, skipped): `net` without the Python layers whose code would run (in its net state) and every
    layer that reads what they compute; `skipped` are the indices (into net.layer) of the layers left
    out, whose tops' shapes cannot be known without running that code.

    Inspection commands (summary, offsets, store build) build their Graph from this net unless the
    user allows Python layers (--allow-python-layers): looking at a file must not run code from it."""
    state = make_state(net, phase, level, stages)
    kept = pb.NetParameter()
    kept.CopyFrom(net)
    del kept.layer[:]
    unknown, skipped = set(), []
    for i, layer in enumerate(net.layer):
        if not layer_included(layer, state):
            kept.layer.add().CopyFrom(layer)  # the Graph leaves it out again (and names it when it is missed)
            continue
        if runs_python(layer, input_shapes) or any(b in unknown for b in layer.bottom):
            unknown.update(layer.top)
            skipped.append(i)
        else:
            unknown.difference_update(layer.top)  # a blob name written again is known again
            kept.layer.add().CopyFrom(layer)
    return kept, skipped


def check_python_bottoms(net, graph, skipped, max_blob_bytes):
    """With Python layers allowed: refuse, before any is run, a Python layer whose bottoms (which its
    reshape sees as arrays of zeros) would take more than the memory cap together.  Only layers whose
    bottoms the Python-free `graph` knows can be checked; the others are checked by the graph as they
    are produced."""
    for i in skipped:
        layer = net.layer[i]
        if layer.type != "Python" or not all(b in graph.blob_shapes for b in layer.bottom):
            continue
        total = 0
        for b in layer.bottom:
            count = 1
            for d in graph.blob_shapes[b]:
                count *= d
            total += 4 * count
        if total > max_blob_bytes:
            from caffeish.errors import MemoryCapError

            raise MemoryCapError(
                f"layer '{layer.name}' (Python): its bottoms would need {total:,} bytes as the arrays its "
                f"reshape() sees, over the cap of {max_blob_bytes:,} bytes; refusing before allocating (raise "
                f"the cap with --max-blob-bytes or CAFFEISH_MAX_BLOB_BYTES)")


# -- per-axis maps: {blob axis: CoordMap}, axes not named are the identity ------------------------


def _get(m, axis):
    return m.get(axis, IDENTITY)


def _compose(outer, inner):
    """outer after inner, axis by axis."""
    return {a: geometry.compose(_get(outer, a), _get(inner, a)) for a in sorted(set(outer) | set(inner))}


def _inverse(m):
    return {a: geometry.inverse(cm) for a, cm in m.items()}


def _same(m1, m2):
    return all(_get(m1, a) == _get(m2, a) for a in set(m1) | set(m2))


# -- number formatting: exact, never rounded --------------------------------------------------------


def fmt_decimal(value):
    """A Fraction as an exact decimal when it has one (23.75, -0.5), else as p/q (1/3)."""
    f = Fraction(value)
    if f.denominator == 1:
        return str(f.numerator)
    d, twos, fives = f.denominator, 0, 0
    while d % 2 == 0:
        d, twos = d // 2, twos + 1
    while d % 5 == 0:
        d, fives = d // 5, fives + 1
    if d != 1:
        return f"{f.numerator}/{f.denominator}"
    k = max(twos, fives)
    digits = str(abs(f.numerator) * 10**k // f.denominator).rjust(k + 1, "0")
    return ("-" if f < 0 else "") + digits[:-k] + "." + digits[-k:]


def fmt_ratio(value):
    """A Fraction as an integer or p/q: 32, 1/4."""
    f = Fraction(value)
    return str(f.numerator) if f.denominator == 1 else f"{f.numerator}/{f.denominator}"


def fmt_axes(values, fmt=str):
    """Per-axis values: one value when every axis agrees, else 'h x w' as '3x5'."""
    if values is None:
        return ""
    cells = [fmt(v) for v in values]
    return cells[0] if len(set(cells)) == 1 else "x".join(cells)


def fmt_map(cm):
    """x -> a*x + b written as 'x/16 + 1.5', '32x - 31', 'x'."""
    a, b = cm
    if a == 1:
        scale = "x"
    elif a.denominator == 1:
        scale = f"{a.numerator}x"
    else:
        scale = f"{'' if a.numerator == 1 else a.numerator}x/{a.denominator}"
    if b == 0:
        return scale
    return f"{scale} {'+' if b > 0 else '-'} {fmt_decimal(abs(b))}"


def fmt_offsets(offsets, first_axis):
    """Crop offsets per cropped axis: '18' when they agree, else '5, 6 (axes 2, 3)'."""
    if len(set(offsets)) <= 1:
        return str(offsets[0]) if offsets else "0"
    axes = ", ".join(str(first_axis + i) for i in range(len(offsets)))
    return f"{', '.join(str(v) for v in offsets)} (axes {axes})"


# -- the analysis ---------------------------------------------------------------------------------------


class Conflict:
    """A blob whose coordinates two joined branches place differently (the message says how)."""

    def __init__(self, message):
        self.message = message


class _Layer:
    def __init__(self, index, param):
        self.index = index  # in the full (upgraded) net
        self.param = param
        self.name = param.name
        self.type = param.type
        self.bottoms = []  # blob ids
        self.tops = []
        self.bottom_shapes = None
        self.lmap = None  # geometry.LayerMap
        self.used_map = {}  # the per-axis map applied (Crop: with the computed offsets)


class _Blob:
    def __init__(self, ident, name, producer, shape):
        self.id = ident
        self.name = name
        self.producer = producer
        self.shape = shape


class CropResult:
    """One Crop layer: what it says and what its offset should be.

    axis: the first cropped axis; written / computed: offsets per cropped axis
    (axis .. ndim-1); computed is None and error says why when the offset cannot
    be derived.  root: the blob the data and the reference were related through.
    """

    def __init__(self, layer, data, reference, axis, written, given):
        self.layer = layer
        self.name = layer.name
        self.data = data
        self.reference = reference
        self.axis = axis
        self.written = written
        self.given = given
        self.computed = None
        self.error = None
        self.root = None
        self.notes = []

    @property
    def agrees(self):
        return self.error is None and self.computed == self.written

    def problem(self):
        """One line describing the mismatch or the error; None when the offset agrees."""
        if self.error is not None:
            return f"Crop '{self.name}': cannot compute the offset: {self.error}"
        if self.computed != self.written:
            return (f"Crop '{self.name}': offset is {fmt_offsets(self.written, self.axis)}, "
                    f"the computed offset is {fmt_offsets(self.computed, self.axis)}")
        return None

    def as_dict(self):
        return {
            "name": self.name, "data": self.data, "reference": self.reference, "axis": self.axis,
            "written": list(self.written), "computed": None if self.computed is None else list(self.computed),
            "agrees": self.agrees, "error": self.error,
        }


def _as_net(net):
    """A current-format NetParameter from a path, a V0/V1 NetParameter or a current one."""
    if isinstance(net, pb.NetParameter):
        if len(net.layers) or len(net.input):
            return upgrade_net(net)[0]
        return net
    return io.read_net(os.fspath(net))


class Analysis:
    """The coordinate maps of a net: per blob, how each root blob's coordinates reach it.

    Roots are the net's inputs (tops of bottomless layers), the tops of layers with no
    coordinate map (the walk back ends there) and the --from blob.  Layers are visited
    in order; a Crop's offset is computed from its data and reference bottoms through
    a common root, then the Crop passes the data on with that offset (so one wrong
    offset upstream is reported once, not again at every later Crop).
    """

    def __init__(self, net, phase=TEST, level=0, stages=(), input_shapes=None, start=None,
                 allow_python_layers=False):
        self.net = _as_net(net)
        self.allow_python_layers = allow_python_layers
        self.python_skipped = []  # layers not run (Python code, or downstream of it): their sizes are unknown
        self.state = make_state(self.net, phase, level, stages)
        self.layers = []
        self.blobs = []
        self.current = {}  # blob name -> id of its latest version
        self.sizes_unknown = None
        self.excluded_crops = [l.name for l in self.net.layer
                               if l.type == "Crop" and not layer_included(l, self.state)]
        shapes = self._shapes(phase, level, stages, input_shapes)
        self._wire(shapes)
        self.start = self.blob_id(start) if start else None
        self.roots = []
        self.root_reason = {}
        self.maps = {}
        self.parent = {}
        self.crops = []
        for layer in self.layers:
            self._visit(layer)

    # -- wiring ------------------------------------------------------------------------
    def _shapes(self, phase, level, stages, input_shapes):
        """{layer index: (bottom shapes, top shapes)} from the graph, or {} when sizes are unknown."""
        net, skipped = self.net, []
        if not self.allow_python_layers:
            net, skipped = without_python_layers(self.net, phase, level, stages, input_shapes)
            self.python_skipped = [self.net.layer[i].name for i in skipped]
        try:
            graph = Graph(net, phase=phase, level=level, stages=stages, input_shapes=input_shapes)
        except CaffeishError as e:
            if input_shapes:
                raise
            self.sizes_unknown = str(e).split(". ")[0]
            return {}
        kept = [i for i, l in enumerate(self.net.layer) if layer_included(l, self.state) and i not in skipped]
        out, k = {}, 0
        for node in graph.nodes:  # the graph's extra Split layers are skipped
            want = self.net.layer[kept[k]] if k < len(kept) else None
            if want is not None and (node.name, node.type) == (want.name, want.type):
                out[kept[k]] = (node.bottom_shapes, node.top_shapes)
                k += 1
        return out

    def _wire(self, shapes):
        known = set(registry.registered_types())
        for i, param in enumerate(self.net.layer):
            if not layer_included(param, self.state):
                continue
            if param.type != "Python" and param.type in known:
                # Caffe's blob counts, also for the layers the graph left out (after a Python layer
                # that does not run): a Crop given three bottoms is refused, as Caffe refuses it.
                spec = registry.create(param, self.state.phase)
                spec.check_counts(len(param.bottom), len(param.top) + spec.auto_tops(len(param.top)))
            layer = _Layer(i, param)
            bottom_shapes, top_shapes = shapes.get(i, (None, None))
            layer.bottom_shapes = bottom_shapes
            for j, name in enumerate(param.bottom):
                if name not in self.current:
                    raise GraphError(f"layer '{param.name}' ({param.type}): unknown bottom blob '{name}' "
                                     f"(bottom {j}); no earlier layer produces it")
                layer.bottoms.append(self.current[name])
            for j, name in enumerate(param.top):
                shape = top_shapes[j] if top_shapes and j < len(top_shapes) else None
                blob = _Blob(len(self.blobs), name, layer, shape)
                self.blobs.append(blob)
                self.current[name] = blob.id
                layer.tops.append(blob.id)
            try:
                layer.lmap = geometry.layer_map(param, bottom_shapes)
            except ShapeError as e:
                raise ShapeError(f"layer '{param.name}' ({param.type}): {e}") from None
            self.layers.append(layer)

    def blob_id(self, name):
        if name not in self.current:
            state = "TRAIN" if self.state.phase == pb.TRAIN else "TEST"
            raise GraphError(f"no blob named '{name}' in the net (phase {state}); "
                             f"blobs: {', '.join(sorted(self.current)) or '(none)'}")
        return self.current[name]

    def name(self, blob):
        return self.blobs[blob].name

    # -- propagation ---------------------------------------------------------------------
    def _new_root(self, blob, reason):
        self.roots.append(blob)
        self.root_reason[blob] = reason
        self.maps.setdefault(blob, {})[blob] = {}

    def _visit(self, layer):
        kind = layer.lmap.kind
        if kind == "source":
            for t in layer.tops:
                self.maps[t] = {}
                self._new_root(t, None)
        elif kind == "none":
            reason = f"layer '{layer.name}' ({layer.type}) has no coordinate map: {layer.lmap.reason}"
            for t in layer.tops:
                self.maps[t] = {}
                self._new_root(t, reason)
        else:
            if kind == "crop":
                self._crop(layer)
            else:
                layer.used_map = dict(zip(layer.lmap.axes, layer.lmap.maps))
            self._through(layer)
        if self.start is not None and self.start in layer.tops and self.start not in self.root_reason:
            self._new_root(self.start, f"'{self.name(self.start)}' is the start blob (--from)")

    def _through(self, layer):
        for j, top in enumerate(layer.tops):
            sources = [layer.bottoms[b] for b, t in layer.lmap.links if t == j]
            merged = {}
            self.maps[top] = merged
            if not sources:
                self._new_root(top, f"layer '{layer.name}' ({layer.type}): top {j} has no coordinate map")
                continue
            roots = []
            for s in sources:
                roots += [r for r in self.maps[s] if r not in roots]
            for r in roots:
                cands = [(s, self.maps[s][r]) for s in sources if r in self.maps[s]]
                self.parent[(top, r)] = (layer, cands[0][0])
                bad = next((m for _, m in cands if isinstance(m, Conflict)), None)
                if bad is not None:
                    merged[r] = bad
                    continue
                first_s, first_m = cands[0]
                for s, m in cands[1:]:
                    if not _same(m, first_m):
                        merged[r] = Conflict(self._disagreement(layer, r, first_s, first_m, s, m))
                        break
                else:
                    merged[r] = _compose(layer.used_map, first_m)

    def _disagreement(self, layer, root, s1, m1, s2, m2):
        parts = {}  # description -> axes
        for a in sorted(set(m1) | set(m2)):
            c1, c2 = _get(m1, a), _get(m2, a)
            if c1 == c2:
                continue
            if c1.a != c2.a:
                how = f"scales differ: {fmt_ratio(c1.a)} vs {fmt_ratio(c2.a)}"
            else:
                how = f"offsets differ by {fmt_decimal(abs(c1.b - c2.b))}"
            parts.setdefault(f"'{self.name(s1)}' has x -> {fmt_map(c1)}, '{self.name(s2)}' has x -> "
                             f"{fmt_map(c2)} ({how})", []).append(a)
        text = "; ".join(f"axis {axes[0]}: {d}" if len(axes) == 1 else
                         f"axes {', '.join(str(x) for x in axes)}: {d}" for d, axes in parts.items())
        return (f"layer '{layer.name}' ({layer.type}) joins bottoms that disagree on where "
                f"'{self.name(root)}' pixels land: {text}")

    def _describe_roots(self, blob):
        out = []
        for r in self.maps[blob]:
            why = self.root_reason[r]
            out.append(f"'{self.name(r)}' ({why or 'a net input'})")
        return ", ".join(out) or "nothing"

    def _crop(self, layer):
        data, ref = layer.bottoms[0], layer.bottoms[1]
        shape = self.blobs[data].shape
        cp = layer.param.crop_param
        if shape is not None:
            ndim = len(shape)
        elif len(cp.offset) > 1 and cp.axis >= 0:
            ndim = cp.axis + len(cp.offset)
        else:
            ndim = max([a + 1 for a in _get_axes(self.maps[data])] + [4])
        try:
            axis, written = geometry.crop_axes(cp, ndim)
        except ShapeError as e:
            raise ShapeError(f"layer '{layer.name}' (Crop): {e}") from None
        res = CropResult(layer, self.name(data), self.name(ref), axis,
                         tuple(written[a] for a in sorted(written)), list(cp.offset))
        self.crops.append(res)
        offsets = self._crop_offsets(res, data, ref, axis, written, ndim)
        used = written if offsets is None else offsets
        res.computed = None if offsets is None else tuple(offsets[a] for a in sorted(offsets))
        lmap = geometry.crop_layer_map(cp, ndim, used)
        layer.used_map = dict(zip(lmap.axes, lmap.maps))

    def _crop_offsets(self, res, data, ref, axis, written, ndim):
        """{axis: offset} for every cropped axis, or None (res.error says why)."""
        common = [r for r in self.roots if r in self.maps[data] and r in self.maps[ref]]
        if not common:
            res.error = (f"data '{res.data}' and reference '{res.reference}' share no input through layers "
                         f"with coordinate maps: the walk back from '{res.data}' ends at "
                         f"{self._describe_roots(data)}; from '{res.reference}' at {self._describe_roots(ref)}")
            return None
        root = common[0]
        res.root = root
        m_data, m_ref = self.maps[data][root], self.maps[ref][root]
        for m in (m_data, m_ref):
            if isinstance(m, Conflict):
                res.error = m.message
                return None
        m = _compose(m_ref, _inverse(m_data))  # data coordinates -> reference coordinates
        offsets, errors = {}, {}  # errors: message -> axes
        for a in range(axis, ndim):
            if a < 2:
                offsets[a] = written[a]
        if axis < 2:
            res.notes.append(f"Crop '{res.name}': the offsets of axes {', '.join(str(a) for a in range(axis, 2))} "
                             "(batch/channels) are kept as written; only spatial axes are computed")
        for a in sorted(set(range(2, ndim)) | {a for a in m if a >= 2}):
            if a >= ndim:
                continue
            cm = _get(m, a)
            where = (f"a pixel x of '{self.name(root)}' lands at {fmt_map(_get(m_data, a))} in '{res.data}' "
                     f"and at {fmt_map(_get(m_ref, a))} in '{res.reference}'")
            if a < axis:
                if cm != IDENTITY:
                    errors.setdefault(f"not cropped (the Crop starts at axis {axis}) but the data and the "
                                      f"reference do not line up there: {where}", []).append(a)
            elif cm.a != 1:
                errors.setdefault(f"scale mismatch: one data pixel spans {fmt_ratio(cm.a)} reference pixels, "
                                  f"so no offset aligns them ({where})", []).append(a)
            elif cm.b > 0:
                errors.setdefault(f"the data starts {fmt_decimal(cm.b)} pixels inside the reference, so the "
                                  f"crop would need a negative offset ({where})", []).append(a)
            elif cm.b.denominator != 1:
                errors.setdefault(f"the offset would be {fmt_decimal(-cm.b)}, not a whole number: data and "
                                  f"reference pixel centres are {fmt_decimal(-cm.b % 1)} pixel apart ({where})",
                                  []).append(a)
            else:
                offsets[a] = int(-cm.b)
        errors = [f"axis {axes[0]}: {msg}" if len(axes) == 1 else
                  f"axes {', '.join(str(x) for x in axes)}: {msg}" for msg, axes in errors.items()]
        if errors:
            res.error = "; ".join(errors)
            return None
        return offsets

    # -- paths and rows ------------------------------------------------------------------------
    def path(self, target, root):
        """[(layer, input blob, output blob)] from `root` to `target`, first layer first."""
        steps = []
        blob = target
        while blob != root:
            layer, src = self.parent[(blob, root)]
            steps.append((layer, src, blob))
            blob = src
        return steps[::-1]

    def preferred_root(self, blob):
        """The --from blob if it reaches `blob`, else the first net input that does, else any root."""
        roots = [r for r in self.roots if r in self.maps[blob]]
        if self.start is not None and self.start in roots:
            return self.start
        inputs = [r for r in roots if self.root_reason[r] is None]
        return (inputs or roots or [blob])[0]

    def rows(self, target, root, all_layers=False):
        """The table rows of the path from `root` to `target` (values exact, per axis)."""
        steps = self.path(target, root)
        axes = sorted({a for layer, _, _ in steps for a in layer.used_map} | set(_shown_axes(steps))) or [2, 3]
        forward, fwd = [], {}
        for layer, _, _ in steps:
            fwd = _compose(layer.used_map, fwd)
            forward.append(fwd)
        backward, bwd = [None] * len(steps), {}
        for i in range(len(steps) - 1, -1, -1):
            bwd = _compose(bwd, steps[i][0].used_map)
            backward[i] = bwd
        rf = {a: (Fraction(1), Fraction(1)) for a in axes}
        rows = []
        for i, (layer, src, out) in enumerate(steps):
            lm = layer.lmap
            per_axis = dict(zip(lm.axes, zip(lm.kernel, lm.stride, lm.pad, lm.dilation))) if lm.kernel else {}
            for a in axes:
                k, s, _, d = per_axis.get(a, (1, 1, 0, 1))
                rf[a] = geometry.receptive_field_step(*rf[a], lm.kind if a in per_axis else "identity", k, s, d)
            if lm.kind == "identity" and not all_layers:
                continue
            own = layer.used_map
            window = lm.kind in ("window", "deconv")
            rows.append({
                "layer": layer.name, "type": layer.type, "input": self.name(src), "output": self.name(out),
                "axes": tuple(axes),
                "stride": tuple(per_axis.get(a, (1, 1, 0, 1))[1] for a in axes) if window else None,
                "pad": tuple(per_axis.get(a, (1, 1, 0, 1))[2] for a in axes) if window else None,
                "kernel": tuple(per_axis.get(a, (1, 1, 0, 1))[0] for a in axes) if window else None,
                "dilation": tuple(per_axis.get(a, (1, 1, 0, 1))[3] for a in axes) if window else None,
                "scale": tuple(_get(own, a).a for a in axes),
                "cum_scale": tuple(_get(forward[i], a).a for a in axes),
                "offset": tuple(_get(own, a).b for a in axes),
                "cum_offset": tuple(_get(backward[i], a).b for a in axes),
                "receptive_field": tuple(rf[a][0] for a in axes),
                "effective_stride": tuple(rf[a][1] for a in axes),
            })
        return rows

    def ceil_notes(self, target, root):
        """Notes for the Pooling layers on a path whose ceil rounding adds outputs."""
        notes = []
        for layer, _, _ in self.path(target, root):
            p = layer.param
            if layer.type != "Pooling" or p.pooling_param.round_mode != pb.PoolingParameter.CEIL:
                continue
            if not layer.bottom_shapes or len(layer.bottom_shapes[0]) != 4:
                continue
            hw = tuple(layer.bottom_shapes[0][2:4])
            lm = layer.lmap
            padded = tuple(lm.pad) != (0, 0)
            ceil = tuple(geometry.pool_out(n, k, s, q, ceil=True, clip=padded)
                         for n, k, s, q in zip(hw, lm.kernel, lm.stride, lm.pad))
            floor = tuple(geometry.pool_out(n, k, s, q, ceil=False, clip=padded)
                          for n, k, s, q in zip(hw, lm.kernel, lm.stride, lm.pad))
            if ceil != floor:
                notes.append(f"{layer.name}: Pooling rounds up (round_mode CEIL): {_xs(ceil)} outputs where "
                             f"FLOOR would give {_xs(floor)} (input {_xs(hw)}); the last window runs past "
                             "the input, which changes sizes but not the coordinate map or the offsets")
        return notes


def _get_axes(per_root):
    """Every axis some root's map of a blob names."""
    return [a for m in per_root.values() if not isinstance(m, Conflict) for a in m]


def _shown_axes(steps):
    return [a for layer, _, _ in steps for a in layer.lmap.axes]


def _xs(values):
    return "x".join(str(v) for v in values)


# -- the public API -------------------------------------------------------------------------------------


def analyze(net, phase=TEST, level=0, stages=(), input_shapes=None, start=None, allow_python_layers=False):
    """The Analysis of a net (a path or a pb.NetParameter).  Python layers' code runs only with
    allow_python_layers (see without_python_layers)."""
    return Analysis(net, phase=phase, level=level, stages=stages, input_shapes=input_shapes, start=start,
                    allow_python_layers=allow_python_layers)


def crop_offsets(net, phase=TEST, level=0, stages=(), input_shapes=None):
    """{Crop layer name: (offset per cropped axis, ...)} computed from the net's layers.

    The offsets cover the axes from the Crop's `axis` on, as Caffe's per-axis
    crop_param offsets do (axes before 2 keep their written offset).  Raises
    ShapeError naming every Crop whose offset cannot be derived, and why.
    """
    a = analyze(net, phase, level, stages, input_shapes)
    errors = [c.problem() for c in a.crops if c.error is not None]
    if errors:
        raise ShapeError("; ".join(errors))
    return {c.name: c.computed for c in a.crops}


def sections(analysis, to=None, all_layers=False):
    """The table's sections: per Crop (or for --to) the data and reference paths with their rows."""
    a = analysis
    out = []
    if to is not None:
        target = a.blob_id(to)
        root = a.preferred_root(target)
        if a.start is not None and root != a.start:
            raise GraphError(f"'{a.name(a.start)}' is not upstream of '{to}' through layers with coordinate maps")
        out.append({"title": f"Path to '{to}'", "crop": None,
                    "parts": [_part(a, "to", target, root, all_layers)]})
        return out
    for crop in a.crops:
        data, ref = crop.layer.bottoms
        if a.start is not None and not (a.start in a.maps[data] and a.start in a.maps[ref]):
            continue
        root_d = crop.root if crop.root is not None else a.preferred_root(data)
        root_r = crop.root if crop.root is not None else a.preferred_root(ref)
        if a.start is not None:
            root_d = root_r = a.start
        parts = [_part(a, "data", data, root_d, all_layers)]
        if ref != root_r:
            parts.append(_part(a, "reference", ref, root_r, all_layers))
        out.append({"title": f"Crop '{crop.name}' (axis {crop.axis}): data '{crop.data}', "
                             f"reference '{crop.reference}'", "crop": crop, "parts": parts})
    if not out:
        if a.start is not None and a.crops:
            raise GraphError(f"no Crop layer has both bottoms downstream of '{a.name(a.start)}'; "
                             "name a blob with --to")
        raise GraphError("the net has no Crop layer (in this phase); name a blob with --to to see its table")
    return out


def _part(a, label, target, root, all_layers):
    notes = []
    if a.root_reason.get(root) and root != a.start:
        notes.append(f"the {label} path starts at '{a.name(root)}': {a.root_reason[root]}")
    return {"label": label, "from": a.name(root), "to": a.name(target), "from_id": root, "to_id": target,
            "rows": a.rows(target, root, all_layers), "notes": notes}


def offset_table(net, to=None, start=None, all_layers=False, phase=TEST, level=0, stages=(), input_shapes=None):
    """The table rows: one dict per layer with spatial effect, values exact (Fractions) per axis.

    Each row also says which section (Crop name, or the --to blob) and path
    ("data", "reference" or "to") it belongs to.  Keys: section, path, layer,
    type, input, output, axes, stride, pad, kernel, dilation, scale, cum_scale,
    offset, cum_offset, receptive_field, effective_stride.
    """
    a = analyze(net, phase, level, stages, input_shapes, start=start)
    rows = []
    for sec in sections(a, to, all_layers):
        name = sec["crop"].name if sec["crop"] is not None else to
        for part in sec["parts"]:
            rows += [{"section": name, "path": part["label"], **r} for r in part["rows"]]
    return rows


def check(net, phase=TEST, level=0, stages=(), input_shapes=None):
    """One line per Crop whose offset differs from the computed one (or cannot be computed)."""
    a = analyze(net, phase, level, stages, input_shapes)
    return [c.problem() for c in a.crops if not c.agrees]


# -- table cells and notes ----------------------------------------------------------------------------------

COLUMNS = [
    ("layer", "layer"),
    ("type", "type"),
    ("stride", "stride"),
    ("pad", "pad"),
    ("kernel", "kernel"),
    ("dilation", "dilation"),
    ("scale", "scaling 1/S"),
    ("cum_scale", "cumulative scaling"),
    ("offset", "offset (P-(K-1)/2)/S"),
    ("cum_offset", "cumulative offset"),
    ("receptive_field", "receptive field"),
    ("effective_stride", "effective stride"),
]

_CELL_FORMAT = {
    "stride": str, "pad": str, "kernel": str, "dilation": str,
    "scale": fmt_ratio, "cum_scale": fmt_ratio, "offset": fmt_decimal, "cum_offset": fmt_decimal,
    "receptive_field": fmt_decimal, "effective_stride": fmt_ratio,
}


def display_row(row):
    """A row with every per-axis value as text: '1/4', '23.75', '3x5'."""
    out = {}
    for key, value in row.items():
        if key in _CELL_FORMAT:
            out[key] = fmt_axes(value, _CELL_FORMAT[key])
        elif key == "axes":
            out[key] = list(value)
        else:
            out[key] = value
    return out


def global_notes(a, secs):
    """The notes that follow the sections' tables: Pooling ceil rounding, unknown sizes, Crop notes."""
    notes = []
    for sec in secs:
        for part in sec["parts"]:
            notes += [n for n in a.ceil_notes(part["to_id"], part["from_id"]) if n not in notes]
    if a.python_skipped:
        notes.append(f"Python layers were not run (their code runs only with --allow-python-layers), so the "
                     f"sizes of {', '.join(repr(n) for n in a.python_skipped[:5])}"
                     f"{f' and {len(a.python_skipped) - 5} more' if len(a.python_skipped) > 5 else ''} "
                     f"are unknown")
    if a.sizes_unknown is not None:
        shown = [layer for sec in secs for part in sec["parts"] for layer in _path_layers(a, part)]
        if any(l.type == "Pooling" for l in shown):
            notes.append("blob sizes are unknown, so where Pooling's ceil rounding changes sizes is not "
                         f"shown (it never changes the offsets); give --input-shape. ({a.sizes_unknown})")
    for sec in secs:
        if sec["crop"] is not None:
            notes += sec["crop"].notes
    return notes


def _path_layers(a, part):
    return [layer for layer, _, _ in a.path(part["to_id"], part["from_id"])]


# -- --fix: edit the offsets in the text ----------------------------------------------------------------------


def _offset_values(computed, given):
    """The offset list to write: one value when all agree and the file had at most one."""
    computed = list(computed)
    if len(given) == len(computed) and len(given) > 1:
        return computed
    if len(set(computed)) == 1:
        return computed[:1]
    return computed


def _edit_crop(text, msg, values):
    """Edits (start, end, new text) setting a Crop layer block's crop_param offsets to `values`."""
    cps = [f for f in msg.fields if f.name == "crop_param" and f.message is not None]
    fields = [f for cp in cps for f in cp.message.fields if f.name == "offset"]
    tokens = [t for f in fields for t in f.values]
    if len(tokens) == len(values):
        return [(t.start, t.end, str(v)) for t, v in zip(tokens, values) if t.text != str(v)]
    lines = [f"offset: {v}" for v in values]
    if fields:
        first = fields[0]
        sep = "\n" + _indent(text, first.start) if _starts_line(text, first.start) else " "
        edits = [(first.start, first.end, sep.join(lines))]
        for f in fields[1:]:
            start, end = f.start, f.end
            if _starts_line(text, start) and not text[end:_line_end(text, end)].strip() and _line_start(text, start):
                start, end = _line_start(text, start) - 1, _line_end(text, end)
            edits.append((start, end, ""))
        return edits
    if cps:
        return [_insert_lines(text, cps[-1].message, lines)]
    # No crop_param: add one as the layer's last field.
    last = msg.fields[-1].end if msg.fields else msg.open.end
    if _same_line(text, last, msg.close.start):
        return [_insert_lines(text, msg, ["crop_param {"] + lines + ["}"])]
    layer_indent = _indent(text, msg.close.start)
    unit = _unit(text, msg, layer_indent)
    block = ["crop_param {"] + [unit + line for line in lines] + ["}"]
    return [_insert_lines(text, msg, block)]


def fix_text(text, phase=TEST, level=0, stages=(), input_shapes=None, path="<string>", allow_python_layers=False):
    """(new text, [(crop name, axis, old offsets, new offsets)]): the prototxt with computed Crop offsets.

    Only the offset values change (or an `offset:` line / crop_param block is added
    where the Crop relied on the default 0); comments and layout stay.  Raises
    ShapeError when some Crop's offset cannot be computed.
    """
    raw = io.parse_text(text, pb.NetParameter(), path=path)
    a = analyze(raw, phase, level, stages, input_shapes, allow_python_layers=allow_python_layers)
    errors = [c.problem() for c in a.crops if c.error is not None]
    if errors:
        raise ShapeError(f"{path}: not fixing, some Crop offsets cannot be computed: " + "; ".join(errors))
    fields, _ = parse_fields(tokenize(text))
    blocks = [f.message for f in fields if f.name == "layer" and f.message is not None
              and any(g.name == "type" and g.values and _unquote(g.values[0].text) == "Crop"
                      for g in f.message.fields)]
    crop_layers = [i for i, l in enumerate(a.net.layer) if l.type == "Crop"]
    if len(blocks) != len(crop_layers):
        raise CaffeishError(f"{path}: found {len(blocks)} Crop layer blocks in the text but the net has "
                            f"{len(crop_layers)} Crop layers; cannot edit it safely")
    by_index = {c.layer.index: c for c in a.crops}
    edits, changes = [], []
    expected = pb.NetParameter()
    expected.CopyFrom(raw)
    raw_crops = [l for l in expected.layer if l.type == "Crop"]
    for block, index, raw_layer in zip(blocks, crop_layers, raw_crops):
        crop = by_index.get(index)
        if crop is None or crop.agrees:
            continue
        values = _offset_values(crop.computed, crop.given)
        edits += _edit_crop(text, block, values)
        del raw_layer.crop_param.offset[:]
        raw_layer.crop_param.offset.extend(values)
        changes.append((crop.name, crop.axis, crop.written, crop.computed))
    for start, end, new in sorted(edits, reverse=True):
        text = text[:start] + new + text[end:]
    check_net = io.parse_text(text, pb.NetParameter(), path=path)
    if check_net != expected:
        raise CaffeishError(f"{path}: editing the offsets changed more than the offsets; nothing written")
    return text, changes


def fix_file(net_path, out_path, phase=TEST, level=0, stages=(), input_shapes=None, allow_python_layers=False):
    """Write `net_path` with computed Crop offsets to `out_path` (never over the input)."""
    if io.is_binary_file(net_path):
        raise CaffeishError(f"{net_path}: --fix edits a prototxt's text; this is a binary file")
    with open(net_path, "rb") as f:
        raw = f.read()
    text = io.decode_text(raw, net_path)  # UTF-16, or bytes that are not UTF-8 outside comments: one line
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise CaffeishError(f"{net_path}: --fix keeps every byte of the text but its comments are not UTF-8; "
                            f"save the file as UTF-8 first") from None
    io.check_has_layers(io.parse_text(text, pb.NetParameter(), path=str(net_path)), net_path)
    new, changes = fix_text(text, phase, level, stages, input_shapes, path=str(net_path),
                            allow_python_layers=allow_python_layers)
    with io.atomic_output(out_path, inputs=[net_path]) as f:
        f.write(new.encode("utf-8"))
    return changes


"""pycaffe's net specification: write nets in Python (`caffe.NetSpec`, `caffe.layers`, `caffe.params`).

    from caffeish import layers as L, params as P      # as `from caffe import layers as L, params as P`
    n = caffeish.NetSpec()
    n.data, n.label = L.Python(module='voc_layers', layer='VOCSegDataLayer', ntop=2)
    n.conv1 = L.Convolution(n.data, kernel_size=3, num_output=64, pad=100,
                            param=[dict(lr_mult=1), dict(lr_mult=2)])
    n.relu1 = L.ReLU(n.conv1, in_place=True)
    n.pool1 = L.Pooling(n.relu1, pool=P.Pooling.MAX, kernel_size=2, stride=2)
    print(n.to_proto())                                 # a caffe NetParameter

pycaffe's semantics (python/caffe/net_spec.py), on our schema (caffeish.formats.schema.pb):

* `L.Type(*bottoms, **kwargs)` makes a layer of that type: one top (a Top), several
  (a tuple, `ntop=n`) or none (`ntop=0`: the Function itself).  `in_place=True`
  makes the tops the bottoms' names.
* A keyword ending in `param` (`param=[dict(lr_mult=1)]`, `convolution_param=dict(...)`,
  `loss_param`, ...) is a LayerParameter field.  Any other keyword is first looked up in
  the layer type's own parameter message (`kernel_size` of a Convolution goes into
  convolution_param: the message named TypeParameter, so Deconvolution, which has
  none, takes `convolution_param=dict(...)`), then in LayerParameter (`loss_weight`,
  `include`, ...).
* Values: a list fills a repeated field (a single value becomes a one-element list),
  a dict fills a message (a list of dicts, a repeated message), anything else is set
  as is; `P.Pooling.MAX` and the like are the schema's enum constants.
* Names: NetSpec attribute names name the tops and each layer after its first top;
  other tops and top-less layers get automatic names (`Convolution1`, ...).

Mistakes (an unknown field, a value of the wrong type, a layer input that is not a
Top) raise a NetSpecError naming the layer and the field; it is also the TypeError,
ValueError, AttributeError or KeyError that pycaffe raises for the same mistake.
"""
import difflib
from collections import Counter, OrderedDict

from caffeish.errors import CaffeishError
from caffeish.formats.io import FORK_FIELDS
from caffeish.formats.schema import pb

__all__ = ["NetSpec", "Top", "Function", "Layers", "Parameters", "layers", "params", "to_proto",
           "assign_proto", "param_name_dict", "NetSpecError"]


class NetSpecError(CaffeishError):
    """A NetSpec layer or value that does not fit the Caffe schema."""


class NetSpecTypeError(NetSpecError, TypeError):
    """A value of the wrong type (pycaffe raises TypeError)."""


class NetSpecValueError(NetSpecError, ValueError):
    """A value out of range for its field (pycaffe raises ValueError)."""


class NetSpecAttributeError(NetSpecError, AttributeError):
    """A field the schema does not have (pycaffe raises AttributeError)."""


class NetSpecKeyError(NetSpecError, KeyError, AttributeError):
    """A NetSpec name that was never assigned (pycaffe raises KeyError)."""

    def __str__(self):
        return str(self.args[0]) if self.args else ""


# -- the schema -------------------------------------------------------------------------


def param_name_dict():
    """Layer type -> the prefix of its LayerParameter field: {'Convolution': 'convolution', ...}.

    As pycaffe: every LayerParameter field `x_param` whose message is `XParameter`
    gives X -> x (so Deconvolution, with no DeconvolutionParameter, has no entry).
    """
    out = {}
    for field in pb.LayerParameter.DESCRIPTOR.fields:
        if field.name.endswith("_param") and field.message_type is not None:
            out[field.message_type.name.removesuffix("Parameter")] = field.name.removesuffix("_param")
    return out


_param_names = param_name_dict()


def _kind(field):
    """A field's type with its article: 'a FillerParameter message', 'an int32', 'a PoolMethod enum'."""
    if field.message_type is not None:
        return f"a {field.message_type.name} message"
    if field.enum_type is not None:
        return f"a {field.enum_type.name} enum"
    names = {field.TYPE_BOOL: "bool", field.TYPE_STRING: "string", field.TYPE_BYTES: "bytes",
             field.TYPE_FLOAT: "float", field.TYPE_DOUBLE: "double", field.TYPE_INT32: "int32",
             field.TYPE_INT64: "int64", field.TYPE_UINT32: "uint32", field.TYPE_UINT64: "uint64"}
    name = names.get(field.type, "scalar")
    return f"an {name}" if name[0] in "aeiou" else f"a {name}"


def _no_field(message, name, where, also=None):
    """The error for a field `name` that `message` (nor `also`, the layer type's own message) has."""
    owners = [message] + ([also] if also is not None else [])
    if also is not None:
        text = f"{where}: neither {also.DESCRIPTOR.name} nor {message.DESCRIPTOR.name} has a field '{name}'"
    else:
        text = f"{where}: {message.DESCRIPTOR.name} has no field '{name}'"
    if name in FORK_FIELDS:
        return NetSpecAttributeError(f"{text} (it comes from {FORK_FIELDS[name]}, not BVLC Caffe)")
    close = difflib.get_close_matches(name, [f.name for m in owners for f in m.DESCRIPTOR.fields], n=1)
    if close:
        text += f"; did you mean '{close[0]}'?"
    elif message.DESCRIPTOR.name == "LayerParameter":
        holders = [f.name for f in pb.LayerParameter.DESCRIPTOR.fields
                   if f.message_type is not None and f.name.endswith("_param")
                   and name in f.message_type.fields_by_name]
        if holders:
            shown = " or ".join(f"{h}=dict({name}=...)" for h in holders[:3])
            text += f"; it is a field of {shown}"
    return NetSpecAttributeError(text)


def _wrap(exc, where, value):
    """A protobuf TypeError/ValueError as a NetSpecError naming the field and the value."""
    cls = NetSpecValueError if isinstance(exc, ValueError) else NetSpecTypeError
    detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return cls(f"{where}: cannot take {value!r}: {detail}")


def _join(path, name):
    return f"{path}.{name}" if path else name


def _assign(proto, name, val, prefix, path=""):
    """Set `proto.name` from `val`; errors read '{prefix}: {path.name}: ...'."""
    field = proto.DESCRIPTOR.fields_by_name.get(name)
    if field is None:
        raise _no_field(proto, name, f"{prefix}: {path}" if path else prefix)
    here = _join(path, name)
    where = f"{prefix}: {here}"
    repeated = field.is_repeated
    if repeated and not isinstance(val, (list, tuple)):
        val = [val]
    if isinstance(val, (list, tuple)):
        if not repeated:
            raise NetSpecTypeError(f"{where}: is {_kind(field)} field that takes one value, "
                                   f"not a {type(val).__name__}")
        container = getattr(proto, name)
        for i, item in enumerate(val):
            at = f"{here}[{i}]"
            if field.message_type is not None:
                if isinstance(item, dict):
                    sub = container.add()
                    for k, v in item.items():
                        _assign(sub, k, v, prefix, at)
                elif getattr(item, "DESCRIPTOR", None) is field.message_type:
                    container.add().CopyFrom(item)
                else:
                    raise NetSpecTypeError(f"{prefix}: {at}: is {_kind(field)}; give a dict of its "
                                           f"fields, not {type(item).__name__} {item!r}")
            else:
                try:
                    container.append(item)
                except (TypeError, ValueError) as e:
                    raise _wrap(e, f"{prefix}: {at}", item) from None
    elif isinstance(val, dict):
        if field.message_type is None:
            raise NetSpecTypeError(f"{where}: is {_kind(field)} field, not a message; a dict cannot fill it")
        sub = getattr(proto, name)
        for k, v in val.items():
            _assign(sub, k, v, prefix, here)
    elif field.message_type is not None:
        if getattr(val, "DESCRIPTOR", None) is field.message_type:
            getattr(proto, name).CopyFrom(val)
        else:
            raise NetSpecTypeError(f"{where}: is {_kind(field)}; give a dict of its fields "
                                   f"(e.g. {name}=dict(...)), not {type(val).__name__} {val!r}")
    else:
        try:
            setattr(proto, name, val)
        except (TypeError, ValueError) as e:
            raise _wrap(e, where, val) from None


def assign_proto(proto, name, val):
    """Set field `name` of message `proto` from a Python value, as pycaffe's assign_proto.

    Lists (and tuples) fill repeated fields, a single value a one-element repeated
    field, dicts fill messages (a list of dicts: repeated messages), other values are
    set as they are.  Errors are NetSpecErrors naming the field.
    """
    _assign(proto, name, val, proto.DESCRIPTOR.name)


# -- tops and layers ----------------------------------------------------------------------


class Top:
    """One output blob of a layer (a Function): `fn` and its index `n` among the layer's tops."""

    def __init__(self, fn, n):
        self.fn = fn
        self.n = n

    def __repr__(self):
        return f"<caffe Top {self.n} of a {self.fn.type_name} layer>"

    def to_proto(self):
        """A NetParameter with every layer needed to compute this top (automatic names)."""
        return to_proto(self)

    def _update(self, params):
        self.fn._update(params)

    def _to_proto(self, layers, names, autonames):
        return self.fn._to_proto(layers, names, autonames)


class Function:
    """A layer: its type, its inputs (Tops of other layers) and its parameters (the keywords)."""

    def __init__(self, type_name, inputs, params):
        self.type_name = type_name
        for index, inp in enumerate(inputs):
            if not isinstance(inp, Top):
                # pycaffe's message, word for word (its tests match it).
                raise NetSpecTypeError(f"{type_name} input {index} is not a Top (type is {type(inp)})")
        self.inputs = inputs
        self.params = params
        self.ntop = self.params.pop("ntop", 1)
        if isinstance(self.ntop, bool) or not isinstance(self.ntop, int) or self.ntop < 0:
            raise NetSpecValueError(f"{type_name}: ntop must be a whole number of tops (0 or more), "
                                    f"got {self.ntop!r}")
        self.in_place = self.params.pop("in_place", False)
        self.tops = tuple(Top(self, n) for n in range(self.ntop))

    def __repr__(self):
        return f"<caffe {self.type_name} layer, {len(self.inputs)} bottom(s), {self.ntop} top(s)>"

    def _get_name(self, names, autonames):
        if self not in names and self.ntop > 0:
            names[self] = self._get_top_name(self.tops[0], names, autonames)
        elif self not in names:
            autonames[self.type_name] += 1
            names[self] = self.type_name + str(autonames[self.type_name])
        return names[self]

    def _get_top_name(self, top, names, autonames):
        if top not in names:
            autonames[top.fn.type_name] += 1
            names[top] = top.fn.type_name + str(autonames[top.fn.type_name])
        return names[top]

    def _update(self, params):
        self.params.update(params)

    def _fill_params(self, layer, where):
        """Set the keyword parameters on LayerParameter `layer` (pycaffe's lookup order)."""
        own = _param_names.get(self.type_name)
        for k, v in self.params.items():
            sub = None
            if not k.endswith("param") and own is not None:
                sub = getattr(layer, own + "_param")
                if k in sub.DESCRIPTOR.fields_by_name:
                    _assign(sub, k, v, where, own + "_param")
                    continue
            if k not in layer.DESCRIPTOR.fields_by_name:
                raise _no_field(layer, k, where, sub)
            _assign(layer, k, v, where)

    def layer_parameter(self):
        """This layer's type and parameters as a LayerParameter (no name, bottoms or tops)."""
        layer = pb.LayerParameter()
        layer.type = self.type_name
        self._fill_params(layer, f"{self.type_name} layer")
        return layer

    def _to_proto(self, layers, names, autonames):
        if self in layers:
            return
        bottom_names = []
        for inp in self.inputs:
            inp._to_proto(layers, names, autonames)
            producer = layers[inp.fn]
            if inp.n >= len(producer.top):
                raise NetSpecValueError(
                    f"layer '{producer.name}' ({producer.type}) is in place with {len(producer.top)} "
                    f"bottom(s), so it has no top {inp.n} to feed a {self.type_name} layer")
            bottom_names.append(producer.top[inp.n])
        layer = pb.LayerParameter()
        layer.type = self.type_name
        layer.bottom.extend(bottom_names)
        if self.in_place:
            layer.top.extend(layer.bottom)
        else:
            for top in self.tops:
                layer.top.append(self._get_top_name(top, names, autonames))
        layer.name = self._get_name(names, autonames)
        self._fill_params(layer, f"layer '{layer.name}' ({self.type_name})")
        layers[self] = layer


def _check_top(name, value):
    if isinstance(value, (Top, Function)):
        return
    if isinstance(value, tuple) and value and all(isinstance(v, Top) for v in value):
        raise NetSpecTypeError(
            f"NetSpec '{name}' holds a tuple of {len(value)} tops (a layer with ntop={len(value)}); "
            f"give each its own name: n.a, n.b = L.{value[0].fn.type_name}(..., ntop={len(value)})")
    raise NetSpecTypeError(f"NetSpec '{name}' is a {type(value).__name__}, not a top (the result of a "
                           "caffe.layers call)")


def to_proto(*tops):
    """A NetParameter with every layer needed to compute the given tops (automatic names)."""
    layers = OrderedDict()
    autonames = Counter()
    for i, top in enumerate(tops):
        _check_top(f"argument {i}", top)
        (top.fn if isinstance(top, Top) else top)._to_proto(layers, {}, autonames)
    net = pb.NetParameter()
    net.layer.extend(layers.values())
    return net


class NetSpec:
    """Named tops: assign them as attributes (or items); to_proto() gives the NetParameter.

    The layers come in the order the names were first assigned (each after the layers
    it needs); tops and layers take the names they were assigned to.
    """

    def __init__(self):
        super().__setattr__("tops", OrderedDict())

    def __setattr__(self, name, value):
        self.tops[name] = value

    def __getattr__(self, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)  # copy, pickle and friends probe for special methods
        try:
            return self.tops[name]
        except KeyError:
            raise NetSpecKeyError(f"NetSpec has no top named '{name}'") from None

    def __setitem__(self, key, value):
        self.__setattr__(key, value)

    def __getitem__(self, item):
        return self.__getattr__(item)

    def __delitem__(self, name):
        try:
            del self.tops[name]
        except KeyError:
            raise NetSpecKeyError(f"NetSpec has no top named '{name}'") from None

    def keys(self):
        return list(self.tops.keys())

    def vals(self):
        return list(self.tops.values())

    def update(self, name, params):
        """Add or change keyword parameters of the layer that makes top `name`."""
        self[name]._update(params)

    def to_proto(self):
        for name, top in self.tops.items():
            _check_top(name, top)
        names = {v: k for k, v in self.tops.items()}
        autonames = Counter()
        layers = OrderedDict()
        for top in self.tops.values():
            top._to_proto(layers, names, autonames)
        net = pb.NetParameter()
        net.layer.extend(layers.values())
        return net


class Layers:
    """`caffe.layers`: L.Type(*bottoms, **params) makes a layer of type Type (see the module doc)."""

    def __getattr__(self, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)

        def layer_fn(*args, **kwargs):
            fn = Function(name, args, kwargs)
            if fn.ntop == 0:
                return fn
            if fn.ntop == 1:
                return fn.tops[0]
            return fn.tops

        layer_fn.__name__ = name
        layer_fn.__qualname__ = f"layers.{name}"
        return layer_fn


class _ParamConstants:
    """`caffe.params.Type`: the constants (enum values, nested enums) of the schema's TypeParameter."""

    def __init__(self, name):
        self._name = name

    def __getattr__(self, attr):
        if attr.startswith("__") and attr.endswith("__"):
            raise AttributeError(attr)
        message = getattr(pb, self._name + "Parameter", None)
        if message is None:
            raise NetSpecAttributeError(f"caffe.params.{self._name}: the Caffe schema has no "
                                        f"{self._name}Parameter message")
        try:
            return getattr(message, attr)
        except AttributeError:
            values = [v.name for e in message.DESCRIPTOR.enum_types for v in e.values]
            known = f"its constants: {', '.join(values)}" if values else "it has no enum constants"
            raise NetSpecAttributeError(f"caffe.params.{self._name}.{attr}: {self._name}Parameter has "
                                        f"no constant '{attr}' ({known})") from None


class Parameters:
    """`caffe.params`: P.Pooling.MAX is PoolingParameter.MAX, P.Eltwise.SUM EltwiseParameter.SUM, ..."""

    def __getattr__(self, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return _ParamConstants(name)


layers = Layers()
params = Parameters()

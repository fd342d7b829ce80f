"""Python layers: the user code a prototxt names, run as pycaffe runs it.

Caffe's Python layer (`python_param { module layer param_str }`) imports
`module` from the Python path, builds its class `layer` with the
LayerParameter, sets the instance's `param_str` and `phase`, and then:

- when the net is built: `setup(bottom, top)` then `reshape(bottom, top)`;
- on every forward pass: `reshape(bottom, top)` then `forward(bottom, top)`.

`bottom` and `top` are lists of blobs whose `.data` are float32 arrays; the
code decides the top shapes (`top[0].reshape(1, *image.shape)`), which may
change from one forward to the next (fcn.berkeleyvision.org's VOCSegDataLayer
loads one image of its own size per pass), and the runtime then reshapes the
layers downstream.  Here the blobs are `caffeish.runtime.blobs.ArrayBlob`s over
numpy arrays (on the GPU backend bottoms are copied to the host and tops
back); bottoms are read-only views of the runtime's arrays, except where a top
has its bottom's name (in place), where the two are one blob, as in Caffe.

Shape inference (our `reshape(bottom_shapes)`) builds the user layer on first
use, with zero-filled bottoms of those shapes, and returns the tops' shapes.
It runs the user's `reshape` again whenever the runtime reshapes (new input
shapes), as Caffe's Net::Reshape does.

While the module is imported, `import caffe` gives caffeish unless a `caffe`
module is loaded already; the alias stays when no other `caffe` could be
imported (so a later `import caffe` inside the layer's methods agrees), and
is removed when one could (a real Caffe or a Caffe source tree on the path is
not shadowed for the rest of the process).

Parameter blobs: a layer may add its own (`self.blobs.add_blob(...)` in
setup, as pycaffe allows); the Net shows them (`net.params[name]`,
`net.layers[i].blobs`), loads weights into them and saves them.  Their shapes
are the layer's `param_shapes`, read after setup.

Errors: an exception raised by the user's code (its module's top-level code,
its constructor, setup, reshape or forward) reaches the caller unchanged, the
same object, as in pycaffe (`except RuntimeError` around `caffe.Net(...)`
works); a note naming the layer and the method is added to it.  Inside
`user_errors_as_caffeish()` (the CLI) it becomes a PythonLayerError instead,
one line naming the layer, the method, the error and the file:line.  A module
that cannot be found or imported, or a class that is missing or not a layer,
is an UnsupportedError either way.

Safety and limits: only a class that subclasses `caffeish.Layer` (pycaffe's
`caffe.Layer`) is instantiated; any other callable a prototxt names
(`module: "subprocess" layer: "Popen"`) is refused before it is called.
Importing the module does run its top-level code, as in Caffe.

Backward: Caffe's PythonLayer::Backward calls `backward(top, propagate_down,
bottom)` on the host (there is no GPU version).  The top blobs' `.diff` hold the
top diffs (a copy: what the layer writes there stays its own), their `.data`
the tops' current values; the bottom blobs' `.diff` start at zeros, and what the
layer leaves there is the bottom diff, for every bottom asked for
(`propagate_down[i]`) and for any other whose `.diff` it touched (Caffe's blob
memory would hold it).  An in-place pair is one blob, whose `.diff` holds the top
diff on entry and the bottom diff on return, as in Caffe.  The parameter blobs'
`.diff` (`self.blobs[i].diff`) are the Net's parameter diffs, which the layer adds
into (or overwrites) as it likes.  pycaffe's `caffe.Layer` has no `backward`, so
a layer class that defines none fails with AttributeError when Caffe calls it (a
Python data layer under force_backward, say).

A bottomless Python layer (a data layer) whose tops all have shapes given by
the user (`--input-shape TOP=...`, `input_shapes=`) is not run: its tops are
net inputs that the caller feeds, and its module need not be importable.
"""
import contextlib
import contextvars
import importlib
import importlib.util
import os
import re
import sys
import traceback

import numpy as np

from caffeish.runtime import backend as backends
from caffeish.errors import CaffeishError, ShapeError, UnsupportedError
from caffeish.graph.registry import Layer, register

_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


class PythonLayerError(CaffeishError):
    """A Python layer's own code raised: the message names the layer, the method, the error and where."""


_AS_CAFFEISH = contextvars.ContextVar("caffeish_python_layer_errors_as_caffeish", default=False)


@contextlib.contextmanager
def user_errors_as_caffeish():
    """Within this block an exception from a Python layer's code becomes a PythonLayerError
    (a one-line CaffeishError, for the CLI); outside it, the exception reaches the caller unchanged."""
    token = _AS_CAFFEISH.set(True)
    try:
        yield
    finally:
        _AS_CAFFEISH.reset(token)


@contextlib.contextmanager
def caffe_resolves_to_caffeish():
    """`import caffe` gives caffeish while a Python layer's module is imported (see the module doc)."""
    import caffeish

    if "caffe" in sys.modules:
        yield
        return
    try:
        other_caffe = importlib.util.find_spec("caffe") is not None
    except (ImportError, ValueError):
        other_caffe = True
    added = [name for name in ("caffe", "caffe.io") if name not in sys.modules]
    sys.modules["caffe"] = caffeish
    sys.modules.setdefault("caffe.io", caffeish.io)
    try:
        yield
    finally:
        if other_caffe:
            for name in added:
                if sys.modules.get(name) in (caffeish, caffeish.io):
                    del sys.modules[name]


def _where(error, module_name):
    """' (at file:line)' for the deepest frame of the user's module in the error's traceback."""
    frames = traceback.extract_tb(error.__traceback__)
    module = sys.modules.get(module_name)
    path = os.path.abspath(getattr(module, "__file__", None) or "") if module else ""
    chosen = [f for f in frames if path and os.path.abspath(f.filename) == path] or frames[-1:]
    return f" (at {chosen[-1].filename}:{chosen[-1].lineno})" if chosen else ""


@register("Python")
class Python(Layer):
    """Caffe's Python layer (any number of bottoms and tops), running the class python_param names."""

    value_dependent_shape = True  # the user code decides the top shapes, at every forward

    def __init__(self, param, phase):
        super().__init__(param, phase)
        p = param.python_param
        self.module, self.layer_class, self.param_str = p.module, p.layer, p.param_str
        self.instance = None  # the user's layer object, built on first reshape
        self._class = None
        self._load_error = None
        self._bottom_blobs = self._top_blobs = None

    def _describe(self):
        module = self.module or "<unset>"
        cls = self.layer_class or "<unset>"
        return f"layer '{self.name}' (Python, python_param module '{module}', layer '{cls}')"

    # -- fed data layers -----------------------------------------------------------------
    def _given(self):
        """The user's shapes for the tops of a bottomless layer ({} when it has bottoms)."""
        if len(self.param.bottom):
            return {}
        return {t: tuple(self.input_shapes[t]) for t in self.param.top if t in self.input_shapes}

    @property
    def fed(self):
        """True for a data layer whose tops all have user-given shapes: the caller feeds them."""
        tops = list(self.param.top)
        return bool(tops) and len(self._given()) == len(tops)

    def _data_hint(self):
        if len(self.param.bottom):
            return ""
        flags = " ".join(f"--input-shape {t}=N,C,H,W" for t in self.param.top)
        return (f"; or, to feed this data layer's tops yourself, give their shapes: "
                f"{flags} (summary, offsets) or input_shapes= in Python, or replace it with an Input layer")

    # -- loading the user's class --------------------------------------------------------
    def user_class(self):
        """The class python_param names, checked to subclass caffeish.Layer (UnsupportedError if not)."""
        if self._class is not None:
            return self._class
        if self._load_error is not None:
            raise self._load_error
        try:
            self._class = self._load()
        except UnsupportedError as e:
            self._load_error = e
            raise
        return self._class

    def _load(self):
        from caffeish.runtime.blobs import PythonLayer

        what, module_name, class_name = self._describe(), self.module, self.layer_class
        if not module_name or not class_name:
            raise UnsupportedError(f"{what}: python_param needs both 'module' and 'layer'{self._data_hint()}")
        if not _MODULE_NAME.match(module_name):
            raise UnsupportedError(f"{what}: '{module_name}' is not a module name (dotted Python identifiers)")
        try:
            with caffe_resolves_to_caffeish():
                module = importlib.import_module(module_name)
        except ImportError as e:
            if getattr(e, "name", None) == module_name or module_name.startswith(f"{getattr(e, 'name', None)}."):
                how = (f"Caffe imports it from the Python path: put the folder that holds {module_name}.py "
                       f"on PYTHONPATH (e.g. PYTHONPATH=/path/to/fcn.berkeleyvision.org for voc_layers)")
            else:
                how = f"install what {module_name} imports, or put it on PYTHONPATH"
            raise UnsupportedError(
                f"{what}: cannot import module '{module_name}' ({type(e).__name__}: {e}); {how}"
                f"{self._data_hint()}") from e
        except Exception as e:  # the module's own top-level code raised
            raise self._user_error(e, f"importing module '{module_name}'", module_name)
        where = getattr(module, "__file__", None) or module_name
        cls = getattr(module, class_name, None)
        if cls is None:
            names = sorted(n for n, v in vars(module).items() if isinstance(v, type) and issubclass(v, PythonLayer)
                           and v is not PythonLayer)
            listed = f"; its Python layer classes: {', '.join(names)}" if names else "; it defines no Python layer class"
            raise UnsupportedError(f"{what}: module '{module_name}' ({where}) has no '{class_name}'{listed}")
        if not (isinstance(cls, type) and issubclass(cls, PythonLayer)):
            other = next((b for b in getattr(cls, "__mro__", ())[1:] if b.__name__ == "Layer"), None)
            why = (f" ({class_name} subclasses {other.__module__}.Layer: another Caffe's, imported before "
                   f"caffeish loaded {module_name}; import caffeish as caffe instead)") if other else ""
            raise UnsupportedError(
                f"{what}: '{module_name}.{class_name}' is not a Python layer class (a subclass of caffe.Layer, "
                f"i.e. caffeish.Layer){why}; caffeish instantiates nothing else a prototxt names")
        return cls

    @property
    def can_forward(self):
        if self.fed:
            return False
        try:
            self.user_class()
        except UnsupportedError:
            return False
        return True

    @property
    def unsupported_reason(self):
        if self.fed:
            return ("--input-shape / input_shapes gave the shapes of this Python data layer's tops, so they "
                    "are inputs to pass and its code does not run")
        try:
            self.user_class()
        except UnsupportedError as e:
            return str(e)
        raise AssertionError("unsupported_reason is asked only when the layer cannot run")

    # -- calling the user's code ----------------------------------------------------------
    def _user_error(self, error, what, module_name=None):
        """What to raise for `error`, raised by the user's code while doing `what`: the error itself
        (with a note naming the layer), or a PythonLayerError inside user_errors_as_caffeish()."""
        where = _where(error, module_name or self.module)
        if _AS_CAFFEISH.get():
            wrapped = PythonLayerError(f"{self._describe()}: {what} raised {type(error).__name__}: {error}"
                                       f"{where}{self._data_hint()}")
            wrapped.__cause__ = error
            return wrapped
        note = f"caffeish: raised in {what} of {self._describe()}{where}"
        if hasattr(error, "add_note") and note not in getattr(error, "__notes__", ()):
            error.add_note(note)
        return error

    def _call(self, method, *args):
        try:
            return getattr(self.instance, method)(*args)
        except CaffeishError:
            raise
        except Exception as e:
            error = self._user_error(e, f"{method}()")
            if error is e:
                raise
            raise error from e

    def _instantiate(self, bottoms):
        """Build the user's layer and run setup() then reshape(), as Caffe's Layer::SetUp."""
        from caffeish.runtime.blobs import ArrayBlob

        cls = self.user_class()
        try:
            instance = cls(self.param)
        except CaffeishError:
            raise
        except Exception as e:
            error = self._user_error(e, f"building {cls.__name__}")
            if error is e:
                raise
            raise error from e
        instance.param_str = self.param_str
        instance.phase = int(self.phase)
        self.instance = instance
        self._top_blobs = [ArrayBlob(name=t) for t in self.param.top]
        self._bind_bottoms(bottoms)
        try:
            self._call("setup", self._bottom_blobs, self._top_blobs)
            self._call("reshape", self._bottom_blobs, self._top_blobs)
        except BaseException:
            self.instance = None  # a later call builds it again, as a new net would
            raise

    def param_shapes(self, bottom_shapes):
        """The shapes of the layer's own parameter blobs (self.blobs), as its setup made them."""
        if self.instance is None:
            return []
        return [blob.shape for blob in self.instance.blobs]

    def _bind_bottoms(self, bottoms):
        """Blobs over the bottom arrays: read-only views, except an in-place pair (one blob, a copy)."""
        from caffeish.runtime.blobs import ArrayBlob

        blobs = []
        tops = list(self.param.top)
        for j, (name, array) in enumerate(zip(self.param.bottom, bottoms)):
            if j < len(tops) and tops[j] == name:  # in place: Caffe passes the same blob as bottom and top
                blob = self._top_blobs[j]
                blob.bind(np.array(array, dtype=np.float32, copy=True))
            else:
                view = np.asarray(array, dtype=np.float32).view()
                view.flags.writeable = False
                blob = ArrayBlob(name=name)
                blob.bind(view)
            blobs.append(blob)
        self._bottom_blobs = blobs

    # -- the Layer interface ----------------------------------------------------------------
    def reshape(self, bottom_shapes):
        tops = list(self.param.top)
        given = self._given()
        if given and len(given) == len(tops):
            return [given[t] for t in tops]
        if given:
            missing = [t for t in tops if t not in given]
            raise ShapeError(
                f"{self._describe()}: --input-shape gives {sorted(given)} but not {missing}; give the shapes "
                f"of all its tops (to feed them yourself) or of none (to run its Python code)")
        zeros = [np.zeros(tuple(s), dtype=np.float32) for s in bottom_shapes]
        if self.instance is None:
            self._instantiate(zeros)
        else:
            self._bind_bottoms(zeros)
            self._call("reshape", self._bottom_blobs, self._top_blobs)
        return [blob.shape for blob in self._top_blobs]

    def backward(self, xp, top_diffs, tops, bottoms, blobs, propagate_down, param_diffs):
        """Caffe's PythonLayer::Backward: the user's backward(top, propagate_down, bottom) on the host
        (see the module doc)."""
        if self.fed:
            return [None] * len(bottoms)  # its tops are inputs: nothing runs, as for an Input layer
        if self.instance is None:
            raise UnsupportedError(f"{self._describe()}: backward before any forward")
        from caffeish.runtime.blobs import PythonLayer

        method = getattr(type(self.instance), "backward", None)
        if method is None or method is getattr(PythonLayer, "backward", None):
            error = AttributeError(f"'{type(self.instance).__name__}' object has no attribute 'backward' "
                                   f"(Caffe calls backward(self, top, propagate_down, bottom) on every Python "
                                   f"layer that needs backward; define it, as a no-op where nothing flows back)")
            raise self._user_error(error, "backward()")
        self._bind_bottoms([backends.to_numpy(b) for b in bottoms])
        in_place = {j for j, (b, t) in enumerate(zip(self.param.bottom, self.param.top)) if b == t}
        for j, blob in enumerate(self._top_blobs):
            if j not in in_place and j < len(tops) and tops[j] is not None:
                current = backends.to_numpy(tops[j])
                if blob.shape == tuple(current.shape) and blob.data.flags.writeable:
                    blob.data[...] = current  # the blob keeps its array, as Caffe's top persists
                else:
                    blob.bind(np.array(current, dtype=np.float32, copy=True))
            blob.diff[...] = backends.to_numpy(top_diffs[j])
        own = list(self.instance.blobs)
        copied = []  # (net's diff, the blob's host diff) where they are not one array
        for blob, net_diff in zip(own, param_diffs):
            if net_diff is not None and net_diff is not blob.diff:
                blob.diff[...] = backends.to_numpy(net_diff)
                copied.append((net_diff, blob.diff))
        self._call("backward", self._top_blobs, [bool(p) for p in propagate_down], self._bottom_blobs)
        for net_diff, host in copied:
            net_diff[...] = host if backends.is_host(net_diff) else xp.asarray(host)
        out = []
        for i, blob in enumerate(self._bottom_blobs):
            if propagate_down[i] or (i not in in_place and blob._diff is not None):
                diff = np.array(blob.diff, dtype=np.float32, copy=True)
                out.append(diff if xp is np else xp.asarray(diff))
            else:
                out.append(None)
        return out

    def forward(self, xp, bottoms, blobs):
        if not self.can_forward:
            raise UnsupportedError(f"layer '{self.name}' ({self.type}): cannot run: {self.unsupported_reason}")
        host = [backends.to_numpy(b) for b in bottoms]
        if self.instance is None:
            self._instantiate(host)
        else:
            self._bind_bottoms(host)
        self._call("reshape", self._bottom_blobs, self._top_blobs)
        self._call("forward", self._bottom_blobs, self._top_blobs)
        tops = []
        for blob in self._top_blobs:
            # The top blobs keep their arrays for the next pass (Caffe's blobs persist), so the
            # runtime gets its own copy: an output returned earlier must not change later.
            data = blob.data.copy()
            tops.append(data if xp is np else xp.asarray(data))
        return tops

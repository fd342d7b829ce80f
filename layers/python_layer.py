"""Python layers: user code that caffeish cannot run.

Caffe's Python layer imports `python_param.module` and instantiates the class
`python_param.layer`, whose setup/reshape/forward methods decide everything,
including the top shapes.  caffeish does not execute arbitrary Python from a
prototxt, so shape inference stops here with an UnsupportedError that says how
to go on.  The one exception is a Python *data* layer (no bottoms), whose top
shapes the user may give on the command line (--input-shape TOP=d0,d1,...).
"""
from caffeish.errors import UnsupportedError
from caffeish.registry import Layer, register


@register("Python")
class Python(Layer):
    """Caffe's Python layer (any number of bottoms and tops)."""

    unsupported_reason = (
        "caffeish does not run the Python code a prototxt names (python_param); replace the layer "
        "with built-in layers (an Input layer if it feeds data), remove it, or choose a phase "
        "(--phase) or stage that excludes it"
    )

    def __init__(self, param, phase):
        super().__init__(param, phase)
        p = param.python_param
        self.module, self.layer_class, self.param_str = p.module, p.layer, p.param_str

    def _describe(self):
        module = self.module or "<unset>"
        cls = self.layer_class or "<unset>"
        return f"layer '{self.name}' (Python, python_param module '{module}', layer '{cls}')"

    def reshape(self, bottom_shapes):
        tops = list(self.param.top)
        given = {t: self.input_shapes[t] for t in tops if t in self.input_shapes}
        if not bottom_shapes and len(given) == len(tops):
            return [tuple(given[t]) for t in tops]
        msg = (
            f"{self._describe()}: caffeish cannot run arbitrary Python layers, so it cannot "
            f"infer this layer's top shapes. Replace it with built-in layers"
        )
        if bottom_shapes:
            msg += " (for example an equivalent loss or Input layer), or remove it from the net."
        else:
            missing = [t for t in tops if t not in given]
            msg += (
                ", or give the shapes of its tops on the command line, e.g. "
                + " ".join(f"--input-shape {t}=N,C,H,W" for t in missing)
                + " (or replace it with an Input layer)."
            )
        raise UnsupportedError(msg)

"""Recurrent layers (RNN, LSTM) and the LSTMUnit step they are built from.

Caffe implements RNN and LSTM by unrolling them over the T timesteps of the
input into an internal net of InnerProduct, Eltwise, Scale, TanH and LSTMUnit
layers that share named parameters.  The layer's blobs are those parameters,
in the order they first appear in the unrolled net.  Here only the shapes are
computed.

Bottoms: x (T, N, ...), cont (T, N) sequence-continuation flags, an optional
static input (N, ...), and with recurrent_param.expose_hidden the initial
hidden state(s) (1, N, num_output) after it.  Top: (T, N, num_output), plus the
final hidden state(s) with expose_hidden.

Backward: RNN and LSTM refuse it (no unrolled net here), and force_backward never
asks for their continuation flags (bottom 1).  LSTMUnit's backward is Caffe's
formula (it recomputes the gates from its bottoms and reads c from its top), and
force_backward never asks for its continuation flags (bottom 2).
"""
import math

import numpy as np

from caffeish.errors import UnsupportedError
from caffeish.graph.registry import Layer, register


def _sigmoid(xp, x):
    """lstm_unit_layer.cpp's sigmoid: 1 / (1 + exp(-x)) (float32)."""
    return np.float32(1) / (np.float32(1) + xp.exp(-x))


def _tanh(xp, x):
    """lstm_unit_layer.cpp's tanh: 2 sigmoid(2x) - 1."""
    return np.float32(2) * _sigmoid(xp, np.float32(2) * x) - np.float32(1)


class _Recurrent(Layer):
    """Shared shape logic of Caffe's RecurrentLayer."""

    unsupported_reason = (
        "the caffeish runtime does not implement recurrent layers (Caffe runs them as an unrolled "
        "internal net); only their shapes and parameters are inferred, so run the net in Caffe or "
        "export it without its RNN/LSTM layers"
    )

    hidden_names = ()  # recurrent state blobs: LSTM (h, c), RNN (h,)

    def __init__(self, param, phase):
        super().__init__(param, phase)
        p = param.recurrent_param
        self.num_output = p.num_output
        self.expose_hidden = p.expose_hidden
        n_exposed = len(self.hidden_names) if self.expose_hidden else 0
        self.min_bottoms = 2 + n_exposed
        self.max_bottoms = 3 + n_exposed
        self.exact_tops = 1 + n_exposed

    def _static_input(self, bottom_shapes):
        n_exposed = len(self.hidden_names) if self.expose_hidden else 0
        return len(bottom_shapes) > 2 + n_exposed

    def reshape(self, bottom_shapes):
        self.check_counts(len(bottom_shapes), len(self.param.top))
        bottoms = [tuple(s) for s in bottom_shapes]
        x, cont = bottoms[0], bottoms[1]
        if len(x) < 2:
            raise self.error(f"bottom 0 must have at least 2 axes (#timesteps, #streams, ...), got {x}")
        t, n = x[0], x[1]
        if len(cont) != 2:
            raise self.error(f"bottom 1 must have exactly 2 axes (#timesteps, #streams), got {cont}")
        if cont != (t, n):
            raise self.error(f"bottom 1 (the continuation flags) must have shape {(t, n)}, got {cont}")
        static = self._static_input(bottoms)
        if static:
            xs = bottoms[2]
            if len(xs) < 1 or xs[0] != n:
                raise self.error(
                    f"bottom 2 (the static input) must have shape ({n}, ...) with {n} streams, got {xs}"
                )
            if len(xs) < 2:
                raise self.error(
                    f"bottom 2 (the static input) needs at least 2 axes: its transform is an "
                    f"InnerProduct over axis 1, got {xs}"
                )
        if self.num_output <= 0:
            raise self.error("recurrent_param.num_output must be positive")
        if t < 1:
            raise self.error(f"bottom 0 has {t} timesteps; the unrolled net needs at least 1")
        if len(x) < 3:
            raise self.error(
                f"bottom 0 needs at least 3 axes (#timesteps, #streams, features...): its "
                f"transform is an InnerProduct over axis 2, got {x}"
            )
        hidden = (1, n, self.num_output)
        if self.expose_hidden:
            first = 2 + int(static)
            for j, name in enumerate(self.hidden_names):
                if bottoms[first + j] != hidden:
                    raise self.error(
                        f"bottom {first + j} (initial {name}) must have the hidden state "
                        f"shape {hidden}, got {bottoms[first + j]}"
                    )
        tops = [(t, n, self.num_output)]
        if self.expose_hidden:
            tops += [hidden] * len(self.hidden_names)
        return tops

    def allow_force_backward(self, bottom_index):
        """Caffe's RecurrentLayer: never the sequence continuation flags (bottom 1)."""
        return bottom_index != 1

    def backward(self, xp, top_diffs, tops, bottoms, blobs, propagate_down, param_diffs):
        if len(propagate_down) > 1 and propagate_down[1]:
            raise UnsupportedError(
                f"layer '{self.name}' ({self.type}): cannot backpropagate to the sequence continuation "
                f"indicators (bottom 1, '{self.param.bottom[1]}'); give it propagate_down: false (Caffe: "
                f"Cannot backpropagate to sequence indicators.)")
        raise UnsupportedError(
            f"layer '{self.name}' ({self.type}): backward is not implemented: caffeish does not run "
            f"recurrent layers (Caffe unrolls them into an internal net); train this net in Caffe")

    def _dims(self, bottom_shapes):
        """(T, N, input size, static input size or None)."""
        x = tuple(bottom_shapes[0])
        static = None
        if self._static_input(bottom_shapes):
            static = math.prod(tuple(bottom_shapes[2])[1:])
        return x[0], x[1], math.prod(x[2:]), static


@register("LSTM")
class LSTM(_Recurrent):
    """Caffe's LSTM layer (gates i, f, o, g stacked into 4*num_output rows).

    Blobs, as in Caffe's unrolled net: W_xc (4H, I), b_c (4H,), W_xc_static
    (4H, S) if there is a static input, W_hc (4H, H); H = num_output,
    I = prod(x.shape[2:]), S = prod(x_static.shape[1:]).
    """

    hidden_names = ("h", "c")

    def param_shapes(self, bottom_shapes):
        _, _, i, s = self._dims(bottom_shapes)
        h4, h = 4 * self.num_output, self.num_output
        shapes = [(h4, i), (h4,)]
        if s is not None:
            shapes.append((h4, s))
        shapes.append((h4, h))
        return shapes

    def macs(self, bottom_shapes, top_shapes):
        t, n, i, s = self._dims(bottom_shapes)
        h4, h = 4 * self.num_output, self.num_output
        return t * n * h4 * (i + h) + (n * h4 * s if s is not None else 0)


@register("RNN")
class RNN(_Recurrent):
    """Caffe's RNN layer: h_t = tanh(W_hh h_{t-1} + W_xh x_t + b_h), o_t = tanh(W_ho h_t + b_o).

    Blobs: W_xh (H, I), b_h (H,), W_xh_static (H, S) if there is a static
    input, W_hh (H, H), W_ho (H, H), b_o (H,).
    """

    hidden_names = ("h",)

    def param_shapes(self, bottom_shapes):
        _, _, i, s = self._dims(bottom_shapes)
        h = self.num_output
        shapes = [(h, i), (h,)]
        if s is not None:
            shapes.append((h, s))
        shapes += [(h, h), (h, h), (h,)]
        return shapes

    def macs(self, bottom_shapes, top_shapes):
        t, n, i, s = self._dims(bottom_shapes)
        h = self.num_output
        return t * n * h * (i + 2 * h) + (n * h * s if s is not None else 0)


@register("LSTMUnit")
class LSTMUnit(Layer):
    """Caffe's LSTMUnit: one LSTM step.

    Bottoms: c_prev (1, N, D), gate inputs x (1, N, 4D), cont (1, N).
    Tops: c and h, both (1, N, D).  No blobs.
    """

    exact_bottoms = 3
    exact_tops = 2
    unsupported_reason = (
        "the caffeish runtime does not implement LSTMUnit (the LSTM step of Caffe's unrolled "
        "LSTM); only its shapes are inferred, so run the net in Caffe or export it without it"
    )

    def reshape(self, bottom_shapes):
        self.check_counts(len(bottom_shapes), len(self.param.top))
        bottoms = [tuple(s) for s in bottom_shapes]
        names = ("c_prev", "the gate input", "cont")
        for i, shape in enumerate(bottoms):
            want = 2 if i == 2 else 3
            if len(shape) != want:
                raise self.error(f"bottom {i} ({names[i]}) must have {want} axes, got {shape}")
        n = bottoms[0][1]
        for i, shape in enumerate(bottoms):
            if shape[0] != 1 or shape[1] != n:
                raise self.error(
                    f"bottom {i} ({names[i]}) must start with (1, {n}) (one timestep, "
                    f"{n} streams as in bottom 0), got {shape}"
                )
        d = bottoms[0][2]
        if bottoms[1][2] != 4 * d:
            raise self.error(
                f"bottom 1 (the gate input) must have 4*{d} = {4 * d} values per stream "
                f"(bottom 0 has {d}), got {bottoms[1]}"
            )
        return [bottoms[0], bottoms[0]]

    def allow_force_backward(self, bottom_index):
        """Caffe's LSTMUnit: never the sequence continuation flags (bottom 2)."""
        return bottom_index != 2

    def backward(self, xp, top_diffs, tops, bottoms, blobs, propagate_down, param_diffs):
        """Caffe's LSTMUnit Backward: with the gates i, f, o, g recomputed from x (f = 0 where
        cont = 0, else cont * sigmoid), c the top, and dc_term = dc + dh * o * (1 - tanh(c)^2):
        dc_prev = dc_term * f; di = dc_term * g * i(1-i); df = dc_term * c_prev * f(1-f);
        do = dh * tanh(c) * o(1-o); dg = dc_term * i * (1-g^2).  Like Caffe it computes both
        diffs when either is asked for; the continuation flags never get one (fatal if asked)."""
        if len(propagate_down) > 2 and propagate_down[2]:
            raise UnsupportedError(
                f"layer '{self.name}' (LSTMUnit): cannot backpropagate to the sequence continuation "
                f"indicators (bottom 2, '{self.param.bottom[2]}'); give it propagate_down: false (Caffe: "
                f"Cannot backpropagate to sequence indicators.)")
        if not (propagate_down[0] or propagate_down[1]):
            return [None, None, None]
        c_prev, x, cont = bottoms
        n, d = c_prev.shape[1], c_prev.shape[2]
        gates = xp.reshape(x, (n, 4, d))
        cont = xp.reshape(cont, (n, 1))
        one = np.float32(1)
        i = _sigmoid(xp, gates[:, 0])
        f = xp.where(cont == 0, np.float32(0), cont * _sigmoid(xp, gates[:, 1]))
        o = _sigmoid(xp, gates[:, 2])
        g = _tanh(xp, gates[:, 3])
        c = xp.reshape(tops[0], (n, d))
        tanh_c = _tanh(xp, c)
        dc = xp.reshape(top_diffs[0], (n, d))
        dh = xp.reshape(top_diffs[1], (n, d))
        c_term = dc + dh * o * (one - tanh_c * tanh_c)
        dx = xp.empty((n, 4, d), dtype=xp.float32)
        dx[:, 0] = c_term * g * i * (one - i)
        dx[:, 1] = c_term * xp.reshape(c_prev, (n, d)) * f * (one - f)
        dx[:, 2] = dh * tanh_c * o * (one - o)
        dx[:, 3] = c_term * i * (one - g * g)
        return [xp.reshape(c_term * f, c_prev.shape), xp.reshape(dx, x.shape), None]

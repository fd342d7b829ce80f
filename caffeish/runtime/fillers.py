"""Caffe's fillers: the initial values of parameter blobs (and of DummyData tops).

`fill(filler_param, shape, rng)` returns a float32 numpy array of `shape` filled
the way Caffe's filler.hpp does (semantics.md section 4):

* constant: every element = value.
* uniform: U[min, max] (Caffe requires min <= max).
* gaussian: N(mean, std) (std > 0).  With sparse >= 0 each element is kept with
  probability sparse / shape[0] and set to 0 otherwise.
* xavier: U[-sqrt(3/n), +sqrt(3/n)]; msra: N(0, sqrt(2/n)), where n is fan_in,
  fan_out or their average (variance_norm).  fan_in = count / shape[0] and
  fan_out = count / shape[1] (count when there is one axis), both integer
  divisions, so the blob layout decides them (a Deconvolution weight
  (C_in, O/g, k, k) has "fan_in" O/g*k*k).
* positive_unitball: U[0, 1], then every item along axis 0 is divided by its sum.
* bilinear: a 4-D blob with a square K x K kernel; f = ceil(K/2),
  c = (K-1)/(2f), w(y, x) = (1 - |x/f - c|) * (1 - |y/f - c|), written into every
  (out, in) slot (use it with group = channels for per-channel upsampling).

Every filler except gaussian rejects sparse != -1, and Caffe refuses to fill an
empty blob.  Random fillers cannot reproduce Caffe's random numbers (Caffe uses
boost's generators); only their distributions match.

The global random stream (`set_global_seed`, pycaffe's `caffe.set_random_seed`)
stands for Caffe's global RNG: once seeded, Nets built without their own seed
draw their fillers and random layers from it, one stream for all of them, so a
script that seeds and then builds its nets in the same order gets the same
values every run.  Seeding again restarts the stream, for the nets already built
too (their Dropout/DummyData draws come from it), as in Caffe.
"""
import math

import numpy as np

from caffeish.errors import ArgumentError, FillerError
from caffeish.formats.schema import pb

TYPES = ("constant", "gaussian", "positive_unitball", "uniform", "xavier", "msra", "bilinear")


def fan_in_out(shape):
    """Caffe's (fan_in, fan_out) for a blob shape: count/shape[0], count/shape[1] (integer)."""
    count = math.prod(shape)
    num = shape[0] if len(shape) >= 1 else 1  # Caffe's legacy num(): 1 for a 0-axis blob
    fan_in = count // num
    fan_out = count // shape[1] if len(shape) >= 2 else count
    return fan_in, fan_out


def variance_n(filler_param, shape):
    """The n of xavier/msra: fan_in, fan_out, or their average (a float), per variance_norm."""
    fan_in, fan_out = fan_in_out(shape)
    norm = filler_param.variance_norm
    if norm == pb.FillerParameter.AVERAGE:
        return (fan_in + fan_out) / 2.0
    if norm == pb.FillerParameter.FAN_OUT:
        return float(fan_out)
    return float(fan_in)


def bilinear_kernel(size):
    """The K x K bilinear upsampling kernel of Caffe's bilinear filler, float32."""
    f = math.ceil(size / 2.0)
    c = np.float32((size - 1) / (2.0 * f))
    coords = np.arange(size, dtype=np.float32) / np.float32(f)
    line = np.float32(1) - np.abs(coords - c)
    return np.outer(line, line).astype(np.float32)


def fill(filler_param, shape, rng=None, what="blob"):
    """A float32 array of `shape` filled per `filler_param` (a pb.FillerParameter; None: zeros).

    rng: a numpy.random.Generator for the random fillers (default: a fresh,
    unseeded one).  what: names the blob in error messages.
    """
    shape = tuple(int(d) for d in shape)
    if filler_param is None:
        return np.zeros(shape, np.float32)
    p = filler_param
    kind = p.type
    where = f"{what} of shape {shape}: filler '{kind}'"
    if kind not in TYPES:
        raise FillerError(f"{what}: unknown filler type '{kind}' (Caffe's fillers: {', '.join(TYPES)})")
    count = math.prod(shape)
    if count == 0:
        raise FillerError(f"{where}: Caffe cannot fill an empty blob (0 elements)")
    if kind == "gaussian":
        if p.sparse < -1:
            raise FillerError(f"{where}: sparse must be -1 (dense) or >= 0, got {p.sparse}")
    elif p.sparse != -1:
        raise FillerError(f"{where}: sparse {p.sparse} is only supported by the gaussian filler")
    if rng is None:
        rng = np.random.default_rng()

    if kind == "constant":
        return np.full(shape, p.value, np.float32)
    if kind == "uniform":
        return _uniform(rng, p.min, p.max, shape, where)
    if kind == "gaussian":
        out = _gaussian(rng, p.mean, p.std, shape, where)
        if p.sparse >= 0:
            if not shape:
                raise FillerError(f"{where}: sparse needs a blob with at least 1 axis")
            keep = p.sparse / shape[0]
            if keep > 1:
                raise FillerError(
                    f"{where}: sparse {p.sparse} exceeds shape[0] = {shape[0]} (the keep "
                    f"probability sparse/shape[0] must be at most 1)"
                )
            out *= np.asarray(rng.random(shape) < keep)
        return out
    if kind == "positive_unitball":
        out = _uniform(rng, 0.0, 1.0, shape, where)
        items = out.reshape(shape[0] if shape else 1, -1)
        items /= items.sum(axis=1, keepdims=True, dtype=np.float32)
        return out
    if kind in ("xavier", "msra"):
        n = variance_n(p, shape)
        if n <= 0:
            raise FillerError(f"{where}: the variance_norm fan is {n}; it must be positive")
        if kind == "xavier":
            scale = math.sqrt(3.0 / n)
            return _uniform(rng, -scale, scale, shape, where)
        return _gaussian(rng, 0.0, math.sqrt(2.0 / n), shape, where)
    # bilinear
    if len(shape) != 4:
        raise FillerError(f"{where}: the blob must be 4-D (out, in, K, K)")
    if shape[2] != shape[3]:
        raise FillerError(f"{where}: the kernel must be square, got {shape[2]}x{shape[3]}")
    return np.ascontiguousarray(np.broadcast_to(bilinear_kernel(shape[3]), shape))


def _uniform(rng, low, high, shape, where):
    low, high = float(np.float32(low)), float(np.float32(high))
    if low > high:
        raise FillerError(f"{where}: min {low} is greater than max {high}")
    out = np.asarray(rng.random(shape, dtype=np.float32))
    out *= np.float32(high - low)
    out += np.float32(low)
    return out


def _gaussian(rng, mean, std, shape, where):
    if not std > 0:
        raise FillerError(f"{where}: std must be positive, got {std}")
    out = np.asarray(rng.standard_normal(shape, dtype=np.float32))
    out *= np.float32(std)
    out += np.float32(mean)
    return out


# -- the global random stream (Caffe's Caffe::set_random_seed) ------------------------------------


class GlobalRNG:
    """A numpy Generator that follows the latest `set_global_seed` (what Nets hold as their rng)."""

    generator = None

    def __getattr__(self, name):
        if GlobalRNG.generator is None:
            raise AttributeError(name)
        return getattr(GlobalRNG.generator, name)

    def __repr__(self):
        return f"GlobalRNG({GlobalRNG.generator!r})"


_GLOBAL = GlobalRNG()
UINT_MAX = 2 ** 32 - 1


def set_global_seed(seed):
    """Seed the global stream (seed: an integer 0..2**32-1, Caffe's unsigned int)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ArgumentError(f"set_random_seed: the seed must be an integer, got {seed!r}")
    if not 0 <= int(seed) <= UINT_MAX:
        raise ArgumentError(f"set_random_seed: the seed must be in 0..{UINT_MAX} (Caffe's unsigned int), got {seed}")
    GlobalRNG.generator = np.random.default_rng(int(seed))


def global_rng():
    """The global stream once `set_global_seed` was called, else None."""
    return _GLOBAL if GlobalRNG.generator is not None else None


# Layers whose first blob is a weight that must not be constant: with every weight equal, every output
# channel computes the same thing (and zeros make the layer's output ignore its input).
WEIGHT_TYPES = ("Convolution", "Deconvolution", "InnerProduct", "Embed")


def constant_value(spec):
    """The one value a filler gives every element (0 for no filler: Caffe's zeros), or None when it
    draws different values (gaussian, xavier, msra, bilinear, ...)."""
    if spec is None:
        return 0.0
    if spec.type == "constant":
        return float(spec.value)
    if spec.type == "gaussian" and spec.std == 0:
        return float(spec.mean)
    if spec.type == "uniform" and spec.min == spec.max:
        return float(spec.min)
    return None


def constant_filler(spec):
    """How a filler gives one value to every element ("constant 0", "no filler: zeros", ...), or None when
    it draws different values (constant_value decides)."""
    if constant_value(spec) is None:
        return None
    if spec is None:
        return "no filler: zeros"
    if spec.type == "gaussian":
        return f"gaussian with std 0: constant {spec.mean:g}"
    if spec.type == "uniform":
        return f"uniform from {spec.min:g} to {spec.max:g}: constant"
    return f"constant {spec.value:g}"


def constant_weights(node):
    """The constant_filler description of a layer's weight filler when the layer is a WEIGHT_TYPES layer whose
    weights a constant filler gives, else None."""
    if node.type not in WEIGHT_TYPES or not node.param_shapes:
        return None
    specs = node.layer.fillers()
    return constant_filler(specs[0] if specs else None)

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
"""
import math

import numpy as np

from caffeish.errors import FillerError
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

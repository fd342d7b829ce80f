"""caffeish.runtime.fillers against Caffe's filler semantics (semantics.md section 4) and a golden case."""
import math

import numpy as np
import pytest

from caffeish.errors import CaffeishError
from caffeish.runtime.fillers import FillerError, bilinear_kernel, fan_in_out, fill
from caffeish.formats.schema import pb
from conftest import shared_path


def filler(**kw):
    return pb.FillerParameter(**kw)


def rng():
    return np.random.default_rng(1234)


# -- deterministic fillers --------------------------------------------------------------


def test_none_is_zeros():
    out = fill(None, (2, 3))
    assert out.dtype == np.float32 and out.shape == (2, 3) and not out.any()


def test_constant_default_is_zero_and_value_is_used():
    assert not fill(filler(), (4,)).any()
    out = fill(filler(type="constant", value=0.25), (2, 3, 1))
    assert out.dtype == np.float32 and out.shape == (2, 3, 1)
    assert np.all(out == np.float32(0.25))


def test_scalar_blob():
    out = fill(filler(type="constant", value=3), ())
    assert isinstance(out, np.ndarray) and out.shape == () and out == 3
    for kind in ("uniform", "gaussian", "xavier", "msra", "positive_unitball"):
        out = fill(filler(type=kind), (), rng())
        assert isinstance(out, np.ndarray) and out.shape == () and out.dtype == np.float32


def test_bilinear_k4_is_outer_product_of_quarter_steps():
    line = np.array([0.25, 0.75, 0.75, 0.25], np.float32)
    out = fill(filler(type="bilinear"), (3, 2, 4, 4))
    assert out.dtype == np.float32 and out.shape == (3, 2, 4, 4)
    # The same kernel goes into every (out, in) slot, not only the diagonal.
    for o in range(3):
        for i in range(2):
            np.testing.assert_array_equal(out[o, i], np.outer(line, line))


def test_bilinear_k3_and_odd_even_sizes():
    np.testing.assert_array_equal(bilinear_kernel(3)[1], np.array([0.5, 1, 0.5], np.float32))
    # Independent restatement of Caffe's formula: f = ceil(K/2), c = (K-1)/(2f).
    for k in (1, 2, 3, 4, 5, 6, 7, 8, 16):
        f = math.ceil(k / 2)
        c = (k - 1) / (2 * f)
        want = [[(1 - abs(x / f - c)) * (1 - abs(y / f - c)) for x in range(k)] for y in range(k)]
        np.testing.assert_allclose(bilinear_kernel(k), want, rtol=1e-6, atol=1e-7)
        # The kernel is symmetric for odd and even sizes alike.
        np.testing.assert_allclose(bilinear_kernel(k), bilinear_kernel(k)[::-1, ::-1], atol=1e-7)


def test_bilinear_matches_caffe_golden_weights():
    params = np.load(shared_path("golden", "deconv_bilinear_filler", "params.npz"))
    weight = params["up/0"]
    np.testing.assert_array_equal(fill(filler(type="bilinear"), weight.shape), weight)


def test_bilinear_needs_4d_square():
    with pytest.raises(FillerError, match="4-D"):
        fill(filler(type="bilinear"), (2, 4, 4))
    with pytest.raises(FillerError, match="square"):
        fill(filler(type="bilinear"), (1, 1, 3, 4))


# -- fans -------------------------------------------------------------------------------


def test_fans_are_integer_divisions_by_layout():
    assert fan_in_out((16, 3, 5, 5)) == (75, 400)  # conv: C*k*k, O*k*k
    assert fan_in_out((10, 60)) == (60, 10)  # InnerProduct (N, K)
    assert fan_in_out((3, 8, 4, 4)) == (128, 48)  # deconv (C_in, O, k, k): "fan_in" = O*k*k
    assert fan_in_out((7,)) == (1, 7)  # one axis: fan_out = count


# -- random fillers: distributions ------------------------------------------------------


def test_uniform_bounds_and_mean():
    out = fill(filler(type="uniform", min=-2, max=3), (200, 100), rng())
    assert out.dtype == np.float32
    assert out.min() >= -2 and out.max() <= 3
    assert abs(out.mean() - 0.5) < 0.05
    assert abs(out.std() - 5 / math.sqrt(12)) < 0.05


def test_gaussian_mean_std():
    out = fill(filler(type="gaussian", mean=1.5, std=0.5), (200, 100), rng())
    assert out.dtype == np.float32
    assert abs(out.mean() - 1.5) < 0.02 and abs(out.std() - 0.5) < 0.02


def test_gaussian_sparse_keeps_sparse_over_num_outputs():
    out = fill(filler(type="gaussian", sparse=5), (20, 10000), rng())
    kept = np.count_nonzero(out) / out.size
    assert abs(kept - 5 / 20) < 0.01
    assert np.all(fill(filler(type="gaussian", sparse=0), (4, 50), rng()) == 0)


def test_xavier_bounds_follow_variance_norm():
    shape = (16, 3, 5, 5)  # fan_in 75, fan_out 400
    for norm, n in ((pb.FillerParameter.FAN_IN, 75), (pb.FillerParameter.FAN_OUT, 400),
                    (pb.FillerParameter.AVERAGE, 237.5)):
        out = fill(filler(type="xavier", variance_norm=norm), shape, rng())
        bound = math.sqrt(3 / n)
        assert out.min() >= -bound and out.max() <= bound
        assert out.max() > 0.9 * bound and out.min() < -0.9 * bound
        assert abs(out.std() - bound / math.sqrt(3)) < 0.05 * bound


def test_msra_std_follows_variance_norm():
    shape = (64, 32, 3, 3)  # fan_in 288, fan_out 576
    for norm, n in ((pb.FillerParameter.FAN_IN, 288), (pb.FillerParameter.FAN_OUT, 576),
                    (pb.FillerParameter.AVERAGE, 432)):
        out = fill(filler(type="msra", variance_norm=norm), shape, rng())
        want = math.sqrt(2 / n)
        assert abs(out.std() - want) < 0.03 * want and abs(out.mean()) < 0.03 * want


def test_positive_unitball_items_sum_to_one():
    out = fill(filler(type="positive_unitball"), (6, 3, 2, 2), rng())
    assert out.min() >= 0
    np.testing.assert_allclose(out.reshape(6, -1).sum(axis=1), 1, rtol=1e-5)


def test_seeded_generator_is_reproducible():
    a = fill(filler(type="xavier"), (8, 8), np.random.default_rng(7))
    b = fill(filler(type="xavier"), (8, 8), np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)


# -- errors -----------------------------------------------------------------------------


def test_unknown_type_names_it():
    with pytest.raises(FillerError, match="unknown filler type 'glorot'") as err:
        fill(filler(type="glorot"), (2, 2))
    assert isinstance(err.value, CaffeishError)


@pytest.mark.parametrize("kind", ["constant", "uniform", "xavier", "msra", "positive_unitball", "bilinear"])
def test_sparse_only_for_gaussian(kind):
    with pytest.raises(FillerError, match="sparse"):
        fill(filler(type=kind, sparse=2), (2, 2, 2, 2), rng())


def test_bad_values_rejected_as_caffe_does():
    with pytest.raises(FillerError, match="min"):
        fill(filler(type="uniform", min=2, max=1), (3,), rng())
    with pytest.raises(FillerError, match="std"):
        fill(filler(type="gaussian", std=0), (3,), rng())
    with pytest.raises(FillerError, match="sparse"):
        fill(filler(type="gaussian", sparse=-2), (3,), rng())
    with pytest.raises(FillerError, match="exceeds"):
        fill(filler(type="gaussian", sparse=5), (3, 4), rng())
    with pytest.raises(FillerError, match="empty"):
        fill(filler(type="constant"), (0, 3))

"""Caffe's solvers (caffeish.runtime.solver, pycaffe's caffe.*Solver) against ../shared/caffe/training.md
sections 11 and 12, on tiny nets written here; every expected number is computed independently in
numpy float64 from the spec's formulas.  (The comparison with real Caffe runs is test_golden_solver.py.)
"""
import math
import os
import re

import numpy as np
import pytest

import caffeish
from caffeish.errors import CaffeishError
from caffeish.formats.datum import LmdbWriter, make_datum
from caffeish.formats.io import parse_text
from caffeish.formats.schema import TRAIN, pb
from caffeish.runtime.solver import (LR_POLICIES, SOLVER_TYPES, Solver, SolverError, check_lr_policy, check_solver,
                                     learning_rate, read_solver, read_state)

f64 = np.float64


# -- helpers ------------------------------------------------------------------------------------------
class Log(list):
    """The solver's log lines (messages only), in order."""

    def __call__(self, message, where):
        assert re.fullmatch(r"[\w.]+:\d+", where), where
        self.append(message)

    def __bool__(self):  # a callable, even while empty
        return True

    def index_of(self, pattern, start=0):
        for i in range(start, len(self)):
            if re.search(pattern, self[i]):
                return i
        raise AssertionError(f"no line matching {pattern!r} in {list(self)}")

    def matching(self, pattern):
        return [m for m in map(re.compile(pattern).search, self) if m]


def ip_net(ip_params="", name="tiny", extra=""):
    """DummyData (gaussian data, label 1) + InnerProduct(3 -> 2) + SoftmaxWithLoss."""
    return f"""name: "{name}"
layer {{ name: "data" type: "DummyData" top: "data" top: "label"
  dummy_data_param {{ shape {{ dim: 4 dim: 3 }} shape {{ dim: 4 }}
    data_filler {{ type: "gaussian" std: 1 }} data_filler {{ type: "constant" value: 1 }} }} }}
layer {{ name: "ip" type: "InnerProduct" bottom: "data" top: "ip" {ip_params}
  inner_product_param {{ num_output: 2 weight_filler {{ type: "gaussian" std: 0.5 }}
                         bias_filler {{ type: "gaussian" std: 0.5 }} }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }}
{extra}"""


def make_solver(tmp_path, solver_text, net_text=None, **kw):
    """(Solver, Log) of `solver_text` over `net_text` (written to tmp_path/net.prototxt)."""
    net = tmp_path / "net.prototxt"
    net.write_text(ip_net() if net_text is None else net_text)
    param = parse_text(f'net: "{net}"\n' + solver_text, pb.SolverParameter())
    log = Log()
    return Solver(param, log=log, **kw), log


def param_text(solver_text, net="net.prototxt"):
    return parse_text(f'net: "{net}"\n' + solver_text, pb.SolverParameter())


def params_of(solver):
    """[(layer, index)] of the train net's learnable parameters, in Caffe's order."""
    return [(e.layer, e.index) for e in solver.learnable]


def data_of(solver, net=None):
    net = net or solver.net
    return [np.array(net.params[l][i].data, dtype=np.float32) for l, i in params_of(solver)]


def set_diffs(solver, grads):
    for (l, i), g in zip(params_of(solver), grads):
        solver.net.params[l][i].diff[...] = g


def write_db(path, values):
    with LmdbWriter(path) as w:
        for i, v in enumerate(values):
            w.put(b"%08d" % i, v)
    return str(path)


def float_db(path, xs, labels):
    """An LMDB of float Datums (3 x 1 x 1) with labels."""
    return write_db(path, [make_datum(np.asarray(x, np.float32).reshape(3, 1, 1), label=int(y))
                           for x, y in zip(xs, labels)])


def softmax_loss(x, y, w, b):
    """SoftmaxWithLoss (VALID normalisation) of an InnerProduct in float64."""
    z = np.asarray(x, f64) @ np.asarray(w, f64).T + np.asarray(b, f64)
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(y)), np.asarray(y, int)].mean())


def accuracy(x, y, w, b):
    z = np.asarray(x, f64) @ np.asarray(w, f64).T + np.asarray(b, f64)
    return float((z.argmax(axis=1) == np.asarray(y)).mean())


# -- 11.5 lr policies -----------------------------------------------------------------------------
def expected_rate(policy, it, base, gamma=0.0, power=0.0, stepsize=0, max_iter=0):
    if policy == "fixed":
        return base
    if policy == "step":
        return base * gamma ** (it // stepsize)
    if policy == "exp":
        return base * gamma ** it
    if policy == "inv":
        return base * (1 + gamma * it) ** (-power)
    if policy == "poly":
        return base * (1 - it / max_iter) ** power
    if policy == "sigmoid":
        return base / (1 + math.exp(-gamma * (it - stepsize)))
    raise AssertionError(policy)


POLICY_CASES = [
    ("fixed", dict(base=0.01)),
    ("step", dict(base=0.1, gamma=0.5, stepsize=4)),
    ("step", dict(base=0.02, gamma=0.1, stepsize=1)),
    ("exp", dict(base=0.1, gamma=0.95)),
    ("inv", dict(base=0.01, gamma=1e-4 * 100, power=0.75)),
    ("inv", dict(base=0.5, gamma=0.3, power=2.5)),
    ("poly", dict(base=0.1, power=2.0, max_iter=30)),
    ("poly", dict(base=0.1, power=0.5, max_iter=40)),
    ("sigmoid", dict(base=0.02, gamma=0.5, stepsize=6)),
    ("sigmoid", dict(base=1.0, gamma=0.05, stepsize=20)),
]


@pytest.mark.parametrize("policy,kw", POLICY_CASES, ids=[f"{p}-{i}" for i, (p, _) in enumerate(POLICY_CASES)])
def test_lr_policy_formulas_over_a_range_of_iterations(policy, kw):
    param = pb.SolverParameter(lr_policy=policy, base_lr=kw["base"], gamma=kw.get("gamma", 0),
                               power=kw.get("power", 0), stepsize=kw.get("stepsize", 0),
                               max_iter=kw.get("max_iter", 0))
    check_lr_policy(param)
    step = 0
    for it in range(30):
        rate, step = learning_rate(param, it, step)
        assert isinstance(rate, np.float32)
        want = expected_rate(policy, it, kw["base"], kw.get("gamma", 0), kw.get("power", 0),
                             kw.get("stepsize", 0), kw.get("max_iter", 0))
        assert float(rate) == pytest.approx(want, rel=2e-6, abs=1e-12), (policy, it)
        if policy == "step":
            assert step == it // kw["stepsize"]  # current_step is the step number


def test_sigmoid_checked_value_at_iteration_zero():
    param = pb.SolverParameter(lr_policy="sigmoid", base_lr=0.02, gamma=0.5, stepsize=6)
    rate, _ = learning_rate(param, 0, 0)
    assert f"{float(rate):g}" == "0.000948517"
    assert float(learning_rate(param, 6, 0)[0]) == pytest.approx(0.01, rel=1e-6)  # half at stepsize
    rates = [float(learning_rate(param, it, 0)[0]) for it in range(60)]
    assert all(a <= b for a, b in zip(rates, rates[1:]))  # it only rises, towards base_lr
    assert rates[0] < rates[5] < rates[10] < rates[15]
    assert max(rates) <= 0.02


def test_multistep_moves_at_most_one_step_per_update_and_logs_it():
    param = pb.SolverParameter(lr_policy="multistep", base_lr=1.0, gamma=0.5, stepvalue=[3, 4, 5, 20])
    log = Log()
    step, rates = 0, {}
    # a solver resumed at it 10 with current_step 0: each update may move one step only
    for it in list(range(0, 3)) + list(range(10, 16)):
        rate, step = learning_rate(param, it, step, log)
        rates[it] = (float(rate), step)
    assert rates[0] == (1.0, 0) and rates[2] == (1.0, 0)
    assert rates[10] == (0.5, 1)
    assert rates[11] == (0.25, 2)
    assert rates[12] == (0.125, 3)
    assert rates[13] == (0.125, 3) and rates[15] == (0.125, 3)  # 20 is not reached
    assert list(log) == ["MultiStep Status: Iteration 10, step = 1", "MultiStep Status: Iteration 11, step = 2",
                         "MultiStep Status: Iteration 12, step = 3"]


def test_multistep_through_the_solver_logs_the_status_and_saves_current_step(tmp_path):
    s, log = make_solver(tmp_path, 'lr_policy: "multistep" base_lr: 0.1 gamma: 0.1 stepvalue: 2 stepvalue: 4 '
                                   'max_iter: 6 display: 1')
    s.step(6)
    assert s.current_step == 2
    lrs = [(int(m.group(1)), float(m.group(2))) for m in log.matching(r"^Iteration (\d+), lr = (\S+)$")]
    want = [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]
    assert [i for i, _ in lrs] == list(range(6))
    np.testing.assert_allclose([r for _, r in lrs], want, rtol=1e-6)
    status = [m.group(0) for m in log.matching(r"^MultiStep Status: Iteration \d+, step = \d+$")]
    assert status == ["MultiStep Status: Iteration 2, step = 1", "MultiStep Status: Iteration 4, step = 2"]


def test_logged_rates_are_update_numbers_rates(tmp_path):
    s, log = make_solver(tmp_path, 'lr_policy: "step" base_lr: 0.3 gamma: 0.5 stepsize: 2 max_iter: 5 display: 1')
    s.step(5)
    lrs = [(int(m.group(1)), float(m.group(2))) for m in log.matching(r"^Iteration (\d+), lr = (\S+)$")]
    assert lrs == [(it, pytest.approx(0.3 * 0.5 ** (it // 2), rel=1e-6)) for it in range(5)]


# -- 11.6 update rules --------------------------------------------------------------------------------
def reference_updates(kind, data, grads_seq, lr_mults, decay_mults=None, *, base_lr, lr_gamma=1.0, it0=0,
                      momentum=0.0, delta=1e-8, rms_decay=0.99, momentum2=0.999, weight_decay=0.0, reg="L2",
                      clip=-1.0, iter_size=1):
    """training.md 11.4 + 11.6 in float64: (data, history in Caffe's layout, last Δ per param)."""
    data = [np.array(d, f64) for d in data]
    n = len(data)
    sets = 2 if kind in ("Adam", "AdaDelta") else 1
    hist = [np.zeros_like(d) for _ in range(sets) for d in data]
    decay_mults = decay_mults or [1.0] * n
    steps = None
    for k, grads in enumerate(grads_seq):
        it = it0 + k
        rate = base_lr * lr_gamma ** it  # lr_policy "exp"
        grads = [np.array(g, f64) for g in grads]
        if clip >= 0:
            norm = math.sqrt(sum(float((g * g).sum()) for g in grads))
            if norm > clip:
                grads = [g * (clip / norm) for g in grads]
        steps = []
        for i in range(n):
            g = grads[i] / iter_size
            d = weight_decay * decay_mults[i]
            if d:
                g = g + d * (data[i] if reg == "L2" else np.sign(data[i]))
            alpha = rate * lr_mults[i]
            mu = momentum
            if kind == "SGD":
                hist[i] = mu * hist[i] + alpha * g
                step = hist[i]
            elif kind == "Nesterov":
                v_new = mu * hist[i] + alpha * g
                step = (1 + mu) * v_new - mu * hist[i]
                hist[i] = v_new
            elif kind == "AdaGrad":
                hist[i] = hist[i] + g * g
                step = alpha * g / (np.sqrt(hist[i]) + delta)
            elif kind == "RMSProp":
                hist[i] = rms_decay * hist[i] + (1 - rms_decay) * g * g
                step = alpha * g / (np.sqrt(hist[i]) + delta)
            elif kind == "AdaDelta":
                h1, h2 = hist[i], hist[n + i]
                h1 = mu * h1 + (1 - mu) * g * g
                u = g * np.sqrt((h2 + delta) / (h1 + delta))
                h2 = mu * h2 + (1 - mu) * u * u
                hist[i], hist[n + i] = h1, h2
                step = alpha * u
            elif kind == "Adam":
                b1, b2 = mu, momentum2
                m = b1 * hist[i] + (1 - b1) * g
                v = b2 * hist[n + i] + (1 - b2) * g * g
                hist[i], hist[n + i] = m, v
                t = it + 1
                step = alpha * math.sqrt(1 - b2 ** t) / (1 - b1 ** t) * m / (np.sqrt(v) + delta)
            else:
                raise AssertionError(kind)
            data[i] = data[i] - step
            steps.append(step)
    return data, hist, steps


def gradients(shapes, steps, seed=0):
    rng = np.random.default_rng(seed)
    return [[rng.normal(0, 1, s).astype(np.float32) for s in shapes] for _ in range(steps)]


RULES = [
    ("SGD", 'base_lr: 0.1 momentum: 0.9', dict(base_lr=0.1, momentum=0.9)),
    ("Nesterov", 'base_lr: 0.1 momentum: 0.9', dict(base_lr=0.1, momentum=0.9)),
    ("AdaGrad", 'base_lr: 0.1 delta: 0.3', dict(base_lr=0.1, delta=0.3)),
    ("AdaGrad", 'base_lr: 0.1', dict(base_lr=0.1)),
    ("RMSProp", 'base_lr: 0.1 rms_decay: 0.9 delta: 0.3', dict(base_lr=0.1, rms_decay=0.9, delta=0.3)),
    ("RMSProp", 'base_lr: 0.05', dict(base_lr=0.05)),  # rms_decay 0.99 by default
    ("AdaDelta", 'base_lr: 0.5 momentum: 0.95 delta: 0.01', dict(base_lr=0.5, momentum=0.95, delta=0.01)),
    ("AdaDelta", 'base_lr: 1 momentum: 0.9 delta: 1e-6', dict(base_lr=1.0, momentum=0.9, delta=1e-6)),
    ("Adam", 'base_lr: 0.01', dict(base_lr=0.01)),  # β1 = momentum = 0 when unset; β2 0.999; δ 1e-8
    ("Adam", 'base_lr: 0.01 momentum: 0.9 momentum2: 0.99 delta: 0.1',
     dict(base_lr=0.01, momentum=0.9, momentum2=0.99, delta=0.1)),
]


@pytest.mark.parametrize("kind,text,kw", RULES, ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(RULES)])
def test_update_rule_three_steps_against_a_float64_transcription(tmp_path, kind, text, kw):
    s, _ = make_solver(tmp_path, f'type: "{kind}" lr_policy: "exp" gamma: 0.8 {text}',
                       ip_net('param { lr_mult: 1 } param { lr_mult: 2 }'))
    n = len(s.learnable)
    assert n == 2
    sets = 2 if kind in ("Adam", "AdaDelta") else 1
    assert len(s.history) == sets * n  # 2N for Adam and AdaDelta
    start = data_of(s)
    grads = gradients([d.shape for d in start], 3, seed=len(kind))
    for k, g in enumerate(grads):
        set_diffs(s, g)
        assert s.iter == k
        s.apply_update()
        assert s.iter == k + 1
    want, hist, steps = reference_updates(kind, start, grads, [1.0, 2.0], lr_gamma=0.8, **kw)
    for got, w in zip(data_of(s), want):
        np.testing.assert_allclose(got, w, rtol=2e-5, atol=2e-6)
    for i, (got, w) in enumerate(zip(s.history, hist)):
        assert got.shape == w.shape
        np.testing.assert_allclose(np.asarray(got, f64), w, rtol=2e-5, atol=1e-7, err_msg=f"history {i}")
    for (l, j), st in zip(params_of(s), steps):  # the diff holds the last Δ
        np.testing.assert_allclose(s.net.params[l][j].diff, st, rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("reg", ["L2", "L1"])
def test_weight_decay_with_decay_mult_biases_decay_too(tmp_path, reg):
    s, _ = make_solver(tmp_path, f'lr_policy: "fixed" base_lr: 0.5 weight_decay: 0.1 regularization_type: "{reg}"',
                       ip_net('param { decay_mult: 3 }'))  # the bias keeps decay_mult 1
    s.net.params["ip"][0].data[0, 0] = 0.0  # sign(0) = 0 for L1
    start = data_of(s)
    grads = gradients([d.shape for d in start], 2, seed=3)
    for g in grads:
        set_diffs(s, g)
        s.apply_update()
    want, _, _ = reference_updates("SGD", start, grads, [1.0, 1.0], [3.0, 1.0], base_lr=0.5, weight_decay=0.1,
                                   reg=reg)
    for got, w in zip(data_of(s), want):
        np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-6)
    # the bias moved by more than its gradient alone
    no_decay, _, _ = reference_updates("SGD", start, grads, [1.0, 1.0], base_lr=0.5)
    assert not np.allclose(data_of(s)[1], no_decay[1], rtol=1e-4, atol=1e-5)


def test_unknown_regularization_type_is_refused_naming_the_field():
    param = param_text('lr_policy: "fixed" weight_decay: 0.1 regularization_type: "L3"')
    with pytest.raises(SolverError, match="regularization_type"):
        check_solver(param)
    check_solver(param_text('lr_policy: "fixed" regularization_type: "L3"'))  # only fatal when decay ≠ 0


@pytest.mark.parametrize("kind", ["Adam", "AdaGrad"])
def test_lr_mult_zero_never_moves_the_param_yet_its_history_changes(tmp_path, kind):
    s, _ = make_solver(tmp_path, f'type: "{kind}" lr_policy: "fixed" base_lr: 0.1 momentum: 0.0',
                       ip_net('param { lr_mult: 0 } param { lr_mult: 1 }'))
    start = data_of(s)
    grads = gradients([d.shape for d in start], 3, seed=5)
    for g in grads:
        set_diffs(s, g)
        s.apply_update()
    got = data_of(s)
    assert np.array_equal(got[0], start[0])  # exactly: α = 0
    assert not np.allclose(got[1], start[1])
    want, hist, _ = reference_updates(kind, start, grads, [0.0, 1.0], base_lr=0.1)
    np.testing.assert_allclose(got[1], want[1], rtol=2e-5, atol=2e-6)
    assert np.abs(np.asarray(s.history[0])).max() > 0.1  # m (Adam) / h (AdaGrad) of the frozen weight
    for got_h, w in zip(s.history, hist):
        np.testing.assert_allclose(np.asarray(got_h, f64), w, rtol=2e-5, atol=1e-7)


def test_clip_gradients_uses_the_norm_of_all_params_before_decay_and_logs_it(tmp_path):
    s, log = make_solver(tmp_path, 'lr_policy: "fixed" base_lr: 1 weight_decay: 0.5 clip_gradients: 0.7 display: 1',
                         ip_net('param { lr_mult: 0 } param { lr_mult: 1 }'))
    start = data_of(s)
    grads = gradients([d.shape for d in start], 1, seed=7)
    norm = math.sqrt(sum(float((np.asarray(g, f64) ** 2).sum()) for g in grads[0]))  # lr_mult 0 included
    assert norm > 0.7
    set_diffs(s, grads[0])
    s.apply_update()
    want, _, _ = reference_updates("SGD", start, grads, [0.0, 1.0], base_lr=1.0, weight_decay=0.5, clip=0.7)
    np.testing.assert_allclose(data_of(s)[1], want[1], rtol=1e-5, atol=1e-6)
    assert np.array_equal(data_of(s)[0], start[0])
    (m,) = log.matching(r"^Gradient clipping: scaling down gradients \(L2 norm (\S+) > (\S+)\) by scale factor (\S+)$")
    assert float(m.group(1)) == pytest.approx(norm, rel=1e-5)
    assert m.group(2) == "0.7"
    assert float(m.group(3)) == pytest.approx(0.7 / norm, rel=1e-5)


def test_clip_gradients_below_the_norm_changes_nothing_and_logs_nothing(tmp_path):
    s, log = make_solver(tmp_path, 'lr_policy: "fixed" base_lr: 1 clip_gradients: 1000 display: 1')
    start = data_of(s)
    grads = gradients([d.shape for d in start], 1, seed=8)
    set_diffs(s, grads[0])
    s.apply_update()
    want, _, _ = reference_updates("SGD", start, grads, [1.0, 1.0], base_lr=1.0)
    for got, w in zip(data_of(s), want):
        np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-6)
    assert not log.matching("Gradient clipping")


def test_clip_gradients_zero_zeroes_every_gradient(tmp_path):
    s, log = make_solver(tmp_path, 'lr_policy: "fixed" base_lr: 1 momentum: 0.9 clip_gradients: 0 display: 1')
    start = data_of(s)
    set_diffs(s, gradients([d.shape for d in start], 1, seed=9)[0])
    s.apply_update()
    for got, w in zip(data_of(s), start):
        assert np.array_equal(got, w)
    assert log.matching(r"^Gradient clipping: .*> 0\) by scale factor 0$")


def test_iter_size_divides_the_diff_after_clipping_the_summed_gradient(tmp_path):
    s, _ = make_solver(tmp_path, 'lr_policy: "fixed" base_lr: 0.5 iter_size: 4 clip_gradients: 2')
    start = data_of(s)
    grads = [[g * 3 for g in gs] for gs in gradients([d.shape for d in start], 2, seed=10)]
    for g in grads:
        set_diffs(s, g)
        s.apply_update()
    want, _, _ = reference_updates("SGD", start, grads, [1.0, 1.0], base_lr=0.5, clip=2.0, iter_size=4)
    for got, w in zip(data_of(s), want):
        np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-6)


# -- the loop on a data net: display, smoothing, tests ---------------------------------------------
XS = np.array([[0.5, -1.0, 2.0], [1.5, 0.3, -0.7], [-2.0, 0.1, 0.4], [0.9, 0.9, -1.2], [0.0, -0.6, 1.1],
               [1.2, -2.2, 0.3]], np.float32)
YS = np.array([1, 0, 1, 0, 1, 0])
TEST_XS = np.array([[1.0, 1.0, 1.0], [-1.0, 0.5, 0.2], [0.3, -0.3, 2.0], [2.0, -1.0, -1.0], [-0.4, 0.8, -0.9]],
                   np.float32)
TEST_YS = np.array([0, 1, 1, 0, 0])


def data_net(train_db, batch, test_db=None, test_batch=1):
    test = ""
    if test_db:
        test = f"""layer {{ name: "data" type: "Data" top: "data" top: "label" include {{ phase: TEST }}
  data_param {{ source: "{test_db}" batch_size: {test_batch} backend: LMDB }} }}"""
    return f"""name: "datanet"
layer {{ name: "data" type: "Data" top: "data" top: "label" include {{ phase: TRAIN }}
  data_param {{ source: "{train_db}" batch_size: {batch} backend: LMDB }} }}
{test}
layer {{ name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  inner_product_param {{ num_output: 2 weight_filler {{ type: "gaussian" std: 1 }}
                         bias_filler {{ type: "gaussian" std: 1 }} }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }}
layer {{ name: "accuracy" type: "Accuracy" bottom: "ip" bottom: "label" top: "accuracy" include {{ phase: TEST }} }}
"""


class Trains:
    def __init__(self):
        self.train, self.tests = [], []

    def on_train(self, it, loss, outputs):
        self.train.append((it, loss, dict(outputs)))

    def on_test(self, it, index, outputs):
        self.tests.append((it, index, dict(outputs)))


def test_iter_size_display_loss_is_the_mean_of_the_passes_and_the_output_the_last_pass(tmp_path):
    db = float_db(tmp_path / "train_db", XS, YS)
    s, log = make_solver(tmp_path, 'lr_policy: "fixed" base_lr: 0 iter_size: 3 display: 1',
                         data_net(db, batch=2))
    rec = Trains()
    s.listeners.append(rec)
    w, b = (np.array(a, f64) for a in data_of(s))
    s.step(2)
    passes = [softmax_loss(XS[k:k + 2], YS[k:k + 2], w, b) for k in (0, 2, 4)]  # cursor wraps at 6
    (it0, loss0, out0), (it1, loss1, out1) = rec.train
    assert (it0, it1) == (0, 1)
    assert loss0 == pytest.approx(np.mean(passes), rel=1e-5)
    assert loss1 == pytest.approx((np.mean(passes) + np.mean(passes)) / 2, rel=1e-5)  # same batches again
    assert out0["loss"] == pytest.approx(passes[-1], rel=1e-5)
    m = log.matching(r"^Iteration 0 \(.*\), loss = (\S+)$")[0]
    assert float(m.group(1)) == pytest.approx(np.mean(passes), rel=2e-5)
    m = log.matching(r"^    Train net output #0: loss = (\S+) \(\* 1 = (\S+) loss\)$")[0]
    assert float(m.group(1)) == pytest.approx(passes[-1], rel=2e-5)


def test_average_loss_smooths_over_a_ring_that_restarts_with_each_step_call(tmp_path):
    db = float_db(tmp_path / "train_db", XS[:5], YS[:5])
    s, log = make_solver(tmp_path, 'lr_policy: "fixed" base_lr: 0 average_loss: 3 display: 1',
                         data_net(db, batch=1))
    rec = Trains()
    s.listeners.append(rec)
    w, b = (np.array(a, f64) for a in data_of(s))
    losses = [softmax_loss(XS[k % 5:k % 5 + 1], YS[k % 5:k % 5 + 1], w, b) for k in range(12)]
    s.step(7)
    s.step(4)
    want = []
    for start, n in ((0, 7), (7, 4)):
        for it in range(start, start + n):
            window = losses[max(start, it - 2):it + 1]
            want.append((it, np.mean(window)))
    assert [it for it, _, _ in rec.train] == [it for it, _ in want]
    np.testing.assert_allclose([l for _, l, _ in rec.train], [l for _, l in want], rtol=1e-5)
    shown = [(int(m.group(1)), float(m.group(2))) for m in log.matching(r"^Iteration (\d+) \(.*\), loss = (\S+)$")]
    assert [i for i, _ in shown] == list(range(11))
    np.testing.assert_allclose([l for _, l in shown], [l for _, l in want], rtol=2e-5)
    # the train output is the current iteration's loss, not the smoothed one
    np.testing.assert_allclose([o["loss"] for _, _, o in rec.train], losses[:11], rtol=1e-5)


def test_average_loss_of_zero_is_refused():
    with pytest.raises(SolverError, match="average_loss"):
        check_solver(param_text('average_loss: 0 lr_policy: "fixed"'))


def test_test_outputs_are_means_over_test_iter_with_cursors_continuing(tmp_path):
    db = float_db(tmp_path / "train_db", XS, YS)
    tdb = float_db(tmp_path / "test_db", TEST_XS, TEST_YS)
    s, log = make_solver(tmp_path, 'lr_policy: "fixed" base_lr: 0 max_iter: 4 test_iter: 2 test_interval: 2 '
                                   'test_compute_loss: true display: 0 snapshot_after_train: false',
                         data_net(db, batch=2, test_db=tdb, test_batch=1))
    rec = Trains()
    s.listeners.append(rec)
    w, b = (np.array(a, f64) for a in data_of(s))
    s.solve()
    # passes at it 0, 2 and 4 (the final test); test records 0,1 then 2,3 then 4,0
    assert [(it, i) for it, i, _ in rec.tests] == [(0, 0), (2, 0), (4, 0)]
    for p, (it, _, outs) in enumerate(rec.tests):
        idx = [(2 * p + k) % 5 for k in range(2)]
        loss = np.mean([softmax_loss(TEST_XS[i:i + 1], TEST_YS[i:i + 1], w, b) for i in idx])
        acc = np.mean([accuracy(TEST_XS[i:i + 1], TEST_YS[i:i + 1], w, b) for i in idx])
        assert outs["loss"] == pytest.approx(loss, rel=1e-5)
        assert outs["accuracy"] == pytest.approx(acc, abs=1e-6)
        # the lines: Testing, Test loss, outputs sorted by name (accuracy before loss)
        t = log.index_of(rf"^Iteration {it}, Testing net \(#0\)$")
        m = re.fullmatch(r"Test loss: (\S+)", log[t + 1])
        assert m and float(m.group(1)) == pytest.approx(loss, rel=2e-5)
        m = re.fullmatch(r"    Test net output #0: accuracy = (\S+)", log[t + 2])
        assert m and float(m.group(1)) == pytest.approx(acc, abs=1e-5)
        m = re.fullmatch(r"    Test net output #1: loss = (\S+) \(\* 1 = (\S+) loss\)", log[t + 3])
        assert m and float(m.group(1)) == pytest.approx(loss, rel=2e-5)
        assert float(m.group(2)) == pytest.approx(loss, rel=2e-5)


def test_a_test_pass_sees_the_weights_after_it_updates(tmp_path):
    db = float_db(tmp_path / "train_db", XS, YS)
    tdb = float_db(tmp_path / "test_db", TEST_XS, TEST_YS)
    s, log = make_solver(tmp_path, 'lr_policy: "fixed" base_lr: 0.5 momentum: 0.5 max_iter: 3 test_iter: 5 '
                                   'test_interval: 1 snapshot_after_train: false',
                         data_net(db, batch=2, test_db=tdb, test_batch=1))
    seen = []

    class Weights:
        def on_test(self, it, index, outputs):
            seen.append((it, data_of(s), dict(outputs)))

    s.listeners.append(Weights())
    s.solve()
    assert [it for it, _, _ in seen] == [0, 1, 2, 3]
    assert not np.array_equal(seen[0][1][0], seen[3][1][0])
    for it, (w, b), outputs in seen:  # test_iter 5 over 5 records: the whole test set each pass
        assert outputs["loss"] == pytest.approx(softmax_loss(TEST_XS, TEST_YS, w, b), rel=1e-5)
        assert outputs["accuracy"] == pytest.approx(accuracy(TEST_XS, TEST_YS, w, b), abs=1e-6)


def test_no_test_loss_line_without_test_compute_loss_and_no_first_test_without_initialization(tmp_path):
    db = float_db(tmp_path / "train_db", XS, YS)
    tdb = float_db(tmp_path / "test_db", TEST_XS, TEST_YS)
    s, log = make_solver(tmp_path, 'lr_policy: "fixed" base_lr: 0.1 max_iter: 4 test_iter: 1 test_interval: 2 '
                                   'test_initialization: false snapshot_after_train: false',
                         data_net(db, batch=2, test_db=tdb))
    s.solve()
    assert [int(m.group(1)) for m in log.matching(r"^Iteration (\d+), Testing net \(#0\)$")] == [2, 4]
    assert not log.matching("Test loss")


def test_display_lines_in_caffes_order_within_an_iteration(tmp_path):
    db = float_db(tmp_path / "train_db", XS, YS)
    tdb = float_db(tmp_path / "test_db", TEST_XS, TEST_YS)
    prefix = tmp_path / "snaps" / "s"
    prefix.parent.mkdir()
    s, log = make_solver(tmp_path, f'lr_policy: "multistep" base_lr: 0.1 gamma: 0.1 stepvalue: 1 max_iter: 3 '
                                   f'test_iter: 1 test_interval: 1 display: 1 clip_gradients: 1e-6 '
                                   f'snapshot: 2 snapshot_prefix: "{prefix}"',
                         data_net(db, batch=2, test_db=tdb))
    s.step(2)
    # training.md 11.2's list puts "MultiStep Status" after the lr and clipping lines, but real Caffe logs
    # it from GetLearningRate, before "Iteration N, lr" (../shared/golden_train/solver/adam_multistep_cls/
    # caffe.log: "MultiStep Status: Iteration 4, step = 1" then "Iteration 4, lr = 0.0006"): Caffe's order.
    order = [r"^Iteration 1, Testing net \(#0\)$", r"^    Test net output #0: accuracy",
             r"^    Test net output #1: loss", r"^Iteration 1 \(.* iter/s, .*s/1 iters\), loss = \S+$",
             r"^    Train net output #0: loss = \S+ \(\* 1 = \S+ loss\)$", r"^MultiStep Status: Iteration 1, step = 1$",
             r"^Iteration 1, lr = 0.01$", r"^Gradient clipping: scaling down gradients",
             rf"^Snapshotting to binary proto file {re.escape(str(prefix))}_iter_2\.caffemodel$",
             rf"^Snapshotting solver state to binary proto file {re.escape(str(prefix))}_iter_2\.solverstate$"]
    pos = log.index_of(r"^Iteration 0, lr") + 1
    for pattern in order:
        pos = log.index_of(pattern, pos) + 1
    assert log.index_of(r"^Iteration 1, Testing") > log.index_of(r"^Iteration 0, lr = 0.1$")
    assert len(log.matching("Train net output")) == 2  # the train net has one output: loss


def test_train_outputs_are_sorted_by_name(tmp_path):
    net = ip_net(extra='layer { name: "aaa" type: "Power" bottom: "ip" top: "zz" }\n'
                       'layer { name: "bbb" type: "Power" bottom: "data" top: "mm" power_param { scale: 2 } }')
    s, log = make_solver(tmp_path, 'lr_policy: "fixed" base_lr: 0.1 display: 1', net)
    s.step(1)
    names = [m.group(2) for m in log.matching(r"^    Train net output #(\d+): (\S+) = ")]
    ks = [int(m.group(1)) for m in log.matching(r"^    Train net output #(\d+): ")]
    # loss (1 element), mm (4 x 3), zz (4 x 2), each element a line, k across blobs
    assert names == ["loss"] + ["mm"] * 12 + ["zz"] * 8
    assert ks == list(range(21))


# -- Solve / step / iter -----------------------------------------------------------------------------
def test_solve_runs_to_max_iter_and_step_continues_from_iter(tmp_path):
    s, log = make_solver(tmp_path, 'lr_policy: "fixed" base_lr: 0.1 max_iter: 7 display: 0 '
                                   'snapshot_after_train: false')
    assert s.iter == 0
    s.step(2)
    assert s.iter == 2
    s.step(3)
    assert s.iter == 5
    s.solve()
    assert s.iter == 7
    assert log.index_of(r"^Solving tiny$") < log.index_of(r"^Learning Rate Policy: fixed$") < \
        log.index_of(r"^Optimization Done\.$")


def test_unknown_lr_policy_is_fatal_at_the_first_update_not_before(tmp_path):
    s, _ = make_solver(tmp_path, 'base_lr: 0.1')  # lr_policy unset
    with pytest.raises(SolverError, match="lr_policy"):
        s.apply_update()
    assert s.iter == 0


# -- 12 snapshots and restore -------------------------------------------------------------------------
def test_snapshot_names_count_updates_unpadded_and_the_final_one(tmp_path):
    prefix = tmp_path / "snaps" / "model"
    prefix.parent.mkdir()
    s, _ = make_solver(tmp_path, f'lr_policy: "fixed" base_lr: 0.1 max_iter: 5 snapshot: 2 '
                                 f'snapshot_prefix: "{prefix}"')
    s.solve()
    assert sorted(os.listdir(prefix.parent)) == sorted(
        f"model_iter_{i}.{e}" for i in (2, 4, 5) for e in ("caffemodel", "solverstate"))
    assert s.snapshot_names() == (f"{prefix}_iter_5.caffemodel", f"{prefix}_iter_5.solverstate")


def test_no_extra_final_snapshot_when_max_iter_is_a_multiple_or_after_train_is_off(tmp_path):
    for text, want in (("max_iter: 4", (2, 4)), ("max_iter: 5 snapshot_after_train: false", (2, 4))):
        folder = tmp_path / text.replace(" ", "_").replace(":", "")
        folder.mkdir()
        s, _ = make_solver(folder, f'lr_policy: "fixed" base_lr: 0.1 snapshot: 2 {text} '
                                   f'snapshot_prefix: "{folder}/m"')
        s.solve()
        assert sorted(f for f in os.listdir(folder) if f.endswith(".caffemodel")) == \
            sorted(f"m_iter_{i}.caffemodel" for i in want)


def read_model(path):
    m = pb.NetParameter()
    with open(path, "rb") as f:
        m.ParseFromString(f.read())
    return m


SPLIT_NET = ip_net(extra='layer { name: "acc" type: "Accuracy" bottom: "ip" bottom: "label" top: "acc" }')


def test_caffemodel_holds_every_layer_splits_included_with_the_weights(tmp_path):
    s, _ = make_solver(tmp_path, f'lr_policy: "fixed" base_lr: 0.1 snapshot_prefix: "{tmp_path}/m"', SPLIT_NET)
    s.step(2)
    model, state = s.snapshot()
    assert model == f"{tmp_path}/m_iter_2.caffemodel"
    m = read_model(model)
    assert m.name == "tiny"
    names = [l.name for l in m.layer]
    assert names == list(s.net._layer_names)
    assert {"data", "ip", "loss", "acc"} <= set(names)
    assert any(n.endswith("_split") for n in names)  # ip and label feed two layers each
    by = {l.name: l for l in m.layer}
    assert by["ip"].HasField("phase") and by["ip"].phase == TRAIN
    for j, blob in enumerate(by["ip"].blobs):
        want = np.asarray(s.net.params["ip"][j].data)
        assert list(blob.shape.dim) == list(want.shape)
        assert np.array_equal(np.array(blob.data, np.float32).reshape(want.shape), want)
        assert len(blob.diff) == 0  # snapshot_diff is off


BN_NET = ip_net(name="bn").replace('bottom: "data" top: "ip"', 'bottom: "bn" top: "ip"').replace(
    'layer { name: "ip"', 'layer { name: "bn" type: "BatchNorm" bottom: "data" top: "bn" }\nlayer { name: "ip"')


def test_caffemodel_layers_carry_the_loss_weight_loss_layers_add(tmp_path):
    s, _ = make_solver(tmp_path, f'lr_policy: "fixed" base_lr: 0.1 snapshot_prefix: "{tmp_path}/m"')
    model, _ = s.snapshot()
    by = {l.name: l for l in read_model(model).layer}
    assert list(by["loss"].loss_weight) == [1.0]  # as Caffe's own snapshots have it
    assert list(by["ip"].loss_weight) == []


def test_caffemodel_batchnorm_carries_its_lr_mult_zero_specs(tmp_path):
    s, _ = make_solver(tmp_path, f'lr_policy: "fixed" base_lr: 0.1 snapshot_prefix: "{tmp_path}/m"', BN_NET)
    assert [e.lr_mult for e in s.learnable if e.layer == "bn"] == [0.0, 0.0, 0.0]
    s.step(1)
    model, _ = s.snapshot()
    bn = {l.name: l for l in read_model(model).layer}["bn"]
    assert len(bn.blobs) == 3
    assert [(p.HasField("lr_mult"), p.lr_mult) for p in bn.param] == [(True, 0.0)] * 3


def test_solve_without_a_prefix_still_takes_the_final_snapshot(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s, log = make_solver(tmp_path, 'lr_policy: "fixed" base_lr: 0.1 max_iter: 2')
    s.solve()  # Caffe: Snapshot() with an empty prefix writes _iter_2.caffemodel and .solverstate in the cwd
    assert s.iter == 2
    assert os.path.isfile(tmp_path / "_iter_2.caffemodel") and os.path.isfile(tmp_path / "_iter_2.solverstate")
    assert log[-1] == "Optimization Done."


def test_snapshot_diff_stores_the_last_step(tmp_path):
    s, _ = make_solver(tmp_path, f'lr_policy: "fixed" base_lr: 0.25 momentum: 0.5 snapshot_diff: true '
                                 f'snapshot_prefix: "{tmp_path}/m"')
    start = data_of(s)
    grads = gradients([d.shape for d in start], 2, seed=11)
    for g in grads:
        set_diffs(s, g)
        s.apply_update()
    _, _, steps = reference_updates("SGD", start, grads, [1.0, 1.0], base_lr=0.25, momentum=0.5)
    model, _ = s.snapshot()
    ip = {l.name: l for l in read_model(model).layer}["ip"]
    for blob, st in zip(ip.blobs, steps):
        np.testing.assert_allclose(np.array(blob.diff, f64).reshape(st.shape), st, rtol=1e-5, atol=1e-7)


def test_hdf5_snapshot_diff_writes_the_diff_group(tmp_path):
    h5py = pytest.importorskip("h5py")
    s, _ = make_solver(tmp_path, f'lr_policy: "fixed" base_lr: 0.25 snapshot_diff: true snapshot_format: HDF5 '
                                 f'snapshot_prefix: "{tmp_path}/m"')
    start = data_of(s)
    grads = gradients([d.shape for d in start], 1, seed=14)
    set_diffs(s, grads[0])
    s.apply_update()
    model, _ = s.snapshot()
    with h5py.File(model, "r") as f:
        assert "diff" in f
        for j, g in enumerate(grads[0]):
            np.testing.assert_allclose(f[f"diff/ip/{j}"][()], np.float32(0.25) * g, rtol=1e-6)


def test_solverstate_round_trips_iter_current_step_and_history_exactly(tmp_path):
    text = (f'type: "Nesterov" lr_policy: "multistep" base_lr: 0.1 gamma: 0.5 stepvalue: 1 stepvalue: 2 '
            f'momentum: 0.9 snapshot_prefix: "{tmp_path}/m" test_iter: 1 test_interval: 100 random_seed: 1')
    s, _ = make_solver(tmp_path, text)
    s.step(3)
    assert s.current_step == 2
    model, state = s.snapshot()
    it, learned, step, history = read_state(state)
    assert (it, learned, step, len(history)) == (3, model, 2, 2)
    t, _ = make_solver(tmp_path, text.replace("random_seed: 1", "random_seed: 2"))
    test_before = data_of(t, t.test_nets[0])
    assert not np.array_equal(data_of(t)[0], data_of(s)[0])
    t.restore(state)
    assert (t.iter, t.current_step) == (3, 2)
    assert len(t.history) == len(s.history)
    for a, b in zip(t.history, s.history):
        assert a.dtype == np.float32 and np.array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(data_of(t), data_of(s)):
        assert np.array_equal(a, b)
    # into the train net only: the test net keeps its own weights until the next test shares them
    for a, b in zip(data_of(t, t.test_nets[0]), test_before):
        assert np.array_equal(a, b)
    t.test_all()  # a test shares the train net's weights
    for a, b in zip(data_of(t, t.test_nets[0]), data_of(s)):
        assert np.array_equal(a, b)


def test_adam_resumed_continues_t_from_the_restored_iter(tmp_path):
    text = f'type: "Adam" lr_policy: "fixed" base_lr: 0.01 momentum: 0.9 delta: 0.01 snapshot_prefix: "{tmp_path}/m"'
    s, _ = make_solver(tmp_path, text)
    start = data_of(s)
    grads = gradients([d.shape for d in start], 3, seed=12)
    for g in grads[:2]:
        set_diffs(s, g)
        s.apply_update()
    _, state = s.snapshot()
    t, _ = make_solver(tmp_path, text)
    t.restore(state)
    set_diffs(t, grads[2])
    t.apply_update()
    want, hist, _ = reference_updates("Adam", start, grads, [1.0, 1.0], base_lr=0.01, momentum=0.9, delta=0.01)
    for got, w in zip(data_of(t), want):
        np.testing.assert_allclose(got, w, rtol=2e-5, atol=2e-6)
    assert len(t.history) == 4
    for got, w in zip(t.history, hist):
        np.testing.assert_allclose(np.asarray(got, f64), w, rtol=2e-5, atol=1e-7)


def test_history_count_mismatch_is_a_one_line_error_naming_both_counts(tmp_path):
    s, _ = make_solver(tmp_path, f'lr_policy: "fixed" base_lr: 0.1 snapshot_prefix: "{tmp_path}/m"')
    s.step(1)
    _, state = s.snapshot()
    t, _ = make_solver(tmp_path, 'type: "Adam" lr_policy: "fixed" base_lr: 0.1')
    before = data_of(t)
    with pytest.raises(SolverError) as e:
        t.restore(state)
    msg = str(e.value)
    assert "\n" not in msg
    assert re.search(r"\b2\b", msg) and re.search(r"\b4\b", msg), msg
    assert t.iter == 0 and all(np.array_equal(a, b) for a, b in zip(data_of(t), before))


@pytest.mark.parametrize("damage", ["negative", "short", "long"])
def test_a_damaged_history_blob_is_a_one_line_error_and_changes_nothing(tmp_path, damage):
    """Found by mutating Caffe's solverstates: a history blob whose declared shape has a negative
    dimension, or whose values do not fill it, is refused before anything is restored."""
    from caffeish.formats import wire

    s, _ = make_solver(tmp_path, f'lr_policy: "fixed" base_lr: 0.1 snapshot_prefix: "{tmp_path}/m"')
    s.step(1)
    h = s.history[0]
    values = np.ones(h.size + {"negative": 0, "short": -1, "long": 1}[damage], np.float32)
    shape = (-h.shape[0],) + tuple(h.shape[1:]) if damage == "negative" else tuple(h.shape)
    records = [wire.BlobRecord(values, shape=shape)] + [wire.BlobRecord.from_array(x) for x in s.history[1:]]
    chunks = [wire.tag(1, wire.VARINT), wire.encode_varint(1)]  # SolverState: iter 1, its history
    for record in records:
        enc = wire.encode_blob(record)
        chunks += [wire.tag(3, wire.LENGTH), wire.encode_varint(wire.chunks_size(enc))] + enc
    path = tmp_path / "bad.solverstate"
    path.write_bytes(b"".join(bytes(c) for c in chunks))
    t, _ = make_solver(tmp_path, 'lr_policy: "fixed" base_lr: 0.1')
    before = data_of(t)
    with pytest.raises(CaffeishError, match="history blob 0") as e:
        t.restore(str(path))
    assert "\n" not in str(e.value)
    assert t.iter == 0 and all(np.array_equal(a, b) for a, b in zip(data_of(t), before))


def test_hdf5_snapshots_round_trip(tmp_path):
    h5py = pytest.importorskip("h5py")
    text = (f'type: "AdaDelta" lr_policy: "step" stepsize: 1 gamma: 0.9 base_lr: 1 momentum: 0.9 '
            f'snapshot_format: HDF5 snapshot_prefix: "{tmp_path}/m"')
    s, _ = make_solver(tmp_path, text)
    s.step(2)
    model, state = s.snapshot()
    assert (model, state) == (f"{tmp_path}/m_iter_2.caffemodel.h5", f"{tmp_path}/m_iter_2.solverstate.h5")
    with h5py.File(state, "r") as f:
        assert int(f["iter"][()]) == 2 and int(f["current_step"][()]) == 1  # set by update #1
        assert sorted(f["history"].keys()) == ["0", "1", "2", "3"]
    with h5py.File(model, "r") as f:
        assert set(f["data"].keys()) == {"data", "ip", "loss"}
        assert np.array_equal(f["data/ip/0"][()], np.asarray(s.net.params["ip"][0].data))
    t, _ = make_solver(tmp_path, text)
    t.restore(state)
    assert (t.iter, t.current_step) == (2, 1)
    for a, b in zip(t.history, s.history):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(data_of(t), data_of(s)):
        assert np.array_equal(a, b)


# -- check_solver ---------------------------------------------------------------------------------------
REFUSALS = [
    ('type: "Momentum" lr_policy: "fixed"', r"type 'Momentum'.*" + ".*".join(SOLVER_TYPES)),
    ('type: "AdaGrad" momentum: 0.9 lr_policy: "fixed"', r"momentum"),
    ('type: "RMSProp" rms_decay: 1.0 lr_policy: "fixed"', r"rms_decay"),
    ('type: "RMSProp" rms_decay: -0.1 lr_policy: "fixed"', r"rms_decay"),
    ('type: "RMSProp" momentum: 0.5 lr_policy: "fixed"', r"momentum"),
    ('average_loss: 0 lr_policy: "fixed"', r"average_loss"),
    ('snapshot: 10 lr_policy: "fixed"', r"snapshot_prefix"),
    ('train_net: "other.prototxt" lr_policy: "fixed"', r"\bnet\b.*train_net"),
    ('iter_size: 0 lr_policy: "fixed"', r"iter_size"),
    ('snapshot: -1 snapshot_prefix: "x" lr_policy: "fixed"', r"snapshot"),
    ('max_iter: -1 lr_policy: "fixed"', r"max_iter"),
    ('display: -1 lr_policy: "fixed"', r"display"),
    ('test_interval: -2 lr_policy: "fixed"', r"test_interval"),
    ('test_iter: -1 test_interval: 1 lr_policy: "fixed"', r"test_iter"),
]


@pytest.mark.parametrize("text,pattern", REFUSALS, ids=[f"r{i}" for i in range(len(REFUSALS))])
def test_check_solver_refusals_name_the_field(text, pattern):
    with pytest.raises(SolverError, match=pattern) as e:
        check_solver(param_text(text))
    assert "\n" not in str(e.value)


def test_no_train_net_is_refused():
    with pytest.raises(SolverError, match="net"):
        check_solver(pb.SolverParameter(lr_policy="fixed"))


def test_adagrad_and_rmsprop_accept_their_valid_settings():
    check_solver(param_text('type: "RMSProp" rms_decay: 0 lr_policy: "fixed"'))
    check_solver(param_text('type: "AdaGrad" lr_policy: "fixed"'))
    for kind in SOLVER_TYPES:
        check_solver(param_text(f'type: "{kind}" lr_policy: "fixed"'))


LR_REFUSALS = [
    ('lr_policy: "cosine"', r"lr_policy 'cosine'.*" + ".*".join(LR_POLICIES)),
    ('', r"lr_policy"),
    ('lr_policy: "step" stepsize: 0 gamma: 0.1', r"stepsize"),
    ('lr_policy: "step" stepsize: -3 gamma: 0.1', r"stepsize"),
    ('lr_policy: "sigmoid" stepsize: 0 gamma: 0.1', r"stepsize"),
    ('lr_policy: "step" stepsize: 2 gamma: -0.1', r"gamma"),
    ('lr_policy: "exp" gamma: -1', r"gamma"),
    ('lr_policy: "inv" gamma: -1 power: 1', r"gamma"),
    ('lr_policy: "multistep" gamma: -1 stepvalue: 3', r"gamma"),
    ('lr_policy: "sigmoid" gamma: -1 stepsize: 3', r"gamma"),
]


@pytest.mark.parametrize("text,pattern", LR_REFUSALS, ids=[f"lr{i}" for i in range(len(LR_REFUSALS))])
def test_check_lr_policy_refusals_name_the_field(text, pattern):
    with pytest.raises(SolverError, match=pattern):
        check_lr_policy(param_text(text))


def test_lr_policies_without_checks_accept_gamma_zero():
    for text in ('lr_policy: "fixed" gamma: -1', 'lr_policy: "poly" power: 1 max_iter: 10',
                 'lr_policy: "exp" gamma: 0', 'lr_policy: "sigmoid" gamma: 0 stepsize: 1'):
        check_lr_policy(param_text(text))


def test_test_iter_count_must_match_the_test_nets(tmp_path):
    (tmp_path / "t.prototxt").write_text(ip_net(name="t"))
    with pytest.raises(SolverError, match="test_iter"):  # one test_net file, two test_iter, no generic net
        Solver(parse_text(f'train_net: "{tmp_path}/t.prototxt" test_net: "{tmp_path}/t.prototxt" '
                          f'test_iter: 1 test_iter: 2 test_interval: 5 lr_policy: "fixed"', pb.SolverParameter()),
               log=Log())


def test_test_state_count_must_match_the_test_nets(tmp_path):
    with pytest.raises(SolverError, match="test_state"):
        make_solver(tmp_path, 'lr_policy: "fixed" test_iter: 1 test_iter: 1 test_interval: 2 test_state { stage: "a" }')


def test_test_nets_need_a_test_interval(tmp_path):
    with pytest.raises(SolverError, match="test_interval"):
        make_solver(tmp_path, 'lr_policy: "fixed" test_iter: 3')


# -- construction: old enum, NetState, test nets, weights, seed ----------------------------------------
def test_old_solver_type_enum_is_upgraded(tmp_path):
    (tmp_path / "net.prototxt").write_text(ip_net())
    path = tmp_path / "solver.prototxt"
    path.write_text(f'net: "{tmp_path}/net.prototxt"\nsolver_type: NESTEROV\nlr_policy: "fixed"\nbase_lr: 0.1\n')
    param = read_solver(path)
    assert param.type == "Nesterov"
    assert not param.HasField("solver_type")
    s = caffeish.get_solver(str(path))
    assert s.type == "Nesterov" and len(s.history) == 2


STATE_NET = ip_net(name="states", extra="""
state { level: 1 stage: "a" }
layer { name: "only_a" type: "Power" bottom: "data" top: "pa" include { stage: "a" } }
layer { name: "only_b" type: "Power" bottom: "data" top: "pb" include { stage: "b" } }
layer { name: "only_t1" type: "Power" bottom: "data" top: "pt1" include { stage: "t1" } }
layer { name: "only_t2" type: "Power" bottom: "data" top: "pt2" include { stage: "t2" } }
layer { name: "min3" type: "Power" bottom: "data" top: "p3" include { min_level: 3 } }
layer { name: "max1" type: "Power" bottom: "data" top: "p1" include { max_level: 1 } }
layer { name: "train_only" type: "Power" bottom: "data" top: "ptr" include { phase: TRAIN } }
""")


def names(net):
    return set(net._layer_names)


def test_net_state_merging_train_state_and_test_state(tmp_path):
    s, _ = make_solver(tmp_path, 'lr_policy: "fixed" train_state { level: 3 stage: "b" } test_iter: 1 test_iter: 1 '
                                 'test_interval: 10 test_state { stage: "t1" } test_state { level: 5 stage: "t2" }',
                       STATE_NET)
    extra = {"only_a", "only_b", "only_t1", "only_t2", "min3", "max1", "train_only"}
    # train: {TRAIN} + net's {level 1, stage a} + train_state {level 3, stage b}: stages appended, level overwritten
    assert names(s.net) & extra == {"only_a", "only_b", "min3", "train_only"}
    assert names(s.test_nets[0]) & extra == {"only_a", "only_t1", "max1"}  # level 1, stages a, t1
    assert names(s.test_nets[1]) & extra == {"only_a", "only_t2", "min3"}  # level 5, stages a, t2


def test_test_nets_come_from_params_then_files_then_generic_copies(tmp_path):
    (tmp_path / "other.prototxt").write_text(ip_net(name="other"))
    inline = ip_net(name="inline").replace("\n", " ")
    s, _ = make_solver(tmp_path, f'lr_policy: "fixed" test_net: "{tmp_path}/other.prototxt" '
                                 f'test_net_param {{ {inline} }} test_iter: 1 test_iter: 1 test_iter: 1 '
                                 f'test_iter: 1 test_interval: 10')
    assert [n.name for n in s.test_nets] == ["inline", "other", "tiny", "tiny"]
    assert s.net.name == "tiny"
    assert s.test_nets[2] is not s.test_nets[3] and s.test_nets[2] is not s.net


WEIGHTS_NET = ip_net(extra="""
layer { name: "ip2" type: "InnerProduct" bottom: "data" top: "ip2"
  inner_product_param { num_output: 1 weight_filler { type: "gaussian" std: 1 } } }""")


def save_weights(path, net_text, values):
    net = caffeish.Net(parse_text(net_text, pb.NetParameter()), phase=TRAIN)
    for layer, v in values.items():
        for blob in net.params[layer]:
            blob.data[...] = v
    net.save(str(path))
    return str(path)


def test_weights_are_comma_separated_later_files_override_earlier_ones(tmp_path):
    w1 = save_weights(tmp_path / "w1.caffemodel", WEIGHTS_NET, {"ip": 1.0, "ip2": 1.5})
    w2 = save_weights(tmp_path / "w2.caffemodel", ip_net(), {"ip": 2.0})
    w3 = save_weights(tmp_path / "w3.caffemodel", WEIGHTS_NET, {"ip": 3.0, "ip2": 3.5})
    s, log = make_solver(tmp_path, f'lr_policy: "fixed" weights: "{w1} , {w2}" test_iter: 1 test_interval: 9',
                         WEIGHTS_NET)
    for net in (s.net, s.test_nets[0]):
        assert np.all(np.asarray(net.params["ip"][0].data) == 2.0)
        assert np.all(np.asarray(net.params["ip"][1].data) == 2.0)
        assert np.all(np.asarray(net.params["ip2"][0].data) == 1.5)
    assert [m.group(1) for m in log.matching(r"^Finetuning from (\S+)$")] == [w1, w2]
    # the solver's weights first, then the extra ones (the --weights list)
    t, _ = make_solver(tmp_path, f'lr_policy: "fixed" weights: "{w3}"', WEIGHTS_NET, weights=[f"{w1},{w2}"])
    assert np.all(np.asarray(t.net.params["ip"][0].data) == 2.0)
    assert np.all(np.asarray(t.net.params["ip2"][0].data) == 1.5)


def test_random_seed_makes_filler_weights_identical(tmp_path):
    a, _ = make_solver(tmp_path, 'lr_policy: "fixed" random_seed: 17')
    b, _ = make_solver(tmp_path, 'lr_policy: "fixed" random_seed: 17')
    c, _ = make_solver(tmp_path, 'lr_policy: "fixed" random_seed: 18')
    for x, y in zip(data_of(a), data_of(b)):
        assert np.array_equal(x, y)
    assert not np.array_equal(data_of(a)[0], data_of(c)[0])


# -- pycaffe ---------------------------------------------------------------------------------------
def solver_file(tmp_path, text, net_text=None):
    (tmp_path / "net.prototxt").write_text(ip_net() if net_text is None else net_text)
    path = tmp_path / "solver.prototxt"
    path.write_text(f'net: "{tmp_path}/net.prototxt"\n{text}\n')
    return str(path)


@pytest.fixture
def quiet(monkeypatch):
    monkeypatch.setenv("GLOG_minloglevel", "1")


def test_get_solver_builds_the_files_type_and_typed_classes_override_it(tmp_path, quiet):
    path = solver_file(tmp_path, 'type: "RMSProp" lr_policy: "fixed" base_lr: 0.1 test_iter: 2 test_interval: 5')
    s = caffeish.get_solver(path)
    assert s.type == "RMSProp" and len(s.history) == 2 and type(s) is caffeish.RMSPropSolver
    assert isinstance(s.net, caffeish.Net)
    assert len(s.test_nets) == 1 and isinstance(s.test_nets[0], caffeish.Net) and s.test_nets[0] is not s.net
    a = caffeish.AdamSolver(path)
    assert a.type == "Adam" and len(a.history) == 4
    for cls, kind in ((caffeish.SGDSolver, "SGD"), (caffeish.NesterovSolver, "Nesterov"),
                      (caffeish.AdaGradSolver, "AdaGrad"), (caffeish.AdaDeltaSolver, "AdaDelta")):
        assert cls(path).type == kind
    # the typed class really runs its rule: Adam's first step is α·sqrt(1−β2)·g/(|g|·sqrt(1−β2) + δ) ≈ α·sign(g)
    start = data_of(a)
    grads = gradients([d.shape for d in start], 1, seed=13)
    set_diffs(a, grads[0])
    a.apply_update()
    want, _, _ = reference_updates("Adam", start, grads, [1.0, 1.0], base_lr=0.1)
    for got, w in zip(data_of(a), want):
        np.testing.assert_allclose(got, w, rtol=2e-5, atol=2e-6)


def test_add_callback_is_called_in_caffes_order(tmp_path, quiet):
    path = solver_file(tmp_path, 'lr_policy: "fixed" base_lr: 0.1 max_iter: 2 display: 1 test_iter: 1 '
                                 'test_interval: 1 snapshot_after_train: false')
    s = caffeish.get_solver(path)
    events = []
    s.log = lambda message, where: events.append(("log", message))
    seen = {}

    def on_start():
        events.append(("start", s.iter))
        seen["start"] = (s.iter, data_of(s), [np.array(s.net.params["ip"][j].diff) for j in range(2)])

    def on_gradients():
        events.append(("gradients", s.iter))
        it, data, diffs = seen["start"]
        assert s.iter == it
        for a, b in zip(data_of(s), data):
            assert np.array_equal(a, b)  # before the update
        for d in diffs:
            assert not d.any()  # the diffs were cleared before on_start
        assert any(np.asarray(s.net.params["ip"][j].diff).any() for j in range(2))  # after backward

    s.add_callback(on_start, on_gradients)
    s.step(2)
    kinds = []
    for kind, what in events:
        if kind != "log":
            kinds.append(f"{kind}{what}")
        elif re.match(r"Iteration \d+, Testing net", what):
            kinds.append("test")
        elif re.match(r"Iteration \d+ \(", what):
            kinds.append("display")
        elif re.match(r"Iteration \d+, lr", what):
            kinds.append("lr")
    assert kinds == ["test", "start0", "display", "gradients0", "lr",
                     "test", "start1", "display", "gradients1", "lr"]
    assert s.iter == 2


def test_pycaffe_apply_update_increments_iter_and_solve_reaches_max_iter(tmp_path, quiet):
    path = solver_file(tmp_path, f'lr_policy: "fixed" base_lr: 0.1 max_iter: 6 snapshot_prefix: "{tmp_path}/p"')
    s = caffeish.SGDSolver(path)
    before = data_of(s)
    set_diffs(s, [np.ones_like(d) for d in before])
    s.apply_update()
    assert s.iter == 1
    for a, b in zip(data_of(s), before):
        np.testing.assert_allclose(a, b - np.float32(0.1), rtol=1e-6)
    s.step(2)
    assert s.iter == 3
    s.solve()
    assert s.iter == 6
    assert os.path.isfile(f"{tmp_path}/p_iter_6.caffemodel")
    r = caffeish.SGDSolver(path)
    r.restore(f"{tmp_path}/p_iter_6.solverstate")
    assert r.iter == 6
    r.snapshot()  # pycaffe's snapshot(): names use the restored iter
    assert os.path.isfile(f"{tmp_path}/p_iter_6.solverstate")


def test_out_of_range_settings_give_cpp_numbers_not_python_errors(tmp_path):
    """Found by benchmarks/fuzz_train.py: a huge gamma overflows the rate to inf (C++'s pow), and an Adam
    momentum2 above 1 makes its correction NaN (C++'s sqrt of a negative), as in Caffe; neither may
    raise OverflowError or 'math domain error'."""
    for policy in ('lr_policy: "exp" gamma: 1e30', 'lr_policy: "step" gamma: 1e30 stepsize: 1'):
        rate, _ = learning_rate(param_text(policy + " base_lr: 0.1"), 200, 0)
        assert np.isinf(rate), policy
    s, _ = make_solver(tmp_path, 'type: "Adam" momentum: 0.9 momentum2: 2 lr_policy: "fixed" base_lr: 0.1')
    with np.errstate(all="ignore"):
        s.step(2)
    assert s.iter == 2 and np.isnan(data_of(s)[0]).all()


def test_a_snapshot_prefix_with_a_nul_byte_is_refused_before_training(tmp_path):
    s, _ = make_solver(tmp_path, 'lr_policy: "fixed" base_lr: 0.1 snapshot_prefix: "a\\000b"')
    with pytest.raises(SolverError, match="NUL byte"):
        s.check_snapshot_folder()

"""Metrics (eqs. 1, 2, 10, 19; appendices 9.1.1, 9.3) and evaluate() against direct recomputation."""
import json
import math

import numpy as np
import pytest

from heads.evaluation.evaluate import Calibration, ExitOutputs, calibrate, evaluate, predict_with_sets
from heads.evaluation.metrics import (
    CONFORMAL_METHODS, GATED_MIN_SAMPLES, bootstrap_ci, conformal_coverage, conformal_sets, conformal_threshold,
    conformal_thresholds, expected_calibration_error, fit_temperature, reported_conformal, softmax,
)


def _sample_labels(rng, probs):
    """One categorical draw per row."""
    u = rng.random((probs.shape[0], 1))
    return np.minimum((probs.cumsum(axis=1) < u).sum(axis=1), probs.shape[1] - 1)


def _early_exit_model(rng, n, n_exits=3, n_classes=6):
    """Synthetic early-exit outputs: later exits see the true logits more clearly; exit = first confident IM."""
    true = rng.normal(size=(n, n_classes)) * 2.5
    labels = _sample_labels(rng, softmax(true))
    strength = np.linspace(0.4, 1.0, n_exits)[None, :, None]
    noise = rng.normal(size=(n, n_exits, n_classes)) * (1 - strength)
    logits = (strength * true[:, None, :] + noise).astype(np.float32)
    confident = softmax(logits).max(axis=2) > 0.7
    confident[:, -1] = True
    return ExitOutputs(logits, confident.argmax(axis=1), labels)


# ---------------------------------------------------------------- ECE (eq. 19)

def _ece_direct(conf, correct, n_bins):
    """Eq. 19 written out: sort, cut into B equal-mass bins, weight |ACC - mean conf| by |Q_b| / N."""
    order = np.argsort(conf, kind="stable")
    n = conf.size
    total = 0.0
    for b in range(1, n_bins + 1):
        q = order[n * (b - 1) // n_bins: n * b // n_bins]
        if q.size:
            total += q.size / n * abs(correct[q].mean() - conf[q].mean())
    return total


@pytest.mark.parametrize("n,n_bins", [(1000, 15), (997, 10), (7, 15), (50, 1)])
def test_ece_matches_direct_eq19(n, n_bins):
    rng = np.random.default_rng(n)
    conf = rng.random(n)
    conf[: n // 5] = 0.5  # ties across bin boundaries
    correct = rng.random(n) < conf ** 2
    assert expected_calibration_error(conf, correct, n_bins) == pytest.approx(_ece_direct(conf, correct, n_bins),
                                                                              abs=1e-12)


def test_ece_hand_values():
    assert expected_calibration_error(np.full(10, 0.9), np.ones(10, bool), 5) == pytest.approx(0.1)
    conf = np.array([0.2, 0.2, 0.8, 0.8])
    correct = np.array([0, 0, 1, 1], bool)
    assert expected_calibration_error(conf, correct, 2) == pytest.approx(0.2)
    with pytest.raises(ValueError):
        expected_calibration_error([], [], 15)


# ---------------------------------------------------------------- temperature

@pytest.mark.parametrize("planted", [0.5, 2.5])
def test_temperature_recovers_planted(planted):
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(6000, 10)) * 3.0
    labels = _sample_labels(rng, softmax(logits / planted))
    t = fit_temperature(logits, labels)
    assert abs(t - planted) / planted < 0.08
    assert fit_temperature(logits, labels) == t  # deterministic


# ---------------------------------------------------------------- conformal (eqs. 2, 10; appendix 9.3)

def test_threshold_is_the_finite_sample_quantile():
    scores = np.random.default_rng(0).permutation(np.arange(1, 20) / 20.0)  # n = 19
    # ceil(20 * 0.95) = 19 -> the largest score; ceil(20 * 0.9) = 18 -> the second largest
    assert conformal_threshold(scores, 0.05) == pytest.approx(19 / 20)
    assert conformal_threshold(scores, 0.1) == pytest.approx(18 / 20)
    assert conformal_threshold(scores[:10], 0.05) == 1.0  # ceil(11 * 0.95) = 11 > 10: full sets


def test_sets_are_inclusive_at_the_threshold():
    probs = np.array([[0.5, 0.25, 0.25, 0.0], [0.125, 0.125, 0.25, 0.5]])  # exact binary fractions: exact ties
    thresholds = np.array([[0.75, 0.875]])  # exit 0: tau = 1 - 0.25, exit 1: tau = 1 - 0.125
    coverage, size = conformal_coverage(probs, np.array([2, 0]), np.array([0, 1]), thresholds)
    assert coverage[0] == 1.0 and size[0] == pytest.approx((3 + 4) / 2)
    np.testing.assert_array_equal(conformal_sets(probs, np.array([0, 1]), thresholds[0]),
                                  [[True, True, True, False], [True, True, True, True]])


def test_strict_and_gated_small_groups():
    rng = np.random.default_rng(0)
    true_probs = rng.random((200, 3))
    exit_index = np.r_[np.zeros(190, int), np.ones(10, int)]  # exit 1 has 10 < 20 samples, exit 2 none
    general = conformal_thresholds("general", true_probs, exit_index, [0.1])[0]
    strict = conformal_thresholds("strict", true_probs, exit_index, [0.1])[0]
    gated = conformal_thresholds("gated", true_probs, exit_index, [0.1])[0]
    assert strict[2] == 0.0 and 10 < GATED_MIN_SAMPLES
    assert gated[1] == general[1] and gated[2] == general[2]
    assert gated[0] == strict[0] == conformal_threshold(1 - true_probs[:190, 0], 0.1)
    ims = conformal_thresholds("ims", true_probs, exit_index, [0.1])[0]
    assert ims[2] == conformal_threshold(1 - true_probs[:, 2], 0.1)
    with pytest.raises(ValueError, match="unknown conformal method"):
        conformal_thresholds("foo", true_probs, exit_index, [0.1])


def test_coverage_on_exchangeable_data():
    alphas = np.array([0.05, 0.1, 0.2])
    # a small calibration split makes the finite-sample correction (n+1) visible against sampling error
    repeats, n_cal, n = 400, 60, 200
    rng = np.random.default_rng(7)
    coverage = {m: [] for m in CONFORMAL_METHODS}
    size = {m: [] for m in CONFORMAL_METHODS}
    for _ in range(repeats):
        cal, test = _early_exit_model(rng, n_cal), _early_exit_model(rng, n)
        probs = softmax(test.logits)[np.arange(n), test.exit_index]
        for m in CONFORMAL_METHODS:
            thr = conformal_thresholds(m, cal.true_class_probs(), cal.exit_index, alphas)
            c, s = conformal_coverage(probs, test.labels, test.exit_index, thr)
            coverage[m].append(c)
            size[m].append(s)
    for m in CONFORMAL_METHODS:
        mean = np.mean(coverage[m], axis=0)
        se = np.std(coverage[m], axis=0) / math.sqrt(repeats)
        assert np.all(mean >= 1 - alphas - 3 * se - 1e-3), (m, mean)
        assert np.all(np.mean(size[m], axis=0) < 6)  # sets are informative, not every class
    # General has the two-sided split-conformal guarantee: coverage <= 1 - alpha + 1/(n_cal+1)
    mean = np.mean(coverage["general"], axis=0)
    se = np.std(coverage["general"], axis=0) / math.sqrt(repeats)
    assert np.all(mean <= 1 - alphas + 1 / (n_cal + 1) + 3 * se), mean


def test_reported_rule_reaches_target():
    rng = np.random.default_rng(3)
    cal, test = _early_exit_model(rng, 120), _early_exit_model(rng, 400)
    probs = softmax(test.logits)[np.arange(400), test.exit_index]
    for m in CONFORMAL_METHODS:
        cov, ineff, used = reported_conformal(m, cal.true_class_probs(), cal.exit_index, probs, test.labels,
                                              test.exit_index, 0.05)
        assert cov >= 0.95 and 0.0 <= used <= 0.05
        grid = np.round(0.05 * (1 - np.arange(11) / 10), 6)
        assert np.isclose(grid, used).any()
        if used < 0.05:  # the step before must have missed the target
            thr = conformal_thresholds(m, cal.true_class_probs(), cal.exit_index, [used + 0.005])
            assert conformal_coverage(probs, test.labels, test.exit_index, thr)[0][0] < 0.95


# ---------------------------------------------------------------- intervals (appendix 9.1.1)

def test_bootstrap_ci():
    rng = np.random.default_rng(0)
    values = rng.random(1003) < 0.7
    mean, low, high = bootstrap_ci(values, 10, seed=1)
    assert mean == pytest.approx(values.mean()) and low < mean < high and high - low < 0.1
    assert bootstrap_ci(values, 10, seed=1) == (mean, low, high)
    hits = 0
    for seed in range(200):
        v = np.random.default_rng(100 + seed).random(1000) < 0.7
        _, lo, hi = bootstrap_ci(v, 10, seed=seed)
        hits += lo <= 0.7 <= hi
    assert hits >= 0.85 * 200  # percentile bootstrap over 10 means: ~90-93% for a nominal 95%
    with pytest.raises(ValueError):
        bootstrap_ci(np.ones(5), 10)


# ---------------------------------------------------------------- evaluate()

def test_evaluate_matches_direct_recomputation():
    rng = np.random.default_rng(11)
    v2, test = _early_exit_model(rng, 240, n_exits=4), _early_exit_model(rng, 260, n_exits=4)
    test.exit_index[test.exit_index == 2] = 1  # an exit nobody takes -> NaN accuracy there
    costs = np.array([10.0, 20.0, 35.0, 50.0])
    res = evaluate(v2, test, costs, alphas=(0.05, 0.1))
    assert set(res) == {"v2", "test"}
    json.dumps(res)
    for name, out in (("v2", v2), ("test", test)):
        r = res[name]
        pred = out.logits[np.arange(len(out.labels)), out.exit_index].argmax(1)
        assert r["accuracy"] == pytest.approx(np.mean(pred == out.labels))
        assert r["accuracy_ci_low"] <= r["accuracy"] <= r["accuracy_ci_high"]
        assert r["cost_macs"] == pytest.approx(costs[out.exit_index].mean())  # eq. 1
        assert r["cost_norm"] == pytest.approx(costs[out.exit_index].mean() / 50.0)
        assert r["cost_norm_ci_low"] <= r["cost_norm"] <= r["cost_norm_ci_high"]
        assert r["exit_hist"] == np.bincount(out.exit_index, minlength=4).tolist()
        for exit_ in range(4):
            taken = out.exit_index == exit_
            acc = np.mean(pred[taken] == out.labels[taken]) if taken.any() else float("nan")
            np.testing.assert_equal(r["exit_acc_exited"][exit_], acc)
            assert r["exit_acc_all"][exit_] == pytest.approx(np.mean(out.logits[:, exit_].argmax(1) == out.labels))
        assert len(r["coverage_gated"]) == len(r["inefficiency_ims"]) == len(r["conformal_alphas"]) == 2
        assert r["ece"] >= 0 and r["ece_temp"] >= 0
    assert math.isnan(res["test"]["exit_acc_exited"][2])
    assert res["v2"]["temperature"] == res["test"]["temperature"] == fit_temperature(v2.exited_logits(), v2.labels)
    # temperature fitted on V2 cannot leave the V2 ECE much worse than before
    assert res["v2"]["ece_temp"] <= res["v2"]["ece"] + 0.02

    # the runtime helper reproduces evaluate()'s Gated sets at alpha 0.05
    calib = Calibration.from_dict(json.loads(json.dumps(calibrate(v2, 0.05, "gated").to_dict())))
    pred2, probs, sets = predict_with_sets(test.exited_logits(), test.exit_index, calib)
    np.testing.assert_array_equal(pred2, pred)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert sets[np.arange(len(test.labels)), test.labels].mean() == pytest.approx(res["test"]["coverage_gated"][0])
    assert sets.sum(1).mean() == pytest.approx(res["test"]["inefficiency_gated"][0])


def test_evaluate_rejects_bad_inputs():
    rng = np.random.default_rng(0)
    out = _early_exit_model(rng, 50)
    with pytest.raises(ValueError, match="cumulative_costs"):
        evaluate(out, out, np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="exit_index"):
        ExitOutputs(out.logits, np.full(50, 3), out.labels)
    with pytest.raises(ValueError, match="labels"):
        ExitOutputs(out.logits, out.exit_index, out.labels[:10])



def test_fit_temperature_stops_once_newton_has_converged(monkeypatch):
    """A fit whose Newton step lands on the root returns there: at grad = 0 the step equals beta, which is also the
    bracket's lower end, and a strict bracket test used to send it bisecting towards T = 100 and back (on real
    K = 100 outputs ~18 passes over the logits per fit instead of ~7). A linear derivative with its root at
    beta = 0.75 makes Newton exact in one step."""
    import heads.evaluation.metrics as metrics
    calls = []

    def linear(z, zy, beta):
        calls.append(beta)
        return (beta - 0.75) * 2.0, 2.0
    monkeypatch.setattr(metrics, "_nll_derivatives", linear)
    t = fit_temperature(np.zeros((4, 3), np.float32), np.zeros(4, np.int64))
    assert t == 1.0 / 0.75 and len(calls) <= 4, (t, calls)


def test_softmax_gives_the_plain_formulas_bits():
    """The in-place softmax computes exactly (logits / T - max) -> exp -> / sum, the formula written out."""
    rng = np.random.default_rng(3)
    logits = (rng.normal(size=(50, 4, 12)) * 6).astype(np.float32)
    kept = logits.copy()
    for t in (1.0, 0.37, 2.5):
        z = logits / t
        e = np.exp(z - z.max(axis=-1, keepdims=True))
        want = e / e.sum(axis=-1, keepdims=True)
        got = softmax(logits, t)
        assert got.dtype == np.float32 and np.array_equal(got, want)
    assert softmax(np.array([[0, 1]])).dtype == np.float64          # integer logits: float64 as before
    assert np.array_equal(logits, kept)                               # in place on its own array, not the input


def test_parallel_kernels_equal_the_serial_ones_bit_for_bit():
    """Temperature's derivatives and the conformal set sizes run on the thread pool for large splits; the rows are
    added in the serial order, so the fitted temperature and every count are the same whatever the thread count."""
    import torch

    import heads.evaluation.metrics as metrics
    rng = np.random.default_rng(4)
    z = rng.normal(size=(3000, 40)) * 3.0
    z -= z.max(axis=1, keepdims=True)
    zy = z[np.arange(3000), rng.integers(0, 40, 3000)]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for beta in (0.2, 1.0, 3.1):
            assert metrics._nll_parallel(z, zy, beta) == metrics._nll_serial(z, zy, beta)
        scores = np.sort(rng.random((3000, 40)), axis=1)
        scores[::7, -3:] = np.nan                                   # NaN scores sort last, as np.sort puts them
        thresholds = rng.random((31, 5))
        thresholds[0, 2], thresholds[4] = np.nan, thresholds[3]     # a NaN threshold and tied rows
        exit_index = rng.integers(0, 5, 3000)
        order = np.argsort(thresholds.T, axis=1, kind="stable")
        ascending = np.ascontiguousarray(np.take_along_axis(thresholds.T, order, axis=1))
        serial, parallel = np.empty((31, 3000), np.int64), np.empty((31, 3000), np.int64)
        metrics._count_serial(scores, ascending, order, exit_index, serial)
        metrics._count_parallel(scores, ascending, order, exit_index, parallel)
        assert np.array_equal(serial, parallel)
        want = np.stack([[np.searchsorted(scores[i], thresholds[a, exit_index[i]], side="right")
                          for i in range(3000)] for a in range(31)])
        assert np.array_equal(serial, want)
    finally:
        torch.set_num_threads(before)

"""Uncertainty and reporting metrics of the JEI-DNN paper: ECE, temperature scaling, conformal sets, intervals.

    ece = expected_calibration_error(confidence, correct, n_bins=15)          # eq. 19, equal-mass bins
    T = fit_temperature(v2_logits, v2_labels)                                   # scalar T > 0, NLL on V2
    thr = conformal_thresholds("gated", v2_true_probs, v2_exit, alphas)        # (A, L), appendix 9.3
    coverage, inefficiency = conformal_coverage(probs_exited, labels, exit_index, thr)   # eq. 2, per alpha
    mean, low, high = bootstrap_ci(correct, n_partitions=10, seed=0)           # appendix 9.1.1

Decisions (where the paper leaves room):
- ECE bins: sort by confidence (stable sort, so ties are binned reproducibly) and cut at floor(N b / B),
  b = 0..B; bin b holds sorted positions [floor(N(b-1)/B), floor(N b/B)). Eq. 19 writes both ends inclusive,
  which would count the boundary samples twice; empty bins (N < B) contribute nothing.
- Temperature: NLL(beta) with beta = 1/T is convex (log-sum-exp of a linear function minus a linear one), so a
  bracketed Newton iteration on beta finds the global optimum deterministically; T is confined to [0.01, 100].
- Conformal score s = 1 - p_k; the threshold is the ceil((n+1)(1-alpha))-th smallest calibration score (the
  ceil((n+1)(1-alpha))/n empirical quantile), and the set is INCLUSIVE, C = {k : s_k <= tau}. With the inclusive
  set, P(s_test <= tau) >= 1 - alpha holds for exchangeable data even with ties; eq. 10's strict "<" only agrees
  when no test score equals tau exactly. When ceil((n+1)(1-alpha)) > n the quantile is +infinity; we store
  tau = 1.0 instead, which (since s <= 1) is the same full set and stays JSON-friendly.
- The four constructions of appendix 9.3 are selected by name: "general", "ims", "strict", "gated"
  (Strict sets tau_l = 0 when V^l is empty; Gated uses the General threshold when |V^l| < 20).
- Reporting rule (9.3): for a target alpha, thresholds for alpha' = alpha (1 - j/10), j = 0..10 (0.05, 0.045,
  ..., 0.005, 0), take the first alpha' whose empirical coverage on the evaluated split reaches >= 1 - alpha.
  alpha' = 0 gives full sets, so the rule always stops, except for Strict with an empty V^l (tau = 0), where the
  alpha' = 0 values are reported and the coverage shows the shortfall.
- Confidence interval: the samples are shuffled (seeded) and split into 10 partitions, as in appendix 9.1.1;
  the 10 partition means are resampled with replacement (10,000 percentile-bootstrap resamples) and the 2.5/97.5
  percentiles of the resampled means are the 95% interval; the point estimate is the plain mean over all
  samples. With only 10 partition means this percentile interval is about 0.8 x the width of a Student-t
  interval (it ignores the t correction), so it is slightly optimistic; it is what the paper describes.
"""
import math

import numba
import numpy as np

from heads import cpu

CONFORMAL_METHODS = ("general", "ims", "strict", "gated")
GATED_MIN_SAMPLES = 20            # appendix 9.3: below this many V^l samples Gated falls back to General
TEMPERATURE_BOUNDS = (0.01, 100.0)
BOOTSTRAP_RESAMPLES = 10_000
_QUANTILE_EPS = 1e-9              # so that (n+1)(1-alpha) = 19.000000000000004 still rounds up to 19
# elements (rows x classes) from which a kernel runs on the thread pool: about a millisecond of serial work, so a
# launch that waits a scheduler tick on a busy machine (heads/cpu.py) costs at most as much as it can save
PARALLEL_ELEMENTS = 1 << 18


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Numerically stable softmax over the last axis of logits / temperature (float32 in, float32 out).

    One new array, the rest in place: the (N, L, K) softmax of a split is evaluation's largest numpy pass, and its
    temporaries cost more than its arithmetic. The same operations in the same order as the plain formula, so the
    same bits (dividing by a temperature of 1.0 is exact, hence skipped)."""
    z = np.asarray(logits)
    if not np.issubdtype(z.dtype, np.floating):
        z = z.astype(np.float64)
    if temperature != 1.0:
        z = z / temperature
    e = np.subtract(z, z.max(axis=-1, keepdims=True))
    np.exp(e, out=e)
    np.divide(e, e.sum(axis=-1, keepdims=True), out=e)
    return e


# ---------------------------------------------------------------- calibration (eq. 19, temperature scaling)

@numba.njit(cache=True)
def _ece_sorted(conf, correct, n_bins):
    n = conf.shape[0]
    total = 0.0
    for b in range(n_bins):
        lo = (n * b) // n_bins
        hi = (n * (b + 1)) // n_bins
        gap = 0.0
        for i in range(lo, hi):
            gap += correct[i] - conf[i]
        total += abs(gap)  # |Q_b|/N * |ACC(Q_b) - P(Q_b)| = |sum(correct - conf)| / N
    return total / n


def expected_calibration_error(confidence, correct, n_bins: int = 15) -> float:
    """Eq. 19: equal-mass bins over the sorted confidences, sum_b |Q_b|/N |ACC(Q_b) - mean conf(Q_b)|."""
    conf = np.asarray(confidence, dtype=np.float64).ravel()
    corr = np.asarray(correct, dtype=np.float64).ravel()
    if conf.size == 0 or conf.size != corr.size:
        raise ValueError(f"ECE needs matching non-empty confidence/correct, got {conf.size} and {corr.size}")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    order = np.argsort(conf, kind="stable")
    return float(_ece_sorted(conf[order], corr[order], n_bins))


@numba.njit(inline="always")
def _nll_row(z, zy, beta, i):
    """Row i's terms of _nll_derivatives: (d/d beta, d2/d beta2) of logsumexp(beta z_i) - beta z_iy."""
    s, sz, szz = 0.0, 0.0, 0.0
    for j in range(z.shape[1]):
        e = np.exp(beta * z[i, j])
        s += e
        sz += e * z[i, j]
        szz += e * z[i, j] * z[i, j]
    ez = sz / s
    return ez - zy[i], max(szz / s - ez * ez, 0.0)


@numba.njit(cache=True)
def _nll_serial(z, zy, beta):
    n = z.shape[0]
    grad, hess = 0.0, 0.0
    for i in range(n):
        g, h = _nll_row(z, zy, beta, i)
        grad += g
        hess += h
    return grad / n, hess / n


@numba.njit(parallel=True, cache=True)
def _nll_parallel(z, zy, beta):
    # the rows' terms in parallel (the exponentials are the work), summed in row order as _nll_serial sums them
    n = z.shape[0]
    terms = np.empty((n, 2))
    for i in numba.prange(n):
        terms[i, 0], terms[i, 1] = _nll_row(z, zy, beta, i)
    grad, hess = 0.0, 0.0
    for i in range(n):
        grad += terms[i, 0]
        hess += terms[i, 1]
    return grad / n, hess / n


def _nll_derivatives(z, zy, beta):
    """First and second derivative in beta of mean_i [logsumexp(beta z_i) - beta z_iy], for rows z_i whose largest
    entry is 0 (so exp(beta z) never overflows): one pass per row, no temporaries (a fit calls it ~20 times). Large
    inputs compute the rows on the shared thread pool and add them in the serial order: the same bits either way."""
    if z.size >= PARALLEL_ELEMENTS:
        cpu.match_torch_threads()
        return _nll_parallel(z, zy, beta)
    return _nll_serial(z, zy, beta)


def fit_temperature(logits, labels, max_iter: int = 100) -> float:
    """Scalar T > 0 minimising the NLL of softmax(logits / T) (Guo et al., 2017), fitted on V2 logits."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels).astype(np.int64).ravel()
    if z.ndim != 2 or z.shape[0] != y.size or z.shape[0] == 0:
        raise ValueError(f"fit_temperature needs logits (N, K) and labels (N,), got {z.shape} and {y.shape}")
    z = np.ascontiguousarray(z - z.max(axis=1, keepdims=True))  # a per-row shift changes no softmax at any T
    zy = z[np.arange(y.size), y]
    t_min, t_max = TEMPERATURE_BOUNDS
    lo, hi = 1.0 / t_max, 1.0 / t_min
    if _nll_derivatives(z, zy, lo)[0] >= 0.0:
        return t_max
    if _nll_derivatives(z, zy, hi)[0] <= 0.0:
        return t_min
    beta = min(max(1.0, lo), hi)
    for _ in range(max_iter):
        grad, hess = _nll_derivatives(z, zy, beta)
        if grad > 0.0:
            hi = beta
        else:
            lo = beta
        step = beta - grad / hess if hess > 0.0 else math.nan
        if abs(step - beta) <= 1e-12 * beta:
            # converged: tested before the bracket, whose end the step may sit on (at grad ~ 0 the bracket's end is
            # beta itself and a strict test sent the search off bisecting from there)
            beta = step
            break
        new = step if lo < step < hi else 0.5 * (lo + hi)  # Newton inside the bracket, else bisect
        if abs(new - beta) <= 1e-12 * beta:
            beta = new
            break
        beta = new
    return float(1.0 / beta)


# ---------------------------------------------------------------- conformal sets (eqs. 2, 10; appendix 9.3)

def _scores(probs: np.ndarray) -> np.ndarray:
    # One definition of the score for calibration and evaluation, so that thresholds and sets compare exactly.
    return 1.0 - np.asarray(probs, dtype=np.float64)


def _check_alphas(alphas) -> np.ndarray:
    a = np.atleast_1d(np.asarray(alphas, dtype=np.float64))
    if a.ndim != 1 or np.any(a < 0.0) or np.any(a >= 1.0):
        raise ValueError(f"alphas must be in [0, 1), got {alphas}")
    return a


def _grouped_thresholds(scores: np.ndarray, groups: np.ndarray, n_groups: int, alphas: np.ndarray):
    """Per group g and alpha: the ceil((n_g+1)(1-alpha))-th smallest score of that group -> ((A, G), counts)."""
    order = np.lexsort((scores, groups))
    ordered = scores[order]
    counts = np.bincount(groups, minlength=n_groups)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    k = np.ceil((counts[None, :] + 1) * (1.0 - alphas[:, None]) - _QUANTILE_EPS).astype(np.int64)
    k = np.maximum(k, 1)
    inside = k <= counts[None, :]
    idx = np.where(inside, starts[None, :] + k - 1, 0)
    thr = np.where(inside, ordered[idx] if ordered.size else 0.0, 1.0)  # beyond the sample: full sets
    return thr, counts


def conformal_threshold(scores_true_class, alpha: float) -> float:
    """Split-conformal threshold (eq. 10): the ceil((n+1)(1-alpha))-th smallest score, 1.0 when that is > n."""
    s = np.asarray(scores_true_class, dtype=np.float64).ravel()
    thr, _ = _grouped_thresholds(s, np.zeros(s.size, dtype=np.int64), 1, _check_alphas(alpha))
    return float(thr[0, 0])


def conformal_thresholds(method: str, true_probs, exit_index, alphas) -> np.ndarray:
    """(A, L) thresholds tau_l per alpha from a calibration split (V2), by one of the four 9.3 constructions.

    true_probs: (N, L) probability each exit's IM gives the true class; exit_index: (N,) exit each sample takes.
    """
    if method not in CONFORMAL_METHODS:
        raise ValueError(f"unknown conformal method {method!r}; choose from {', '.join(CONFORMAL_METHODS)}")
    tp = np.asarray(true_probs)
    ex = np.asarray(exit_index).astype(np.int64)
    if tp.ndim != 2 or ex.shape != (tp.shape[0],) or tp.shape[0] == 0:
        raise ValueError(f"need true_probs (N, L) and exit_index (N,), got {tp.shape} and {ex.shape}")
    n, n_exits = tp.shape
    a = _check_alphas(alphas)
    exited = _scores(tp[np.arange(n), ex])
    general, _ = _grouped_thresholds(exited, np.zeros(n, dtype=np.int64), 1, a)
    general = np.repeat(general, n_exits, axis=1)
    if method == "general":
        return general
    if method == "ims":  # every IM calibrated on all of V, wherever the sample exits
        thr, _ = _grouped_thresholds(_scores(tp).ravel(), np.tile(np.arange(n_exits), n), n_exits, a)
        return thr
    thr, counts = _grouped_thresholds(exited, ex, n_exits, a)
    if method == "strict":
        return np.where(counts[None, :] == 0, 0.0, thr)
    return np.where(counts[None, :] < GATED_MIN_SAMPLES, general, thr)


@numba.njit(inline="always")
def _count_row(sorted_scores, ascending, order, exit_index, out, i):
    """Set sizes of sample i at every alpha: one walk up its sorted scores against its exit's thresholds in
    ascending order (counts as searchsorted(side="right") gives them; a NaN threshold, sorted last, counts all)."""
    row, l = sorted_scores[i], exit_index[i]
    j, k = 0, row.shape[0]
    for a in range(ascending.shape[1]):
        t = ascending[l, a]
        if np.isnan(t):
            j = k
        while j < k and row[j] <= t:
            j += 1
        out[order[l, a], i] = j


@numba.njit(cache=True)
def _count_serial(sorted_scores, ascending, order, exit_index, out):
    for i in range(sorted_scores.shape[0]):
        _count_row(sorted_scores, ascending, order, exit_index, out, i)


@numba.njit(parallel=True, cache=True)
def _count_parallel(sorted_scores, ascending, order, exit_index, out):
    for i in numba.prange(sorted_scores.shape[0]):
        _count_row(sorted_scores, ascending, order, exit_index, out, i)


def _count_at_most(sorted_scores, thresholds, exit_index):
    """(A, N) counts of sample i's sorted scores (N, K) <= thresholds[a, exit_index[i]] (thresholds (A, L)): one
    merge of each row with its exit's sorted thresholds, on the shared thread pool when there are enough rows to pay
    for a launch (counts: the same either way)."""
    order = np.argsort(thresholds.T, axis=1, kind="stable")               # (L, A)
    ascending = np.ascontiguousarray(np.take_along_axis(thresholds.T, order, axis=1))
    out = np.empty((thresholds.shape[0], sorted_scores.shape[0]), dtype=np.int64)
    args = (sorted_scores, ascending, order, exit_index, out)
    if sorted_scores.size >= PARALLEL_ELEMENTS:
        cpu.match_torch_threads()
        _count_parallel(*args)
    else:
        _count_serial(*args)
    return out


def conformal_coverage(probs_exited, labels, exit_index, thresholds) -> tuple[np.ndarray, np.ndarray]:
    """Eq. 2 for each row of thresholds (A, L): empirical coverage (A,) and inefficiency = mean set size (A,).
    Put every alpha of interest in one call: the scores are sorted once per call."""
    p = np.asarray(probs_exited)
    y = np.asarray(labels).astype(np.int64)
    ex = np.asarray(exit_index).astype(np.int64)
    thresholds = np.atleast_2d(np.asarray(thresholds, dtype=np.float64))
    s = _scores(p)
    covered = s[np.arange(y.size), y][None, :] <= thresholds[:, ex]   # (A, N): each sample against its own tau
    sizes = _count_at_most(np.sort(s, axis=1), thresholds, ex)
    return covered.mean(axis=1), sizes.mean(axis=1)


def reported_alphas(alpha: float = 0.05) -> np.ndarray:
    """The alpha' grid of the appendix 9.3 reporting rule: alpha, 0.9 alpha, ..., 0."""
    return _check_alphas(alpha)[0] * (1.0 - np.arange(11) / 10.0)


def pick_reported(coverage, inefficiency, used, alpha: float = 0.05) -> tuple[float, float, float]:
    """Of the coverages at the alpha' grid `used`, the first reaching 1 - alpha (else the last) ->
    (coverage, inefficiency, alpha')."""
    hit = np.flatnonzero(np.asarray(coverage) >= 1.0 - alpha - 1e-12)
    j = int(hit[0]) if hit.size else len(used) - 1
    return float(coverage[j]), float(inefficiency[j]), float(used[j])


def conformal_sets(probs_exited, exit_index, thresholds) -> np.ndarray:
    """(N, K) boolean prediction sets C_i = {k : 1 - p_ik <= tau_{exit_i}} for thresholds (L,)."""
    thr = np.asarray(thresholds, dtype=np.float64)
    return _scores(probs_exited) <= thr[np.asarray(exit_index).astype(np.int64)][:, None]


def reported_conformal(method: str, cal_true_probs, cal_exit, probs_exited, labels, exit_index,
                       alpha: float = 0.05) -> tuple[float, float, float]:
    """Appendix 9.3 reporting rule -> (coverage, inefficiency, alpha' used) on the evaluated split."""
    used = reported_alphas(alpha)
    thr = conformal_thresholds(method, cal_true_probs, cal_exit, used)
    coverage, inefficiency = conformal_coverage(probs_exited, labels, exit_index, thr)
    return pick_reported(coverage, inefficiency, used, alpha)


# ---------------------------------------------------------------- intervals (appendix 9.1.1)

def bootstrap_ci(values_per_sample, n_partitions: int = 10, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): percentile bootstrap over the means of n_partitions random partitions of the split."""
    v = np.asarray(values_per_sample, dtype=np.float64).ravel()
    if n_partitions < 2 or v.size < n_partitions:
        raise ValueError(f"bootstrap_ci needs >= n_partitions >= 2 samples, got {v.size} for {n_partitions}")
    rng = np.random.default_rng(seed)
    shuffled = v[rng.permutation(v.size)]  # stored order may be sorted by class: partition at random
    bounds = (np.arange(n_partitions) * v.size) // n_partitions
    means = np.add.reduceat(shuffled, bounds) / np.diff(np.append(bounds, v.size))
    boot = means[rng.integers(0, n_partitions, (BOOTSTRAP_RESAMPLES, n_partitions))].mean(axis=1)
    low, high = np.quantile(boot, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return float(v.mean()), float(low), float(high)

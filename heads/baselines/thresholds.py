"""Threshold gating with MSDNet's budgeted search (Huang et al. 2018), as used by BoostedNet and L2W-DEN.

A sample leaves at the first exit whose max softmax probability reaches that exit's threshold; the last exit takes
everything left. One operating point per budget parameter p: the target share of samples leaving at exit k is
proportional to p^k (k = 0..L-1, normalised), so p < 1 favours early exits and p > 1 late ones. Thresholds are fitted
on V1 so that exactly those shares leave, then applied unchanged to V2 and test:

    conf_v1 = max_softmax(v1_logits)                       # (N, L)
    thr, _ = fit_thresholds(conf_v1, budget_fractions(0.5, L))
    exit_index = exit_by_thresholds(max_softmax(test_logits), thr)

The search is sequential over exits (L small) and vectorised over samples: at exit k, among the samples still in
flight, the threshold is the confidence of the last sample that must leave for the cumulative target count to be
met. Cumulative targets (rounded once) keep every exit within one sample of its requested share and let a later
exit absorb any overshoot from tied confidences. Everything is torch, so the same routine routes a mini-batch on the
GPU inside L2W-DEN's meta step (heads/baselines/methods.py) and fits thresholds on V1.
"""
import math

import numba
import numpy as np
import torch

# MSDNet's / BoostedNet's / L2W-DEN's evaluation grid: p = 1/20, 2/20, ..., 39/20.
DEFAULT_P_GRID = tuple(i / 20 for i in range(1, 40))


def budget_fractions(p: float, n_exits: int) -> torch.Tensor:
    """Target share of samples leaving at each exit: p^k / sum_j p^j, k = 0..L-1 (float64, sums to 1)."""
    if not p > 0:
        raise ValueError(f"budget parameter p must be > 0, got {p}")
    if n_exits < 1:
        raise ValueError(f"need at least one exit, got {n_exits}")
    # In log space so large L or p far from 1 neither overflows nor underflows before normalising.
    log_w = torch.arange(n_exits, dtype=torch.float64) * float(np.log(p))
    return torch.softmax(log_w, dim=0)


def max_softmax(logits: torch.Tensor | np.ndarray) -> torch.Tensor:
    """(..., K) logits -> (...) max softmax probability, in float64 so confident samples do not all tie at 1.0."""
    logits = torch.as_tensor(logits).double()
    # max_k softmax_k = 1 / sum_k exp(l_k - max l): exact, no (..., K) probability tensor kept around.
    return 1.0 / torch.exp(logits - logits.amax(-1, keepdim=True)).sum(-1)


def fit_thresholds(confidence: torch.Tensor, fractions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Thresholds (L,) that make `fractions` of the samples leave at each exit, and the resulting exit_index (N,).

    confidence: (N, L) exit confidences (max softmax). A threshold of +inf closes an exit, the last one is -inf.
    """
    if confidence.ndim != 2:
        raise ValueError(f"confidence must be (N, L), got shape {tuple(confidence.shape)}")
    n, n_exits = confidence.shape
    fractions = torch.as_tensor(fractions, dtype=torch.float64)
    if fractions.shape != (n_exits,) or (fractions < 0).any() or abs(float(fractions.sum()) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be {n_exits} non-negative shares summing to 1, got {fractions.tolist()}")
    device = confidence.device
    # Cumulative target counts, rounded once: |count_k - N f_k| < 1 for every exit and the counts sum to N.
    cum_target = torch.round(n * torch.cumsum(fractions, 0)).long().tolist()
    thresholds = torch.full((n_exits,), float("inf"), dtype=confidence.dtype, device=device)
    thresholds[-1] = float("-inf")
    exit_index = torch.full((n,), n_exits - 1, dtype=torch.long, device=device)
    in_flight = torch.ones(n, dtype=torch.bool, device=device)
    n_out = 0
    for k in range(n_exits - 1):
        want = cum_target[k] - n_out          # <= samples in flight, since cum_target <= N
        if want <= 0:
            continue
        conf_k = torch.where(in_flight, confidence[:, k], float("-inf"))
        thr = torch.topk(conf_k, want, sorted=True).values[-1]
        leaving = in_flight & (confidence[:, k] >= thr)
        thresholds[k] = thr
        exit_index[leaving] = k
        in_flight &= ~leaving
        n_out += int(leaving.sum())
    return thresholds, exit_index


def cumulative_targets(n: int, fractions: torch.Tensor) -> np.ndarray:
    """fit_thresholds' cumulative target counts of n samples (L,) int64: round(n * cumsum(fractions)), once."""
    return torch.round(n * torch.cumsum(torch.as_tensor(fractions, dtype=torch.float64), 0)).long().numpy()


@numba.njit(cache=True)
def route_by_budget(confidence, cum_target):
    """fit_thresholds' exit_index for a small batch, in one compiled pass: confidence (N, L) float64 numpy,
    cum_target from cumulative_targets. The same search: at exit k the threshold is the want-th largest confidence
    among the samples in flight, and every sample in flight at or above it leaves (ties leave together). L2W-DEN
    routes every meta half-batch this way, where fit_thresholds' dozen torch ops per exit cost more than the
    routing itself (tests/test_baselines.py checks both agree, ties included)."""
    n, n_exits = confidence.shape
    exit_index = np.full(n, n_exits - 1, dtype=np.int64)
    in_flight = np.ones(n, dtype=np.bool_)
    vals = np.empty(n)
    n_out = 0
    for k in range(n_exits - 1):
        want = cum_target[k] - n_out
        if want <= 0:
            continue
        for i in range(n):
            vals[i] = confidence[i, k] if in_flight[i] else -np.inf
        thr = np.sort(vals)[n - want]
        for i in range(n):
            if in_flight[i] and confidence[i, k] >= thr:
                exit_index[i] = k
                in_flight[i] = False
                n_out += 1
    return exit_index


def exit_by_thresholds(confidence: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """(N, L) confidences, (L,) thresholds -> (N,) first exit whose confidence reaches its threshold."""
    leaves = confidence >= thresholds.to(confidence)
    leaves[:, -1] = True
    return leaves.int().argmax(dim=1)    # argmax returns the first maximal index


def threshold_sweep(v1_logits, eval_logits: dict, p_grid=DEFAULT_P_GRID) -> list[dict]:
    """For each p: thresholds fitted on V1 logits (N1, L, K), exit_index (numpy) for every split in eval_logits.

    Returns [{"p", "thresholds" (L,) numpy, "fractions" (L,) numpy, "v1_exit_index", <split>: exit_index}, ...].
    """
    return budget_sweep(max_softmax(v1_logits), {name: max_softmax(z) for name, z in eval_logits.items()}, p_grid)


def budget_sweep(conf_v1: torch.Tensor, conf_eval: dict, p_grid=DEFAULT_P_GRID) -> list[dict]:
    """threshold_sweep on any per-exit confidence (N, L): max softmax for the baselines, JEI-DNN's learned
    P(E^l|x) for its budgeted models (heads/sweep/compare.py, method "jei-budget")."""
    n_exits = conf_v1.shape[1]
    points = []
    for p in p_grid:
        fractions = budget_fractions(float(p), n_exits)
        thr, v1_exit = fit_thresholds(conf_v1, fractions)
        point = {"p": float(p), "thresholds": thr.cpu().numpy(), "fractions": fractions.numpy(),
                 "v1_exit_index": v1_exit.cpu().numpy()}
        for name, conf in conf_eval.items():
            point[name] = exit_by_thresholds(conf, thr).cpu().numpy()
        points.append(point)
    return points


def budget_for_cost(confidence: torch.Tensor, ic_norm, target: float, lo: float = 1e-6, hi: float = 1e6,
                    steps: int = 60) -> float:
    """The budget parameter p whose thresholds, fitted on `confidence` (N, L) with fit_thresholds, spend the most
    mean normalised cost that is still <= target on those samples. The shares of budget_fractions move to later
    exits as p grows, so log p is bisected on the cost the fitted thresholds really give: saturated confidences
    tie (many exactly 1.0) and a tie leaves together, so the shares alone would overshoot at the early exits and
    spend less than asked. ValueError when the target lies below the first exit's cost."""
    ic_norm = np.asarray(ic_norm, dtype=np.float64)
    n_exits = ic_norm.shape[0]
    if not target > float(ic_norm[0]):
        raise ValueError(f"a target cost of {target:g} lies at or below the first exit's cost {float(ic_norm[0]):.3f}")

    def spent(p):
        _, exits = fit_thresholds(confidence, budget_fractions(p, n_exits))
        return float(ic_norm[exits.cpu().numpy()].mean())

    if spent(hi) <= target:
        return hi
    for _ in range(steps):
        mid = math.sqrt(lo * hi)
        if spent(mid) <= target:
            lo = mid
        else:
            hi = mid
    return lo


def shared_threshold_for_cost(confidence: torch.Tensor, ic_norm, target: float, steps: int = 50) -> float | None:
    """One threshold t for every exit (a sample leaves at the first exit whose confidence exceeds t: the learned
    gates' own rule with t in place of 0.5) that spends the most mean normalised cost still <= target on these
    samples; cost grows with t, so t is bisected. None when even the largest t spends less than target - 0.03 or
    the smallest more than target (the rule cannot be moved that far)."""
    ic_norm = np.asarray(ic_norm, dtype=np.float64)

    def spent(t):
        leaves = confidence > t
        leaves[:, -1] = True
        return float(ic_norm[leaves.int().argmax(1).cpu().numpy()].mean())

    lo, hi = 0.0, float(np.nextafter(1.0, 0.0))
    if spent(lo) > target or spent(hi) < target - 0.03:
        return None
    if spent(hi) <= target:
        return hi
    for _ in range(steps):
        mid = (lo + hi) / 2
        if spent(mid) <= target:
            lo = mid
        else:
            hi = mid
    return lo

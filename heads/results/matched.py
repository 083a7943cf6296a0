"""Accuracy at matched inference costs, read off each method's upper envelope, and the area under its curve.

    table = matched_costs(rows, split="test")        # one dict per method and matched cost (CSV-ready)
    print(matched_table(table))                      # methods x costs, with the AUC over the common cost range

A method's operating points (heads/results/report.py curves(): one per lambda or per budget p; the single exits as a
reference) are reduced to their upper envelope: the points that no other point beats at the same or a lower
cost (sorted by cost, each strictly more accurate than every cheaper one). Between two envelope points the
accuracy and both 95% bounds are interpolated linearly (the bounds of the two neighbours, weighted alike: an
approximation, not a fresh bootstrap). Past the most accurate point the envelope stays flat, also beyond the
method's most expensive point: a model that spends less is available at any larger budget, so the value at cost c is
at least the best accuracy among the method's points at cost <= c. Below a method's cheapest point every value is
NaN: nothing it trained spends that little.

The area under the curve is the integral of the envelope's accuracy over the cost range that EVERY compared
method covers (largest of the cheapest costs to smallest of the most expensive costs; the single exits and methods
whose points all sit at one cost do not narrow it, and get NaN when they do not cover it), so the areas are
comparable; divided by the range's width it is the mean accuracy over that range. The range is printed with the
table and stored in every CSV row (auc_cost_low, auc_cost_high).
"""
import math

import numpy as np

from heads.results.report import curves

MATCHED_COSTS = tuple(round(0.1 * i, 1) for i in range(3, 10))   # 0.3, 0.4, ..., 0.9 of IC^L
REFERENCE = "single-exit"


def upper_envelope(cost, accuracy) -> np.ndarray:
    """Indices of the envelope points in increasing cost: each strictly more accurate than every cheaper point."""
    cost, accuracy = np.asarray(cost, dtype=float), np.asarray(accuracy, dtype=float)
    if cost.shape != accuracy.shape or cost.ndim != 1 or cost.size == 0:
        raise ValueError(f"need two equal-length non-empty 1-D arrays, got {cost.shape} and {accuracy.shape}")
    order = np.lexsort((-accuracy, cost))            # by cost; at equal cost the most accurate first
    ranked = accuracy[order]
    best_before = np.maximum.accumulate(np.r_[-np.inf, ranked[:-1]])
    return order[ranked > best_before]


def envelope_at(cost, accuracy, at, low=None, high=None) -> tuple[np.ndarray, ...]:
    """The envelope's accuracy (and interpolated bounds `low`, `high` when given) at the costs `at`; NaN below
    min(cost), the best point's values above max(cost)."""
    cost, accuracy = np.asarray(cost, dtype=float), np.asarray(accuracy, dtype=float)
    at = np.atleast_1d(np.asarray(at, dtype=float))
    keep = upper_envelope(cost, accuracy)
    outside = at < cost.min()
    out = []
    for values in (accuracy, low, high):
        if values is not None:
            # np.interp holds the last value past the last envelope point: the flat part of the envelope
            v = np.interp(at, cost[keep], np.asarray(values, dtype=float)[keep])
            out.append(np.where(outside, np.nan, v))
    return tuple(out)


def area_under(cost, accuracy, lo: float, hi: float) -> float:
    """Integral of the envelope's accuracy over [lo, hi] (exact: the envelope is piecewise linear); NaN when the
    method does not cover [lo, hi] or the range is empty."""
    cost, accuracy = np.asarray(cost, dtype=float), np.asarray(accuracy, dtype=float)
    if not lo < hi or lo < cost.min() or hi > cost.max():
        return math.nan
    keep = upper_envelope(cost, accuracy)
    x = cost[keep]
    grid = np.unique(np.r_[lo, hi, x[(x > lo) & (x < hi)]])
    return float(np.trapezoid(np.interp(grid, x, accuracy[keep]), grid))


def common_range(points: dict[str, list[dict]]) -> tuple[float, float]:
    """(lo, hi): the normalised-cost range every compared method covers. Left out: the single exits (a
    reference), methods whose points all cost the same (no curve to integrate; their area is NaN), and, when the
    ranges do not overlap, the narrowest methods until the rest do. lo >= hi only when no two ranges overlap."""
    spans = {m: (min(r["cost_norm"] for r in pts), max(r["cost_norm"] for r in pts)) for m, pts in points.items()}
    methods = [m for m, (a, b) in spans.items() if m != REFERENCE and a < b] or list(spans)
    # a method with a narrow range (DiffBranch often sits at one cost) would empty the intersection for everyone:
    # leave out the narrowest methods, one at a time, until the others overlap (those left out get NaN areas)
    while len(methods) > 1 and max(spans[m][0] for m in methods) >= min(spans[m][1] for m in methods):
        methods.remove(min(methods, key=lambda m: spans[m][1] - spans[m][0]))
    return max(spans[m][0] for m in methods), min(spans[m][1] for m in methods)


def method_points(rows: list[dict]) -> dict[str, list[dict]]:
    """method -> its operating points (report.curves) plus the single exits as the reference "single-exit"."""
    points = curves(rows)
    singles = [r for r in rows if r["method"] == REFERENCE]
    if singles:
        points[REFERENCE] = sorted(singles, key=lambda r: r["cost_norm"])
    return points


def matched_costs(rows: list[dict], split: str = "test", costs=MATCHED_COSTS) -> list[dict]:
    """One dict per method and matched cost: method, split, cost_norm, accuracy, accuracy_ci_low,
    accuracy_ci_high (NaN below the method's cheapest point), and the method's auc over [auc_cost_low,
    auc_cost_high] with auc_mean_accuracy = auc / (auc_cost_high - auc_cost_low)."""
    rows = [r for r in rows if r["split"] == split]
    points = method_points(rows)
    if not points:
        raise ValueError(f"the results hold no operating points of split {split!r}")
    if any(not 0 < c <= 1 for c in costs):
        raise ValueError(f"matched costs are fractions of IC^L in (0, 1], got {list(costs)}")
    lo, hi = common_range(points)
    table = []
    for method, pts in points.items():
        cost = [r["cost_norm"] for r in pts]
        acc, low, high = envelope_at(cost, [r["accuracy"] for r in pts], costs,
                                     [r["accuracy_ci_low"] for r in pts], [r["accuracy_ci_high"] for r in pts])
        auc = area_under(cost, [r["accuracy"] for r in pts], lo, hi)
        mean = auc / (hi - lo) if hi > lo else math.nan
        for c, a, l, h in zip(costs, acc, low, high):
            table.append({"method": method, "split": split, "cost_norm": float(c), "accuracy": float(a),
                          "accuracy_ci_low": float(l), "accuracy_ci_high": float(h), "auc": auc,
                          "auc_cost_low": lo, "auc_cost_high": hi, "auc_mean_accuracy": mean})
    return table


def _cell(a, low, high) -> str:
    if math.isnan(a):
        return f"{'-':^17}"
    return f"{100 * a:5.1f} [{100 * low:4.1f},{100 * high:5.1f}]"


def matched_table(table: list[dict]) -> str:
    """matched_costs' dicts as text: one line per method, accuracy [95% CI] in % at each cost, then the AUC."""
    costs = list(dict.fromkeys(r["cost_norm"] for r in table))
    methods = list(dict.fromkeys(r["method"] for r in table))
    first = table[0]
    lo, hi = first["auc_cost_low"], first["auc_cost_high"]
    span = f"[{lo:.3f}, {hi:.3f}] of IC^L" if lo < hi else "(empty: the methods' cost ranges do not overlap)"
    lines = [f"accuracy at matched cost ({first['split']} split; upper envelope, linear interpolation, flat past "
             f"a method's most accurate point; '-' below its cheapest point); AUC over the common cost range {span}",
             f"{'method':<17}" + "".join(f"{f'cost {c:g}':^18}" for c in costs) + f"{'AUC':>8} {'mean acc':>9}"]
    for method in methods:
        mine = {r["cost_norm"]: r for r in table if r["method"] == method}
        cells = "".join(" " + _cell(mine[c]["accuracy"], mine[c]["accuracy_ci_low"], mine[c]["accuracy_ci_high"])
                        for c in costs)
        auc, mean = mine[costs[0]]["auc"], mine[costs[0]]["auc_mean_accuracy"]
        tail = f"{auc:>8.4f} {100 * mean:>8.2f}%" if not math.isnan(auc) else f"{'-':>8} {'-':>9}"
        lines.append(f"{method:<17}{cells}{tail}")
    return "\n".join(lines)

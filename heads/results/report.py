"""Plots and a plain-text table from a run directory, drawn like the paper's figures 2, 3 and 5.

    python pipeline.py report RUN [--lam 1.0] [--split test]
    paths = write_plots(rows, RUN, lam=None, split="test")     # the PNGs below, in RUN
    print(results_table(rows, split="test"))

The x axis is always the expected Mul-Adds normalised by the full network's, IC^L (as in the paper).
    accuracy_vs_cost.png      figure 2: accuracy of the selected models with the 95% CI as a band, the fixed
                              single exits as points, the other grid trials as small dots, the gate-threshold
                              curves of the selected models as thin lines, a star at the decomposed model
    ece_vs_cost.png           figure 5a: ECE before (solid) and after (dashed) temperature scaling
    inefficiency_vs_cost.png  figure 5b: conformal inefficiency at empirical coverage >= 95% (appendix 9.3 rule),
                              one line per construction (general, ims, strict, gated)
    alpha_vs_alpha.png        figure 5c: empirical alpha (1 - coverage) vs requested alpha, averaged over the
                              selected models
    exit_decomposition.png    figure 3: (a) accuracy of each IM on the samples that exit there, (b) on all
                              samples; circle area proportional to the exit count; dotted line: overall accuracy

Rows are grouped by their `method` column, so a results table that holds several methods (a `compare` run)
overlays them with one colour per method; "single-exit" and "jei-threshold" rows are drawn as references. With
several methods figures 5b/5c show one conformal construction per method ("gated": thresholds per exit, fitted on
the V2 samples that exit there), so that the methods, not the constructions, are compared.

A compare run also gets (write_compare_plots, given heads/results/matched.py's matched-cost table):
    ablation.png                    figure 9: JEI-DNN vs learnable gates on fixed IMs ("fixed-ims") vs threshold
                                    gates on JEI-DNN's warmed-up IMs ("threshold-warmup"), with 95% bands
    exit_decomposition_compare.png  figure 3 for JEI-DNN (the starred model) and the best baseline (largest area
                                    under its accuracy/cost envelope) at its operating point nearest in cost
"""
import math
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from heads.baselines.methods import METHODS
from heads.evaluation.metrics import CONFORMAL_METHODS
from heads.results.rundir import nearest_lambda

CONFORMAL = CONFORMAL_METHODS
COMPARED_CONFORMAL = "gated"     # the one construction drawn per method when several methods are overlaid
REFERENCE_METHODS = ("single-exit", "jei-threshold")
BASELINES = METHODS              # compare's baselines and ablations
ABLATION = {"jei": "JEI-DNN (gates and IMs trained jointly)", "fixed-ims": "learnable gates, fixed IMs",
            "threshold-warmup": "threshold gates, warm-up IMs"}            # appendix 9.6, figure 9
X_LABEL = "Mul-Add / IC$^L$"
TAB10 = colormaps["tab10"].colors


def _split(rows, split):
    return [r for r in rows if r["split"] == split]


def curves(rows: list[dict]) -> dict[str, list[dict]]:
    """method -> its curve points sorted by cost: the `selected` rows when the method has any, else all rows."""
    out = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        if method in REFERENCE_METHODS:
            continue
        mine = [r for r in rows if r["method"] == method]
        chosen = [r for r in mine if r.get("selected")] or mine
        out[method] = sorted(chosen, key=lambda r: r["cost_norm"])
    return out


def decomposition_row(rows: list[dict], lam: float | None = None) -> dict:
    """The selected "jei" row nearest to `lam` in log space; by default the middle lambda."""
    if lam is not None:
        return nearest_lambda(rows, lam)
    chosen = sorted((r for r in rows if r["method"] == "jei" and r.get("selected")), key=lambda r: r["lam"])
    if not chosen:
        raise ValueError("the run has no selected JEI-DNN model to decompose")
    return chosen[(len(chosen) - 1) // 2]


def _xy(points, key):
    return np.array([p["cost_norm"] for p in points]), np.array([p[key] for p in points], dtype=float)


def plot_accuracy(rows, path, star=None):
    fig, ax = _subplots(figsize=(6, 4.5))
    others = [r for r in rows if r["method"] == "jei" and not r.get("selected")]
    if others:
        x, y = _xy(others, "accuracy")
        ax.scatter(x, y, s=8, color="0.75", label="other grid trials", zorder=1)
    by_trial = {}
    for r in rows:
        if r["method"] == "jei-threshold" or (r["method"] == "jei" and r.get("selected")):
            by_trial.setdefault(r["trial"], []).append(r)
    for i, points in enumerate(p for p in by_trial.values() if len(p) > 1):
        x, y = _xy(sorted(points, key=lambda r: r["cost_norm"]), "accuracy")
        ax.plot(x, y, color="tab:blue", alpha=0.3, lw=0.8, label="gate threshold != 0.5" if i == 0 else None)
    for (method, points), color in zip(curves(rows).items(), TAB10):
        x, y = _xy(points, "accuracy")
        low, high = _xy(points, "accuracy_ci_low")[1], _xy(points, "accuracy_ci_high")[1]
        ax.plot(x, y, "o-", ms=3, color=color, label=method, zorder=3)
        ax.fill_between(x, low, high, color=color, alpha=0.25, lw=0, zorder=2)
    singles = sorted((r for r in rows if r["method"] == "single-exit"), key=lambda r: r["cost_norm"])
    if singles:
        x, y = _xy(singles, "accuracy")
        err = np.array([[r["accuracy"] - r["accuracy_ci_low"], r["accuracy_ci_high"] - r["accuracy"]]
                        for r in singles]).T
        ax.errorbar(x, y, yerr=err, fmt="s", ms=4, color="black", mfc="none", label="single exit (warm-up IMs)",
                    zorder=4)
    if star is not None:
        ax.plot(star["cost_norm"], star["accuracy"], "*", ms=14, color="gold", mec="black",
                label=f"decomposed (lambda {star['lam']:.3g})", zorder=5)
    _finish(fig, ax, X_LABEL, "accuracy", path)


def plot_ece(rows, path):
    fig, ax = _subplots(figsize=(6, 4.5))
    for (method, points), color in zip(curves(rows).items(), TAB10):
        ax.plot(*_xy(points, "ece"), "o-", ms=3, color=color, label=f"{method}: before temperature")
        ax.plot(*_xy(points, "ece_temp"), "o--", ms=3, color=color, label=f"{method}: after temperature")
    singles = sorted((r for r in rows if r["method"] == "single-exit"), key=lambda r: r["cost_norm"])
    if singles:
        ax.plot(*_xy(singles, "ece"), "s", ms=4, color="black", mfc="none", label="single exit")
    _finish(fig, ax, X_LABEL, "ECE (15 equal-mass bins)", path)


def _construction_style(method_color, construction, n_methods):
    """One method: a colour per conformal construction; several (one construction each): the method's colour."""
    if n_methods == 1:
        return {"color": TAB10[CONFORMAL.index(construction)], "ls": "-"}
    return {"color": method_color, "ls": "-"}


def _constructions(n_methods):
    return CONFORMAL if n_methods == 1 else (COMPARED_CONFORMAL,)


def plot_inefficiency(rows, path):
    fig, ax = _subplots(figsize=(6, 4.5))
    lines = curves(rows)
    for (method, points), color in zip(lines.items(), TAB10):
        for c in _constructions(len(lines)):
            key = f"reported_inefficiency_{c}"
            if key in points[0]:
                ax.plot(*_xy(points, key), marker="o", ms=3, label=f"{method}: {c}",
                        **_construction_style(color, c, len(lines)))
    _finish(fig, ax, X_LABEL, "inefficiency (mean set size), coverage >= 95%", path)


def plot_alpha(rows, path):
    fig, ax = _subplots(figsize=(5, 5))
    lines, top = curves(rows), 0.0
    for (method, points), color in zip(lines.items(), TAB10):
        if "conformal_alphas" not in points[0]:
            continue
        alphas = np.array(points[0]["conformal_alphas"], dtype=float)
        top = max(top, alphas.max())
        for c in _constructions(len(lines)):
            empirical = 1.0 - np.mean([p[f"coverage_{c}"] for p in points], axis=0)
            ax.plot(alphas, empirical, marker="o", ms=3, label=f"{method}: {c}",
                    **_construction_style(color, c, len(lines)))
    ax.plot([0, top], [0, top], color="0.5", lw=0.8, label="empirical = requested")
    _finish(fig, ax, "requested alpha", "empirical alpha (1 - coverage), mean over models", path)


def plot_ablation(rows, path):
    """Figure 9: accuracy vs cost of the methods of appendix 9.6 present in rows, each with its 95% band."""
    fig, ax = _subplots(figsize=(6, 4.5))
    colours = dict(zip(curves(rows), TAB10))
    for method, points in curves(rows).items():
        if method in ABLATION:
            x, y = _xy(points, "accuracy")
            ax.plot(x, y, "o-", ms=3, color=colours[method], label=ABLATION[method], zorder=3)
            ax.fill_between(x, _xy(points, "accuracy_ci_low")[1], _xy(points, "accuracy_ci_high")[1],
                            color=colours[method], alpha=0.25, lw=0, zorder=2)
    ax.set_title("ablation (appendix 9.6)", fontsize=10)
    _finish(fig, ax, X_LABEL, "accuracy", path)


def best_baseline(table: list[dict]) -> str | None:
    """The baseline with the largest area under its envelope in a matched-cost table (heads/results/matched.py); ties
    and NaN areas fall back to the best accuracy at the matched costs. None when the table holds no baseline."""
    scores = {}
    for r in table:
        if r["method"] in BASELINES:
            auc = -math.inf if math.isnan(r["auc"]) else r["auc"]
            best = scores.get(r["method"], (auc, -math.inf))[1]
            scores[r["method"]] = (auc, max(best, -math.inf if math.isnan(r["accuracy"]) else r["accuracy"]))
    return max(scores, key=scores.get) if scores else None


def nearest_in_cost(rows: list[dict], method: str, cost: float) -> dict:
    """The operating point of `method` (report curves) whose normalised cost is nearest `cost`."""
    return min(curves(rows)[method], key=lambda r: abs(r["cost_norm"] - cost))


def plot_decomposition_pair(jei: dict, other: dict, path):
    """Figure 3 with two methods on the same axes: per-exit accuracy on the exited samples (a) and on all (b)."""
    fig, axes = _subplots(1, 2, figsize=(10, 4), sharey=True)
    for row, color, shift in ((jei, "tab:blue", -0.12), (other, "tab:orange", 0.12)):
        hist = np.array(row["exit_hist"], dtype=float)
        exits = np.arange(1, hist.size + 1)
        sizes = 20 + 600 * hist / max(hist.max(), 1)
        name = "JEI-DNN" if row["method"] == "jei" else row["method"]
        label = f"{name}: cost {row['cost_norm']:.2f}, accuracy {row['accuracy']:.3f}"
        for ax, key in ((axes[0], "exit_acc_exited"), (axes[1], "exit_acc_all")):
            acc = np.array(row[key], dtype=float)
            ax.plot(exits + shift, acc, color=color, lw=0.8, alpha=0.5)
            ax.scatter((exits + shift)[hist > 0], acc[hist > 0], s=sizes[hist > 0], color=color, alpha=0.5,
                       edgecolor="black", label=label)
            ax.axhline(row["accuracy"], ls=":", color=color)
    for ax, title in ((axes[0], "a) accuracy of IM l on the samples exiting at l"),
                      (axes[1], "b) accuracy of IM l on all samples")):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("exit l (circle area: samples exited; dotted: overall accuracy)")
        ax.set_xticks(np.arange(1, len(jei["exit_hist"]) + 1))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(fontsize=8, loc="lower right", markerscale=0.4)
    fig.suptitle("exit decomposition: JEI-DNN vs the best baseline at a similar cost", fontsize=10)
    _save(fig, path)


def plot_decomposition(row, path):
    hist = np.array(row["exit_hist"], dtype=float)
    exits = np.arange(1, hist.size + 1)
    sizes = 20 + 600 * hist / max(hist.max(), 1)
    fig, axes = _subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, key, title in ((axes[0], "exit_acc_exited", "a) accuracy of IM l on the samples exiting at l"),
                           (axes[1], "exit_acc_all", "b) accuracy of IM l on all samples")):
        acc = np.array(row[key], dtype=float)
        ax.plot(exits, acc, color="tab:blue", lw=0.8, alpha=0.5)
        ax.scatter(exits[hist > 0], acc[hist > 0], s=sizes[hist > 0], color="tab:blue", alpha=0.6,
                   edgecolor="black")
        ax.axhline(row["accuracy"], ls=":", color="black", label=f"overall accuracy {row['accuracy']:.3f}")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("exit l (circle area: samples exited)")
        ax.set_xticks(exits)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    axes[0].set_ylabel("accuracy")
    fig.suptitle(f"exit decomposition, lambda {row['lam']:.3g}, cost {row['cost_norm']:.2f} IC$^L$", fontsize=10)
    _save(fig, path)


def _subplots(nrows: int = 1, ncols: int = 1, **kwargs):
    """A figure that is only ever written to a file: matplotlib's Figure with its own canvas, so no pyplot state and
    no global backend (a notebook's own backend stays as the user set it)."""
    fig = Figure(figsize=kwargs.pop("figsize", None))
    return fig, fig.subplots(nrows, ncols, **kwargs)


def _finish(fig, ax, xlabel, ylabel, path):
    """The single-panel figures' common ending: labels, grid, legend, save."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def _save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_plots(rows: list[dict], out, lam: float | None = None, split: str = "test") -> list[Path]:
    """All five PNGs for one split into `out`; returns their paths."""
    out, rows = Path(out), _split(rows, split)
    if not rows:
        raise ValueError(f"the results hold no rows of split {split!r}")
    star = decomposition_row(rows, lam) if any(r["method"] == "jei" for r in rows) else None
    paths = {name: out / name for name in ("accuracy_vs_cost.png", "ece_vs_cost.png", "inefficiency_vs_cost.png",
                                           "alpha_vs_alpha.png", "exit_decomposition.png")}
    plot_accuracy(rows, paths["accuracy_vs_cost.png"], star)
    plot_ece(rows, paths["ece_vs_cost.png"])
    plot_inefficiency(rows, paths["inefficiency_vs_cost.png"])
    plot_alpha(rows, paths["alpha_vs_alpha.png"])
    if star is None:
        del paths["exit_decomposition.png"]
    else:
        plot_decomposition(star, paths["exit_decomposition.png"])
    return list(paths.values())


def write_compare_plots(rows: list[dict], out, table: list[dict], lam: float | None = None,
                        split: str = "test") -> list[Path]:
    """The compare figures (module docstring) that the rows allow: ablation.png when JEI-DNN and an ablation are
    present, exit_decomposition_compare.png when JEI-DNN and a baseline are. table:
    heads.results.matched.matched_costs."""
    out, rows, paths = Path(out), _split(rows, split), []
    present = set(curves(rows))
    if "jei" in present and present & (set(ABLATION) - {"jei"}):
        paths.append(out / "ablation.png")
        plot_ablation(rows, paths[-1])
    other = best_baseline(table)
    if "jei" in present and other is not None:
        star = decomposition_row(rows, lam)
        paths.append(out / "exit_decomposition_compare.png")
        plot_decomposition_pair(star, nearest_in_cost(rows, other, star["cost_norm"]), paths[-1])
    return paths


def _param(r) -> str:
    """The lambda of a row, or p= of a threshold-gated baseline row."""
    if r.get("lam") is not None:
        return f"{r['lam']:>9.4g}"
    return f"{'p=' + format(r['p'], '.3g'):>9}"


def results_table(rows: list[dict], split: str = "test") -> str:
    """The selected models (one line per lambda) and the single-exit references, as plain text."""
    rows = _split(rows, split)
    lines = [f"{'lambda':>9} {'trial':>5}  {split + ' accuracy':>17}  {'cost':>5}  {'ECE':>6}  {'ECE(T)':>6}  "
             f"{'ineff':>6}  {'epochs':>6}"]
    for method, points in curves(rows).items():
        if len(curves(rows)) > 1:
            lines.append(f"[{method}]")
        for r in sorted(points, key=lambda r: next(r[k] for k in ("lam", "p", "cost_norm") if r.get(k) is not None)):
            half = (r["accuracy_ci_high"] - r["accuracy_ci_low"]) / 2
            trial = "-" if r.get("trial") is None else r["trial"]
            lines.append(f"{_param(r)} {trial:>5}  {100 * r['accuracy']:>8.2f} +- {100 * half:>5.2f}  "
                         f"{r['cost_norm']:>5.3f}  {r['ece']:>6.4f}  {r['ece_temp']:>6.4f}  "
                         f"{r['reported_inefficiency_gated']:>6.2f}  {r['epochs']:>6}")
    singles = sorted((r for r in rows if r["method"] == "single-exit"), key=lambda r: r["exit"])
    if singles:
        lines.append("single exits (warm-up IMs; the last is the backbone's head when it is the task's):")
        lines.append(f"{'exit':>9} {'':>5}  {split + ' accuracy':>17}  {'cost':>5}  {'ECE':>6}  {'ECE(T)':>6}  "
                     f"{'ineff':>6}")
        for r in singles:
            half = (r["accuracy_ci_high"] - r["accuracy_ci_low"]) / 2
            lines.append(f"{r['exit']:>9} {'':>5}  {100 * r['accuracy']:>8.2f} +- {100 * half:>5.2f}  "
                         f"{r['cost_norm']:>5.3f}  {r['ece']:>6.4f}  {r['ece_temp']:>6.4f}  "
                         f"{r['reported_inefficiency_gated']:>6.2f}")
    lines.append("accuracy in %, +- half the 95% CI; cost = Mul-Add / IC^L; ECE(T) after temperature scaling; "
                 "ineff = gated conformal set size at coverage >= 95%")
    return "\n".join(lines)

"""`fit --target-cost C`: one model that spends C of the full network's Mul-Adds, with the most accurate exits
JEI-DNN's gates can give at that cost.

    run = fit_target_cost("cache/x.zarr", FitSettings(target_cost=0.4), default_settings(), "runs/fit")

JEI-DNN's lambda sets the cost only indirectly (the paper's stated limitation). A fit trains the lambda sweep
(heads/sweep/sweep.py, `--lambdas auto` by default: one warm-up, one stacked pass), then moves every selected model to
the target after training, two ways: per-exit thresholds on its learned P(E^l|x), fitted on V1 so that the shares of
samples leaving at each exit follow MSDNet's budget p^k, with p chosen so that they spend as much as possible, but
no more than the target, on V1 (heads/baselines/thresholds.py budget_for_cost, fit_thresholds); and one threshold shared
by every exit (the gates' own rule P(E^l|x) > t with t moved away from 0.5, which keeps the shares the gates learned;
`predict --threshold t` deploys it), when that can reach the target. Of those budgeted points the one most
accurate on V2 is chosen; V2 and test are evaluated unchanged. Rows: every trial as in a sweep ("jei"), plus
"jei-budget" rows (v2, test) per selected model and way at the target; the chosen point's rows and its trial's
"jei" rows are `selected`, and its per-exit thresholds are in the exit_thresholds column.
"""
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from heads.baselines.methods import MethodPoint, threshold_point, threshold_points
from heads.sweep.compare import BUDGET_METHOD, point_rows, selected_models
from heads.sweep.lambdas import DEFAULT_THRESHOLDS, AutoLambdas, lambda_identity, lambda_values
from heads.sweep.rows import evaluate_group, select_per_lambda
from heads.sweep.session import REFERENCE_GROUP, Session
from heads.sweep.sweep import Run, RunResult, trained_groups
from heads.baselines.thresholds import budget_for_cost, exit_by_thresholds, shared_threshold_for_cost
from heads.train.stream import MemorySettings, plan_memory
from heads.train.bilevel import TrainSettings


@dataclass(frozen=True)
class FitSettings:
    target_cost: float                       # Mul-Adds to spend, as a fraction of IC^L
    lambdas: "tuple[float, ...] | AutoLambdas" = AutoLambdas()
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS

    def __post_init__(self):
        object.__setattr__(self, "lambdas", lambda_values(self.lambdas))
        if not 0 < self.target_cost <= 1:
            raise ValueError(f"the target cost is a fraction of the full network's Mul-Adds in (0, 1], "
                             f"got {self.target_cost}")


def budget_rows(session: Session, groups: list[dict], selected: set, target: float,
                settings: TrainSettings) -> list[dict]:
    """Rows "jei-budget" (v2, test) of every selected model moved to `target` on V1, two ways each (module
    docstring): MSDNet's budget shares p^k, and one threshold shared by every exit."""
    ic_norm = session.costs / session.costs[-1]
    rows = []
    for model in selected_models(session, groups, selected):
        p = budget_for_cost(model.confidence["v1"], ic_norm, target)
        points = threshold_points(BUDGET_METHOD, model.logits, model.labels, [p], model.extra,
                                  confidence=model.confidence)
        shared = shared_threshold_for_cost(model.confidence["v1"], ic_norm, target)
        if shared is not None:
            points.append(_shared_point(model, shared))
        rows += point_rows(session, points, settings)
    return rows


def _shared_point(model, threshold: float) -> MethodPoint:
    """The model's exits at one threshold for every exit (P(E^l|x) > threshold) as a budget point; its per-exit
    thresholds are stored as the smallest float above it, since exit_by_thresholds tests >=."""
    n_exits = model.confidence["v1"].shape[1]
    thresholds = torch.full((n_exits,), float(np.nextafter(threshold, np.inf)), dtype=torch.float64)
    thresholds[-1] = -math.inf
    exits = {s: exit_by_thresholds(c, thresholds).cpu().numpy() for s, c in model.confidence.items()}
    shares = np.bincount(exits["v1"], minlength=n_exits) / len(exits["v1"])
    return threshold_point(BUDGET_METHOD, math.nan, model.logits, model.labels, exits, exits["v1"],
                           thresholds.numpy(), shares, model.extra)


def fit_target_cost(cache_path, fit: FitSettings, settings: TrainSettings, out, overwrite: bool = False,
                    progress: bool = True, memory: MemorySettings = MemorySettings()) -> RunResult:
    """Train the sweep, move each selected model to the target cost, keep the most accurate on V2 (module doc)."""
    from cache.store import open_cache

    with open_cache(cache_path) as cache:
        identity = {"fit": {"target_cost": fit.target_cost, "lambdas": lambda_identity(fit.lambdas),
                            "thresholds": list(fit.thresholds)}}
        plan = plan_memory(cache, memory)
        run = Run(out, cache, "fit", settings, identity, overwrite, plan)
        session = Session(cache, settings, progress, plan)
        first = session.costs[0] / session.costs[-1]
        if not fit.target_cost > first:
            raise ValueError(f"a target cost of {fit.target_cost:g} is not above the first exit's cost {first:.3f}: "
                             "no model can spend less")
        groups, _ = trained_groups(run, session, settings, fit.lambdas, ())
        run.write_status("evaluating")
        start = time.perf_counter()
        rows = [row for g in groups if g["group"] != REFERENCE_GROUP for row in evaluate_group(session, g)]
        budget = budget_rows(session, groups, select_per_lambda(rows), fit.target_cost, settings)
        run.timings["evaluate_seconds"] = time.perf_counter() - start
        best = max((r for r in budget if r["split"] == "v2"), key=lambda r: (r["accuracy"], r["cost_norm"]))
        for row in budget:        # of the chosen trial's budgeted points, only the chosen one
            row["selected"] = row["trial"] == best["trial"] and list(row["exit_thresholds"]) == \
                list(best["exit_thresholds"])
        return run.finish(session, groups, rows + budget, {best["trial"]}, fit.thresholds, warn=False)

"""The paper's baselines and ablations, trained from the same feature cache (and the same IMs) as JEI-DNN.

    session = Session(cache, settings)                                   # heads/sweep/session.py: data, test, costs
    points = run_baselines(session.data, session.test, ["threshold", "boosted", "l2w", "fixed-ims", "diffbranch"],
                           settings, lambdas=[0.01, 0.1, 1.0])
    for method, param, v2, test_out, extra in points:                     # MethodPoint named tuples
        metrics = evaluate(v2, test_out, session.costs)                   # {"v2": {...}, "test": {...}}, as JEI-DNN

A results row of a `compare` command is then {"method": method, "lam" or "p": param, **metrics[split], ...}.
The points of one threshold-gated method share their logits arrays (only exit_index differs), so a 39-point grid
costs one copy of the logits per split.

Methods (METHODS), each one MethodPoint per operating point (param = p of the budget grid, or lambda):
  threshold         IMs trained on every sample to convergence: the JEI-DNN warm-up (eq. 17) run for max_epochs,
                    each IM kept at its best V2 accuracy; threshold gating (heads/baselines/thresholds.py), one
                    point per p.
  threshold-warmup  ablation 2 of appendix 9.6: threshold gating on exactly the IMs JEI-DNN starts its bi-level
                    phase from (the warm-up after warmup_epochs epochs).
  boosted           BoostedNet (Yu et al. 2023), see boosted_ensemble; threshold gating on the ensemble logits.
  l2w               L2W-DEN (Han et al. 2022b), see train_l2w; threshold gating.
  fixed-ims         ablation 1 of appendix 9.6: JEI-DNN's Algorithm 1 that never enters the CLASSIFIER state, so
                    only the gates learn (train_stack with bi_switch beyond the last batch); one point per lambda.
  diffbranch        DiffBranch (Scardapane et al. 2020, appendix 9.13): from the same warm-up, IMs and gates (same
                    gate inputs) trained jointly by gradient descent on the expected loss eq. 9; one per lambda.

Training of the IM-only baselines (boosted, l2w) follows TrainSettings: Adam (lr, weight_decay), batch_size,
at most max_epochs epochs, the state with the lowest V2 cross-entropy (summed over exits; for BoostedNet of the
ensemble logits) kept, stopping after `patience` epochs without improvement. The exit-L head is the backbone's own
(frozen) head unless the cache's head is not the task's, exactly as for JEI-DNN. Thresholds are fitted on V1,
temperature and conformal thresholds on V2 by heads.evaluation.evaluate, as in the paper (section 5).

extra of a point: {"train_seconds": wall time of the training that produced the point (shared by all points of a
threshold-gated method), "epochs"}, plus {"p", "fractions", "thresholds", "v1_exit_hist"} for threshold gating,
{"lam"} for the learned-gate methods.
"""

import dataclasses
import logging
import math
import time
from typing import NamedTuple

import numpy as np
import torch

from heads.baselines.boosted import boosted_ensemble, train_boosted
from heads.baselines.common import BaselineSettings, split_logits, warm_ims
from heads.baselines.diffbranch import train_diffbranch
from heads.baselines.l2w import train_l2w
from heads.baselines.thresholds import budget_sweep, threshold_sweep
from heads.evaluation.evaluate import ExitOutputs
from heads.model.exits import exit_decision, exit_distribution
from heads.model.stack import StackedHeads
from heads.train.bilevel import train_stack, TrainSettings, WarmState, warmup
from heads.train.data import Split, split_outputs, TrainData


METHODS = ("threshold", "threshold-warmup", "boosted", "l2w", "fixed-ims", "diffbranch")
LAMBDA_METHODS = ("fixed-ims", "diffbranch")
log = logging.getLogger(__name__)


class MethodPoint(NamedTuple):
    """One operating point of one method: unpacks as (method, param, v2, test, extra)."""
    method: str
    param: float          # p of the budget grid (threshold gating) or lambda (learned gates)
    v2: ExitOutputs
    test: ExitOutputs
    extra: dict


def _never_switching(data: TrainData, settings: TrainSettings) -> int:
    """A bi_switch beyond the last batch of any bi-level phase of these settings."""
    return math.ceil(len(data.train) / settings.batch_size) * settings.max_epochs + 1


def fixed_ims_is_jei(data: TrainData, settings: TrainSettings) -> bool:
    """Whether JEI-DNN trained with these settings never enters the CLASSIFIER state, so that its models are the
    fixed-ims ablation's exactly (the converged recipe): then fixed-ims need not be trained again."""
    return settings.bi_switch >= _never_switching(data, settings)


def train_fixed_ims(data: TrainData, warm: WarmState, lambdas, settings: TrainSettings) -> StackedHeads:
    """Appendix 9.6 ablation 1: Algorithm 1 starts in the GATE state and flips every bi_switch batches; a bi_switch
    beyond the last batch of the phase means it never enters CLASSIFIER, so the warmed-up IMs stay bit-identical."""
    never = dataclasses.replace(settings, bi_switch=_never_switching(data, settings))
    return train_stack(data, warm, [{"lam": float(lam)} for lam in lambdas], never)


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).numpy()


def threshold_points(method: str, logits: dict, labels: dict, p_grid, extra: dict,
                     confidence: dict | None = None) -> list[MethodPoint]:
    """logits/labels: {"v1", "v2", "test"} -> (N, L, K) arrays / (N,). One MethodPoint per p, all sharing the same
    logits arrays (no copies). The exits are gated on max softmax, or on `confidence` ({"v1", "v2", "test"} ->
    (N, L) tensors) when given."""
    if confidence is None:
        sweep = threshold_sweep(logits["v1"], {"v2": logits["v2"], "test": logits["test"]}, p_grid)
    else:
        sweep = budget_sweep(confidence["v1"], {"v2": confidence["v2"], "test": confidence["test"]}, p_grid)
    return [threshold_point(method, pt["p"], logits, labels, {s: pt[s] for s in ("v2", "test")},
                            pt["v1_exit_index"], pt["thresholds"], pt["fractions"], extra) for pt in sweep]


def threshold_point(method: str, p: float, logits: dict, labels: dict, exits: dict, v1_exits, thresholds,
                    fractions, extra: dict) -> MethodPoint:
    """One threshold-gated operating point: `exits` {"v2", "test"} -> (N,) exit index, v1_exits those of V1 (the
    histogram kept in its rows), the per-exit thresholds and target shares it was fitted with."""
    n_exits = logits["v1"].shape[1]
    info = {"p": p, "fractions": np.asarray(fractions).tolist(), "thresholds": np.asarray(thresholds).tolist(),
            "v1_exit_hist": np.bincount(v1_exits, minlength=n_exits).tolist(), **extra}
    return MethodPoint(method, p, ExitOutputs(logits["v2"], exits["v2"], labels["v2"]),
                       ExitOutputs(logits["test"], exits["test"], labels["test"]), info)


def gated_points(method: str, heads: StackedHeads, lambdas, v2: Split, test: Split,
                 extra: dict) -> list[MethodPoint]:
    """One MethodPoint per trial of a learned-gate model: deterministic exits, P(E^l|x) > 0.5 (section 5)."""
    outs = {}
    for name, split in (("v2", v2), ("test", test)):
        logits, g = split_outputs(heads, split)
        outs[name] = (_numpy(logits), exit_decision(exit_distribution(g)).cpu().numpy(), split.labels.cpu().numpy())
    return [MethodPoint(method, float(lam),
                        *(ExitOutputs(outs[s][0][t], outs[s][1][t], outs[s][2]) for s in ("v2", "test")),
                        {"lam": float(lam), "epochs": int(heads.epochs_trained[t]), **extra})
            for t, lam in enumerate(lambdas)]


def run_baselines(data: TrainData, test: Split, methods, settings: TrainSettings,
                  baseline_settings: BaselineSettings = BaselineSettings(), lambdas=(), warm: WarmState | None = None
                  ) -> list[MethodPoint]:
    """Train and gate every requested method (names in METHODS) from the cache; return their operating points.

    test: the test split, resident or streamed (same exits and frozen-logit convention as data). lambdas: the cost
    weights of the learned-gate methods (fixed-ims, diffbranch), normally the JEI-DNN sweep's. warm: a WarmState
    from heads.train.bilevel.warmup with settings' (lr, weight_decay) to re-use (the sweep's); one is trained here when
    absent or too short (threshold needs max_epochs warm-up epochs, the others warmup_epochs).
    """
    methods = list(dict.fromkeys(methods))
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown baseline method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if any(m in LAMBDA_METHODS for m in methods) and not len(lambdas):
        raise ValueError(f"{' and '.join(m for m in methods if m in LAMBDA_METHODS)} need lambdas")
    if len(test.exit_dims) != len(data.exit_dims) or test.has_logits == data.trains_last:
        raise ValueError("the test split does not match the training data (number of exits or frozen last logits)")
    bs = baseline_settings
    splits = {"v1": data.v1, "v2": data.v2, "test": test}
    labels = {name: split.labels.cpu().numpy() for name, split in splits.items()}

    warm_users = [m for m in methods if m in ("threshold", "threshold-warmup", *LAMBDA_METHODS)]
    need_warm = max([settings.max_epochs if m == "threshold" else settings.warmup_epochs for m in warm_users],
                    default=0)
    warm_seconds = 0.0
    if warm_users and (warm is None or not warm.reaches(need_warm)
                       or (settings.lr, settings.weight_decay) not in warm.optim):
        log.info(f"warm-up: {need_warm} epochs")
        t0 = time.perf_counter()
        long = dataclasses.replace(settings, max_epochs=need_warm + 1, warmup_epochs=need_warm)
        warm = warmup(data, long)
        warm_seconds = time.perf_counter() - t0

    points = []
    for method in methods:
        log.info(f"baseline {method}")
        t0 = time.perf_counter()
        if method in ("threshold", "threshold-warmup", "boosted", "l2w"):
            if method == "boosted":
                heads = train_boosted(data, settings, bs.boost_gamma)
            elif method == "l2w":
                heads = train_l2w(data, settings, bs)[0]
            else:
                epochs = settings.max_epochs if method == "threshold" else settings.warmup_epochs
                heads = warm_ims(data, warm, settings, epochs)
            logits = {name: split_logits(heads, split)[0] for name, split in splits.items()}
            if method == "boosted":
                n_boosted = len(heads.im_weight)
                logits = {name: boosted_ensemble(z, bs.boost_gamma, n_boosted) for name, z in logits.items()}
            seconds = time.perf_counter() - t0 + (0.0 if method in ("boosted", "l2w") else warm_seconds)
            extra = {"train_seconds": seconds, "epochs": int(heads.epochs_trained[0])}
            points += threshold_points(method, {k: _numpy(v) for k, v in logits.items()}, labels, bs.p_grid, extra)
        else:
            train = train_fixed_ims if method == "fixed-ims" else train_diffbranch
            heads = train(data, warm, lambdas, settings)
            extra = {"train_seconds": time.perf_counter() - t0 + warm_seconds}
            points += gated_points(method, heads, lambdas, data.v2, test, extra)
    return points

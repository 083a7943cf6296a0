"""The results rows of trained heads: every trial on V2 and test at gate threshold 0.5 (and, for the selected
models, along gate-threshold curves), the warm-up IMs as single exits, and the per-lambda selection on V2.
Columns: heads/results/rundir.py.
"""
import math

import numpy as np

from heads.evaluation.evaluate import ExitOutputs, evaluate_many
from heads.model.exits import exit_decision
from heads.sweep.session import REFERENCE_GROUP, Session
from heads.train.bilevel import TRIAL_KEYS


def _evaluate(session: Session, v2, test, exits) -> list[dict]:
    """v2/test: (logits (N, L, K), labels) of one model; exits: (v2 exit, test exit) per exit rule, evaluated
    together (heads.evaluation.evaluate.evaluate_many shares the work that depends on the logits alone)."""
    return evaluate_many([(ExitOutputs(v2[0], v2_exit, v2[1]), ExitOutputs(test[0], test_exit, test[1]))
                          for v2_exit, test_exit in exits], session.costs)


def evaluate_group(session: Session, group: dict, thresholds=(0.5,), only=None) -> list[dict]:
    """Rows (v2 and test) of every trial of a heads group (or of the trial ids in `only`), at each gate threshold:
    method "jei" at 0.5, "jei-threshold" otherwise."""
    heads, rows = group["heads"], []
    for position, trial in enumerate(group["trials"]):
        if only is not None and trial["trial"] not in only:
            continue
        one = heads.select(position)
        (v2, v2_pg, v2_y), (test, test_pg, test_y) = session.outputs(one, "v2"), session.outputs(one, "test")
        results = _evaluate(session, (v2[0], v2_y), (test[0], test_y),
                            [(exit_decision(v2_pg[0], threshold).numpy(), exit_decision(test_pg[0], threshold).numpy())
                             for threshold in thresholds])
        for threshold, result in zip(thresholds, results):
            for split in ("v2", "test"):
                rows.append({"method": "jei" if threshold == 0.5 else "jei-threshold", "split": split,
                             "trial": trial["trial"], "lam": trial["lam"], "threshold": threshold,
                             **{k: group["settings"][k] for k in TRIAL_KEYS if k != "lam"},
                             **{k: v for k, v in trial.items() if k not in ("trial", "lam")},
                             "epochs": int(heads.epochs_trained[position]),
                             "seconds": group["seconds"] / len(group["trials"]), **result[split]})
    return rows


def evaluate_trials(session: Session, groups: list[dict], thresholds=()) -> list[dict]:
    """The first evaluation of a run's trials (every group but the reference): rows at threshold 0.5, and when no
    lambda has more than one trial here (no grid: each will be selected), the curves at `thresholds` in the same
    pass, sharing each trial's outputs; Run.finish adds the curves of selected trials that lack them and drops
    those of trials not selected."""
    trained = [g for g in groups if g["group"] != REFERENCE_GROUP]
    lambdas = [t["lam"] for g in trained for t in g["trials"]]
    curves = tuple(t for t in thresholds if t != 0.5) if len(lambdas) == len(set(lambdas)) else ()
    return [row for g in trained for row in evaluate_group(session, g, (0.5, *curves))]


def single_exit_rows(session: Session, group: dict) -> list[dict]:
    """One row per exit and split: every sample exits there (warm-up IMs; the backbone's head at exit L)."""
    heads = group["heads"]
    (v2, _, v2_y), (test, _, test_y) = session.outputs(heads, "v2"), session.outputs(heads, "test")
    warm_epochs, rows = int(heads.epochs_trained[0]), []
    results = _evaluate(session, (v2[0], v2_y), (test[0], test_y),
                        [(np.full(len(v2_y), exit_), np.full(len(test_y), exit_)) for exit_ in range(heads.n_exits)])
    for exit_, result in enumerate(results):
        for split in ("v2", "test"):
            rows.append({"method": "single-exit", "split": split, "exit": exit_ + 1, "threshold": math.nan,
                         "warmup_epochs": warm_epochs, "lr": group["settings"]["lr"],
                         "weight_decay": group["settings"]["weight_decay"], "epochs": warm_epochs,
                         "seconds": group["seconds"], **result[split]})
    return rows


def select_per_lambda(rows: list[dict]) -> set[int]:
    """Trial ids with the best V2 accuracy among the trials of their lambda (ties: cheaper, then lower id)."""
    best = {}
    for r in rows:
        if r["method"] == "jei" and r["split"] == "v2":
            key = (r["accuracy"], -r["cost_norm"], -r["trial"])
            if r["lam"] not in best or key > best[r["lam"]][0]:
                best[r["lam"]] = (key, r["trial"])
    return {trial for _, trial in best.values()}

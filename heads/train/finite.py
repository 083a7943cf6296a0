"""Finite or refuse: training that reaches NaN/Inf stops with a message saying where, instead of writing a
chance-level run. Called once per epoch (a few reductions over the stacked weights: cheap)."""
import torch


class DivergedError(ValueError):
    """Training produced NaN/Inf (one-line message: phase, epoch, the trials, what to try)."""


def check_heads(heads, phase: str, epoch: int, trials: list[str]) -> None:
    """heads: a StackedHeads; trials: one label per stacked trial. DivergedError naming every trial with a
    non-finite weight."""
    bad = torch.zeros(len(trials), dtype=torch.bool)
    axes = [(w, 1) for w in heads.im_weight] + [(t, 0) for t in [*heads.im_bias, heads.gate_weight, heads.gate_bias]]
    for t, axis in axes:
        bad |= ~torch.isfinite(t).movedim(axis, 0).reshape(len(trials), -1).all(dim=1).cpu()
    check_values(bad, phase, epoch, trials, "weights")


def check_values(bad: torch.Tensor, phase: str, epoch: int, trials: list[str], what: str) -> None:
    """bad: (trials,) bool, True where a trial's `what` is NaN/Inf."""
    if bool(bad.any()):
        names = [t for t, b in zip(trials, bad.tolist()) if b]
        raise DivergedError(f"training diverged: NaN/Inf {what} in {phase} epoch {epoch} for "
                            f"{', '.join(names[:5])}{' ...' if len(names) > 5 else ''}; no heads or results were written -- "
                            "lower --lr (or check the cache with `cache verify`)")

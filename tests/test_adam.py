"""heads.train.adam.StackedAdam: every backend is torch.optim.Adam per trial, and keep() continues the kept trials."""
import pytest
import torch

from heads.train.adam import StackedAdam


def _run(backend, lrs, wds, trial_dim, steps=12, keep_after=None):
    gen = torch.Generator().manual_seed(3)
    shape = (4, 3, 5) if trial_dim == 1 else (3, 6)
    stacked = torch.randn(*shape, generator=gen)
    n = stacked.shape[trial_dim]
    alone = [stacked.select(trial_dim, t).clone().requires_grad_(True) for t in range(n)]
    refs = [torch.optim.Adam([a], lr=lr, weight_decay=wd) for a, lr, wd in zip(alone, lrs, wds)]
    adam = StackedAdam([stacked], [trial_dim], torch.tensor(lrs), torch.tensor(wds), backend=backend)
    live = list(range(n))
    for step in range(steps):
        if keep_after is not None and step == keep_after:
            idx = torch.tensor([0, 2])
            stacked = stacked.index_select(trial_dim, idx).contiguous()
            adam.keep(idx, [stacked])
            live = [0, 2]
        x = torch.randn(*stacked.shape, generator=gen)
        adam.step([2 * stacked * x * x])
        for i, t in enumerate(live):
            refs[t].zero_grad()
            (alone[t] * x.select(trial_dim, i)).pow(2).sum().backward()
            refs[t].step()
    for i, t in enumerate(live):
        torch.testing.assert_close(stacked.select(trial_dim, i), alone[t].detach())
    return adam


@pytest.mark.parametrize("backend", ["foreach", "columns", "fused"])
@pytest.mark.parametrize("trial_dim", [0, 1])
def test_every_backend_is_torch_adam_per_trial(backend, trial_dim):
    lrs, wds = [0.01, 0.003, 0.02], [5e-4, 0.0, 1e-3]
    _run(backend, lrs, wds, trial_dim)        # per-trial lr: "fused" steps through the column kernel


@pytest.mark.parametrize("backend", ["foreach", "columns", "fused"])
def test_shared_hyperparameters_and_keep(backend):
    adam = _run(backend, [0.01] * 3, [5e-4] * 3, 1, keep_after=5)
    if backend == "fused" and torch.__version__ >= (2, 4):    # a CPU fused Adam exists: it must have been used
        assert adam.backend == "fused"


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="unknown Adam backend"):
        StackedAdam([torch.zeros(2)], [0], torch.ones(2), torch.zeros(2), backend="lamb")

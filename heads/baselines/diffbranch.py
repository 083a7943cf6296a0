"""DiffBranch (Scardapane et al. 2020, appendix 9.13): from JEI-DNN's warm-up, IMs and gates (the same gate
inputs) trained jointly by gradient descent on the expected loss, eq. 9; one model per lambda, stacked. The
gradient is in closed form on the CPU (diffbranch_grads, equal to autograd on diffbranch_loss).
"""
import torch

from heads.model.exits import exit_costs, exit_distribution, exit_mass_terms
from heads.model.gate_features import _features_grad_kernel, gate_features_numpy
from heads.model.stack import StackedHeads, gate_pre_activation
from heads.train.adam import StackedAdam
from heads.train.bilevel import BestState, copy_trials, exited_metrics, seed_streams, TrainSettings, WarmState
from heads.train.data import TrainData
from heads.train.kernels import exit_cross_entropy


def diffbranch_loss(heads: StackedHeads, feats, labels, last, lam, ic_norm) -> torch.Tensor:
    """Eq. 9 with gradients into IMs and gates alike (also through the gate inputs): mean over the batch of
    sum_l P(G=l|x) (CE_l + lam IC_norm^l), summed over trials."""
    logits = heads.im_logits(feats, last)
    p_g = exit_distribution(torch.sigmoid(heads.gate_logits(logits)))
    return (p_g * exit_costs(exit_cross_entropy(logits, labels), lam, ic_norm)).sum(-1).mean(-1).sum()


@torch.no_grad()
def diffbranch_grads(heads: StackedHeads, feats, labels, last, lam, ic_norm) -> list[torch.Tensor]:
    """The gradient of diffbranch_loss in every IM and gate parameter (im_params() + gate_params() order), in
    closed form on the CPU, bit for bit what autograd returns on one thread: the same forward, then the backward
    formulas autograd runs, in its order. The expected loss's dP = C/B and dC = P/B (1/B as mean's backward forms
    it); eqs. 7-8's clamp, minimum (ties split in halves), the mass left and its cumulative sum (reversed); the
    sigmoid (aten's kernel) and the gates' linear layer; the statistics' derivative kernel (heads.gate_features,
    the one autograd calls); the softmax (aten's kernel); every exit's CE as logsumexp's and the label's parts,
    summed with the gates' part in the order autograd accumulates them. No graph per batch: autograd's bookkeeping
    was the largest single cost of a DiffBranch step (tests/test_baselines.py checks the bits)."""
    logits = heads.im_logits(feats, last)                              # (T, B, L, K)
    n_trials, b, n_exits, k = logits.shape
    probs = torch.softmax(logits[:, :, :-1, :], dim=-1)                # the gates' inputs
    stats = torch.from_numpy(gate_features_numpy(probs.numpy()))       # (T, B, L-1, 4)
    gate_w = heads.gate_weight.detach()[:, None]
    g = torch.sigmoid(gate_pre_activation(stats, gate_w, heads.gate_bias.detach()[:, None]))
    g_full, room = exit_mass_terms(g)
    m = torch.minimum(g_full, room)
    index = labels[None, :, None, None].expand(n_trials, b, n_exits, 1)
    lse = torch.logsumexp(logits, dim=-1)
    ce = lse - logits.gather(-1, index).squeeze(-1)
    inv_b = torch.ones((), device=logits.device) / b
    d_ce = inv_b * m.clamp_min(0.0)                                    # P(G=l|x) / B
    d_m = torch.where(m >= 0, inv_b * exit_costs(ce, lam, ic_norm), 0.0)
    d_m = torch.where(g_full == room, d_m / 2, d_m)
    d_room = d_m.masked_fill(g_full < room, 0.0)
    d_g = d_m.masked_fill(g_full > room, 0.0)[..., :-1] + (-d_room[..., 1:]).flip(-1).cumsum(-1).flip(-1)
    d_a = torch.ops.aten.sigmoid_backward(d_g, g)
    grad_gate_w = (d_a[..., None] * stats).sum(1)
    grad_gate_b = d_a.sum(1)
    d_stats = (d_a[..., None] * gate_w).contiguous()
    d_probs = torch.empty_like(probs)
    _features_grad_kernel(probs.numpy().reshape(-1, k), d_stats.numpy().reshape(-1, d_stats.shape[-1]),
                          d_probs.numpy().reshape(-1, k))
    d_logits = d_ce[..., None] * (logits - lse[..., None]).exp()
    d_logits = d_logits + torch.zeros_like(logits).scatter_add_(-1, index, -d_ce[..., None])
    d_logits[:, :, :-1] += torch.ops.aten._softmax_backward_data(d_probs, probs, -1, probs.dtype)
    grad_w, grad_b = [], []
    for l, x in enumerate(feats[:len(heads.im_weight)]):
        d = d_logits[:, :, l].permute(1, 0, 2).reshape(b, n_trials * k)
        grad_w.append((x.T @ d).view(x.shape[1], n_trials, k))
        grad_b.append(d.sum(0).view(n_trials, k))
    return grad_w + grad_b + [grad_gate_w, grad_gate_b]


def train_diffbranch(data: TrainData, warm: WarmState, lambdas, settings: TrainSettings) -> StackedHeads:
    """All lambdas stacked, IMs from the JEI-DNN warm-up, Adam on IMs and gates jointly for the bi-level epoch
    budget (max_epochs - warmup_epochs); each trial kept at its best V2 objective with JEI-DNN's stopping rule."""
    device, n_trials = settings.device, len(lambdas)
    heads = warm.start_heads(data, [(settings.lr, settings.weight_decay, settings.warmup_epochs)] * n_trials,
                             seed_streams(settings.seed)[0], device)
    heads.epochs_trained[:] = 0                             # from here: the epochs of the kept state
    params = heads.im_params() + heads.gate_params()
    for p in params:
        p.requires_grad_(True)
    n_w = len(heads.im_weight)
    lam = torch.tensor([float(x) for x in lambdas], device=device)
    ic_norm = data.ic_norm.to(device)
    adam = StackedAdam(params, [1] * n_w + [0] * n_w + [0, 0], torch.full((n_trials,), settings.lr, device=device),
                       torch.full((n_trials,), settings.weight_decay, device=device))
    best, tracker = heads.select(list(range(n_trials))), BestState((n_trials,), device=device)
    active = torch.ones(n_trials, dtype=torch.bool, device=device)
    gen = torch.Generator().manual_seed(seed_streams(settings.seed)[2])
    for epoch in range(settings.max_epochs - settings.warmup_epochs):
        for batch in data.train.epoch(settings.batch_size, gen, device, stacked=False):
            if torch.device(device).type == "cpu":
                adam.step(diffbranch_grads(heads, *batch, lam, ic_norm), active)
            else:   # the statistics' derivative kernel is the CPU's: autograd through the torch statistics
                adam.step(torch.autograd.grad(diffbranch_loss(heads, *batch, lam, ic_norm), params), active)
        objective = exited_metrics(heads, data.v2, lam, ic_norm)["objective"]
        improved = tracker.update(objective, where=active)
        changed = improved.nonzero().squeeze(1)
        copy_trials(best, heads, changed, changed)
        best.epochs_trained[improved.cpu()] = epoch + 1
        active &= tracker.stale < settings.patience
        if not bool(active.any()):
            break
    return best

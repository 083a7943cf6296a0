"""BoostedNet (Yu et al. 2023): each IM a weak learner of a boosted ensemble, trained on the ensemble's
logits (their public code's reweighting); threshold gating on the ensemble logits.
"""
import torch

from heads.baselines.common import RunParams, ce_residual, fit_ims, split_logits, weighted_ce_coef, weighted_ce_grads
from heads.model.stack import StackedHeads
from heads.train.adam import StackedAdam
from heads.train.bilevel import TrainSettings
from heads.train.data import TrainData
from heads.train.kernels import exit_cross_entropy


def boosted_ensemble(logits: torch.Tensor, gamma: float, n_boosted: int, detach: bool = False) -> torch.Tensor:
    """(..., L, K) weak-learner logits o_s -> (..., L, K) ensemble logits F_s (Yu et al. 2023, their public code):

        F_1 = o_1,   F_s = o_s + gamma * F_{s-1}   (s = 2..n_boosted),   i.e. F_s = sum_{j<=s} gamma^(s-j) o_j.

    detach=True stops the gradient through F_{s-1} (training: exit s fits the residual of the fixed earlier
    ensemble). Exits after n_boosted (the frozen backbone head, which cannot learn a residual) are returned as is.
    """
    out = [logits[..., 0, :]]
    for s in range(1, n_boosted):
        prev = out[-1].detach() if detach else out[-1]
        out.append(logits[..., s, :] + gamma * prev)
    out.extend(logits[..., s, :] for s in range(n_boosted, logits.shape[-2]))
    return torch.stack(out, dim=-2)


@torch.no_grad()
def boosted_grads(heads: StackedHeads, feats, labels, last, gamma: float) -> list[torch.Tensor]:
    """The IM gradients of BoostedNet's loss, batch mean of sum over trained exits s of CE(y, o_s + gamma
    sg(F_{s-1})), one trial. With F_{s-1} held fixed the logit gradient at exit s is softmax(F_s) - onehot, the
    closed form weighted_ce_grads takes (weights 1)."""
    n_boosted = len(heads.im_weight)
    residual = ce_residual(boosted_ensemble(heads.im_logits(feats, last), gamma, n_boosted)[0], labels)
    return weighted_ce_grads(feats, residual, torch.ones(residual.shape[:2], device=residual.device), n_boosted)


class BoostedStep:
    """train_boosted's mini-batch step: boosted_grads with the products batched per run of equal-width exits
    (RunParams), then one Adam step (tests/test_baselines.py runs it beside boosted_grads)."""

    def __init__(self, heads: StackedHeads, settings: TrainSettings, gamma: float):
        self.ims, self.gamma = RunParams(heads), gamma
        self.update = StackedAdam.one_trial(self.ims.params(), settings.lr, settings.weight_decay, settings.device)

    @torch.no_grad()
    def __call__(self, feats, labels, last):
        x, n = self.ims.stack(feats), self.ims.n_trained
        ens = boosted_ensemble(self.ims.logits(x, last), self.gamma, n)                   # (B, L, K)
        # weights 1, formed as boosted_grads forms them (a plain division by B would round differently)
        ones = torch.ones(labels.shape[0], n, device=labels.device)
        coef = weighted_ce_coef(ce_residual(ens, labels), ones, n)
        self.update.step(self.ims.grads(x, coef))


def train_boosted(data: TrainData, settings: TrainSettings, gamma: float) -> StackedHeads:
    """BoostedNet training: sum over trained exits s of CE(y, o_s + gamma * sg(F_{s-1})), gradients in closed
    form (boosted_grads)."""
    n_boosted = len(data.exit_dims) if data.trains_last else len(data.exit_dims) - 1

    def make_step(heads):
        return BoostedStep(heads, settings, gamma)

    def v2_score(heads):
        ens = boosted_ensemble(split_logits(heads, data.v2), gamma, n_boosted)
        return exit_cross_entropy(ens, data.v2.labels).sum(-1).mean()

    return fit_ims(data, settings, make_step, v2_score)

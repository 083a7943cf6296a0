"""The training step of a stack of trials with hand-written gradients: what heads.train.bilevel runs every mini-batch.

    engine = StackEngine(heads, lr, weight_decay, batch_size)   # takes over heads' IM weights (one flat buffer)
    out = engine.forward(features, last_logits, labels)           # logits, softmax, gate features, per-exit CE
    engine.gate_step(out, lam, ic_norm, "subsequent", pos_weight) # GATE state (eq. 16)
    engine.im_step(out, features, labels, engine.classifier_coef(out, "weighted"))   # CLASSIFIER state (eq. 30)
    engine.keep(torch.tensor([0, 2]))                              # drop stopped trials from the stack

Every loss of heads.train.bilevel except JEI-DNN-FULL (eq. 29) is a weighted cross-entropy of the IMs, sum_l c_l CE_l
with weights c that carry no gradient (eq. 30: P(G=l|x); uniform: 1; warm-up eq. 17: L - l), or a BCE of the gates on
four statistics of detached IM outputs. Their gradients are closed-form: d/dz of c CE is c (softmax(z) - onehot(y)),
and of the BCE with pos_weight w and target t at pre-activation a it is sigmoid(a) (w t + 1 - t) - w t. So a step is
one addmm per exit into a preallocated (L, B, T, K) buffer, torch's softmax, one numba pass for the statistics
(heads.train.kernels), the logit gradient in place, one mm per exit for the weight gradients, and one fused Adam kernel
over a single flat buffer holding every IM weight and bias of every trial. No autograd graph, no temporaries of the
logits' size. tests/test_engine.py checks each gradient against autograd on heads.train.bilevel's losses; JEI-DNN-FULL
differentiates through the gate statistics and goes through autograd (im_step_autograd).

Trials that stop are removed with keep(): the products shrink with the stack.
"""
from dataclasses import dataclass

import torch

from heads import cpu
from heads.train.adam import StackedAdam
from heads.model.exits import classifier_weights, exit_costs, exit_decision, exit_distribution, gate_targets
from heads.train.kernels import softmax_stats, weighted_ce_grad
from heads.model.stack import N_GATE_FEATURES, StackedHeads, gate_pre_activation

EVAL_FLOATS = 1 << 23          # logits per evaluation chunk (32 MiB of float32; two such buffers)


@dataclass
class StepOutputs:
    """One forward pass: views into the engine's buffers, valid until the next forward."""
    p: torch.Tensor            # (L, B, T, K) softmax of the logits; im_step turns it into the logit gradient
    feats: torch.Tensor        # (T, B, L-1, 4) gate statistics (heads.model.gate_features order)
    ce: torch.Tensor           # (T, B, L) cross-entropy of every exit
    pred: torch.Tensor | None  # (T, B, L) int32 argmax of every exit (evaluation only)
    x: torch.Tensor | None     # (n_ims, B, D) the trained exits' features, stacked when they share one width


def pos_weight_from_counts(positives: torch.Tensor, n: int, cap: float) -> torch.Tensor:
    """n_neg / n_pos of each gate's targets (positives: counts over n samples), clipped to [1/cap, cap]; a gate
    without positives counts half a positive (the clip then applies)."""
    return ((n - positives) / positives.clamp_min(0.5)).clamp(1 / cap, cap)


class StackEngine:
    """IM weights of T trials in one flat float32 buffer (heads.im_weight / im_bias become views of it), their Adam
    state in two more, the gates' Adam state, and the per-batch buffers."""

    def __init__(self, heads: StackedHeads, lr: torch.Tensor, weight_decay: torch.Tensor, batch_size: int,
                 betas=(0.9, 0.999), eps=1e-8):
        cpu.configure()          # shared threads and flushed denormals before the first step (heads/cpu.py)
        self.heads, self.betas, self.eps = heads, betas, eps
        self.device = heads.gate_weight.device
        self.lr, self.weight_decay = lr.to(self.device, torch.float32), weight_decay.to(self.device, torch.float32)
        self.batch_size = batch_size
        self.flat = self._flatten(heads.im_weight, heads.im_bias)
        self.grad = torch.empty_like(self.flat)
        # the IMs: one (rows, T, K) buffer, torch's fused Adam when the trials share lr and weight decay; the gates:
        # their two tensors, trials on the first axis
        self.im_adam = StackedAdam([self._trial_view(self.flat)], [1], self.lr, self.weight_decay, betas, eps,
                                   backend="fused")
        self.gate_adam = StackedAdam([heads.gate_weight, heads.gate_bias], [0, 0], self.lr, self.weight_decay,
                                     betas, eps)
        self._bind()

    # ---- layout ---------------------------------------------------------------------------------------------
    @property
    def n_trials(self) -> int:
        return self.heads.n_trials

    def _sizes(self) -> list[int]:
        tk = self.n_trials * self.heads.num_classes
        return [d * tk for d in self.heads.exit_dims] + [tk] * len(self.heads.exit_dims)

    def _flatten(self, weights, biases) -> torch.Tensor:
        return torch.cat([w.detach().reshape(-1) for w in weights] + [b.detach().reshape(-1) for b in biases]) \
            .to(self.device, torch.float32).contiguous()

    def _trial_view(self, flat: torch.Tensor) -> torch.Tensor:
        """A flat buffer as (rows, T, K): every weight row and bias of every exit, trials on axis 1."""
        return flat.view(-1, self.n_trials, self.heads.num_classes)

    def _views(self, flat: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(weights (D_l, T, K), biases (T, K)) as views of a flat buffer."""
        t, k, dims = self.n_trials, self.heads.num_classes, self.heads.exit_dims
        parts = flat.split(self._sizes())
        return ([p.view(d, t, k) for p, d in zip(parts, dims)], [p.view(t, k) for p in parts[len(dims):]])

    def _blocks(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For exits of one width D: (weights (n, D, T*K), biases (n, 1, T*K)) as views of a flat buffer."""
        n, tk = len(self.heads.exit_dims), self.n_trials * self.heads.num_classes
        split = n * self.heads.exit_dims[0] * tk
        return flat[:split].view(n, -1, tk), flat[split:].view(n, 1, tk)

    def _bind(self):
        """Point heads' IM tensors at the flat buffer; size the per-batch buffers for the current stack."""
        self.heads.im_weight, self.heads.im_bias = self._views(self.flat)
        self.uniform = len(set(self.heads.exit_dims)) == 1
        self.grad_weight, self.grad_bias = self._views(self.grad)
        t, k, n_exits = self.n_trials, self.heads.num_classes, self.heads.n_exits
        self.eval_rows = max(self.batch_size, EVAL_FLOATS // (n_exits * t * k))
        rows = self.eval_rows
        self._z = torch.empty(n_exits * rows * t * k, device=self.device)
        self._p = torch.empty_like(self._z)
        self._feats = torch.empty(t * rows * (n_exits - 1) * N_GATE_FEATURES, device=self.device)
        self._ce = torch.empty(t * rows * n_exits, device=self.device)
        self._pred = torch.empty(t * rows * n_exits, dtype=torch.int32, device=self.device)

    def keep(self, trials: torch.Tensor) -> None:
        """Keep only the given trials (indices into the current stack), with their Adam state."""
        idx = trials.to(self.device, torch.int64)
        self.flat = self._trial_view(self.flat).index_select(1, idx).reshape(-1)
        self.grad = torch.empty_like(self.flat)
        h = self.heads
        h.gate_weight, h.gate_bias = h.gate_weight.detach()[idx].clone(), h.gate_bias.detach()[idx].clone()
        h.epochs_trained = h.epochs_trained[idx.cpu()].clone()
        self.lr, self.weight_decay = self.lr[idx], self.weight_decay[idx]
        self._bind()
        self.im_adam.keep(idx, [self._trial_view(self.flat)])
        self.gate_adam.keep(idx, [h.gate_weight, h.gate_bias])

    # ---- forward --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, features: list[torch.Tensor] | torch.Tensor, last_logits: torch.Tensor | None,
                labels: torch.Tensor, pred: bool = False, gates: bool = True) -> StepOutputs:
        """Logits of every exit for every trial, their softmax, the gate statistics (unless gates=False) and the
        per-exit cross-entropy; pred=True also each exit's argmax. features: per exit (B, D_l), or the exits
        stacked as one (L, B, D) tensor (SplitTensors.batch). At most eval_rows rows."""
        h = self.heads
        b, t, k, n_exits = labels.shape[0], self.n_trials, h.num_classes, h.n_exits
        if b > self.eval_rows:
            raise ValueError(f"a forward pass takes at most {self.eval_rows} rows, got {b}")
        z = self._z[:n_exits * b * t * k].view(n_exits, b, t, k)
        p = self._p[:n_exits * b * t * k].view(n_exits, b, t, k)
        n_ims, x = len(h.im_weight), None
        if self.uniform:
            # all trained exits have one width: one batched product, (n, B, D) @ (n, D, T*K), faster on 2 CPU cores
            # than n separate addmm (bench/sweep_speed.py prints both); features may come stacked (L, B, D)
            x = features[:n_ims] if isinstance(features, torch.Tensor) else torch.stack(features[:n_ims])
            weights, biases = self._blocks(self.flat)
            torch.baddbmm(biases, x, weights, out=z[:n_ims].view(n_ims, b, t * k))
        else:
            for l, (xl, w, bias) in enumerate(zip(features, h.im_weight, h.im_bias)):
                torch.addmm(bias.reshape(1, -1), xl, w.reshape(w.shape[0], -1), out=z[l].view(b, t * k))
        if not h.trains_last:
            if last_logits is None:
                raise ValueError("the last exit is the backbone's head: pass its cached logits")
            z[-1].copy_(last_logits[:, None, :].expand(b, t, k))
        torch.ops.aten._softmax.out(z, -1, False, out=p)
        n_gated = n_exits - 1 if gates else 0
        feats = self._feats[:t * b * n_gated * N_GATE_FEATURES].view(t, b, n_gated, N_GATE_FEATURES)
        ce = self._ce[:t * b * n_exits].view(t, b, n_exits)
        argmax = self._pred[:t * b * n_exits].view(t, b, n_exits) if pred else None
        softmax_stats(z, p, labels, feats, ce, argmax)
        return StepOutputs(p, feats, ce, argmax, x)

    def gate_probs(self, feats: torch.Tensor) -> torch.Tensor:
        """(T, B, L-1, 4) statistics -> (T, B, L-1) gate probabilities g^l."""
        w, b = self.heads.gate_weight.detach(), self.heads.gate_bias.detach()
        return torch.sigmoid(gate_pre_activation(feats, w[:, None], b[:, None]))

    # ---- steps ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def gate_gradient(self, out: StepOutputs, lam: torch.Tensor, ic_norm: torch.Tensor, rule: str,
                      pos_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradient (gate_weight, gate_bias) of the GATE loss (eq. 16): per trial, the sum over gates of the batch
        mean BCE against the surrogate targets of the trial's costs, positives weighted by pos_weight (T, L-1)."""
        targets = gate_targets(exit_costs(out.ce, lam, ic_norm), rule)     # (T, B, L-1)
        s = self.gate_probs(out.feats)
        wt = pos_weight[:, None, :] * targets
        dz = (s * (wt + 1 - targets) - wt) / targets.shape[1]
        return torch.einsum("tbg,tbgf->tgf", dz, out.feats), dz.sum(1)

    @torch.no_grad()
    def gate_step(self, out: StepOutputs, lam: torch.Tensor, ic_norm: torch.Tensor, rule: str,
                  pos_weight: torch.Tensor) -> None:
        """GATE state: one Adam step of the gates on gate_gradient."""
        self.gate_adam.step(self.gate_gradient(out, lam, ic_norm, rule, pos_weight))

    @torch.no_grad()
    def classifier_coef(self, out: StepOutputs, im_loss: str = "weighted") -> torch.Tensor:
        """(T, B, L) weights of the CLASSIFIER loss per sample and exit, divided by the batch size: P(G=l|x) from
        the current gates (eq. 30) or 1 (uniform)."""
        return classifier_weights(self.gate_probs(out.feats), im_loss) / out.ce.shape[1]

    @torch.no_grad()
    def im_gradient(self, out: StepOutputs, features: list[torch.Tensor], labels: torch.Tensor,
                    coef: torch.Tensor) -> None:
        """Gradient of sum over trials of sum_b sum_l coef * CE_l (coef (T, B, L), already divided by the batch
        size for a batch mean) with respect to every IM weight and bias, into self.grad (views: grad_weight,
        grad_bias). Consumes out.p (it becomes the logit gradient)."""
        n_ims = len(self.heads.im_weight)
        b, t, k = labels.shape[0], self.n_trials, self.heads.num_classes
        dz = out.p[:n_ims]
        weighted_ce_grad(dz, labels, coef)
        if out.x is not None:
            grad_weights, grad_biases = self._blocks(self.grad)
            d = dz.view(n_ims, b, t * k)
            torch.bmm(out.x.transpose(1, 2), d, out=grad_weights)
            torch.sum(d, 1, keepdim=True, out=grad_biases)
            return
        for l in range(n_ims):
            d = dz[l].view(b, t * k)
            torch.mm(features[l].T, d, out=self.grad_weight[l].view(-1, t * k))
            torch.sum(d, 0, out=self.grad_bias[l].view(t * k))

    def im_step(self, out: StepOutputs, features: list[torch.Tensor], labels: torch.Tensor,
                coef: torch.Tensor) -> None:
        """One Adam step of the IMs on im_gradient."""
        self.im_gradient(out, features, labels, coef)
        self._adam_ims()

    def im_step_autograd(self, loss_fn) -> None:
        """One Adam step of the IMs on loss_fn(heads) (a scalar built from heads' IM tensors) by autograd: the
        path of losses without a closed-form logit gradient (JEI-DNN-FULL)."""
        h = self.heads
        alias = StackedHeads([w.detach().requires_grad_() for w in h.im_weight],
                             [b.detach().requires_grad_() for b in h.im_bias], h.gate_weight.detach(),
                             h.gate_bias.detach(), h.trains_last, h.epochs_trained)
        params = alias.im_params()
        grads = torch.autograd.grad(loss_fn(alias), params)
        with torch.no_grad():
            for dst, g in zip(self.grad_weight + self.grad_bias, grads):
                dst.copy_(g)
            self._adam_ims()

    def _adam_ims(self) -> None:
        self.im_adam.step([self._trial_view(self.grad)])

    # ---- whole splits ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def _chunks(self, split, gates: bool = True):
        for feats, labels, last in split.chunks(self.eval_rows):
            yield self.forward(feats, last, labels, pred=True, gates=gates), labels

    @torch.no_grad()
    def exited_metrics(self, split, lam: torch.Tensor, ic_norm: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per trial (T,) float64: accuracy, cost (mean IC_norm) and objective (mean CE + lam IC_norm) at the exit
        each sample takes (first P(E^l|x) > 0.5)."""
        sums = {"accuracy": 0.0, "cost": 0.0, "objective": 0.0}
        for out, labels in self._chunks(split):
            taken = exit_decision(exit_distribution(self.gate_probs(out.feats)))[..., None]
            cost = ic_norm[taken.squeeze(-1)]
            ce = out.ce.gather(2, taken).squeeze(-1)
            sums["accuracy"] = sums["accuracy"] + (out.pred.gather(2, taken).squeeze(-1) == labels).sum(1).double()
            sums["cost"] = sums["cost"] + cost.sum(1).double()
            sums["objective"] = sums["objective"] + (ce + lam[:, None] * cost).sum(1).double()
        return {name: value / len(split) for name, value in sums.items()}

    @torch.no_grad()
    def pos_weight(self, split, lam: torch.Tensor, ic_norm: torch.Tensor, rule: str, cap: float) -> torch.Tensor:
        """(T, L-1) gate class weights from the surrogate targets on `split` (V1)."""
        positives = 0.0
        for out, _ in self._chunks(split, gates=False):
            positives = positives + gate_targets(exit_costs(out.ce, lam, ic_norm), rule).sum(1)
        return pos_weight_from_counts(positives, len(split), cap)

    @torch.no_grad()
    def im_accuracy(self, split) -> torch.Tensor:
        """(T, number of trained IMs) float64 accuracy of every trained IM on all samples of `split`."""
        correct, n_ims = 0.0, len(self.heads.im_weight)
        for out, labels in self._chunks(split, gates=False):
            correct = correct + (out.pred[:, :, :n_ims] == labels[None, :, None]).sum(1).double()
        return correct / len(split)

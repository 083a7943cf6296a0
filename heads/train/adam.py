"""The project's one Adam: torch.optim.Adam's update (coupled L2 weight decay) on parameters that stack several
trials along one axis, each trial with its own learning rate and weight decay, inactive trials standing still.

    adam = StackedAdam(params, trial_dims, lr, weight_decay)               # lr, weight_decay: (T,) tensors
    adam.step(grads)                                                       # or adam.step(grads, active)
    adam.keep(torch.tensor([0, 2]), new_params)                            # drop trials, keep their moments

Backends, one update:
  "foreach"  torch's multi-tensor ops, any device, any trial axes, an `active` mask (the default). On the CPU they
             run the per-tensor kernels of adam_update_torch, so the step is bit-identical to it per parameter.
  "columns"  one read and one write of each buffer (numba on the CPU, adam_update_torch elsewhere): the parameter
             is seen as (rows, columns) with the trial axis and everything after it in the columns, so a per-trial
             lr / weight decay is a per-column array. What heads.train.engine uses for its flat IM buffer when trials
             differ in lr or weight decay.
  "fused"    torch's fused Adam (one kernel, bias corrections inside) when every trial shares one lr and weight
             decay and none is inactive; otherwise, or where torch has no fused Adam for the device, "columns".
Bias corrections are folded into the step size and eps (adam_scales), as torch.optim.Adam computes
m_hat / (sqrt(v_hat) + eps).
"""
import math

import numba
import numpy as np
import torch
from torch.optim.adam import adam as torch_adam

from heads import cpu

BACKENDS = ("foreach", "columns", "fused")


def adam_scales(step: int, b1: float, b2: float) -> tuple[float, float]:
    """(lr factor, eps factor) that fold Adam's bias corrections at `step` (1-based) into the update's lr and eps:
    lr0 sqrt(1-b2^t) / (1-b1^t) and eps0 sqrt(1-b2^t) give torch.optim.Adam's m_hat / (sqrt(v_hat) + eps0)."""
    bc1, bc2 = 1 - b1 ** step, 1 - b2 ** step
    return math.sqrt(bc2) / bc1, math.sqrt(bc2)


@numba.njit(parallel=True, fastmath=True, cache=True)
def _adam_kernel(p, g, m, v, lr_col, wd_col, b1, b2, eps):
    n_rows, n_cols = p.shape
    c1 = 1 - b1
    c2 = 1 - b2
    for r in numba.prange(n_rows):
        for c in range(n_cols):
            gr = g[r, c] + wd_col[c] * p[r, c]
            mr = b1 * m[r, c] + c1 * gr
            vr = b2 * v[r, c] + c2 * gr * gr
            m[r, c] = mr
            v[r, c] = vr
            p[r, c] -= lr_col[c] * mr / (np.sqrt(vr) + eps)


def adam_update(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, lr_col: torch.Tensor,
                wd_col: torch.Tensor, b1: float, b2: float, eps: float) -> None:
    """One Adam step in place on (R, C) float32 buffers whose column c has step size lr_col[c] and weight decay
    wd_col[c]: g' = g + wd p; m <- b1 m + (1-b1) g'; v <- b2 v + (1-b2) g'^2; p <- p - lr m / (sqrt(v) + eps),
    lr and eps with the bias corrections folded in (adam_scales). numba on CPU, torch elsewhere."""
    if p.device.type == "cpu":
        f32 = np.float32
        cpu.match_torch_threads()
        _adam_kernel(p.numpy(), g.numpy(), m.numpy(), v.numpy(), lr_col.numpy(), wd_col.numpy(), f32(b1), f32(b2),
                     f32(eps))
        return
    adam_update_torch(p, g, m, v, lr_col, wd_col, b1, b2, eps)


def adam_update_torch(p, g, m, v, lr_col, wd_col, b1, b2, eps) -> None:
    """adam_update with torch ops (any device; the reference of the kernel); lr_col and wd_col broadcast against p
    (per column, or per trial on any axis)."""
    g = g.addcmul(p, wd_col)
    m.lerp_(g, 1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    p.sub_(m.div(v.sqrt().add_(eps)).mul_(lr_col))


class StackedAdam:
    """Adam with its own lr and weight decay per trial; params[i]'s axis trial_dims[i] indexes the trials."""

    def __init__(self, params, trial_dims, lr: torch.Tensor, weight_decay: torch.Tensor, betas=(0.9, 0.999),
                 eps=1e-8, backend: str = "foreach"):
        if backend not in BACKENDS:
            raise ValueError(f"unknown Adam backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        self.params, self.trial_dims, self.betas, self.eps, self.steps = list(params), list(trial_dims), betas, eps, 0
        self.backend = backend
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self._set_hyper(lr, weight_decay)

    @classmethod
    def one_trial(cls, params, lr: float, weight_decay: float, device) -> "StackedAdam":
        """Adam with one lr and weight decay on the parameters of one model (a trial axis of one: the per-trial
        values broadcast over any shape)."""
        params = list(params)
        return cls(params, [0] * len(params), torch.tensor([lr], device=device),
                   torch.tensor([weight_decay], device=device))

    def _set_hyper(self, lr: torch.Tensor, weight_decay: torch.Tensor) -> None:
        device = self.params[0].device
        self.lr, self.weight_decay = lr.to(device, torch.float32), weight_decay.to(device, torch.float32)
        self.shape = [[-1 if d == dim else 1 for d in range(p.dim())] for p, dim in zip(self.params, self.trial_dims)]
        lrs, wds = set(self.lr.tolist()), set(self.weight_decay.tolist())
        self.shared = (lrs.pop(), wds.pop()) if len(lrs) == len(wds) == 1 else None   # (lr, wd) of every trial

    @torch.no_grad()
    def step(self, grads, active: torch.Tensor | None = None) -> None:
        """One step of every parameter on `grads` (same shapes); trials with active False do not move."""
        self.steps += 1
        grads = list(grads)
        if self.backend == "fused" and active is None and self.shared is not None and self._fused(grads):
            return
        if self.backend == "foreach":
            self._foreach(grads, active)
        else:
            self._columns(grads, active)

    def _fused(self, grads) -> bool:
        b1, b2 = self.betas
        try:
            steps = [torch.tensor(float(self.steps - 1), device=p.device) for p in self.params]   # the op adds 1
            torch_adam(self.params, grads, self.m, self.v, [], steps, foreach=False, fused=True, amsgrad=False,
                       beta1=b1, beta2=b2, lr=self.shared[0], weight_decay=self.shared[1], eps=self.eps,
                       maximize=False)
            return True
        except (RuntimeError, TypeError):     # a torch without a fused Adam for this device
            self.backend = "columns"
            return False

    def _step_lr(self, active) -> tuple[torch.Tensor, float]:
        lr_scale, eps_scale = adam_scales(self.steps, *self.betas)
        lr = self.lr if active is None else self.lr * active.to(self.lr.dtype)
        return lr * lr_scale, self.eps * eps_scale

    def _foreach(self, grads, active) -> None:
        """adam_update_torch on every parameter as torch's multi-tensor (_foreach) ops: on the CPU the same
        per-tensor kernels (bit-identical), without a Python round trip per parameter and operation."""
        lr, eps = self._step_lr(active)
        b1, b2 = self.betas
        g = torch._foreach_addcmul(grads, self.params, [self.weight_decay.view(s) for s in self.shape])
        torch._foreach_lerp_(self.m, g, 1 - b1)
        torch._foreach_mul_(self.v, b2)
        torch._foreach_addcmul_(self.v, g, g, value=1 - b2)
        denominator = torch._foreach_sqrt(self.v)
        torch._foreach_add_(denominator, eps)
        update = torch._foreach_div(self.m, denominator)
        torch._foreach_mul_(update, [lr.view(s) for s in self.shape])
        torch._foreach_sub_(self.params, update)

    def _columns(self, grads, active) -> None:
        lr, eps = self._step_lr(active)
        for p, g, m, v, dim in zip(self.params, grads, self.m, self.v, self.trial_dims):
            inner = math.prod(p.shape[dim + 1:])
            lr_col = lr.repeat_interleave(inner)
            wd_col = self.weight_decay.repeat_interleave(inner)
            cols = lr_col.numel()
            adam_update(p.view(-1, cols), g.reshape(-1, cols), m.view(-1, cols), v.view(-1, cols), lr_col, wd_col,
                        *self.betas, eps)

    @torch.no_grad()
    def keep(self, trials: torch.Tensor, params) -> None:
        """Only the given trials (indices into the current stack) stay, with their moments; `params` are the
        parameters that hold exactly those trials now (the owner selected them)."""
        idx = trials.to(self.lr.device, torch.int64)
        self.params = list(params)
        self.m = [s.index_select(d, idx.to(s.device)).contiguous() for s, d in zip(self.m, self.trial_dims)]
        self.v = [s.index_select(d, idx.to(s.device)).contiguous() for s, d in zip(self.v, self.trial_dims)]
        self._set_hyper(self.lr[idx], self.weight_decay[idx])

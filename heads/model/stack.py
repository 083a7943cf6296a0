"""Stacked JEI-DNN heads: the IMs and gates of T independent models (trials) held along one trial axis.

    heads = StackedHeads.init(exit_dims=[384] * 14, num_classes=100, n_trials=20, trains_last=False, seed=0)
    logits = heads.im_logits(batch_features, last_logits)   # (T, B, L, K)
    g = torch.sigmoid(heads.gate_logits(logits))            # (T, B, L-1)
    logits, g = heads.outputs(split_features, last_logits)  # whole split, in chunks, no grad

IM l < L is Linear(D_l, K) on the cached representation z^l; exit L is the backbone's own head (its cached logits,
frozen) unless the cache's head is not the task's head, in which case a Linear on z^L is trained like the others.
Gate l < L is sigmoid(Linear(4, 1)) over the four softmax statistics of IM l (appendix 9.9).

Layout: the contract's weight of exit l is (T, D_l, K). It is stored as (D_l, T, K) so that one mini-batch of one
exit is ONE matrix product x (B, D_l) @ W (D_l, T*K) for all trials at once, which keeps the CPU's matmul kernel
busy where a batched matmul over T small (D_l, K) products would not. state_dict() speaks the contract's layout.
"""
from dataclasses import dataclass

import torch

from heads.model.gate_features import gate_features

N_GATE_FEATURES = 4
COMPUTE = torch.float32   # what the heads compute in; features held as float16 are converted per chunk or batch
OUTPUT_ROWS = 1024        # rows per block of outputs(): the block boundaries fix the float rounding of a split


def gate_pre_activation(feats: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """A gate's pre-activation a = w . s + b on the four statistics s of its IM's softmax (eq. 11's g^l = sigmoid(a);
    appendix 9.9): feats (..., 4), weight (..., 4) and bias (...) broadcast against each other. Training, the
    engine and the runtime all call this one, so the four products are added in one order everywhere (the
    runtime's numba row kernel adds them in this order too)."""
    return (feats * weight).sum(-1) + bias


@dataclass
class StackedHeads:
    im_weight: list[torch.Tensor]   # per trained exit: (D_l, T, K)
    im_bias: list[torch.Tensor]     # per trained exit: (T, K)
    gate_weight: torch.Tensor       # (T, L-1, 4)
    gate_bias: torch.Tensor         # (T, L-1)
    trains_last: bool               # exit L is a trained Linear (else the cached backbone logits)
    epochs_trained: torch.Tensor    # (T,) int64, bi-level epochs until the kept (best) state

    # ---- construction -------------------------------------------------------------------------------------
    @classmethod
    def init(cls, exit_dims: list[int], num_classes: int, n_trials: int, trains_last: bool,
             seed: int = 0, device="cpu") -> "StackedHeads":
        """nn.Linear's default init, drawn ONCE from `seed` and repeated over the trials, so that every trial starts
        from the same weights whether it is trained alone or in a stack."""
        if len(exit_dims) < 2:
            raise ValueError(f"an early-exit model needs at least 2 exits, got {len(exit_dims)}")
        if num_classes < 2 or n_trials < 1:
            raise ValueError(f"need num_classes >= 2 and n_trials >= 1, got {num_classes} and {n_trials}")
        gen = torch.Generator().manual_seed(seed)
        n_ims = len(exit_dims) if trains_last else len(exit_dims) - 1

        def uniform(shape, fan_in):
            bound = fan_in ** -0.5
            return (torch.rand(shape, generator=gen) * 2 - 1) * bound

        im_weight, im_bias = [], []
        for dim in exit_dims[:n_ims]:
            w = uniform((dim, 1, num_classes), dim).expand(dim, n_trials, num_classes)
            b = uniform((1, num_classes), dim).expand(n_trials, num_classes)
            im_weight.append(w.contiguous().to(device))
            im_bias.append(b.contiguous().to(device))
        n_gates = len(exit_dims) - 1
        gate_weight = uniform((1, n_gates, N_GATE_FEATURES), N_GATE_FEATURES).expand(n_trials, -1, -1)
        gate_bias = uniform((1, n_gates), N_GATE_FEATURES).expand(n_trials, -1)
        return cls(im_weight, im_bias, gate_weight.contiguous().to(device), gate_bias.contiguous().to(device),
                   trains_last, torch.zeros(n_trials, dtype=torch.int64))

    # ---- shapes -------------------------------------------------------------------------------------------
    @property
    def n_trials(self) -> int:
        return self.gate_weight.shape[0]

    @property
    def n_exits(self) -> int:
        return self.gate_weight.shape[1] + 1

    @property
    def num_classes(self) -> int:
        return self.im_bias[0].shape[1]

    @property
    def exit_dims(self) -> list[int]:
        return [w.shape[0] for w in self.im_weight]

    def im_params(self) -> list[torch.Tensor]:
        return [*self.im_weight, *self.im_bias]

    def gate_params(self) -> list[torch.Tensor]:
        return [self.gate_weight, self.gate_bias]

    # ---- forward ------------------------------------------------------------------------------------------
    def im_logits(self, features: list[torch.Tensor], last_logits: torch.Tensor | None = None) -> torch.Tensor:
        """features: per exit (B, D_l) (at least the trained exits); last_logits: (B, K) frozen exit-L logits when
        the last exit is not trained. Returns (T, B, L, K), a view of a (B, L, T, K) tensor."""
        n_trials, n_classes = self.n_trials, self.num_classes
        per_exit = []
        for x, w, b in zip(features, self.im_weight, self.im_bias):
            # one product for all trials: (B, D) @ (D, T*K)
            out = torch.addmm(b.reshape(1, -1), x, w.reshape(w.shape[0], -1))
            per_exit.append(out.view(x.shape[0], n_trials, n_classes))
        if not self.trains_last:
            if last_logits is None:
                raise ValueError("the last exit is the backbone's head: pass its cached logits (last_logits)")
            per_exit.append(last_logits[:, None, :].expand(-1, n_trials, -1))
        return torch.stack(per_exit, dim=1).permute(2, 0, 1, 3)

    def gate_logits(self, logits: torch.Tensor, detach_gates: bool = False) -> torch.Tensor:
        """(T, B, L, K) IM logits -> (T, B, L-1) gate pre-activations (sigmoid gives g^l). detach_gates keeps the
        gradient through the gate inputs (into the IMs) while leaving the gate parameters out of the graph."""
        feats = gate_features(torch.softmax(logits[:, :, :-1, :], dim=-1))   # (T, B, L-1, 4)
        w, b = self.gate_weight, self.gate_bias
        if detach_gates:
            w, b = w.detach(), b.detach()
        return gate_pre_activation(feats, w[:, None], b[:, None])

    @torch.no_grad()
    def outputs(self, features: list[torch.Tensor], last_logits: torch.Tensor | None = None,
                chunk: int = OUTPUT_ROWS, gates: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A whole split: features per exit (N, D_l) -> (logits (T, N, L, K), g (T, N, L-1); None without gates)."""
        n = features[0].shape[0]
        logits_out, g_out = [], []
        for lo in range(0, n, chunk):
            feats = [f[lo:lo + chunk].to(COMPUTE) for f in features]   # features may be held as float16
            last = None if last_logits is None else last_logits[lo:lo + chunk].to(COMPUTE)
            logits = self.im_logits(feats, last)
            if gates:
                g_out.append(torch.sigmoid(self.gate_logits(logits)))
            logits_out.append(logits)
        return torch.cat(logits_out, dim=1), torch.cat(g_out, dim=1) if gates else None

    # ---- trials and checkpoints ---------------------------------------------------------------------------
    def select(self, trials) -> "StackedHeads":
        """A StackedHeads with only the given trial(s) (an int or a list of ints), copied."""
        idx = torch.as_tensor([trials] if isinstance(trials, int) else list(trials), dtype=torch.int64)
        if idx.numel() == 0 or int(idx.min()) < 0 or int(idx.max()) >= self.n_trials:
            raise ValueError(f"trial index out of range 0..{self.n_trials - 1}: {trials}")
        dev = self.gate_weight.device
        return StackedHeads([w.detach()[:, idx.to(dev)].clone() for w in self.im_weight],
                            [b.detach()[idx.to(dev)].clone() for b in self.im_bias],
                            self.gate_weight.detach()[idx.to(dev)].clone(), self.gate_bias.detach()[idx.to(dev)].clone(),
                            self.trains_last, self.epochs_trained[idx].clone())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Contiguous tensors in the contract's layout: im_weight.{l} (T, D_l, K), im_bias.{l} (T, K) for the
        trained exits l (0-based), gate_weight (T, L-1, 4), gate_bias (T, L-1), epochs_trained (T,)."""
        sd = {}
        for l, (w, b) in enumerate(zip(self.im_weight, self.im_bias)):
            sd[f"im_weight.{l}"] = w.detach().permute(1, 0, 2).contiguous().cpu()
            sd[f"im_bias.{l}"] = b.detach().contiguous().cpu()
        sd["gate_weight"] = self.gate_weight.detach().contiguous().cpu()
        sd["gate_bias"] = self.gate_bias.detach().contiguous().cpu()
        sd["epochs_trained"] = self.epochs_trained.detach().cpu()
        return sd

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], device="cpu") -> "StackedHeads":
        missing = {"gate_weight", "gate_bias", "epochs_trained", "im_weight.0"} - set(sd)
        if missing:
            raise ValueError(f"not a StackedHeads state dict: missing {', '.join(sorted(missing))}")
        n_exits = sd["gate_weight"].shape[1] + 1
        n_ims = sum(1 for k in sd if k.startswith("im_weight."))
        if n_ims not in (n_exits - 1, n_exits):
            raise ValueError(f"state dict has {n_ims} IMs for {n_exits} exits (expected {n_exits - 1} or {n_exits})")
        im_weight = [sd[f"im_weight.{l}"].permute(1, 0, 2).contiguous().to(device) for l in range(n_ims)]
        im_bias = [sd[f"im_bias.{l}"].contiguous().to(device) for l in range(n_ims)]
        return cls(im_weight, im_bias, sd["gate_weight"].to(device), sd["gate_bias"].to(device),
                   n_ims == n_exits, sd["epochs_trained"].to(torch.int64))

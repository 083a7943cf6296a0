"""Exit probabilities, exit decisions and gate targets of JEI-DNN (paper sections 4-4.1, appendix 9.15).

    p_g = exit_distribution(g)                 # gates g^1..g^{L-1} in [0, 1] -> P(G = l | x), l = 1..L
    exit_index = exit_decision(p_g)            # 0-based exit each sample takes (first P(E^l | x) > 0.5)
    leaving = ExitRule(n, 0.5).step(g_l)       # the same decision one exit at a time (the runtime), see ExitRule
    costs = exit_costs(ce, lam, ic_norm)       # C^l = CE + lam IC_norm^l per trial, sample and exit
    t = gate_targets(costs, rule="subsequent") # binary targets of gates 1..L-1 from per-exit costs C^l
    w = classifier_weights(g, "weighted")      # eq. 30's weight of each exit's CE: P(G = l | x)
    w = warmup_exit_weights(L, trains_last)    # eq. 17's: L - l

All three work on any leading batch shape (trials, samples, ...); the exit axis is the last one.
"""
import numba
import numpy as np
import torch

TARGET_RULES = ("subsequent", "ifmin")
IM_LOSSES = ("weighted", "uniform")


def exit_distribution(g: torch.Tensor) -> torch.Tensor:
    """(..., L-1) gate outputs in [0, 1] -> (..., L) exit probabilities P(G = l | x) that sum to 1.

    The last gate is g^L = 1. Once the running sum of the g^j passes 1 the remaining entries of eq. 8 are
    negative; clamping them at 0 keeps a distribution (the entry where the sum crosses 1 takes exactly what is left).
    """
    if g.dim() < 1 or g.shape[-1] < 1:
        raise ValueError(f"exit_distribution needs gate outputs of shape (..., L-1) with L >= 2, got {tuple(g.shape)}")
    g_full, room = exit_mass_terms(g)
    return torch.minimum(g_full, room).clamp_min(0.0)


def exit_mass_terms(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two sides of eqs. 7-8's minimum, P(G=1) = g^1, P(G=l) = min(g^l, 1 - sum_{j<l} g^j): (g with g^L = 1
    appended, the mass 1 - sum_{j<l} g^j still left at each exit), both (..., L). exit_distribution takes their
    clamped minimum; DiffBranch's closed-form gradient needs them apart."""
    g_full = torch.cat([g, torch.ones_like(g[..., :1])], dim=-1)
    mass_before = torch.cat([torch.zeros_like(g[..., :1]), torch.cumsum(g, dim=-1)], dim=-1)
    return g_full, 1.0 - mass_before


def classifier_weights(g: torch.Tensor, im_loss: str = "weighted") -> torch.Tensor:
    """Eq. 30: the weight of exit l's cross-entropy in the CLASSIFIER loss, per sample, from the gate outputs g
    (..., L-1): P(G = l | x) ("weighted"), or 1 at every exit ("uniform": plain CE, what the authors' public code
    computes in effect, its per-exit normalisation cancelling the weights). The caller detaches g (eq. 30) or
    not (eq. 29)."""
    if im_loss not in IM_LOSSES:
        raise ValueError(f"unknown im_loss {im_loss!r}; choose one of {', '.join(IM_LOSSES)}")
    if im_loss == "uniform":
        return torch.ones((*g.shape[:-1], g.shape[-1] + 1), dtype=g.dtype, device=g.device)
    return exit_distribution(g)


def warmup_exit_weights(n_exits: int, trains_last: bool, device=None, dtype=torch.float32) -> torch.Tensor:
    """Eq. 17: the weight L - l of IM l's cross-entropy in the warm-up loss, l = 1..L. The last exit's is 0 when it
    is the backbone's frozen head; a trained last head gets 1 (eq. 17 would give it 0 and leave it untrained)."""
    weight = torch.arange(n_exits, 0, -1, dtype=dtype, device=device) - 1.0
    weight[-1] = 1.0 if trains_last else 0.0
    return weight


def exit_probabilities(p_g: torch.Tensor) -> torch.Tensor:
    """(..., L) P(G = l | x) -> (..., L) P(E^l | x), inverting eq. 4.

    P(E^l) = P(G=l) / (1 - sum_{j<l} P(G=j)); the denominator is computed as the mass still left at l,
    sum_{j>=l} P(G=j), which is exact and never negative. Where nothing is left (0/0) the sample would already
    have exited, and P(E^l) = 1 says so; P(E^L) = 1 always.
    """
    remaining = torch.flip(torch.cumsum(torch.flip(p_g, [-1]), dim=-1), [-1])
    p_e = torch.where(remaining > 0, p_g / torch.where(remaining > 0, remaining, torch.ones_like(remaining)),
                      torch.ones_like(p_g))
    p_e = p_e.clamp(0.0, 1.0)
    p_e[..., -1] = 1.0
    return p_e


def exit_decision(p_g: torch.Tensor, threshold: float = 0.5, sample: bool = False,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """(..., L) P(G | x) -> (...,) int64, the 0-based exit taken: the first l with P(E^l | x) > threshold (eq. 3),
    or, with sample=True, the first l whose Bernoulli draw e^l ~ P(E^l | x) is 1. The last exit always fires."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"exit threshold must lie in [0, 1], got {threshold}")
    p_e = exit_probabilities(p_g)
    if sample:
        fire = torch.rand(p_e.shape, generator=generator, device=p_e.device, dtype=p_e.dtype) < p_e
    else:
        fire = p_e > threshold
    fire[..., -1] = True
    # argmax over a bool tensor returns the first True
    return torch.argmax(fire.to(torch.uint8), dim=-1)


class ExitRule:
    """exit_decision one exit at a time, for inference: which of the samples still in flight leave at exit l, from
    their gate g^l and the running sum of their earlier gates only.

        rule = ExitRule(n, threshold)
        leaving = rule.step(g)      # (B,) gates of the samples in flight -> (B,) bool
        rule.keep(rows)             # only these samples stay in flight

    Same numbers as exit_decision(exit_distribution(g^1..g^l)) on the gates seen so far (entries 0..l of P(G|x)
    need nothing later, and the entry after them is the mass still left), with the same float arithmetic: the
    running sum accumulates in float64 and is rounded per exit, as torch.cumsum does for float32 on the CPU;
    P(G=l|x) = min(g^l, 1 - S_{l-1}) clamped at 0 (eqs. 7-8); P(E^l|x) = P(G=l|x) / (P(G=l|x) + max(1 - S_l, 0))
    (eq. 4, the division exit_probabilities makes). exit_decision over all L-1 gates sums the mass left over the
    later exits instead, which can differ in the last bit: a decision differs only for a gate within ~1e-7 of the
    threshold. exit_rule_row is the same arithmetic for one sample, in numba (deploy/runtime.py's kernel).
    """

    def __init__(self, n: int, threshold: float = 0.5, device=None):
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"exit threshold must lie in [0, 1], got {threshold}")
        self.threshold = float(threshold)
        self._views = None   # numpy views of mass and left on the CPU (views())
        if device is None or torch.device(device).type == "cpu":
            self._views = (np.zeros(n), np.ones(n, dtype=np.float32))
            self.mass, self.left = torch.from_numpy(self._views[0]), torch.from_numpy(self._views[1])
        else:
            self.mass = torch.zeros(n, dtype=torch.float64, device=device)   # sum of the gates passed, float64
            self.left = torch.ones(n, device=device)                         # 1 - that sum in float32

    @property
    def can_exit(self) -> bool:
        """False at threshold 1: P(E^l|x) <= 1 never exceeds it, so every sample runs to the last exit."""
        return self.threshold < 1.0

    def step(self, g: torch.Tensor) -> torch.Tensor:
        """(B,) float32 gate outputs g^l of the samples in flight -> (B,) bool, True for those leaving at l.
        While can_exit, the mass left, P(G=l|x) + max(1 - S_l, 0), is > 0 for every sample still in flight (the
        exit where the sum reaches 1 has P(E^l|x) = 1 and lets the sample go), so the division is safe."""
        p_here = torch.minimum(g, self.left).clamp_min_(0.0)
        self.mass.add_(g)
        self.left.copy_(1.0 - self.mass.float())   # in place: views of mass and left stay valid
        return p_here / (p_here + self.left.clamp_min(0.0)) > self.threshold

    def keep(self, rows: torch.Tensor) -> None:
        self.mass, self.left = self.mass[rows], self.left[rows]
        self._views = None

    def views(self) -> tuple[np.ndarray, np.ndarray]:
        """numpy views of (mass, left) of CPU tensors, for a kernel that updates them with exit_rule_row."""
        if self._views is None:
            self._views = (self.mass.numpy(), self.left.numpy())
        return self._views


@numba.njit(inline="always")
def exit_rule_row(g, mass, left, i, threshold):
    """ExitRule.step for sample i in numba: float32 g and threshold, float64 mass[i], float32 left[i] (updated)."""
    p_here = max(min(g, left[i]), np.float32(0.0))
    mass[i] += np.float64(g)
    left[i] = np.float32(1.0) - np.float32(mass[i])
    return p_here / (p_here + max(left[i], np.float32(0.0))) > threshold


def exit_costs(ce: torch.Tensor, lam: torch.Tensor, ic_norm: torch.Tensor) -> torch.Tensor:
    """(T, B, L) per-exit cross-entropies, (T,) lambdas, (L,) IC^l / IC^L -> C^l = CE + lam IC_norm^l (section
    4.1), (T, B, L)."""
    return ce + lam[:, None, None] * ic_norm[None, None, :]


def gate_targets(costs: torch.Tensor, rule: str = "subsequent") -> torch.Tensor:
    """(..., L) per-exit costs C^l -> (..., L-1) float 0/1 targets of gates 1..L-1 (appendix 9.15).

    "subsequent" (eq. 31, ExitSubsequent): t^l = 1 for l >= l* = argmin_l C^l (first minimum), else 0.
    "ifmin" (eq. 32, ExitIfMin): t^l = 1 where no later exit reaches a strictly lower cost,
        t^l = [C^l <= min_{j>l} C^j].
    Reading of eq. 32: its printed cases are identical to eq. 31; the text defines the rule ("only set a gate's
    target to 1 if there is no later IM that reaches a lower cost") and gives t = 0,0,1,0,1,1 as an example. The
    rule above gives t^{l*} = 1 (l* is the global minimum), 0 before l* (l* itself is strictly cheaper, since
    argmin takes the first minimum), and after l* a 1 exactly where the exit is a running minimum from the right.
    Ties count as "not lower", so a later exit of equal cost does not switch a gate off.
    """
    if rule not in TARGET_RULES:
        raise ValueError(f"unknown gate target rule {rule!r}; choose one of {', '.join(TARGET_RULES)}")
    if costs.dim() < 1 or costs.shape[-1] < 2:
        raise ValueError(f"gate_targets needs costs of shape (..., L) with L >= 2, got {tuple(costs.shape)}")
    n_exits = costs.shape[-1]
    if rule == "subsequent":
        best = torch.argmin(costs, dim=-1, keepdim=True)
        gates = torch.arange(n_exits - 1, device=costs.device)
        return (gates >= best).to(costs.dtype)
    later = costs[..., 1:]
    later_min = torch.flip(torch.cummin(torch.flip(later, [-1]), dim=-1).values, [-1])  # min_{j>l} C^j
    return (costs[..., :-1] <= later_min).to(costs.dtype)

"""JEI-DNN training from cached features: a lambda-independent warm-up, then the bi-level phase (Algorithm 1) for
a whole stack of trials (lambdas, and per-trial lr / weight decay / warm-up epochs) in one pass.

    data = make_train_data(open_cache("cache/x"))      # heads/train/data.py
    trials = [{"lam": lam} for lam in (0.01, 0.1, 1.0)]
    warm = warmup(data, settings, trials=trials)       # once, for every (lr, weight_decay) the trials use
    heads = train_stack(data, warm, trials, settings)  # StackedHeads, one best-on-V2 state per trial

Design decisions (the paper leaves them open):
- Warm-up loss (eq. 17): IM l's cross-entropy weighted by (L - l); lr_0 of eq. 17 is the optimiser's lr. A trained
  last head (cache head is not the task's head) gets weight 1 (eq. 17 would give it 0). With Adam a constant loss
  scale mostly cancels; what remains is the relative strength of the (coupled, L2) weight decay.
  Early stopping per IM on V2 accuracy: the snapshot after warm-up epoch w holds, per IM, its best epoch <= w, so a
  grid over warm-up epochs needs one warm-up pass.
- CLASSIFIER loss (eq. 30): mean over the batch of sum_l P(G=l|x) CE_l, P detached. Normalising per exit by
  sum_b P(G=l|x_b) would cancel the weighting (the authors' public code did that), which is what im_loss="uniform"
  (weights all 1) reproduces. full_gradient (eq. 29) keeps the gradient through the gate inputs:
  mean_b sum_l P(G=l|x) (CE_l + lam IC_norm^l), the gate parameters themselves left out of the graph.
- GATE loss (eq. 16): sum over gates of the batch-mean BCE with pos_weight = n_neg / n_pos of that gate's targets
  on V1, recomputed at the start of every epoch and clipped to [1/cap, cap] (gate_weight_cap; also when a class
  is absent).
- The state flips every bi_switch batches, counted over the whole bi-level phase (not reset per epoch); the first
  state is GATE.
- Early stopping of each trial on the V2 value of its own objective (eq. 5 at the exit actually taken):
  mean(CE at the exit taken + lam IC_norm at that exit), deterministic exits (P(E^l|x) > 0.5). V2 accuracy alone
  would reward spending more compute than lam asks for. The best state per trial is kept; a trial that stopped
  leaves the stack. A trial with w warm-up epochs gets max_epochs - w bi-level epochs (Algorithm 1).
- The losses below are the definitions (and what the tests differentiate with autograd); training steps run
  through heads.train.engine.StackEngine, which computes the same gradients in closed form (JEI-DNN-FULL by autograd).
- Reproducibility: initial weights are drawn once and repeated over the trials; batch orders come from generators
  shared by the stack; so a trial trained in a stack matches the same trial trained alone (up to float rounding).
"""
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from heads.model.exits import IM_LOSSES, TARGET_RULES, classifier_weights, exit_costs, gate_targets, warmup_exit_weights
from heads.model.stack import StackedHeads
from heads.train import finite
from heads.train.data import SplitTensors, TrainData
from heads.train.engine import StackEngine
from heads.train.kernels import exit_cross_entropy

# The warm-up's convergence test (warmup_patience) looks at the mean over IMs of each IM's best V2 accuracy so far,
# not at any single IM: at lr 0.01 single IMs swing by points from epoch to epoch, so with a dozen IMs one of them
# sets a new best by chance almost every epoch and "no IM improved" never holds (README, measured on the demo cache).
WARMUP_MIN_GAIN = 0.001


TRIAL_KEYS = ("lam", "lr", "weight_decay", "warmup_epochs")


# Appendix 9.1.2's per-dataset values; the others take TrainSettings' defaults. The appendix reads "15 for CIFAR10
# and SVHN, 20 for CIFAR100LT and 30 for CIFAR100LT": the repeated CIFAR100LT is taken to be CIFAR-100.
PAPER_DATASET_DEFAULTS = {
    "cifar10": {"max_epochs": 15}, "svhn": {"max_epochs": 15, "batch_size": 256},
    "cifar100-lt": {"max_epochs": 20}, "cifar100": {"max_epochs": 30},
}


# Named sets of TrainSettings values (`--recipe`); options given explicitly override them, and they override the
# per-dataset defaults above. "paper" is Algorithm 1 as printed (the dataclass defaults). "converged", the command
# line's default, trains the IMs to convergence first (the warm-up stops when they stop improving on V2) and then
# only the gates (GATE state throughout: bi_switch beyond any epoch), with every IM kept trained (uniform loss) and
# the ExitIfMin targets: on real features the CLASSIFIER phase of eq. 30 degrades converged IMs, and IMs that
# receive no exit mass are never trained (README, measured with `compare` on two feature sets).
RECIPES = {
    "paper": {},
    "converged": {"warmup_epochs": 30, "warmup_patience": 3, "max_epochs": 34, "im_loss": "uniform",
                  "targets": "ifmin", "bi_switch": 1 << 40},
}


DEFAULT_RECIPE = "converged"


@dataclass(frozen=True)
class TrainSettings:
    """Appendix 9.1.2 defaults (Adam, lr 0.01, weight decay 5e-4, batch 64, 15 epochs for CIFAR-10/SVHN)."""
    lr: float = 0.01
    weight_decay: float = 5e-4
    batch_size: int = 64
    max_epochs: int = 15          # warm-up + bi-level epochs (Algorithm 1: e in WE..E)
    warmup_epochs: int = 2        # the paper searches {1, ..., E/2}; with warmup_patience, the most warm-up epochs
    # 0: the warm-up runs exactly warmup_epochs epochs (the paper). n > 0: it stops early once the IMs' mean best V2
    # accuracy has gained less than WARMUP_MIN_GAIN over the last n epochs, and the bi-level phase starts from those
    # per-IM best states. Its epoch budget stays max_epochs - warmup_epochs either way, so the stop does not change
    # how long the gates learn.
    warmup_patience: int = 0
    bi_switch: int = 200          # batches between GATE <-> CLASSIFIER switches
    patience: int = 4             # bi-level epochs without a better V2 objective before a trial stops
    targets: str = "subsequent"   # gate targets: "subsequent" (eq. 31) or "ifmin" (eq. 32)
    full_gradient: bool = False   # JEI-DNN-FULL (eq. 29)
    im_loss: str = "weighted"     # "weighted" (eq. 30) or "uniform" (plain CE, the authors' code in effect)
    # The gates' BCE weighs positives by n_neg/n_pos of their V1 targets, clipped to [1/cap, cap] (1 = unweighted).
    # Balanced weights move each gate's 0.5 point to balanced odds, so a gate whose positives are rare fires far too
    # often at the 0.5 exit rule: on real features the V2 accuracy falls the larger the cap (README, "Stage two", has
    # the measurements for caps 1, 2, 5 and unclipped). 2 keeps the paper's class weighting while bounding that shift.
    gate_weight_cap: float = 2.0
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self):
        if self.lr <= 0 or self.weight_decay < 0:
            raise ValueError(f"need lr > 0 and weight_decay >= 0, got {self.lr} and {self.weight_decay}")
        if self.batch_size < 1 or self.bi_switch < 1 or self.patience < 1:
            raise ValueError("batch_size, bi_switch and patience must be >= 1")
        if self.warmup_patience < 0:
            raise ValueError(f"warmup_patience must be >= 0 (0 = a fixed warm-up), got {self.warmup_patience}")
        if not 0 <= self.warmup_epochs < self.max_epochs:
            raise ValueError(f"warmup_epochs must lie in [0, max_epochs), got {self.warmup_epochs} "
                             f"with max_epochs {self.max_epochs}")
        if self.targets not in TARGET_RULES:
            raise ValueError(f"unknown targets {self.targets!r}; choose one of {', '.join(TARGET_RULES)}")
        if not self.gate_weight_cap >= 1:
            raise ValueError(f"gate_weight_cap must be >= 1 (1 = unweighted), got {self.gate_weight_cap}")
        if self.im_loss not in IM_LOSSES:
            raise ValueError(f"unknown im_loss {self.im_loss!r}; choose one of {', '.join(IM_LOSSES)}")
        if self.full_gradient and self.im_loss != "weighted":
            raise ValueError("full_gradient (eq. 29) differentiates the weighted loss: it needs im_loss='weighted'")


def default_settings(recipe: str = DEFAULT_RECIPE, **values) -> "TrainSettings":
    """The settings the command line uses when given no option: a recipe's values over the dataclass defaults
    (which are the paper's), then `values`."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    return TrainSettings(**{**RECIPES[recipe], **values})


# ---- losses ------------------------------------------------------------------------------------------------------
def warmup_loss(heads: StackedHeads, feats, labels, last_logits) -> torch.Tensor:
    """Eq. 17: sum over trained IMs of (L - l) CE_l, batch mean, summed over trials (a trained last head: weight 1)."""
    ce = exit_cross_entropy(heads.im_logits(feats, last_logits), labels)
    return (ce * warmup_exit_weights(ce.shape[-1], heads.trains_last, ce.device, ce.dtype)).sum(-1).mean(-1).sum()


def gate_loss(heads: StackedHeads, feats, labels, last_logits, lam, ic_norm, rule, pos_weight) -> torch.Tensor:
    """GATE state (eq. 16): BCE of every gate l < L against the surrogate targets of its trial's costs; the IMs are
    evaluated without gradient, so only the gate parameters are in the graph."""
    with torch.no_grad():
        logits = heads.im_logits(feats, last_logits)
        targets = gate_targets(exit_costs(exit_cross_entropy(logits, labels), lam, ic_norm), rule)
    z = heads.gate_logits(logits)                                            # (T, B, L-1)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(
        z, targets, pos_weight=pos_weight[:, None, :], reduction="none")
    return bce.mean(1).sum()


def classifier_loss(heads: StackedHeads, feats, labels, last_logits, lam, ic_norm, im_loss="weighted",
                    full_gradient=False) -> torch.Tensor:
    """CLASSIFIER state: eq. 30 (P(G=l|x) detached), eq. 29 with full_gradient, or plain CE (im_loss="uniform").
    The gate parameters are never in the graph."""
    logits = heads.im_logits(feats, last_logits)
    ce = exit_cross_entropy(logits, labels)
    if full_gradient and im_loss == "weighted":
        p_g = classifier_weights(torch.sigmoid(heads.gate_logits(logits, detach_gates=True)))
        return (p_g * exit_costs(ce, lam, ic_norm)).sum(-1).mean(-1).sum()   # eq. 29
    with torch.no_grad():
        p_g = classifier_weights(torch.sigmoid(heads.gate_logits(logits)), im_loss)
    return (p_g * ce).sum(-1).mean(-1).sum()                                  # eq. 30


# ---- evaluation during training ----------------------------------------------------------------------------------
@torch.no_grad()
def exited_metrics(heads: StackedHeads, split: SplitTensors, lam, ic_norm) -> dict[str, torch.Tensor]:
    """StackEngine.exited_metrics for heads trained outside an engine (baselines), on a copy of them."""
    zeros = torch.zeros(heads.n_trials)
    engine = StackEngine(heads.select(list(range(heads.n_trials))), zeros, zeros, batch_size=1)
    return engine.exited_metrics(split, lam, ic_norm)


# ---- progress ----------------------------------------------------------------------------------------------------
@dataclass
class EpochReport:
    """What the progress hook sees after every epoch. Warm-up: accuracy = best V2 accuracy of each IM (best over
    the (lr, weight_decay) pairs), the other lists empty. Bi-level: per trial, V2 accuracy, normalised cost and
    objective (the early-stopping value) of its kept (best) state, whether it is still training, and the V2
    accuracy, cost and objective of this epoch's state (NaN for trials that did not train this epoch), and whether
    this epoch's state became the kept one."""
    phase: str                # "warmup" | "bilevel"
    epoch: int                # 1-based within the phase
    epochs: int               # epochs of the phase at most
    accuracy: list[float]
    cost: list[float] = field(default_factory=list)
    active: list[bool] = field(default_factory=list)
    objective: list[float] = field(default_factory=list)
    epoch_accuracy: list[float] = field(default_factory=list)
    epoch_cost: list[float] = field(default_factory=list)
    epoch_objective: list[float] = field(default_factory=list)
    improved: list[bool] = field(default_factory=list)


Progress = Callable[[EpochReport], None]


def seed_streams(seed: int) -> tuple[int, int, int]:
    """Independent streams for: initial weights, warm-up batch order, bi-level batch order."""
    init, warm, bilevel = np.random.SeedSequence(seed).generate_state(3)
    return int(init), int(warm), int(bilevel)


# ---- early stopping ----------------------------------------------------------------------------------------------
class BestState:
    """The best value so far of every slot (a trial, or an IM of an (lr, weight decay) pair), lower is better
    unless higher=True, and the updates since each slot last improved (early stopping: stale >= patience). The
    caller keeps the matching parameters of the slots update() says improved."""

    def __init__(self, shape, higher: bool = False, device="cpu"):
        self.higher = higher
        self.best = torch.full(shape, -math.inf if higher else math.inf, dtype=torch.float64, device=device)
        self.stale = torch.zeros(shape, dtype=torch.int64, device=device)

    def update(self, value: torch.Tensor, index: torch.Tensor | None = None,
               where: torch.Tensor | None = None) -> torch.Tensor:
        """Compare `value` with the best of the slots `index` (default all); returns the improved mask over the
        compared slots (`where` False: never improved). Every slot not improved counts one more stale update."""
        best = self.best if index is None else self.best[index]
        improved = value > best if self.higher else value < best
        if where is not None:
            improved &= where
        if index is None:
            self.best = torch.where(improved, value.to(self.best.dtype), self.best)
            full = improved
        else:
            self.best[index] = torch.where(improved, value.to(self.best.dtype), best)
            full = torch.zeros_like(self.stale, dtype=torch.bool)
            full[index] = improved
        self.stale = torch.where(full, 0, self.stale + 1)
        return improved


# ---- warm-up -----------------------------------------------------------------------------------------------------
@dataclass
class WarmState:
    """IM weights after each warm-up epoch w = 0..epochs (0 = initial), per (lr, weight_decay) pair; each IM at its
    best V2 accuracy among epochs <= w. Stacked along the trial axis in the order of `optim`."""
    optim: list[tuple[float, float]]
    snapshots: list[tuple[list[torch.Tensor], list[torch.Tensor]]]   # [w] -> (im_weight (D,T,K), im_bias (T,K))
    v2_accuracy: torch.Tensor                                        # (epochs, len(optim), n_ims) per epoch
    trains_last: bool
    converged: bool = False   # stopped by warmup_patience: later epochs count as the last one

    @property
    def epochs(self) -> int:
        return len(self.snapshots) - 1

    def reaches(self, epochs: int) -> bool:
        """Whether a trial with this many warm-up epochs can start from this warm-up."""
        return 0 <= epochs <= self.epochs or (self.converged and epochs >= 0)

    def initial_ims(self, lr: float, weight_decay: float, epochs: int):
        """(im_weight, im_bias) with a trial axis of 1 for the bi-level phase of one trial."""
        if (lr, weight_decay) not in self.optim:
            raise ValueError(f"no warm-up for lr={lr}, weight_decay={weight_decay}; warmed: {self.optim}")
        if not self.reaches(epochs):
            raise ValueError(f"warm-up ran {self.epochs} epochs, a trial asks for {epochs}")
        j = self.optim.index((lr, weight_decay))
        weights, biases = self.snapshots[min(epochs, self.epochs)]
        return [w[:, j:j + 1] for w in weights], [b[j:j + 1] for b in biases]

    def start_heads(self, data: "TrainData", starts: list[tuple[float, float, int]], seed: int,
                    device) -> StackedHeads:
        """A heads stack of one trial per (lr, weight decay, warm-up epochs) in `starts`: its IMs those of that
        warm-up after that many epochs (each IM at its best V2 epoch so far, copied), its gates drawn from `seed`,
        epochs_trained the warm-up epochs it had. Where every trial and baseline starts from."""
        heads = StackedHeads.init(data.exit_dims, data.num_classes, len(starts), data.trains_last, seed, device)
        ims = [self.initial_ims(*start) for start in starts]
        heads.im_weight = [torch.cat([w[i] for w, _ in ims], dim=1).to(device) for i in range(len(heads.im_weight))]
        heads.im_bias = [torch.cat([b[i] for _, b in ims], dim=0).to(device) for i in range(len(heads.im_bias))]
        heads.epochs_trained[:] = torch.tensor([min(start[2], self.epochs) for start in starts])
        return heads


def _resolve_trials(trials: list[dict], settings: TrainSettings) -> list[dict]:
    if not trials:
        raise ValueError("no trials to train")
    out = []
    for trial in trials:
        unknown = set(trial) - set(TRIAL_KEYS)
        if unknown or "lam" not in trial:
            raise ValueError(f"a trial needs 'lam' and may set {', '.join(TRIAL_KEYS[1:])}; got {sorted(trial)}")
        t = {"lam": float(trial["lam"]), "lr": float(trial.get("lr", settings.lr)),
             "weight_decay": float(trial.get("weight_decay", settings.weight_decay)),
             "warmup_epochs": int(trial.get("warmup_epochs", settings.warmup_epochs))}
        if t["lam"] < 0 or t["lr"] <= 0 or t["weight_decay"] < 0:
            raise ValueError(f"a trial needs lam >= 0, lr > 0 and weight_decay >= 0, got {t}")
        if not 0 <= t["warmup_epochs"] < settings.max_epochs:
            raise ValueError(f"warmup_epochs must lie in [0, max_epochs={settings.max_epochs}), got {t}")
        out.append(t)
    return out


def warmup(data: TrainData, settings: TrainSettings, progress: Progress | None = None,
           trials: list[dict] | None = None) -> WarmState:
    """Train all IMs on all training samples (eq. 17), once per distinct (lr, weight_decay) of `trials` (default:
    the settings' pair), all pairs stacked, for the largest warm-up epoch count asked for; with
    settings.warmup_patience = n > 0, stopped earlier once, for every pair, the mean over IMs of their best V2
    accuracy has gained less than WARMUP_MIN_GAIN in the last n epochs (the IMs have converged; the state returned
    is marked `converged`)."""
    resolved = _resolve_trials(trials or [{"lam": 0.0}], settings)
    optim = list(dict.fromkeys((t["lr"], t["weight_decay"]) for t in resolved))
    epochs = max(t["warmup_epochs"] for t in resolved)
    seed_init, seed_warm, _ = seed_streams(settings.seed)
    device = settings.device
    heads = StackedHeads.init(data.exit_dims, data.num_classes, len(optim), data.trains_last, seed_init, device)
    engine = StackEngine(heads, torch.tensor([o[0] for o in optim]), torch.tensor([o[1] for o in optim]),
                         settings.batch_size)
    n_w = len(heads.im_weight)
    # eq. 17's weights L - l per exit (a trained last head: 1), as CE coefficients per sample
    exit_weight = warmup_exit_weights(len(data.exit_dims), data.trains_last, device)
    best_w = [w.clone() for w in heads.im_weight]
    best_b = [b.clone() for b in heads.im_bias]
    tracker = BestState((len(optim), n_w), higher=True, device=device)                # per pair and IM
    snapshots = [([w.clone() for w in best_w], [b.clone() for b in best_b])]
    history = []
    gen = torch.Generator().manual_seed(seed_warm)
    converged, level = False, []      # level[e]: per (lr, weight decay) pair, the mean best V2 accuracy after epoch e
    for epoch in range(epochs):
        for feats, labels, last in data.train.epoch(settings.batch_size, gen, device):
            out = engine.forward(feats, last, labels, gates=False)
            coef = (exit_weight / labels.shape[0]).expand(len(optim), labels.shape[0], -1)
            engine.im_step(out, feats, labels, coef)
        finite.check_heads(heads, "warm-up", epoch + 1, [f"lr {o[0]:g}, weight decay {o[1]:g}" for o in optim])
        acc = engine.im_accuracy(data.v2)
        history.append(acc)
        better = tracker.update(acc)                                              # (n_optim, n_ims)
        best_acc = tracker.best
        for i in range(n_w):
            best_w[i] = torch.where(better[:, i][None, :, None], heads.im_weight[i], best_w[i])
            best_b[i] = torch.where(better[:, i][:, None], heads.im_bias[i], best_b[i])
        snapshots.append(([w.clone() for w in best_w], [b.clone() for b in best_b]))
        if progress is not None:
            progress(EpochReport("warmup", epoch + 1, epochs, best_acc.max(0).values.tolist()))
        level.append(best_acc.mean(1))
        n = settings.warmup_patience
        if n and len(level) > n and epoch + 1 < epochs and bool((level[-1] - level[-1 - n] < WARMUP_MIN_GAIN).all()):
            converged = True
            break
    accs = torch.stack(history) if history else torch.zeros(0, len(optim), n_w, dtype=torch.float64)
    return WarmState(optim, snapshots, accs.cpu(), data.trains_last, converged)


# ---- bi-level phase ----------------------------------------------------------------------------------------------
def train_stack(data: TrainData, warm: WarmState, trials: list[dict], settings: TrainSettings,
                progress: Progress | None = None) -> StackedHeads:
    """Algorithm 1 after the warm-up, for every trial at once; returns each trial's best state on V2. Trials that
    stop (early stopping, or the end of their epoch budget) leave the stack, so the later epochs cost less."""
    resolved = _resolve_trials(trials, settings)
    if warm.trains_last != data.trains_last:
        raise ValueError("the warm-up state and the data disagree on whether the last head is trained")
    device, n_trials = settings.device, len(resolved)
    seed_init, _, seed_bilevel = seed_streams(settings.seed)
    heads = warm.start_heads(data, [(t["lr"], t["weight_decay"], t["warmup_epochs"]) for t in resolved], seed_init,
                             device)
    heads.epochs_trained[:] = 0                             # from here: the bi-level epochs of the kept state
    best = heads.select(list(range(n_trials)))

    lam = torch.tensor([t["lam"] for t in resolved], device=device)
    budget = torch.tensor([settings.max_epochs - t["warmup_epochs"] for t in resolved], device=device)
    ic_norm = data.ic_norm.to(device)
    engine = StackEngine(heads, torch.tensor([t["lr"] for t in resolved]),
                         torch.tensor([t["weight_decay"] for t in resolved]), settings.batch_size)
    stack = torch.arange(n_trials, device=device)     # the trial (index into `resolved`) of each stack position

    tracker = BestState((n_trials,), device=device)                     # the V2 objective of each trial
    best_acc = torch.zeros(n_trials, dtype=torch.float64, device=device)
    best_cost = torch.zeros(n_trials, dtype=torch.float64, device=device)
    active = torch.ones(n_trials, dtype=torch.bool, device=device)
    gen = torch.Generator().manual_seed(seed_bilevel)
    gate_state, step = True, 0                                                   # Algorithm 1 line 11
    n_epochs = int(budget.max())
    for epoch in range(n_epochs):
        active &= epoch < budget
        if not bool(active.any()):
            break
        running = active[stack]
        if not bool(running.all()):
            engine.keep(running.nonzero().squeeze(1))
            stack = stack[running]
        lam_s = lam[stack]
        pos_weight = engine.pos_weight(data.v1, lam_s, ic_norm, settings.targets, settings.gate_weight_cap)
        for feats, labels, last in data.train.epoch(settings.batch_size, gen, device):
            out = engine.forward(feats, last, labels)
            if gate_state:
                engine.gate_step(out, lam_s, ic_norm, settings.targets, pos_weight)
            elif settings.full_gradient:
                engine.im_step_autograd(lambda h: classifier_loss(h, feats, labels, last, lam_s, ic_norm,
                                                                  settings.im_loss, True))
            else:
                engine.im_step(out, feats, labels, engine.classifier_coef(out, settings.im_loss))
            step += 1
            if step % settings.bi_switch == 0:
                gate_state = not gate_state
        v2 = engine.exited_metrics(data.v2, lam_s, ic_norm)
        labels_s = [f"lambda {resolved[i]['lam']:g} (lr {resolved[i]['lr']:g})" for i in stack.tolist()]
        finite.check_heads(engine.heads, "bi-level", epoch + 1, labels_s)
        finite.check_values(~torch.isfinite(v2["objective"]).cpu(), "bi-level", epoch + 1, labels_s, "V2 objective")
        improved_s = tracker.update(v2["objective"], stack)
        improved = tracker.stale == 0                                   # over all trials: improved now
        best_acc[stack] = torch.where(improved_s, v2["accuracy"], best_acc[stack])
        best_cost[stack] = torch.where(improved_s, v2["cost"], best_cost[stack])
        copy_trials(best, engine.heads, stack[improved_s], improved_s.nonzero().squeeze(1))
        best.epochs_trained[improved.cpu()] = epoch + 1
        active &= tracker.stale < settings.patience
        if progress is not None:
            now = {k: torch.full((n_trials,), math.nan, dtype=torch.float64, device=device)
                   for k in ("accuracy", "cost", "objective")}
            for k, values in now.items():
                values[stack] = v2[k].to(values)
            progress(EpochReport("bilevel", epoch + 1, n_epochs, best_acc.tolist(), best_cost.tolist(),
                                 active.tolist(), tracker.best.tolist(), now["accuracy"].tolist(),
                                 now["cost"].tolist(), now["objective"].tolist(), improved.tolist()))
    return best


@torch.no_grad()
def copy_trials(dst: StackedHeads, src: StackedHeads, dst_trials: torch.Tensor, src_trials: torch.Tensor) -> None:
    """dst's trials dst_trials[i] <- src's trials src_trials[i] (IMs and gates)."""
    if dst_trials.numel() == 0:
        return
    for d, s in zip(dst.im_weight, src.im_weight):
        d[:, dst_trials] = s[:, src_trials]
    for d, s in zip(dst.im_bias + [dst.gate_weight, dst.gate_bias], src.im_bias + [src.gate_weight, src.gate_bias]):
        d[dst_trials] = s[src_trials]

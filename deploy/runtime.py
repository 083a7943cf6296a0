"""The early-exit network at inference: a frozen backbone plus one trained JEI-DNN model, exiting for real.

    model = EarlyExitModel.from_run("runs/sweep-abc", lam=0.5)   # the selected trial nearest lambda 0.5
    out = model(images)               # images normalised as the cache's dataset transform (image_batch below)
    out.prediction, out.exit_index, out.probs, out.sets          # per sample: class, 0-based exit, p_T, set

How a batch runs: stem, then block by block. After block l < L the samples still in flight get exit l's
representation, IM and gate, P(G=l|x) from their gates so far (eqs. 7-8) and the decision of eq. 4 (P(E^l|x) >
threshold); the samples that exit leave the batch (index_select on the state, token sequences and feature maps
alike) and the loop stops as soon as none are left. Exit L is the backbone's own head, or the trained last IM when
the cache's head was not the task's.

Speed: after a block the work is the exit's representation (a pooling or a norm) and, on the CPU, one serial numba
call, _exit_head_kernel (float16 rounding, IM, softmax, gate statistics, gate, eq. 4 on the running gate sum of
exits.ExitRule): no thread-pool launch, no tensor temporaries, one decision on the host whether the batch
shrinks. At batch 1 every call costs microseconds and a dozen tensor ops per exit were a large part of a small
CNN block. One image on the CPU takes its own path (_forward_one): the same kernel row code on the image's
running gate sum, no batch to cut down and nothing allocated per exit. Calibrated probabilities and conformal
sets are computed once per call, by one more serial call (_finish_kernel): predict_with_sets' sets exactly (a
score too close to its threshold to be sure falls back to predict_with_sets), its probabilities to float32
rounding. Other devices run the same steps as torch ops (_exit_head_torch). bench/runtime_speed.py measures the
runtime against the blocks alone, run up to each sample's exit. What remains at batch 1 is mostly the pooling
per exit (one torch reduction, kept because the cache holds torch's rounding of it): work between two blocks
costs several times what it costs in a tight loop (caches the blocks left cold; bench/README.md).

Identical to the simulation. Stage two (heads/sweep/sweep.py) computes every exit of every sample from the cache and
picks the exit afterwards; here the same numbers must come out of the live backbone. Three things make them agree:
- Rounding: the cache stores representations and backbone logits as float16 (extract/run.py). The live backbone
  computes float32, so every representation (and the backbone head's logits) is rounded to float16 and back
  before the IM reads it, exactly as the cache did (the kernel's _round_to_half is x.half().float(), tested bit
  for bit). Without that, a gate near its threshold or two near-equal logits could decide differently from what
  the run's evaluation recorded.
- The same arithmetic: the gate statistics are those of heads.model.gate_features' kernel, which the simulation used;
  the gate is StackedHeads.gate_logits' sum of products (in its order) and sigmoid; P(G|x) and P(E^l|x) are
  exits.ExitRule, the arithmetic of exit_distribution and exit_probabilities on the gates seen so far (the first l
  entries of P(G|x) only depend on the first l gates). The kernel's IM product and softmax sum in their own
  order, not BLAS's and torch's: the logits can differ from StackedHeads.im_logits' in float32 last bits.
- The same calibration: temperature and conformal thresholds are fitted on V2 of the run's cache with
  heads.evaluation.evaluate.calibrate, from the exits the simulation takes at this threshold.
What can still differ, at float-rounding level: the backbone's float32 output of a sample may depend on the batch
it runs in (BLAS / oneDNN blocking), which can move a feature across a float16 rounding boundary; the logits'
last bits (above); and P(E^l|x)
in the simulation divides by the exit mass left as summed over the later exits, here as P(G=l|x) + what the
earlier gates and this one leave; and torch's sigmoid over a whole split uses a vectorised exp that can differ in
the last bit from the scalar one of a small batch. Each changes a decision only when a gate sits within ~1e-7 of
the threshold or two logits tie to ~1e-7: on the 10,000 test images of two demo-cache runs none did
(bench/runtime_check.py, bench/README.md).
A cache extracted on a GPU under autocast (manifest "precision") holds lower-precision features than the float32
runtime computes: predictions then agree statistically, not sample for sample.
"""
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numba
import numpy as np
import torch
from torch import nn

from heads import cpu

from heads.results import rundir
from heads.evaluation.evaluate import Calibration, ExitOutputs, calibrate, predict_with_sets
from heads.model.exits import ExitRule, exit_decision, exit_distribution, exit_rule_row
from heads.model.gate_features import gate_features_torch, row_features
from heads.evaluation.metrics import CONFORMAL_METHODS
from heads.model.stack import StackedHeads, gate_pre_activation
from heads.train.data import v1_v2_rows

CACHE_DTYPE = torch.float16   # what the cache stores features and logits as (cache/store.py)
GRAYSCALE_DATASETS = ("fashion-mnist",)   # stored as one channel; extract.datasets feeds it to all three


@dataclass(frozen=True)
class RuntimeSettings:
    threshold: float = 0.5       # eq. 4: exit at the first l with P(E^l|x) > threshold
    alpha: float = 0.05          # conformal miscoverage the sets are calibrated for
    conformal: str = "gated"     # appendix 9.3 construction: general, ims, strict, gated

    def __post_init__(self):
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"the exit threshold must lie in [0, 1], got {self.threshold}")
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"alpha must lie in (0, 1), got {self.alpha}")
        if self.conformal not in CONFORMAL_METHODS:
            raise ValueError(f"unknown conformal method {self.conformal!r}; choose one of "
                             f"{', '.join(CONFORMAL_METHODS)}")


@dataclass
class EarlyExitOutput:
    prediction: torch.Tensor   # (B,) int64 class index
    exit_index: torch.Tensor   # (B,) int64, 0-based exit taken
    logits: torch.Tensor       # (B, K) float32 logits of the exit taken (untempered)
    probs: torch.Tensor        # (B, K) float32 temperature-calibrated probabilities
    sets: torch.Tensor         # (B, K) bool conformal prediction sets


def _as_cached(x: torch.Tensor) -> torch.Tensor:
    """Round to the cache's float16 and back (module docstring: why)."""
    return x.to(CACHE_DTYPE).to(torch.float32)


class EarlyExitModel(nn.Module):
    """A frozen ExitBackbone with the IMs and gates of ONE trained trial, exiting samples as soon as eq. 4 says."""

    def __init__(self, backbone, heads: StackedHeads, calibration: Calibration, threshold: float = 0.5,
                 manifest: dict | None = None, run_row: dict | None = None):
        """heads: one trial; calibration: fitted on V2 with the exits this threshold gives; manifest: the cache's
        (class names, per-exit Mul-Adds, transform); run_row: the run's results row of the trial (from_run)."""
        super().__init__()
        cpu.configure()     # the kernels' shared thread pool and flushed denormals (heads/cpu.py), once per process
        if heads.n_trials != 1:
            raise ValueError(f"an EarlyExitModel runs one trained model; got heads of {heads.n_trials} trials "
                             "(use StackedHeads.select)")
        if backbone.tokens == "all":
            raise ValueError("tokens='all' caches every token; the runtime runs IMs on one vector per exit")
        n_exits = backbone.num_exits
        if heads.n_exits != n_exits or heads.exit_dims != backbone.exit_dims[:len(heads.exit_dims)]:
            raise ValueError(f"heads for {heads.n_exits} exits of widths {heads.exit_dims} do not fit the backbone's "
                             f"{n_exits} exits of widths {backbone.exit_dims}")
        if heads.trains_last == backbone.head_is_task_head:
            raise ValueError("the heads " + ("train a last IM although the backbone's head is the task's" if
                             heads.trains_last else "use the backbone's head, but it is not the task's head"))
        if heads.num_classes != backbone.num_classes or len(calibration.thresholds) != n_exits:
            raise ValueError(f"classes or exits disagree: heads K={heads.num_classes}, backbone "
                             f"K={backbone.num_classes}, calibration for {len(calibration.thresholds)} exits")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"the exit threshold must lie in [0, 1], got {threshold}")
        self.backbone = backbone
        self.calibration, self.threshold = calibration, float(threshold)
        self.manifest, self.run_row = manifest, run_row
        # One trial's weights in the layout StackedHeads.im_logits multiplies with: (D_l, T*K) with T = 1.
        for l, (w, b) in enumerate(zip(heads.im_weight, heads.im_bias)):
            self.register_buffer(f"im_weight_{l}", w.detach().reshape(w.shape[0], -1).contiguous().clone())
            self.register_buffer(f"im_bias_{l}", b.detach().reshape(1, -1).contiguous().clone())
        self.register_buffer("gate_weight", heads.gate_weight.detach()[0].clone())   # (L-1, 4)
        self.register_buffer("gate_bias", heads.gate_bias.detach()[0].clone())       # (L-1,)
        self.trains_last = heads.trains_last
        self._im_dims = heads.exit_dims
        self._arrays = None

    @property
    def num_exits(self) -> int:
        return self.backbone.num_exits

    def compile_blocks(self, **options) -> "EarlyExitModel":
        """torch.compile each backbone block (dynamic batch size: the batch shrinks as samples leave); the exit
        logic stays eager. torch.compile(model) itself runs, but breaks its graph at every exit (the numba kernel,
        the host decision whether the batch shrinks) and recompiles the block method per exit index until dynamo's
        recompile limit sends the rest back to eager: compile the blocks instead. This raises dynamo's (process-wide)
        recompile_limit to fit the blocks. Compiled blocks round float32 differently from eager ones, so exits then
        match the simulation statistically, not sample for sample."""
        import torch._dynamo

        blocks = self.backbone.blocks
        # blocks of one class share one forward code object, and dynamo counts recompilations per code object:
        # room for one graph per block, and another for batch 1 (a dynamic batch still specialises size 1)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 2 * len(blocks) + 2)
        for block in blocks:
            block.compile(**{"dynamic": True, **options})
        return self

    @property
    def class_names(self) -> list[str] | None:
        return None if self.manifest is None else self.manifest.get("class_names")

    @property
    def cumulative_macs(self) -> list[float] | None:
        """IC^l of every exit (backbone + the IMs and gates passed), from the cache manifest."""
        return None if self.manifest is None else [float(e["cumulative_total_macs"]) for e in self.manifest["exits"]]

    # ---- one exit ---------------------------------------------------------------------------------------------
    def _im(self, l: int, z: torch.Tensor) -> torch.Tensor:
        # the same product as StackedHeads.im_logits, so that a row gives the same float32 logits
        return torch.addmm(self._buffers[f"im_bias_{l}"], _as_cached(z), self._buffers[f"im_weight_{l}"])

    def _exit_head(self, l: int, z: torch.Tensor, rule: ExitRule) -> tuple:
        """IM l, its gate and eq. 4 for the samples in flight: z (B, D_l) -> (logits (B, K), leaving (B,) bool, the
        number leaving). On the CPU one call of _exit_head_kernel (numpy arrays out); elsewhere _exit_head_torch."""
        if z.device.type != "cpu":
            return self._exit_head_torch(l, z, rule)
        weights, biases, gate_weight, gate_bias = self._cpu_arrays()
        # numpy out: the caller makes tensors of them (torch.as_tensor, no copy) only when samples leave
        return _exit_head_kernel(z.numpy(), weights[l], biases[l], gate_weight, gate_bias, l, *rule.views(),
                                 np.float32(rule.threshold))

    def _cpu_arrays(self) -> tuple:
        """numpy views of the parameters, made once; _apply drops them."""
        if self._arrays is None:
            n = len(self._im_dims)
            self._arrays = ([self._buffers[f"im_weight_{l}"].numpy() for l in range(n)],
                            [self._buffers[f"im_bias_{l}"].numpy()[0] for l in range(n)],
                            self.gate_weight.numpy(), self.gate_bias.numpy())
        return self._arrays

    def _exit_head_torch(self, l: int, z: torch.Tensor, rule: ExitRule) -> tuple[torch.Tensor, torch.Tensor, int]:
        logits = self._im(l, z)
        feats = gate_features_torch(torch.softmax(logits, dim=-1))
        leaving = rule.step(torch.sigmoid(gate_pre_activation(feats, self.gate_weight[l], self.gate_bias[l])))
        return logits, leaving, int(leaving.sum())

    def _apply(self, fn, *args, **kwargs):
        self._arrays = None   # .to() / .float() / ... may replace the buffers the views point into
        return super()._apply(fn, *args, **kwargs)

    # ---- the early-exit forward pass ----------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> EarlyExitOutput:
        """x: (B, 3, S, S) images, normalised like the cache's dataset (image_batch)."""
        if x.dim() != 4 or x.shape[0] == 0:
            raise ValueError(f"need a non-empty batch of images (B, 3, S, S), got shape {tuple(x.shape)}")
        if x.shape[0] == 1 and x.device.type == "cpu":
            return self._forward_one(x)
        return self._forward_batch(x)

    def _forward_batch(self, x: torch.Tensor) -> EarlyExitOutput:
        bb, last, n = self.backbone, self.num_exits - 1, x.shape[0]
        logits_out = torch.empty(n, self.backbone.num_classes, device=x.device)
        exit_out = torch.full((n,), last, dtype=torch.int64, device=x.device)
        alive = None                                        # original rows in flight (None: all, in order)
        rule = ExitRule(n, self.threshold, device=x.device)  # eqs. 7-8 and 4 on the running sum of the gates
        state = bb.stem(x)
        for l in range(self.num_exits):
            state = bb.block(l, state)
            if l == last:
                _put(logits_out, alive, self._last_logits(state))
                break
            if not rule.can_exit:
                continue
            logits, leaving, n_leaving = self._exit_head(l, bb.represent(l, state).contiguous(), rule)
            if n_leaving == 0:
                continue
            logits, leaving = torch.as_tensor(logits), torch.as_tensor(leaving)
            if n_leaving == logits.shape[0]:    # all that were left leave here
                _put(logits_out, alive, logits)
                _put(exit_out, alive, l)
                break
            rows = torch.arange(n, device=x.device) if alive is None else alive
            logits_out[rows[leaving]] = logits[leaving]
            exit_out[rows[leaving]] = l
            stay = torch.nonzero(~leaving).squeeze(1)
            alive, state = rows[stay], state.index_select(0, stay)
            rule.keep(stay)
        return self._finish(logits_out, exit_out)

    def _forward_one(self, x: torch.Tensor) -> EarlyExitOutput:
        """_forward_batch for one image on the CPU, the same numbers with less fixed work per exit: a sample
        either leaves or goes on, so there is no batch to cut down, no ExitRule (its running sums are two
        one-element arrays the kernel updates) and no logits array per exit (_exit_one_kernel writes one)."""
        bb, last = self.backbone, self.num_exits - 1
        weights, biases, gate_weight, gate_bias = self._cpu_arrays()
        threshold = np.float32(self.threshold)
        logits = np.empty((1, self.backbone.num_classes), np.float32)
        mass, left = np.zeros(1), np.ones(1, np.float32)   # ExitRule's state for one sample
        block, represent = bb.block, bb.represent
        state = bb.stem(x)
        if self.threshold < 1.0:                           # ExitRule.can_exit
            for l in range(last):
                state = block(l, state)
                if _exit_one_kernel(represent(l, state).contiguous().numpy(), weights[l], biases[l], gate_weight,
                                    gate_bias, l, mass, left, threshold, logits):
                    return self._finish(torch.from_numpy(logits), torch.full((1,), l))
        else:
            for l in range(last):
                state = block(l, state)
        return self._finish(self._last_logits(block(last, state)), torch.full((1,), last))

    def _last_logits(self, state: torch.Tensor) -> torch.Tensor:
        """Exit L's logits from the final state: the trained last IM, or the backbone's head rounded as cached."""
        if self.trains_last:
            return self._im(self.num_exits - 1, self.backbone.represent(self.num_exits - 1, state))
        return _as_cached(self.backbone.classify(state))

    def _finish(self, logits: torch.Tensor, exits: torch.Tensor) -> EarlyExitOutput:
        """Calibrated probabilities and conformal sets, once for the whole batch: those of predict_with_sets (the
        sets exactly, the probabilities to float32 rounding), by one serial kernel call (_finish_kernel) where
        numpy's dozen small ops per call were a visible share of a batch of one."""
        z, ex = logits.cpu().numpy(), exits.cpu().numpy()
        n, k = z.shape
        prediction, probs, sets = np.empty(n, np.int64), np.empty((n, k), np.float32), np.empty((n, k), np.bool_)
        calibration = self.calibration
        if not _finish_kernel(z, ex, np.float32(calibration.temperature),
                              np.asarray(calibration.thresholds, dtype=np.float64), prediction, probs, sets):
            prediction, probs, sets = predict_with_sets(z, ex, calibration)
        prediction, probs, sets = (torch.from_numpy(a) for a in (prediction, np.ascontiguousarray(probs), sets))
        if logits.device.type != "cpu":
            prediction, probs, sets = (t.to(logits.device) for t in (prediction, probs, sets))
        return EarlyExitOutput(prediction, exits, logits, probs, sets)

    # ---- loading ---------------------------------------------------------------------------------------------
    @classmethod
    def from_run(cls, run_dir, lam: float, backbone=None, device="cpu",
                 settings: RuntimeSettings = RuntimeSettings(), cache_path=None) -> "EarlyExitModel":
        """The selected trial of RUN whose lambda is nearest `lam` (log scale), on the backbone the run's cache was
        extracted from (rebuilt from the cache manifest and checked against its weights hash unless `backbone`
        is given), calibrated on V2 of that cache. cache_path: where the cache is now, when it moved."""
        run_dir = Path(run_dir)
        meta = rundir.read_settings(run_dir)
        if meta is None or meta.get("status") != "complete":
            raise ValueError(f"{run_dir} is not a finished run (no settings.json with status 'complete')")
        rows, _ = rundir.read_results(run_dir)
        trial = select_trial(rows, lam)
        heads = trial_heads(run_dir, trial["trial"])
        from cache.store import open_cache

        cache_path = Path(cache_path or meta["cache"]["path"])
        if not cache_path.exists():
            raise ValueError(f"the run's cache {cache_path} is not there (pass cache_path= / --cache where it is now)")
        with open_cache(cache_path) as cache:
            if cache.fingerprint != meta["cache"]["fingerprint"]:
                raise ValueError(f"{cache_path} is not the cache {run_dir} was trained on (fingerprint "
                                 f"{cache.fingerprint[:12]} != {meta['cache']['fingerprint'][:12]})")
            manifest = cache.manifest
            calibration = calibrate_on_v2(cache, heads, settings)
        if backbone is None:
            backbone = backbone_from_manifest(manifest)
        elif backbone.name != manifest["backbone"] or backbone.exit_dims != [e["dim"] for e in manifest["exits"]]:
            raise ValueError(f"the backbone given ({backbone.name}, widths {backbone.exit_dims}) is not the cache's "
                             f"({manifest['backbone']})")
        if manifest.get("precision", "float32") != "float32":
            warnings.warn(f"the cache's features were computed under {manifest['precision']}; the float32 runtime "
                          "matches its exits statistically, not sample for sample", stacklevel=2)
        return cls(backbone, heads, calibration, settings.threshold, manifest, trial).to(device)


def _put(out: torch.Tensor, rows: torch.Tensor | None, values) -> None:
    """out[rows] = values, where rows None means every row in order."""
    if rows is None:
        out[:] = values
    else:
        out[rows] = values


@numba.njit(inline="always")
def _round_to_half(x):
    """float32 -> the nearest float16 (ties to even) -> float32, what x.half().float() gives: adding 2^(e+13) to
    |x| in [2^(e-1), 2^e) leaves float32 a spacing of 2^(e-11), float16's there (2^-24 below 2^-14, its subnormals)."""
    a = abs(x)
    if not a < np.float32(65520.0):                   # rounds beyond float16's largest 65504 (or nan)
        return x * np.float32(np.inf) if a == a else x
    shift = np.float32(math.ldexp(1.0, max(math.frexp(np.float64(a))[1] - 1, -14) + 13))
    return np.float32(math.copysign((a + shift) - shift, x))


@numba.njit(inline="always")
def _head_row(z, i, im_weight, im_bias, gate_weight, gate_bias, l, mass, left, threshold, logits, probs, feats):
    """Row i of the kernels below: logits[i] and whether sample i leaves (mass[i], left[i] updated)."""
    d = z.shape[1]
    k = im_weight.shape[1]
    one = np.float32(1.0)
    for c in range(k):
        logits[i, c] = np.float32(0.0)
    for j in range(d):
        zj = _round_to_half(z[i, j])
        for c in range(k):
            logits[i, c] += zj * im_weight[j, c]
    top = logits[i, 0] + im_bias[0]
    for c in range(k):
        logits[i, c] += im_bias[c]
        top = max(top, logits[i, c])
    total = np.float32(0.0)
    for c in range(k):
        probs[i, c] = np.exp(logits[i, c] - top)
        total += probs[i, c]
    for c in range(k):
        probs[i, c] /= total
    row_features(probs, i, feats)
    a = feats[i, 0] * gate_weight[l, 0]              # StackedHeads.gate_logits' sum, in its order
    for j in range(1, 4):
        a += feats[i, j] * gate_weight[l, j]
    g = one / (one + np.exp(-(a + gate_bias[l])))     # torch.sigmoid's formula on a few elements
    return exit_rule_row(g, mass, left, i, threshold)


@numba.njit(cache=True, error_model="numpy")   # x / 0 gives inf or nan as in torch, instead of raising
def _exit_head_kernel(z, im_weight, im_bias, gate_weight, gate_bias, l, mass, left, threshold):
    """EarlyExitModel._exit_head on the CPU, serial (no thread pool): z rounded as the cache stored it, IM
    logits, softmax, the gate statistics (heads.model.gate_features' row code), g^l and eq. 4 (heads.model.exits'
    exit_rule_row), in float32 where torch computes float32. The product and the softmax sum in their own order
    (a float32 last bit apart from torch's; see the module docstring on what that can change)."""
    n = z.shape[0]
    k = im_weight.shape[1]
    logits = np.empty((n, k), np.float32)
    probs = np.empty((n, k), np.float32)
    feats = np.empty((n, 4), np.float32)
    leaving = np.empty(n, np.bool_)
    n_leaving = 0
    for i in range(n):
        leaving[i] = _head_row(z, i, im_weight, im_bias, gate_weight, gate_bias, l, mass, left, threshold,
                               logits, probs, feats)
        n_leaving += leaving[i]
    return logits, leaving, n_leaving


@numba.njit(cache=True, error_model="numpy")
def _exit_one_kernel(z, im_weight, im_bias, gate_weight, gate_bias, l, mass, left, threshold, logits):
    """_exit_head_kernel for a batch of one (EarlyExitModel._forward_one): the same row code, the logits written
    into the caller's (1, K) array and only the decision returned, so that a call boxes no arrays."""
    k = im_weight.shape[1]
    probs = np.empty((1, k), np.float32)
    feats = np.empty((1, 4), np.float32)
    return _head_row(z, 0, im_weight, im_bias, gate_weight, gate_bias, l, mass, left, threshold, logits, probs,
                     feats)


SET_MARGIN = 1e-5   # _finish_kernel: a score this close to its threshold is left to predict_with_sets


@numba.njit(inline="always")
def _softmax_row(z, i, temperature, out):
    """out[:] = heads.evaluation.metrics.softmax of row i of z at `temperature` (float32), in float32 like numpy's."""
    k = z.shape[1]
    top = z[i, 0] / temperature
    for c in range(k):
        out[c] = z[i, c] / temperature
        top = max(top, out[c])
    total = np.float32(0.0)
    for c in range(k):
        out[c] = np.exp(out[c] - top)
        total += out[c]
    for c in range(k):
        out[c] /= total


@numba.njit(cache=True)
def _finish_kernel(z, exits, temperature, thresholds, prediction, probs, sets):
    """heads.evaluation.evaluate.predict_with_sets into the given arrays, in one serial call: prediction, probabilities
    at `temperature`, sets {k : 1 - p_k <= threshold of the exit}. The exp here is not numpy's, so a probability can
    differ from predict_with_sets' in the last bits: where a score lies within SET_MARGIN of its threshold (or a
    logit is not finite) the set could differ, and the kernel returns False for the caller to use
    predict_with_sets instead; True means every set is exactly predict_with_sets'."""
    n, k = z.shape
    p = np.empty(k, np.float32)
    for i in range(n):
        best = 0
        for c in range(k):
            if not np.isfinite(z[i, c]):
                return False
            if z[i, c] > z[i, best]:
                best = c
        prediction[i] = best
        _softmax_row(z, i, temperature, probs[i])
        _softmax_row(z, i, np.float32(1.0), p)
        tau = thresholds[exits[i]]
        for c in range(k):
            score = 1.0 - np.float64(p[c])
            if abs(score - tau) <= SET_MARGIN:
                return False
            sets[i, c] = score <= tau
    return True


# ---- helpers of from_run ---------------------------------------------------------------------------------------
def select_trial(rows: list[dict], lam: float) -> dict:
    """The selected "jei" test row whose lambda is nearest `lam` in log space."""
    return rundir.nearest_lambda(rows, lam, "test")


def trial_heads(run_dir, trial_id: int) -> StackedHeads:
    """The one-trial StackedHeads of trial `trial_id` from RUN/heads.safetensors."""
    index = rundir.load_heads(run_dir)
    if index is None:
        raise ValueError(f"{run_dir} holds no trained heads ({rundir.HEADS})")
    for group in index["groups"]:
        ids = [t["trial"] for t in group["trials"]]
        if trial_id in ids:
            return StackedHeads.from_state_dict(group["state"]).select(ids.index(trial_id))
    raise ValueError(f"trial {trial_id} is not in {run_dir}/{rundir.HEADS_INDEX}")


def v2_outputs(cache, heads: StackedHeads, threshold: float = 0.5) -> ExitOutputs:
    """The model's outputs on V2, the second half of the cache's val split in stored order (the split
    heads.train.data.make_train_data makes), with the exits the simulation takes at `threshold`."""
    val = cache.load_split("val")
    half = v1_v2_rows(len(val.labels))[1][0]
    feats = [f[half:].contiguous() for f in val.features]
    last = None if heads.trains_last else val.logits[half:].contiguous()
    logits, g = heads.outputs(feats, last)
    exits = exit_decision(exit_distribution(g), threshold)
    return ExitOutputs(logits[0].numpy(), exits[0].numpy(), val.labels[half:].numpy())


def calibrate_on_v2(cache, heads: StackedHeads, settings: RuntimeSettings) -> Calibration:
    return calibrate(v2_outputs(cache, heads, settings.threshold), settings.alpha, settings.conformal)


def backbone_from_manifest(manifest: dict):
    """The cache's backbone, built the way extraction built it (extract.run), with its weights hash checked."""
    from extract.backbones import PACKAGED_WEIGHTS
    from extract.run import ExtractSettings, load_for_extraction, weights_identity

    weights = manifest["weights"]
    path = weights.get("path")
    if path is not None and not Path(path).is_file():
        # packaged weights live in site-packages, whose path changes with the environment: find them by package
        packaged = [k for k, p in PACKAGED_WEIGHTS.items() if str(weights.get("source", "")).startswith(p.package)]
        if not packaged:
            raise ValueError(f"the backbone weights {path} are not there (pass backbone= / put them back)")
        path = packaged[0]
    s = ExtractSettings(backbone=manifest["backbone"], dataset=manifest["dataset"]["name"], weights=path,
                        img_size=manifest["img_size"], tokens=manifest["tokens"], progress=False)
    with torch.random.fork_rng(devices=[]):   # load_for_extraction seeds the global generator (random init)
        backbone = load_for_extraction(s, int(manifest["num_classes"]))
    found = weights_identity(backbone)["sha256"]
    if found != weights["sha256"]:
        raise ValueError(f"the backbone weights' sha256 {found[:12]} differs from the cache's "
                         f"{weights['sha256'][:12]}: not the network the features came from")
    return backbone


# ---- images as the extraction saw them -------------------------------------------------------------------------
def data_settings(manifest: dict, data_dir=None):
    """extract.datasets.DataSettings of the cache's dataset and transform (data_dir: where its files are)."""
    from extract.datasets import DataSettings

    d = manifest["dataset"]
    t = d["transform"]
    return DataSettings(name=d["name"], data_dir=data_dir, img_size=int(t["img_size"]), mean=tuple(t["mean"]),
                        std=tuple(t["std"]), interpolation=t["interpolation"], split_seed=int(d["split_seed"]),
                        limit=d.get("limit"), crop_pct=float(t.get("crop_pct") or 1.0))


def image_batch(paths, manifest: dict) -> torch.Tensor:
    """(N, 3, S, S) float32: image files through the cache's eval transform, by extract.datasets' own code
    (class-folder photos: shorter side + centre crop; array datasets: resize; grayscale kept one channel)."""
    from PIL import Image

    from extract.datasets import ImageSplit

    settings = data_settings(manifest)
    paths = [str(p) for p in paths]
    if settings.name == "imagefolder":
        source = paths
    else:
        mode = "L" if settings.name in GRAYSCALE_DATASETS else "RGB"
        source = []
        for p in paths:
            with Image.open(p) as img:
                source.append(np.array(img.convert(mode)))
    n = len(paths)
    split = ImageSplit("predict", "files", source, np.arange(n), np.zeros(n, dtype=np.int64), settings, views=0)
    return torch.stack([split[i][0] for i in range(n)]) if n else torch.empty(0, 3, settings.img_size,
                                                                               settings.img_size)

"""The early-exit network at inference: a frozen backbone plus one trained JEI-DNN model, exiting for real.

    model = EarlyExitModel.from_run("runs/sweep-abc", lam=0.5)   # the selected trial nearest lambda 0.5
    out = model(images)               # images normalised as the cache's dataset transform (image_batch below)
    out.prediction, out.exit_index, out.probs, out.sets          # per sample: class, 0-based exit, p_T, set

How a batch runs: stem, then block by block. After block l < L the samples still in flight get exit l's
representation, IM and gate, P(G=l|x) from their gates so far (eqs. 7-8) and the decision of eq. 4 (P(E^l|x) >
threshold); the samples that exit leave the batch (index_select on the state, token sequences and feature maps
alike) and the loop stops as soon as none are left. Exit L is the backbone's own head, or the trained last IM when
the cache's head was not the task's.

Identical to the simulation. Stage two (heads/sweep.py) computes every exit of every sample from the cache and
picks the exit afterwards; here the same numbers must come out of the live backbone. Three things make them agree:
- Rounding: the cache stores representations and backbone logits as float16 (extract/run.py). The live backbone
  computes float32, so every representation (and the backbone head's logits) is rounded to float16 and back
  before the IM reads it, exactly as the cache did. Without that, a gate near its threshold or two near-equal
  logits could decide differently from what the run's evaluation recorded.
- The same arithmetic: the IM is the same addmm as StackedHeads.im_logits, the gate statistics the same kernels
  (numba on CPU, torch elsewhere), P(G|x) the same exits.exit_distribution on the gates seen so far (its first l
  entries only depend on the first l gates) and P(E^l|x) the same exits.exit_probabilities.
- The same calibration: temperature and conformal thresholds are fitted on V2 of the run's cache with
  heads.evaluate.calibrate, from the exits the simulation takes at this threshold.
What can still differ, at float-rounding level: the backbone's float32 output of a sample may depend on the batch
it runs in (BLAS / oneDNN blocking), which can move a feature across a float16 rounding boundary; and P(E^l|x)
in the simulation divides by the exit mass left as summed over the later exits, here as 1 - (mass of the earlier
exits). Either changes a decision only when a gate sits within ~1e-7 of the threshold or two logits tie to ~1e-7.
A cache extracted on a GPU under autocast (manifest "precision") holds lower-precision features than the float32
runtime computes: predictions then agree statistically, not sample for sample.
"""
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from heads import rundir
from heads.evaluate import Calibration, ExitOutputs, calibrate, predict_with_sets
from heads.exits import exit_decision, exit_distribution, exit_probabilities
from heads.gate_features import gate_features
from heads.metrics import CONFORMAL_METHODS
from heads.model import StackedHeads

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

    @property
    def num_exits(self) -> int:
        return self.backbone.num_exits

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
        return torch.addmm(getattr(self, f"im_bias_{l}"), _as_cached(z), getattr(self, f"im_weight_{l}"))

    def _gate(self, l: int, logits: torch.Tensor) -> torch.Tensor:
        """g^l = sigmoid(w . [4 softmax statistics] + b), as StackedHeads.gate_logits computes it."""
        feats = gate_features(torch.softmax(logits, dim=-1))
        return torch.sigmoid((feats * self.gate_weight[l]).sum(-1) + self.gate_bias[l])

    # ---- the early-exit forward pass ----------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> EarlyExitOutput:
        """x: (B, 3, S, S) images, normalised like the cache's dataset (image_batch)."""
        if x.dim() != 4 or x.shape[0] == 0:
            raise ValueError(f"need a non-empty batch of images (B, 3, S, S), got shape {tuple(x.shape)}")
        bb, last, n = self.backbone, self.num_exits - 1, x.shape[0]
        logits_out = torch.empty(n, self.backbone.num_classes, device=x.device)
        exit_out = torch.full((n,), last, dtype=torch.int64, device=x.device)
        alive = torch.arange(n, device=x.device)            # original rows of the samples in flight
        # g^1..g^l of the samples in flight: eqs. 7-8 need only their running sum, but keeping the few values lets
        # exits.exit_distribution compute it with the very cumsum the simulation used
        gates = torch.empty(n, 0, device=x.device)
        state = bb.stem(x)
        for l in range(self.num_exits):
            state = bb.block(l, state)
            if l == last:
                logits_out[alive] = (self._im(l, bb.represent(l, state)) if self.trains_last
                                     else _as_cached(bb.classify(state)))
                break
            logits = self._im(l, bb.represent(l, state))
            gates = torch.cat([gates, self._gate(l, logits)[:, None]], dim=1)
            # eqs. 7-8 on the gates so far: entries 0..l of P(G|x) need nothing later; the entry after them is the
            # mass still left, so exit_probabilities gives eq. 4's P(E^l|x) = P(G=l|x) / (1 - sum_{j<l} P(G=j|x))
            p_exit = exit_probabilities(exit_distribution(gates))[:, l]
            leaving = p_exit > self.threshold
            if bool(leaving.any()):
                logits_out[alive[leaving]] = logits[leaving]
                exit_out[alive[leaving]] = l
                stay = torch.nonzero(~leaving).squeeze(1)
                alive, gates, state = alive[stay], gates[stay], state.index_select(0, stay)
                if alive.numel() == 0:
                    break
        prediction, probs, sets = predict_with_sets(logits_out.cpu().numpy(), exit_out.cpu().numpy(),
                                                    self.calibration)
        device = x.device
        return EarlyExitOutput(torch.from_numpy(prediction).to(device), exit_out, logits_out,
                               torch.from_numpy(np.ascontiguousarray(probs)).to(device),
                               torch.from_numpy(sets).to(device))

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


# ---- helpers of from_run ---------------------------------------------------------------------------------------
def select_trial(rows: list[dict], lam: float) -> dict:
    """The selected "jei" test row whose lambda is nearest `lam` in log space."""
    if not (lam > 0 and math.isfinite(lam)):
        raise ValueError(f"lambda must be a finite number > 0, got {lam}")
    chosen = [r for r in rows if r["method"] == "jei" and r["split"] == "test" and r.get("selected")]
    if not chosen:
        raise ValueError("the run has no selected JEI-DNN model")
    return min(chosen, key=lambda r: (abs(math.log(r["lam"]) - math.log(lam)), r["trial"]))


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
    heads.train.make_train_data makes), with the exits the simulation takes at `threshold`."""
    val = cache.load_split("val")
    half = len(val.labels) // 2
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

"""A cache's splits as training reads them: resident tensors (float16 as stored, float32 mini-batches) or streamed
from the store (heads/train/stream.py), val halved into V1 and V2, and the outputs of heads over a whole split.

    data = make_train_data(open_cache("cache/x"))          # TrainData: train, v1, v2, ic_norm, num_classes
    for feats, labels, last in data.train.epoch(64, generator, "cpu"):
        ...
"""
from dataclasses import dataclass, field

import torch

from heads.model.stack import COMPUTE, OUTPUT_ROWS, StackedHeads
from heads.train.stream import ChunkShuffle, MemoryPlan, StreamedSplit


@dataclass
class SplitTensors:
    """One split in memory. When every exit has the same width the features are views of one (L, N, D) tensor
    (`stacked`, given or made here), so that a mini-batch of all exits is one gather (batch()). Features and
    logits stay in the dtype they are given (float16 as the cache stores them, by make_train_data) and every
    mini-batch comes out as float32 (COMPUTE): float16 -> float32 is exact, so this gives the values a float32
    copy would, at half its memory. heads.train.stream.StreamedSplit has the same interface (len, labels, exit_dims,
    has_logits, chunks, epoch) for splits read from the store."""
    features: list[torch.Tensor]   # per exit (N, D_l), float16 or float32, contiguous
    labels: torch.Tensor           # (N,) int64
    logits: torch.Tensor | None    # (N, K): frozen last-exit logits, None when the last head is trained
    stacked: torch.Tensor | None = field(default=None, repr=False)   # (L, N, D): then features are its rows
    order: ChunkShuffle | None = field(default=None, repr=False)     # None: one randperm of the rows per epoch

    def __post_init__(self):
        if self.stacked is None and len({tuple(f.shape) for f in self.features}) == 1 \
                and self.features[0].dim() == 2:
            self.stacked = torch.stack(self.features)
        if self.stacked is not None:
            self.features = list(self.stacked.unbind(0))

    def __len__(self) -> int:
        return self.labels.shape[0]

    @property
    def exit_dims(self) -> list[int]:
        return [f.shape[-1] for f in self.features]

    @property
    def has_logits(self) -> bool:
        return self.logits is not None

    def rows(self, idx) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor | None]:
        """One float32 mini-batch: idx is a slice or ONE index tensor shared by every exit (and every trial). An
        index tensor gathers with index_select, the same rows as f[idx] in about half its time (a training step
        gathers every exit's rows)."""
        if isinstance(idx, slice):
            return ([f[idx].to(COMPUTE) for f in self.features], self.labels[idx],
                    None if self.logits is None else self.logits[idx].to(COMPUTE))
        return ([f.index_select(0, idx).to(COMPUTE) for f in self.features], self.labels.index_select(0, idx),
                None if self.logits is None else self.logits.index_select(0, idx).to(COMPUTE))

    def batch(self, idx) -> tuple[list[torch.Tensor] | torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """rows(), with the features as one (L, B, D) tensor when the split is stacked (what StackEngine takes)."""
        if self.stacked is None:
            return self.rows(idx)
        x = self.stacked[:, idx] if isinstance(idx, slice) else self.stacked.index_select(1, idx)
        return x.to(COMPUTE), self.labels[idx], None if self.logits is None else self.logits[idx].to(COMPUTE)

    def chunks(self, rows: int, stacked: bool = True):
        """Consecutive blocks of `rows` rows, in order: batch() (stacked) or rows() of each."""
        get = self.batch if stacked else self.rows
        for lo in range(0, len(self), rows):
            yield get(slice(lo, lo + rows))

    def epoch(self, batch_size: int, generator: torch.Generator, device, stacked: bool = True):
        """One epoch of mini-batches: a permutation of the rows from `generator` (or the ChunkShuffle order)."""
        get = self.batch if stacked else self.rows
        order = shuffled_batches(len(self), batch_size, generator, device) if self.order is None else \
            self.order.batches(len(self), batch_size, generator, device)
        for idx in order:
            yield get(idx)

    @property
    def resident_bytes(self) -> int:
        """Bytes of the features and logits held."""
        held = [self.stacked] if self.stacked is not None else list(self.features)
        return sum(t.numel() * t.element_size() for t in held + ([self.logits] if self.logits is not None else []))


Split = SplitTensors | StreamedSplit


@dataclass
class TrainData:
    train: Split
    v1: Split      # first half of "val": class-imbalance ratios of the gate targets
    v2: Split      # second half of "val": early stopping
    ic_norm: torch.Tensor  # (L,) IC^l / IC^L (eq. 18 costs from the cache manifest)
    num_classes: int

    def __post_init__(self):
        n_exits = self.ic_norm.shape[0]
        for name in ("train", "v1", "v2"):
            split = getattr(self, name)
            if len(split) == 0:
                raise ValueError(f"the {name} split is empty")
            if len(split.exit_dims) != n_exits:
                raise ValueError(f"{name} has {len(split.exit_dims)} exits' features, costs give {n_exits} exits")
            if split.has_logits != self.train.has_logits:
                raise ValueError("frozen last-exit logits must be present in all splits or in none")
            if int(split.labels.min()) < 0 or int(split.labels.max()) >= self.num_classes:
                raise ValueError(f"{name} labels fall outside 0..{self.num_classes - 1}")

    @property
    def exit_dims(self) -> list[int]:
        return self.train.exit_dims

    @property
    def trains_last(self) -> bool:
        return not self.train.has_logits


def open_split(cache, split: str, plan: MemoryPlan | None = None, device="cpu", dtype=torch.float16,
               rows: tuple[int, int] | None = None) -> Split:
    """One split (or its rows [a, b)) as the plan places it: resident, loaded in one pass into its final (stacked)
    tensors (no second copy), or a StreamedSplit (train in the plan's ChunkShuffle order)."""
    head_is_task = bool(cache.manifest["head_is_task_head"])
    n = cache.num_rows(split)
    lo, hi = rows or (0, n)
    if plan is not None and not plan.resident[split]:
        return StreamedSplit(cache, split, lo, hi, head_is_task, plan.order if split == "train" else None, device)
    dims = cache.exit_dims
    stacked = None
    if len(set(dims)) == 1 and not cache.layout["tokens"]:
        stacked = torch.empty((len(dims), hi - lo, dims[0]), dtype=dtype, device=device)
    arrays = cache.read_rows(split, lo, hi, device=device, dtype=dtype,
                             out=None if stacked is None else list(stacked.unbind(0)))
    if head_is_task and arrays.logits is None:
        raise ValueError(f"the cache says its head is the task's head but its {split} split has no logits")
    feats = [f.contiguous() for f in arrays.features] if stacked is None else []
    logits = arrays.logits.to(device=device, dtype=dtype).contiguous() if head_is_task else None
    return SplitTensors(feats, arrays.labels.to(device=device, dtype=torch.int64), logits, stacked)


def v1_v2_rows(n_val: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The row ranges [a, b) of V1 and V2 in a val split of n_val rows: its first and second half in stored order
    (section 5: V1 sets the gates' class weights and the thresholds of threshold gating, V2 selects, stops early
    and calibrates). Training, evaluation and the runtime's calibration all halve val here."""
    half = n_val // 2
    if half == 0:
        raise ValueError("the val split needs at least 2 rows to be halved into V1 and V2")
    return (0, half), (half, n_val)


def make_train_data(cache, device="cpu", dtype=torch.float16, plan: MemoryPlan | None = None) -> TrainData:
    """Load train and val of a cache (features and logits as `dtype`: float16, as stored, by default; mini-batches
    come out as float32), resident or streamed as `plan` says (None: resident); val is halved in stored order into
    V1 and V2."""
    manifest = cache.manifest
    costs = torch.tensor([float(e["cumulative_total_macs"]) for e in manifest["exits"]], dtype=torch.float64)
    if costs.numel() < 2 or bool((costs <= 0).any()):
        raise ValueError(f"the cache manifest needs >= 2 exits with positive cumulative_total_macs, got {costs.tolist()}")
    (_, half), (_, n_val) = v1_v2_rows(cache.num_rows("val"))
    if plan is not None and not plan.resident["val"]:
        v1, v2 = (open_split(cache, "val", plan, device, dtype, r) for r in ((0, half), (half, n_val)))
    else:
        val = open_split(cache, "val", None, device, dtype)

        def part(sl):    # views of val's tensors: V1 and V2 are not copied
            logits = None if val.logits is None else val.logits[sl]
            if val.stacked is not None:
                return SplitTensors([], val.labels[sl], logits, val.stacked[:, sl])
            return SplitTensors([f[sl] for f in val.features], val.labels[sl], logits)
        v1, v2 = part(slice(0, half)), part(slice(half, None))
    return TrainData(open_split(cache, "train", plan, device, dtype), v1, v2,
                     (costs / costs[-1]).to(device=device, dtype=torch.float32), int(manifest["num_classes"]))


@torch.no_grad()
def split_outputs(heads: StackedHeads, split: Split, gates: bool = True):
    """StackedHeads.outputs over a whole split, resident or streamed, in blocks of OUTPUT_ROWS rows."""
    logits, g = [], []
    for feats, _, last in split.chunks(OUTPUT_ROWS, stacked=False):
        out = heads.outputs(feats, last, chunk=OUTPUT_ROWS, gates=gates)
        logits.append(out[0])
        g.append(out[1])
    return torch.cat(logits, dim=1), torch.cat(g, dim=1) if gates else None


def shuffled_batches(n: int, batch_size: int, generator: torch.Generator, device) -> list[torch.Tensor]:
    return list(torch.randperm(n, generator=generator).to(device).split(batch_size))

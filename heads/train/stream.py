"""Stage two past RAM: which splits stay resident, and the splits that are streamed from the store instead.

    plan = plan_memory(cache, MemorySettings(budget_gb=8))       # resident when it fits, streamed otherwise
    data = make_train_data(cache, plan=plan)                     # heads.train.bilevel: SplitTensors or StreamedSplit
    for feats, labels, last in data.train.epoch(64, generator, "cpu"):   # one epoch, in the split's order
        ...

The placement (plan_memory). `--resident` holds every split as today; `--stream` streams every split; the default
holds all splits when their float16 bytes fit the budget (default: a share of the memory available when the run
starts) and otherwise keeps val (read every epoch for V1 and V2), then train, then test resident while they fit
the budget left after two streaming buffers, streaming the rest. settings.json records the placement.

A streamed epoch's order (ChunkShuffle), documented because it is not the resident order: the split's chunks
(whole chunks of the store, chunk_rows rows each) are permuted with the epoch's generator; consecutive groups of
buffer_chunks chunks of that permutation form the buffers; within a buffer the rows are permuted with the same
generator (one randperm per buffer, drawn in buffer order) and cut into mini-batches, the last one of a buffer
possibly short. Every row comes exactly once per epoch. The resident path takes this order too when its
SplitTensors is given a ChunkShuffle (that is how the tests show that streaming changes nothing else); without
one it keeps its one randperm per epoch, so resident runs are unchanged.

Reading (StreamedSplit): whole chunks through cache.store's checked reader, a buffer at a time, the next buffer (or
evaluation block) read by a background thread while the current one is used; so at most two buffers are
materialised at once (held_bytes / peak_bytes count them). Labels stay resident (8 bytes a row). Mini-batches
and evaluation blocks come out as float32 (heads.model.stack.COMPUTE), equal to the resident path's values.
"""
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from heads.model.stack import COMPUTE

MODES = ("auto", "stream", "resident")
AVAILABLE_SHARE = 0.8          # default budget: this share of the memory available when the run starts
BUFFER_BYTES = 256 * 2 ** 20   # a streaming buffer at most (whole chunks); smaller when the budget is small
SPLIT_PRIORITY = ("val", "train", "test")   # who stays resident first when not everything fits


def available_bytes() -> int:
    """Memory available to a new allocation now (Linux MemAvailable; else free physical pages)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class MemorySettings:
    mode: str = "auto"              # auto | stream | resident
    budget_gb: float | None = None  # None: AVAILABLE_SHARE of the memory available at start

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown memory mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.budget_gb is not None and not (self.budget_gb > 0 and math.isfinite(self.budget_gb)):
            raise ValueError(f"the memory budget must be a finite number of GB > 0, got {self.budget_gb}")


@dataclass(frozen=True)
class ChunkShuffle:
    """A streamed epoch's order (module doc): chunk permutation, buffers of buffer_chunks chunks, rows permuted
    within each buffer."""
    chunk_rows: int
    buffer_chunks: int

    def buffers(self, n: int, batch_size: int, generator: torch.Generator) -> list[tuple[list[int], list]]:
        """Per buffer: its chunks (in buffer order) and its mini-batches as row positions within the buffer."""
        perm = torch.randperm(math.ceil(n / self.chunk_rows), generator=generator).tolist()
        out = []
        for i in range(0, len(perm), self.buffer_chunks):
            chunks = perm[i:i + self.buffer_chunks]
            rows = sum(self.rows_of(c, n) for c in chunks)
            out.append((chunks, list(torch.randperm(rows, generator=generator).split(batch_size))))
        return out

    def rows_of(self, chunk: int, n: int) -> int:
        return min(self.chunk_rows, n - chunk * self.chunk_rows)

    def global_rows(self, chunks: list[int], n: int) -> torch.Tensor:
        """The split rows a buffer of these chunks holds, in buffer order."""
        return torch.cat([torch.arange(c * self.chunk_rows, c * self.chunk_rows + self.rows_of(c, n))
                          for c in chunks])

    def batches(self, n: int, batch_size: int, generator: torch.Generator, device) -> list[torch.Tensor]:
        """The same order as split row indices (what the resident path gathers)."""
        out = []
        for chunks, local in self.buffers(n, batch_size, generator):
            rows = self.global_rows(chunks, n)
            out += [rows[idx].to(device) for idx in local]
        return out


@dataclass
class MemoryPlan:
    """Where each split lives for one run (plan_memory)."""
    mode: str
    budget_bytes: int
    split_bytes: dict       # split -> float16 bytes of its features and logits
    resident: dict          # split -> bool
    order: ChunkShuffle     # the order of a streamed train split
    row_bytes: int          # float16 bytes of one row (features of every exit and logits)

    @property
    def streams_train(self) -> bool:
        return not self.resident["train"]

    def identity(self) -> dict:
        """What the run's identity gets: the streamed order changes the trained models, the placement of val and
        test does not (they are read in the same blocks either way)."""
        if not self.streams_train:
            return {}
        return {"train_order": {"chunk_rows": self.order.chunk_rows, "buffer_chunks": self.order.buffer_chunks}}

    def describe(self) -> dict:
        held = sum(b for s, b in self.split_bytes.items() if self.resident[s])
        streamed = [s for s in self.split_bytes if not self.resident[s]]
        buffer = self.order.chunk_rows * self.order.buffer_chunks * self.row_bytes
        return {"mode": self.mode, "budget_gib": self.budget_bytes / 2 ** 30,
                "splits": {s: {"resident": self.resident[s], "gib": b / 2 ** 30} for s, b in self.split_bytes.items()},
                "resident_gib": held / 2 ** 30,
                "streaming_buffers_gib": 2 * buffer / 2 ** 30 if streamed else 0.0,
                "train_order": self.identity().get("train_order", "one permutation of the rows per epoch")}


def plan_memory(cache, memory: MemorySettings = MemorySettings()) -> MemoryPlan:
    """The placement of every split of `cache` (module doc)."""
    layout = cache.layout
    row_bytes = 2 * (sum(d * (layout["tokens"] or 1) for d in layout["exit_dims"])
                     + (layout["num_classes"] if layout["with_logits"] else 0))
    sizes = {s: cache.num_rows(s) * row_bytes for s in cache.splits}
    budget = int(memory.budget_gb * 2 ** 30) if memory.budget_gb is not None else \
        int(AVAILABLE_SHARE * available_bytes())
    chunk_bytes = layout["chunk_rows"] * row_bytes
    buffer_chunks = max(1, min(BUFFER_BYTES, budget // 4) // chunk_bytes)
    if memory.mode == "resident" or (memory.mode == "auto" and sum(sizes.values()) <= budget):
        resident = {s: True for s in sizes}
    elif memory.mode == "stream":
        resident = {s: False for s in sizes}
    else:
        left = budget - 2 * buffer_chunks * chunk_bytes
        resident = {}
        for s in sorted(sizes, key=lambda s: SPLIT_PRIORITY.index(s) if s in SPLIT_PRIORITY else len(SPLIT_PRIORITY)):
            resident[s] = sizes[s] <= left
            left -= sizes[s] if resident[s] else 0
    return MemoryPlan(memory.mode, budget, sizes, resident, ChunkShuffle(layout["chunk_rows"], buffer_chunks),
                      row_bytes)


# ---- streamed splits ---------------------------------------------------------------------------------------------
def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class StreamedSplit:
    """Rows [start, stop) of one split of a cache, read from the store when used (module doc). The same methods as
    heads.train.data.SplitTensors: len(), labels, exit_dims, has_logits, chunks() and epoch()."""

    def __init__(self, cache, split: str, start: int, stop: int, has_logits: bool, order: ChunkShuffle | None,
                 device="cpu"):
        self.cache, self.split, self.start, self.stop = cache, split, start, stop
        self.has_logits, self.order, self.device = has_logits, order, device
        self.labels = cache.read_rows(split, start, stop, labels_only=True).labels.to(device)
        self.exit_dims = [d for d in cache.exit_dims]
        self.uniform = len(set(self.exit_dims)) == 1 and not cache.layout["tokens"]
        self.held_bytes = self.peak_bytes = self.read_bytes = 0
        self._count = threading.Lock()

    def __len__(self) -> int:
        return self.stop - self.start

    # ---- what is held -------------------------------------------------------------------------------------
    def _hold(self, nbytes: int):
        with self._count:
            self.held_bytes += nbytes
            self.read_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.held_bytes)

    def _release(self, nbytes: int):
        with self._count:
            self.held_bytes -= nbytes

    def _prefetched(self, reads: list):
        """Yields item for (item, nbytes) = read() of each read, the next one running in a background thread while the
        caller uses the current one; the caller must drop an item before asking for the next (at most two are
        materialised). The thread ends with the iteration."""
        if not reads:
            return
        pool = ThreadPoolExecutor(1, thread_name_prefix="stream")
        future = pool.submit(reads[0])
        try:
            for i in range(len(reads)):
                item, nbytes = future.result()
                future = pool.submit(reads[i + 1]) if i + 1 < len(reads) else None
                try:
                    yield item
                finally:
                    del item
                    self._release(nbytes)
        finally:
            if future is not None:
                future.cancel()
            pool.shutdown(wait=True)

    # ---- reading ------------------------------------------------------------------------------------------
    def _rows(self, lo: int, hi: int):
        """Rows [lo, hi) of this part (float16 as stored): (features, logits), counted as held."""
        arrays = self.cache.read_rows(self.split, self.start + lo, self.start + hi, dtype=torch.float16)
        logits = arrays.logits if self.has_logits else None
        self._hold(_nbytes(arrays.features + [logits]))
        return (arrays.features, logits), _nbytes(arrays.features + [logits])

    def _buffer(self, chunks: list[int]):
        """The rows of whole chunks, in the given order, as one float16 buffer (features stacked (L, R, D) when
        every exit has one width) and its logits."""
        n_rows = [self.order.rows_of(c, len(self)) for c in chunks]
        rows, k = sum(n_rows), self.cache.num_classes
        if self.uniform:
            stacked = torch.empty((len(self.exit_dims), rows, self.exit_dims[0]), dtype=torch.float16)
            feats = list(stacked.unbind(0))
        else:
            stacked, feats = None, [torch.empty((rows, d), dtype=torch.float16) for d in self.exit_dims]
        logits = torch.empty((rows, k), dtype=torch.float16) if self.has_logits else None
        nbytes = _nbytes(feats + [logits])
        self._hold(nbytes)
        at = 0
        for c, r in zip(chunks, n_rows):
            lo = self.start + c * self.order.chunk_rows
            arrays = self.cache.read_rows(self.split, lo, lo + r, dtype=torch.float16,
                                          out=[f[at:at + r] for f in feats])
            if logits is not None:
                logits[at:at + r].copy_(arrays.logits)
            at += r
        return (stacked if stacked is not None else feats, logits), nbytes

    def _out(self, feats, logits, idx, stacked: bool):
        """A float32 batch on the device from float16 rows: idx None (all rows) or positions in them."""
        def take(t, dim=0):
            return (t if idx is None else t.index_select(dim, idx)).to(device=self.device, dtype=COMPUTE)
        if isinstance(feats, torch.Tensor):          # (L, R, D)
            x = take(feats, 1)
            x = x if stacked else list(x.unbind(0))
        else:
            x = [take(f) for f in feats]
            x = torch.stack(x) if stacked and self.uniform else x
        return x, None if logits is None else take(logits)

    def chunks(self, rows: int, stacked: bool = True):
        """Consecutive blocks of `rows` rows, in order: (features, labels, last logits) as SplitTensors.batch
        (stacked) or .rows gives them."""
        starts = list(range(0, len(self), rows))
        reads = [lambda lo=lo: self._rows(lo, min(lo + rows, len(self))) for lo in starts]
        blocks = self._prefetched(reads)
        for lo in starts:
            feats, logits = next(blocks)
            x, last = self._out(feats, logits, None, stacked)
            del feats, logits                      # dropped before the next block is asked for
            yield x, self.labels[lo:lo + rows], last
        blocks.close()

    def epoch(self, batch_size: int, generator: torch.Generator, device=None, stacked: bool = True):
        """One epoch of mini-batches in the ChunkShuffle order (module doc)."""
        if self.order is None or self.start != 0:
            raise ValueError("only a whole split with a ChunkShuffle order can be trained on from the store")
        plan = self.order.buffers(len(self), batch_size, generator)
        reads = [lambda chunks=chunks: self._buffer(chunks) for chunks, _ in plan]
        buffers = self._prefetched(reads)
        for chunks, local in plan:
            feats, logits = next(buffers)
            rows = self.order.global_rows(chunks, len(self)).to(self.labels.device)
            for idx in local:
                x, last = self._out(feats, logits, idx, stacked)
                yield x, self.labels[rows[idx.to(rows.device)]], last
            del feats, logits                      # dropped before the next buffer is asked for
        buffers.close()

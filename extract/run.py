"""Stage one's loop: run a frozen backbone once over every row of a dataset and fill a feature cache.

    path = run_extraction(ExtractSettings(backbone="t2t_vit_7", dataset="cifar10", data_dir="data",
                                          weights="cifar10_t2t7.pth.tar"))

Only the row chunks the cache still lacks are computed, so a killed run (even SIGKILL) resumes when rerun.
Rows are processed on a fixed grid of batches (batch b = rows [b*B, (b+1)*B)), batches and chunks nest, and a
chunk's rows always come from the same images, so a resumed cache is byte-identical to an uninterrupted one on
the same device and batch size. The backbone computes under torch.no_grad() (autocast on CUDA) while a single
background thread writes finished chunks (bounded queue: memory stays flat).

Under torchrun (`torchrun --nproc_per_node=N pipeline.py extract ...`) every rank runs this on its own device and
the fixed-grid row groups are dealt out among the ranks (_run_ranks); a group is computed exactly as a single
process computes it, so the cache is byte-identical to a one-process extraction on the same kind of device.
"""
import contextlib
import dataclasses
import hashlib
import os
import queue
import logging
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import timm
import torch
from tqdm import tqdm

import torchrun
from cache.store import DEFAULT_CHUNK_ROWS, FORMAT_VERSION, FORMATS, create_or_resume, fingerprint, open_rank_writer

from .backbones import backbone_data_config, load_backbone
from .costs import exit_costs
from .datasets import DATASETS, DataSettings, load_splits

log = logging.getLogger(__name__)

NORMALIZE = ("backbone", "dataset")   # mean/std: the backbone's pretrained config, or the dataset's statistics
SPLITS = ("train", "val", "test")
RANDOM_INIT_SEED = 0                  # random-init backbones must be the same network on every run and resume
WRITE_QUEUE = 8                       # chunks waiting for the writer thread
MAX_WORKERS = 8                       # default DataLoader workers per GPU rank: decoding small images keeps up
PROGRESS_EVERY = 1.0                  # seconds between refreshes of a distributed run's progress bar


class ExtractionError(RuntimeError):
    """The backbone produced something that must not be cached (NaN/Inf features)."""


@dataclass(frozen=True)
class ExtractSettings:
    backbone: str
    dataset: str
    weights: str | None = None
    data_dir: str | None = None
    img_size: int | None = None         # None: the backbone's own input size
    num_classes: int | None = None      # None: the dataset's class count
    tokens: str = "cls"                 # cls | cls+mean | all
    views: int = 0                      # extra random-crop+flip views of every training image
    split_seed: int = 0
    normalize: str = "backbone"
    limit: int | None = None            # first `limit` images of every split (quick runs)
    download: bool = False
    out: str | None = None              # None: cache/<backbone>-<dataset>-<fingerprint[:10]>.zarr|.h5
    fmt: str = "zarr"
    overwrite: bool = False
    batch_size: int = 64
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    num_workers: int | None = None      # None: 0 on a CPU, from the CPU count on a GPU
    device: str | None = None           # None: cuda when available, else cpu
    progress: bool = True

    def __post_init__(self):
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; choose one of {', '.join(DATASETS)}")
        if self.fmt not in FORMATS:
            raise ValueError(f"unknown format {self.fmt!r}; choose one of {', '.join(FORMATS)}")
        if self.normalize not in NORMALIZE:
            raise ValueError(f"normalize must be one of {', '.join(NORMALIZE)}, got {self.normalize!r}")
        if self.batch_size < 1 or self.chunk_rows < 1 or (self.num_workers or 0) < 0:
            raise ValueError("batch size and chunk rows must be >= 1, workers >= 0")
        b, c = self.batch_size, self.chunk_rows
        if b % c and c % b:
            # batches and chunks must nest, so every batch holds the same rows on every run (determinism)
            raise ValueError(f"batch size {b} and chunk rows {c} must divide one another (e.g. batch size "
                             f"{max(c, b // c * c)})")


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r} (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but torch sees no CUDA device")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {name!r} asked for, but torch sees {torch.cuda.device_count()} CUDA device(s)")
    return device


def weights_identity(backbone) -> dict:
    """The weights record of the manifest; random-init weights are identified by a hash of their values."""
    if backbone.weights_info:
        return dict(backbone.weights_info)
    digest = hashlib.sha256()
    for key, value in sorted(backbone.model.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return {"path": None, "sha256": digest.hexdigest(),
            "source": f"random init (torch.manual_seed({RANDOM_INIT_SEED}))"}


def load_for_extraction(s: ExtractSettings, num_classes: int):
    """The backbone an extraction with settings s reads (random-init weights from RANDOM_INIT_SEED, which seeds
    torch's global generator)."""
    torch.manual_seed(RANDOM_INIT_SEED)
    return load_backbone(s.backbone, s.weights, num_classes=num_classes, img_size=s.img_size, tokens=s.tokens)


def prepare(s: ExtractSettings):
    """Backbone, splits, manifest, layout and device of an extraction (no store touched yet)."""
    device = _device(s.device)
    cfg = backbone_data_config(s.backbone, s.weights, s.img_size)
    splits = load_splits(DataSettings.for_backbone(
        s.dataset, cfg, s.normalize, data_dir=s.data_dir, views=s.views, split_seed=s.split_seed, limit=s.limit,
        download=s.download))
    num_classes = s.num_classes or splits.num_classes
    if num_classes < splits.num_classes:
        raise ValueError(f"--num-classes {num_classes} is below the {splits.num_classes} classes of {s.dataset}")
    backbone = load_for_extraction(s, num_classes)   # the class count decides the head (kept, or dropped)

    precision = "float32"
    if device.type == "cuda":
        precision = "bfloat16-autocast" if torch.cuda.is_bf16_supported() else "float16-autocast"
    exits = [{**e, "cumulative_backbone_macs": int(e["cumulative_backbone_macs"]),
              "represent_macs": int(e["represent_macs"]), "cumulative_total_macs": int(e["cumulative_total_macs"])}
             for e in exit_costs(backbone)]   # at batch 1, on the CPU copy
    tokens_per_row = None
    if s.tokens == "all":
        with torch.no_grad():
            reps, _ = backbone(torch.zeros(1, 3, backbone.img_size, backbone.img_size))
        tokens_per_row = int(reps[0].shape[1])
    manifest = {
        "backbone": s.backbone, "weights": weights_identity(backbone), "num_classes": num_classes,
        "img_size": backbone.img_size, "tokens": s.tokens, "head_is_task_head": backbone.head_is_task_head,
        "precision": precision, "exits": exits, "dataset": splits.describe(), "class_names": splits.class_names,
        "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
        "versions": {"torch": torch.__version__, "timm": timm.__version__, "python": sys.version.split()[0]},
    }
    layout = {"splits": {name: len(getattr(splits, name)) for name in SPLITS}, "exit_dims": backbone.exit_dims,
              "num_classes": num_classes, "with_logits": backbone.head_is_task_head, "chunk_rows": s.chunk_rows,
              "tokens": tokens_per_row}
    return backbone, splits, manifest, layout, device


def default_out(s: ExtractSettings, manifest: dict) -> Path:
    fp = fingerprint({**manifest, "format_version": FORMAT_VERSION})
    return Path("cache") / f"{s.backbone}-{s.dataset}-{fp[:10]}.{'zarr' if s.fmt == 'zarr' else 'h5'}"


class _BackgroundWriter:
    """One thread writes chunks while the backbone computes; after a write error it drains the queue (so the
    producer never blocks) and the error is raised in the main thread at the next submit or at close."""

    def __init__(self, writer):
        self.writer, self.error = writer, None
        self.queue = queue.Queue(maxsize=WRITE_QUEUE)
        self.thread = threading.Thread(target=self._run, name="cache-writer", daemon=True)
        self.thread.start()

    def _run(self):
        while (item := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self.writer.write_chunk(*item)
                except BaseException as err:   # handed to the main thread
                    self.error = err

    def submit(self, *item):
        self._raise()
        self.queue.put(item)

    def close(self, raise_error=True):
        self.queue.put(None)
        self.thread.join()
        if raise_error:
            self._raise()

    def _raise(self):
        if self.error is not None:
            raise self.error


def _groups(pending: list[int], chunk_rows: int, group_rows: int, n: int) -> list[tuple[int, int]]:
    """Row ranges [start, stop) of the fixed-grid groups (one batch or one chunk, whichever is larger) that hold
    a pending chunk."""
    starts = sorted({i * chunk_rows // group_rows * group_rows for i in pending})
    return [(a, min(a + group_rows, n)) for a in starts]


def run_extraction(s: ExtractSettings) -> Path:
    """Fills (or resumes) the cache of `s`; returns its path. Already-complete caches are left as they are.
    Under torchrun every rank calls this; the ranks share the work (_run_ranks)."""
    if torchrun.launched():
        return _run_ranks(s)
    backbone, splits, manifest, layout, device = prepare(s)
    out = Path(s.out) if s.out else default_out(s, manifest)
    writer = create_or_resume(out, manifest, layout, fmt=s.fmt, overwrite=s.overwrite)
    if writer.complete:
        log.info(f"{out} is already complete (every chunk verified): nothing to do")
    try:
        return _fill(s, writer, backbone, splits, layout, manifest, device, out)
    finally:
        writer.close()   # the store's lock (the cache stays resumable)


def _work(s: ExtractSettings, writer, pending: dict) -> dict:
    """split -> the fixed-grid row groups that hold pending chunks (each group is computed as one unit)."""
    return {split: _groups(sorted(pending[split]), s.chunk_rows, max(s.batch_size, s.chunk_rows),
                           writer.num_rows(split)) for split in SPLITS}


def _fill(s: ExtractSettings, writer, backbone, splits, layout, manifest, device, out: Path) -> Path:
    pending = {split: set(writer.pending_chunks(split)) for split in SPLITS}
    work = _work(s, writer, pending)
    total = sum(b - a for ranges in work.values() for a, b in ranges)
    bar = tqdm(total=total, unit="img", desc=f"extract {out.name}", disable=not s.progress, dynamic_ncols=True,
               file=sys.stderr)
    started = time.perf_counter()
    try:
        _compute_and_write(s, writer, backbone, splits, layout, manifest, device, work, pending, bar)
    finally:
        bar.close()
    path = writer.finish()
    if s.progress and total:
        elapsed = time.perf_counter() - started
        log.info(f"{total} rows in {elapsed:.1f} s ({total / elapsed:.0f} img/s)")
    return path


def _workers(s: ExtractSettings, device: torch.device, ranks_here: int = 1) -> int:
    """DataLoader workers: as asked; by default none on a CPU (they would compete with the backbone for the
    cores) and, on a GPU, this machine's CPUs shared among its ranks (decoding must keep up with the GPU)."""
    if s.num_workers is not None:
        return s.num_workers
    if device.type != "cuda":
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(MAX_WORKERS, cpus // max(ranks_here, 1) - 1))


def _compute_and_write(s, writer, backbone, splits, layout, manifest, device, work: dict, pending: dict, bar,
                       ranks_here: int = 1):
    """Runs the backbone over the row groups of `work` and hands their pending chunks to a writer thread;
    bar.update(rows) after each group (bar may be None)."""
    backbone = backbone.to(device)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16 if "bfloat16" in manifest["precision"] else torch.float16)
                if device.type == "cuda" else contextlib.nullcontext())
    background = _BackgroundWriter(writer)
    try:
        for split in SPLITS:
            if not work[split]:
                continue
            dataset = getattr(splits, split)
            rows = [r for a, b in work[split] for r in range(a, b)]
            loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, rows), batch_size=s.batch_size,
                                                 shuffle=False, num_workers=_workers(s, device, ranks_here),
                                                 pin_memory=device.type == "cuda")
            batches = iter(loader)
            if bar is not None:
                bar.set_postfix_str(split)
            for start, stop in work[split]:
                feats, labels, logits = _compute_group(backbone, batches, stop - start, device, autocast,
                                                       layout["with_logits"], f"{split} rows {start}:{stop}")
                for i in range(start // s.chunk_rows, -(-stop // s.chunk_rows)):
                    if i not in pending[split]:
                        continue
                    a, b = writer.chunk_range(split, i)
                    part = slice(a - start, b - start)
                    background.submit(split, i, [f[part] for f in feats], labels[part],
                                      None if logits is None else logits[part])
                if bar is not None:
                    bar.update(stop - start)
    except BaseException:
        background.close(raise_error=False)   # chunks already queued are whole and valid: let them land
        raise
    background.close()


# ---------------------------------------------------------------- torchrun: one rank per device

def _run_ranks(s: ExtractSettings) -> Path | None:
    """One rank of a distributed extraction. Rank 0 opens the store (taking its lock for the whole run, folding
    the journal of a killed run) and sends every rank the pending chunks; the fixed-grid row groups holding them
    are dealt out round robin; each rank computes and writes its own (data + journal record, cache/store.py);
    after a barrier rank 0 folds the journal, verifies every chunk and sets `complete`. Returns the cache's
    path on rank 0, None on the others."""
    ranks = torchrun.Ranks.from_env()
    s = dataclasses.replace(s, device=ranks.device(s.device))
    ranks.start(s.device)
    try:
        return _rank_work(s, ranks)
    finally:
        ranks.close()


def _rank_work(s: ExtractSettings, ranks) -> Path | None:
    backbone, splits, manifest, layout, device = prepare(s)
    out = Path(s.out) if s.out else default_out(s, manifest)
    writer, setup = None, None
    if ranks.rank == 0:
        try:
            writer = create_or_resume(out, manifest, layout, fmt=s.fmt, overwrite=s.overwrite, rank=0)
            setup = {"store": str(writer._store_path), "complete": writer.complete,
                     "pending": {split: writer.pending_chunks(split) for split in SPLITS}}
        except BaseException as err:
            ranks.broadcast({"error": str(err)})   # the others stop quietly; this rank says why
            raise
    setup = ranks.broadcast(setup)
    if "error" in setup:
        raise torchrun.OtherRankFailed(setup["error"])
    try:
        if setup["complete"]:
            if ranks.rank == 0:
                log.info(f"{out} is already complete (every chunk verified): nothing to do")
            return out if ranks.rank == 0 else None
        if ranks.rank:
            writer = open_rank_writer(setup["store"], ranks.rank)
        pending = {split: set(chunks) for split, chunks in setup["pending"].items()}
        every = [(split, g) for split, groups in _work(s, writer, pending).items() for g in groups]
        mine = every[ranks.rank::ranks.world]
        work = {split: [g for sp, g in mine if sp == split] for split in SPLITS}
        rows = sum(b - a for _, (a, b) in mine)
        progress = _RankProgress(writer, out, sum(b - a for _, (a, b) in every), ranks, s.progress)
        started, error = time.perf_counter(), None
        try:
            _compute_and_write(s, writer, backbone, splits, layout, manifest, device, work, pending, None,
                               ranks.local_world)
        except Exception as err:   # reported after the barrier, so that no rank waits for this one in vain
            error = err
        finally:
            progress.close()
        elapsed = time.perf_counter() - started
        if s.progress and rows and error is None:
            log.info(f"rank {ranks.rank}/{ranks.world}: {rows} rows in {elapsed:.1f} s ({rows / elapsed:.0f} img/s)")
        failed = [r for r, e in enumerate(ranks.gather(error is not None)) if e]
        if error is not None:
            raise error
        if failed:
            raise torchrun.OtherRankFailed(f"rank(s) {', '.join(map(str, failed))} failed")
        if ranks.rank:
            return None
        path = writer.finish()   # folds every rank's records, verifies every chunk, then `complete`
        if s.progress and progress.total:
            took = time.perf_counter() - started
            log.info(f"{progress.total} rows on {ranks.world} ranks in {took:.1f} s "
                     f"({progress.total / took:.0f} img/s)")
        return path
    finally:
        if writer is not None:
            writer.close()


class _RankProgress:
    """Rank 0's progress bar of a distributed extraction: images done by every rank (counted from the journal
    of finished chunks, refreshed by a thread) with each rank's images/s and the total."""

    def __init__(self, writer, out: Path, total: int, ranks, enabled: bool):
        self.total, self._stop = total, threading.Event()
        self.bar = self.thread = None
        if not enabled or ranks.rank != 0 or not total:
            return
        self.writer, self.ranks, self.started = writer, ranks, time.perf_counter()
        self.bar = tqdm(total=total, unit="img", desc=f"extract {out.name} ({ranks.world} ranks)",
                        dynamic_ncols=True, file=sys.stderr)
        self.thread = threading.Thread(target=self._run, name="progress", daemon=True)
        self.thread.start()

    def _run(self):
        while not self._stop.wait(PROGRESS_EVERY):
            self._refresh()

    def _refresh(self):
        per_rank = [0] * self.ranks.world
        try:
            names = os.listdir(self.writer.journal)
        except OSError:
            return
        for name in names:
            parts = name.split(".")
            if len(parts) == 3 and parts[2][1:].isdigit() and int(parts[2][1:]) < self.ranks.world:
                a, b = self.writer.chunk_range(parts[0], int(parts[1]))
                per_rank[int(parts[2][1:])] += b - a
        took = max(time.perf_counter() - self.started, 1e-9)
        rates = " ".join(f"r{r} {n / took:.0f}" for r, n in enumerate(per_rank))
        self.bar.n = min(sum(per_rank), self.total)
        self.bar.set_postfix_str(f"img/s {rates}, total {sum(per_rank) / took:.0f}", refresh=False)
        self.bar.refresh()

    def close(self):
        if self.thread is not None:
            self._stop.set()
            self.thread.join()
            self._refresh()
            self.bar.close()


def _compute_group(backbone, batches, rows: int, device, autocast, with_logits: bool, where: str):
    """Runs the backbone over the next `rows` rows of the loader; float16 numpy features, labels, logits."""
    feats, labels, logits, got = [], [], [], 0
    with torch.no_grad(), autocast:
        while got < rows:
            x, y = next(batches)
            reps, out = backbone(x.to(device, non_blocking=True))
            finite = torch.stack([torch.isfinite(r).all() for r in reps] + [torch.isfinite(out).all()])
            if not bool(finite.all()):
                bad = [f"exit {l + 1}" for l, ok in enumerate(finite[:-1].tolist()) if not ok] or ["logits"]
                raise ExtractionError(f"the backbone produced NaN/Inf at {where} ({', '.join(bad)}); "
                                      "nothing of it was written -- check the weights and input normalisation")
            feats.append([r.to(torch.float16).cpu().numpy() for r in reps])
            logits.append(out.to(torch.float16).cpu().numpy() if with_logits else None)
            labels.append(np.asarray(y, dtype=np.int64))
            got += len(y)
    return ([np.concatenate([f[l] for f in feats]) for l in range(len(feats[0]))], np.concatenate(labels),
            np.concatenate(logits) if with_logits else None)

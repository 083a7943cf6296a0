"""The feature cache on disk: manifest and fingerprint, a resumable writer, a block reader.

One store per extraction (backbone + weights + dataset + transform), zarr v3 (default) or HDF5, same layout:

    <root attributes>     the manifest: format_version, backbone, weights, num_classes, img_size, tokens,
                          head_is_task_head, exits, dataset, versions, created, plus format, layout, fingerprint
                          and `complete` (written last)
    train/ val/ test/     one group per split of N rows
        features/1 .. L   float16 (N, D_l) -- (N, T, D_l) with tokens="all" -- in chunks of (chunk_rows, ...)
        labels            int64 (N,)
        logits            float16 (N, K), only when the backbone's head is the task's head
        checksums         uint32 (number of row chunks, arrays): crc32 of each array's rows in that chunk, as
                          written (columns: features/1 .. L, labels, logits); format version 2 and later
        done              uint8 (number of row chunks,): 1 once every array of that row chunk is on disk

Resumption. zarr writes every chunk file atomically (temp file + rename), a chunk's `done` entry is written only
after all its arrays, and the store itself appears by an atomic rename of a fully laid-out empty store. So a
process killed at any moment leaves a store whose done chunks are whole; `pending_chunks` lists the rest and a
rerun rewrites exactly those. HDF5 cannot be written crash-safely in place, so an HDF5 cache is staged as a zarr
store beside the target (`<name>.h5.partial.zarr`, resumable like any zarr cache) and converted at `finish()`
into `<name>.h5.partial-h5`, which is then renamed onto the target: the .h5 file either does not exist or is
complete.

Integrity (format version 2). Each chunk's checksums are written just before its done flag; `cache verify` and
every reader recompute them from the bytes read (zlib's crc32 over whole chunks while copying, cheap next to the
read), so a deleted, truncated or altered chunk is named, never read back as zeros. The fingerprint covers the
per-exit costs and class names too, and costs must be positive and non-decreasing. A rerun of `extract` on a
cache with bad chunks marks exactly those not done and re-extracts them. Caches of format version 1 (no
checksums) are still read, with a one-line warning. One process writes a store at a time (cache/lock.py).

Ranks (torchrun, torchrun.py). The `done` and `checksums` arrays hold many chunks per file, so two
processes must not write them. Under torchrun rank 0 holds the lock for the whole run and the ranks write disjoint
row chunks of the data arrays (one zarr chunk file each), but record each finished chunk in a journal beside the
store (`<store>.ranks/<split>.<chunk>.r<rank>`: the chunk's checksums, written after its data, by atomic rename)
instead of the shared arrays. Only the lock holder folds the journal into `checksums` and `done` (after checking
every recorded chunk against its checksums, so a record that does not match the data leaves its chunk pending):
when it opens the store (the journal of a killed run, whatever its number of ranks) and in finish(), before it
verifies the store and sets `complete`. The folded store is the one a single process writes.

Reading: whole splits are read in large contiguous row blocks (random row reads from zarr/HDF5 are ~100x slower
than from RAM), into RAM or straight onto a torch device; `iter_blocks` streams splits that do not fit.
"""
import datetime
import hashlib
import json
import logging
import os
import shutil
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
import zarr

from .lock import acquire as acquire_lock

FORMAT_VERSION = 2
# zarr's settings for reading a block of many chunks: more chunk reads in flight and decoded per batch than zarr's
# defaults (10 and 1), which spend most of a block's read in per-chunk scheduling (bench/cache_load.py). In force
# while a block's array is opened (zarr builds its read pipeline then) and read, not otherwise (a lock keeps the
# stream's reader thread and this one from undoing each other's setting): the process's zarr settings stay its own.
ZARR_BLOCK_READS = {"async.concurrency": 64, "codec_pipeline.batch_size": 64}
_BLOCK_READ = threading.Lock()
READABLE_VERSIONS = (1, 2)   # version 1: no chunk checksums; costs and class names outside the fingerprint
FORMATS = ("zarr", "hdf5")
DEFAULT_CHUNK_ROWS = 64
DONE_CHUNK = 4096            # entries per `done` chunk file: few files; one writer thread, so read-modify-write is safe
BLOCK_BYTES = 64 * 2 ** 20   # target size of one contiguous read
H5_OVERHEAD = (1.05, 2 ** 20)   # HDF5 conversion needs about arrays * 1.05 + 1 MiB (chunk index, metadata)
REQUIRED_FIELDS = ("backbone", "weights", "num_classes", "img_size", "tokens", "head_is_task_head", "exits",
                   "dataset")


class CacheError(ValueError):
    """A cache that cannot be used as asked: missing, incomplete, mismatched or malformed (one-line message)."""


log = logging.getLogger(__name__)
_WARNED: set[str] = set()   # caches already warned about in this process (format version 1)


# ---------------------------------------------------------------- manifest, identity, fingerprint

def identity(attrs: dict) -> dict:
    """The fields that decide a cache's content (flat, JSON-able). Storage details (format, chunking) and
    bookkeeping (created, versions, complete) are not part of it; from format version 2 on, the per-exit costs
    and class names are (stage two reads them)."""
    costs = (attrs.get("format_version") or 0) >= 2
    ident = {
        "format_version": attrs.get("format_version"),
        "backbone": attrs.get("backbone"),
        "weights.sha256": (attrs.get("weights") or {}).get("sha256"),
        "num_classes": attrs.get("num_classes"),
        "img_size": attrs.get("img_size"),
        "tokens": attrs.get("tokens"),
        "head_is_task_head": attrs.get("head_is_task_head"),
        "precision": attrs.get("precision"),
        "exits": [[e.get("name"), e.get("dim")] + ([e.get("cumulative_backbone_macs"),
                                                     e.get("cumulative_total_macs")] if costs else [])
                  for e in attrs.get("exits", [])],
    }
    if costs:
        ident["class_names"] = attrs.get("class_names")
    for key, value in sorted((attrs.get("dataset") or {}).items()):
        ident[f"dataset.{key}"] = value
    return ident


def fingerprint(attrs: dict) -> str:
    """sha256 of the identity fields: equal fingerprints mean equal arrays, whatever the storage format."""
    blob = json.dumps(identity(attrs), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _resume_key(attrs: dict) -> dict:
    """What must match to append to an existing store: the identity plus the storage format and layout."""
    layout = attrs.get("layout") or {}
    return {**identity(attrs), "format": attrs.get("format"),
            **{f"layout.{k}": layout.get(k) for k in ("splits", "chunk_rows", "exit_dims", "with_logits", "tokens")}}


def differences(old: dict, new: dict) -> list[str]:
    """'field: <old> (cache) vs <new> (now)' for every resume-key field that differs."""
    def short(v):
        text = repr(v)
        return text if len(text) <= 40 else text[:37] + "..."
    a, b = _resume_key(old), _resume_key(new)
    return [f"{k}: {short(a.get(k))} (cache) vs {short(b.get(k))} (now)" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k)]


def _check_inputs(manifest: dict, layout: dict) -> dict:
    """Validates the caller's manifest and layout; returns the layout normalised to plain JSON types."""
    missing = [k for k in REQUIRED_FIELDS if k not in manifest]
    if missing:
        raise CacheError(f"manifest lacks {', '.join(missing)}")
    splits = {str(s): int(n) for s, n in layout["splits"].items()}
    if any(n < 0 for n in splits.values()):
        raise CacheError(f"negative split size in {splits}")
    dims = [int(d) for d in layout["exit_dims"]]
    if len(dims) != len(manifest["exits"]) or not dims or min(dims) < 1:
        raise CacheError(f"layout exit_dims {dims} do not match the manifest's {len(manifest['exits'])} exits")
    if int(layout["num_classes"]) != int(manifest["num_classes"]):
        raise CacheError(f"layout num_classes {layout['num_classes']} != manifest {manifest['num_classes']}")
    chunk_rows = int(layout.get("chunk_rows", DEFAULT_CHUNK_ROWS))
    if chunk_rows < 1:
        raise CacheError(f"chunk_rows must be positive, got {chunk_rows}")
    tokens = layout.get("tokens")
    return {"splits": splits, "exit_dims": dims, "num_classes": int(layout["num_classes"]),
            "with_logits": bool(layout["with_logits"]), "chunk_rows": chunk_rows,
            "tokens": None if tokens is None else int(tokens), "checksums": "crc32"}


def cost_problems(exits: list) -> list[str]:
    """Costs stage two divides by and ranks exits with: positive and non-decreasing along the exits."""
    totals = [e.get("cumulative_total_macs") for e in exits]
    if not totals or any(not isinstance(t, (int, float)) or not t > 0 for t in totals):
        return [f"per-exit costs {totals} are not all positive numbers (edited or corrupted manifest)"]
    if any(b < a for a, b in zip(totals, totals[1:])):
        return [f"per-exit costs {totals} decrease along the exits (edited or corrupted manifest)"]
    return []


def array_specs(layout: dict, split: str) -> dict:
    """name -> (shape, chunk shape, dtype) of every array of one split."""
    n, rows, k = layout["splits"][split], layout["chunk_rows"], layout["num_classes"]
    tok = () if layout["tokens"] is None else (layout["tokens"],)
    specs = {f"features/{l}": ((n, *tok, d), (rows, *tok, d), "float16")
             for l, d in enumerate(layout["exit_dims"], start=1)}
    specs["labels"] = ((n,), (rows,), "int64")
    if layout["with_logits"]:
        specs["logits"] = ((n, k), (rows, k), "float16")
    if layout.get("checksums"):
        specs["checksums"] = ((num_chunks(layout, split), len(specs)), (DONE_CHUNK, len(specs)), "uint32")
    specs["done"] = ((num_chunks(layout, split),), (DONE_CHUNK,), "uint8")
    return specs


def data_names(layout: dict, split: str) -> list[str]:
    """The arrays that hold rows, in the order of the checksum columns."""
    return [name for name in array_specs(layout, split) if name not in ("checksums", "done")]


def checksum(rows: np.ndarray) -> int:
    """crc32 of an array's bytes as stored (C order)."""
    return zlib.crc32(np.ascontiguousarray(rows).data)


def nonfinite_rows(block: np.ndarray) -> np.ndarray:
    """Indices of the rows of a float16 block holding NaN/Inf (exponent bits all set: cheaper than isfinite). The
    rows are looked for only when the block's largest masked exponent says there are any, the usual case being
    none."""
    exponents = np.bitwise_and(np.ascontiguousarray(block).view(np.uint16), 0x7C00)
    if exponents.size == 0 or exponents.max() < 0x7C00:
        return np.empty(0, dtype=np.int64)
    return np.flatnonzero((exponents.reshape(len(block), -1) == 0x7C00).any(axis=1))


def num_chunks(layout: dict, split: str) -> int:
    return -(-layout["splits"][split] // layout["chunk_rows"])


def row_blocks(n: int, rows: int):
    """(start, stop) of consecutive row blocks covering n rows."""
    for start in range(0, n, rows):
        yield start, min(start + rows, n)


def block_rows(layout: dict, row_bytes: int) -> int:
    """Rows per contiguous read: about BLOCK_BYTES, a whole number of chunks."""
    rows = layout["chunk_rows"]
    return max(rows, BLOCK_BYTES // max(row_bytes, 1) // rows * rows)


# ---------------------------------------------------------------- opening stores

def staging_path(path: Path) -> Path:
    """Where an HDF5 cache is built (a zarr store) until finish() converts it."""
    return path.with_name(path.name + ".partial.zarr")


def journal_path(store_path: Path) -> Path:
    """Where the ranks of a distributed extraction record the chunks they finished (see the module's doc)."""
    store_path = Path(store_path)
    return store_path.with_name(store_path.name + ".ranks")


class RawStore:
    """attrs + arrays of a zarr or HDF5 cache, read-only unless mode='r+' (zarr only)."""

    def __init__(self, path: Path, mode: str = "r"):
        self.path = Path(path)
        self._h5 = self._group = None
        if self.path.name.endswith(".partial-h5"):
            raise CacheError(f"{self.path} is the temporary file of an HDF5 conversion that did not finish, not a "
                             "cache; rerun the extract command that made it (the file is then replaced)")
        if (self.path / "zarr.json").is_file():
            self.kind = "zarr"
            try:
                self._group = zarr.open_group(self.path, mode=mode)
                self.attrs = dict(self._group.attrs)
            except (ValueError, TypeError, KeyError) as err:   # zarr's errors for a broken zarr.json
                raise CacheError(f"{self.path / 'zarr.json'} is unreadable ({_first_line(err)}): a truncated "
                                 "or edited cache; rerun the extract command with --overwrite") from None
        elif self.path.is_file() and h5py.is_hdf5(self.path):
            self.kind = "hdf5"
            try:
                self._h5 = h5py.File(self.path, "r")
                self.attrs = json.loads(self._h5.attrs.get("manifest", "{}"))
            except (OSError, ValueError) as err:
                self.close()
                raise CacheError(f"{self.path} is unreadable ({_first_line(err)}): a truncated or corrupt HDF5 "
                                 "file; rerun the extract command with --overwrite") from None
        elif self.path.is_file() and self.path.suffix == ".h5":
            raise CacheError(f"{self.path} is not a readable HDF5 file (truncated or corrupt); rerun the extract "
                             "command with --overwrite")
        elif self.path.exists():
            raise CacheError(f"{self.path} is not a cache (neither a zarr store nor an HDF5 file)")
        else:
            raise CacheError(f"no cache at {self.path}")
        if "format_version" not in self.attrs or "layout" not in self.attrs:
            self.close()
            raise CacheError(f"{self.path} is a {self.kind} store but not a feature cache (no manifest)")

    def array(self, name: str):
        """The array (zarr.Array or h5py.Dataset, both sliced like numpy) or None when missing."""
        if self._h5 is not None:
            return self._h5.get(name)
        return self._group.get(name)

    def set_complete(self):
        self._group.attrs["complete"] = True
        self.attrs["complete"] = True

    def close(self):
        if self._h5 is not None:
            self._h5.close()


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__


def _remove_cache(path: Path):
    """Deletes a cache (or a staging store) for overwrite; refuses anything that is not one."""
    if path.exists():
        RawStore(path).close()   # raises CacheError when `path` is not a cache: never delete a stranger's files
    shutil.rmtree(journal_path(path), ignore_errors=True)   # its ranks' records (a folder only this program names)
    if path.exists():
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def _create_zarr(path: Path, attrs: dict):
    """Lays out an empty store under a temporary name, then renames it into place (atomic appearance)."""
    tmp = path.with_name(path.name + ".partial-new")
    if tmp.exists():
        shutil.rmtree(tmp)   # a creation killed earlier: ours by name, and never renamed into place
    shutil.rmtree(journal_path(path), ignore_errors=True)   # records of a store that is gone: never fold them
    path.parent.mkdir(parents=True, exist_ok=True)
    root = zarr.open_group(tmp, mode="w", attributes=attrs)
    for split in attrs["layout"]["splits"]:
        group = root.require_group(split)
        for name, (shape, chunks, dtype) in array_specs(attrs["layout"], split).items():
            group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, compressors=None, fill_value=0)
    os.rename(tmp, path)


# ---------------------------------------------------------------- writer

def create_or_resume(path, manifest: dict, layout: dict, fmt: str = "zarr", overwrite: bool = False,
                     rank: int | None = None):
    """Opens the cache at `path` for writing: a new one, or the existing one when its identity matches
    (else a CacheError naming each differing field). overwrite=True replaces whatever cache is there.
    The writer holds the store's lock (cache/lock.py) until finish() or close(). A complete cache whose chunks
    fail verification is reopened with exactly those chunks pending. A journal left by the ranks of a killed
    distributed run is folded in. rank (rank 0 of a distributed run): its chunks go to the journal too."""
    if fmt not in FORMATS:
        raise CacheError(f"unknown cache format {fmt!r}; choose one of {', '.join(FORMATS)}")
    path = Path(path)
    layout = _check_inputs(manifest, layout)
    versions = {"zarr": zarr.__version__, "h5py": h5py.__version__, "numpy": np.__version__,
                **manifest.get("versions", {})}
    attrs = {**manifest, "format_version": FORMAT_VERSION, "format": fmt, "layout": layout, "versions": versions,
             "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "complete": False}
    attrs["fingerprint"] = fingerprint(attrs)
    problems = cost_problems(attrs["exits"])
    if problems:
        raise CacheError(problems[0])
    lock = acquire_lock(path)
    try:
        writer = _open_for_writing(path, path if fmt == "zarr" else staging_path(path), attrs, fmt, overwrite)
    except BaseException:
        lock.release()
        raise
    writer.hold(lock)
    writer.rank = rank
    return writer


def open_rank_writer(store_path, rank: int) -> "CacheWriter":
    """The writer of a rank other than 0 in a distributed extraction: writes the data of its chunks and records
    them in the journal. It takes no lock (rank 0 holds it for the run) and never folds or finishes."""
    store_path = Path(store_path)
    store = RawStore(store_path)
    store.close()
    return CacheWriter(store_path, store_path, store.attrs, rank=rank, fold=False)


def _open_for_writing(path: Path, store_path: Path, attrs: dict, fmt: str, overwrite: bool):
    if overwrite:
        _remove_cache(path)
        _remove_cache(store_path)
    for existing in dict.fromkeys([path, store_path]):
        if not existing.exists():
            continue
        store = RawStore(existing)
        store.close()
        if store.attrs.get("format_version") != FORMAT_VERSION:
            raise CacheError(f"{existing} has cache format version {store.attrs.get('format_version')} (written by "
                             "an older version of this program, without chunk checksums): it can be read but not "
                             "resumed or repaired; use --overwrite to rebuild it")
        diff = differences(store.attrs, attrs)
        if diff:
            raise CacheError(f"{existing} was built with other settings ({'; '.join(diff)}); "
                             "use --overwrite to replace it")
        if store.attrs.get("complete"):
            from .verify import bad_chunks   # verify builds on this module
            bad = bad_chunks(existing)
            if not any(bad.values()):
                return CacheWriter(path, store_path, store.attrs, complete=True)
            shown = "; ".join(f"{split} chunks {', '.join(map(str, sorted(c)))}" for split, c in bad.items() if c)
            log.warning("%s: chunks fail verification (%s); re-extracting them", path, shown)
            if fmt == "hdf5":
                _restage_hdf5(path, store_path, store.attrs, bad)
            else:
                _mark_not_done(existing, bad)
            return CacheWriter(path, store_path, {**store.attrs, "complete": False})
        if existing == path and fmt == "hdf5":
            raise CacheError(f"{path} is an incomplete HDF5 cache this program did not write; use --overwrite")
        for stray in existing.rglob("*.partial"):   # zarr's temp files from a write that was killed
            stray.unlink()
        return CacheWriter(path, store_path, store.attrs)
    _create_zarr(store_path, attrs)
    return CacheWriter(path, store_path, attrs)


def _mark_not_done(path: Path, bad: dict):
    """Clears the done flags of bad chunks, then the complete flag: killed in between, the cache is refused by
    readers (chunks not done) and a rerun finds the same chunks again."""
    group = zarr.open_group(path, mode="r+")
    for split, chunks in bad.items():
        for i in sorted(chunks):
            group[f"{split}/done"][i] = 0
    group.attrs["complete"] = False


def _restage_hdf5(path: Path, store_path: Path, attrs: dict, bad: dict):
    """Copies the good chunks of a complete HDF5 cache back into a staging store (bad chunks left not done),
    then removes the HDF5 file: the staging store resumes like any other. Killed before the removal, the HDF5
    file is still complete and a rerun starts the copy again."""
    if store_path.exists():
        shutil.rmtree(store_path)
    layout = attrs["layout"]
    _create_zarr(store_path, {**attrs, "complete": False})
    src, dst = RawStore(path), RawStore(store_path, mode="r+")
    try:
        for split in layout["splits"]:
            for name in data_names(layout, split):
                _copy_rows(src.array(f"{split}/{name}"), dst.array(f"{split}/{name}"), layout, skip_errors=True)
            done = np.ones(num_chunks(layout, split), np.uint8)
            done[sorted(bad.get(split, ()))] = 0
            dst.array(f"{split}/checksums")[:] = src.array(f"{split}/checksums")[:]
            dst.array(f"{split}/done")[:] = done
    finally:
        src.close()
    os.remove(path)


def _copy_rows(a, out, layout: dict, skip_errors: bool = False):
    """Copies array a into out in large row blocks; with skip_errors, blocks that cannot be read are copied
    chunk by chunk and unreadable chunks are left out (their done flags say so)."""
    shape, rows = a.shape, layout["chunk_rows"]
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(a.dtype).itemsize
    for start, stop in row_blocks(shape[0], block_rows(layout, row_bytes)):
        try:
            out[start:stop] = a[start:stop]
        except Exception:
            if not skip_errors:
                raise
            for c0, c1 in row_blocks(stop - start, rows):
                try:
                    out[start + c0:start + c1] = a[start + c0:start + c1]
                except Exception:
                    continue


class CacheWriter:
    """Writes row chunks of a cache being built; finish() verifies it and marks it complete. With a `rank`
    (distributed extraction) a chunk's checksums and done flag go to the journal instead (folded by the lock
    holder); fold=False for ranks other than 0, which hold no lock."""

    def __init__(self, path: Path, store_path: Path, attrs: dict, complete: bool = False, rank: int | None = None,
                 fold: bool = True):
        self.path, self.manifest, self.complete, self.rank = path, attrs, complete, rank
        self.layout, self.fingerprint = attrs["layout"], attrs["fingerprint"]
        self.chunk_rows = self.layout["chunk_rows"]
        self._store_path, self._lock = store_path, None
        self.journal = journal_path(store_path)
        self._store_id = f"{attrs.get('created')}/{attrs['fingerprint']}"   # records of this store only
        if complete:
            if store_path != path and store_path.exists():
                shutil.rmtree(store_path)   # killed after the HDF5 rename, before the staging store was removed
            shutil.rmtree(self.journal, ignore_errors=True)   # killed after `complete`, before its removal
        self._store = None if complete else RawStore(store_path, mode="r+")
        if fold and not complete:
            self.fold_journal()

    def hold(self, lock):
        """Keeps the store's lock until finish() or close(); a complete cache needs none."""
        self._lock = lock
        if self.complete:
            self.close()

    def close(self):
        """Releases the lock (the store stays resumable)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def num_rows(self, split: str) -> int:
        return self.layout["splits"][split]

    def chunk_range(self, split: str, i: int) -> tuple[int, int]:
        """Rows [start, stop) of chunk i: a fixed function of i, so a chunk always holds the same images."""
        return i * self.chunk_rows, min((i + 1) * self.chunk_rows, self.num_rows(split))

    def pending_chunks(self, split: str) -> list[int]:
        if self.complete:
            return []
        return np.flatnonzero(self._store.array(f"{split}/done")[:] == 0).tolist()

    def write_chunk(self, split: str, i: int, features: list, labels, logits=None):
        """Writes one whole row chunk (float16 features and logits, int64 labels), then marks it done."""
        if self.complete:
            raise CacheError(f"{self.path} is complete; nothing to write")
        if split not in self.layout["splits"] or not 0 <= i < num_chunks(self.layout, split):
            raise CacheError(f"no chunk {i} in split {split!r}")
        start, stop = self.chunk_range(split, i)
        specs = array_specs(self.layout, split)
        where = f"{split} rows {start}:{stop}"
        if len(features) != len(self.layout["exit_dims"]):
            raise CacheError(f"{where}: {len(features)} feature arrays for {len(self.layout['exit_dims'])} exits")
        if (logits is not None) != self.layout["with_logits"]:
            raise CacheError(f"{where}: logits {'missing' if logits is None else 'given'} but with_logits="
                             f"{self.layout['with_logits']}")
        data = {f"features/{l}": f for l, f in enumerate(features, start=1)}
        data["labels"] = labels
        if logits is not None:
            data["logits"] = logits
        arrays = {}
        for name, value in data.items():
            shape, _, dtype = specs[name]
            value = np.asarray(value)
            if value.shape != (stop - start, *shape[1:]):
                raise CacheError(f"{where}: {name} has shape {value.shape}, expected {(stop - start, *shape[1:])}")
            if dtype == "int64" and not np.issubdtype(value.dtype, np.integer):
                raise CacheError(f"{where}: labels must be integers, got {value.dtype}")
            with np.errstate(over="ignore"):   # float16 overflows above 65504: caught just below
                value = value.astype(dtype, copy=False)
            if dtype == "float16" and not np.isfinite(value).all():
                raise CacheError(f"{where}: {name} has NaN/Inf (or values beyond float16 range); not written")
            arrays[name] = value
        k = self.layout["num_classes"]
        if arrays["labels"].size and (arrays["labels"].min() < 0 or arrays["labels"].max() >= k):
            raise CacheError(f"{where}: labels outside [0, {k})")
        for name, value in arrays.items():
            self._store.array(f"{split}/{name}")[start:stop] = value
        crcs = [checksum(arrays[n]) for n in data_names(self.layout, split)]
        if self.rank is not None:
            self._record(split, i, crcs)   # the shared arrays are the lock holder's (fold_journal)
            return
        self._store.array(f"{split}/checksums")[i] = crcs
        self._store.array(f"{split}/done")[i] = 1   # after the data and checksums: a done chunk is always whole

    def _record(self, split: str, i: int, crcs: list):
        """Journals one finished chunk (after its data): the file appears whole, by rename."""
        self.journal.mkdir(exist_ok=True)
        name = f"{split}.{i}.r{self.rank}"
        tmp = self.journal / f".{name}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps({"store": self._store_id, "checksums": [int(c) for c in crcs]}))
        os.replace(tmp, self.journal / name)

    def journal_records(self) -> dict:
        """split -> {chunk: checksums} of the journal's records for this store (others are ignored)."""
        found = {}
        for entry in os.scandir(self.journal) if self.journal.is_dir() else ():
            parts = entry.name.split(".")
            if len(parts) != 3 or parts[0] not in self.layout["splits"] or not parts[1].isdigit():
                continue   # a temporary file of a killed write, or not ours
            try:
                record = json.loads(Path(entry.path).read_text())
            except (OSError, ValueError):
                continue
            if isinstance(record, dict) and record.get("store") == self._store_id:
                found.setdefault(parts[0], {})[int(parts[1])] = record.get("checksums")
        return found

    def fold_journal(self) -> int:
        """Moves the journal's records into `checksums` and `done` (lock holder only): each recorded chunk is
        read back and kept only when every array matches its recorded checksum; the others stay pending.
        Returns the number of chunks marked done. Rerunnable at any point (a kill leaves the records)."""
        if not self.journal.is_dir():
            return 0
        folded = 0
        for split, records in self.journal_records().items():
            names = data_names(self.layout, split)
            n = num_chunks(self.layout, split)
            good = {i: c for i, c in records.items()
                    if 0 <= i < n and isinstance(c, list) and len(c) == len(names)}
            for col, name in enumerate(names):
                good = self._matching(split, name, col, good)
            if not good:
                continue
            chunks = sorted(good)
            crcs = np.asarray(self._store.array(f"{split}/checksums")[:])
            crcs[chunks] = np.asarray([good[i] for i in chunks], dtype=np.uint32)
            self._store.array(f"{split}/checksums")[:] = crcs
            done = np.asarray(self._store.array(f"{split}/done")[:])
            done[chunks] = 1   # after the checksums, as in write_chunk
            self._store.array(f"{split}/done")[:] = done
            folded += len(chunks)
        shutil.rmtree(self.journal, ignore_errors=True)
        return folded

    def _matching(self, split: str, name: str, col: int, records: dict) -> dict:
        """The records whose chunk of `name` reads back with the recorded checksum (read in large blocks)."""
        if not records:
            return records
        a, rows = self._store.array(f"{split}/{name}"), self.chunk_rows
        row_bytes = np.dtype(a.dtype).itemsize * int(np.prod(a.shape[1:], dtype=np.int64))
        step = block_rows(self.layout, row_bytes) // rows   # chunks per read
        keep, wanted = {}, sorted(records)
        while wanted:
            first = wanted[0]
            last = max(i for i in wanted if i < first + step)
            start, stop = first * rows, min((last + 1) * rows, a.shape[0])
            try:
                block = np.asarray(a[start:stop])
            except Exception:   # an unreadable chunk file: its chunk stays pending
                block = None
            for i in [w for w in wanted if w <= last]:
                r0 = i * rows - start
                if block is not None and checksum(block[r0:r0 + rows]) == records[i][col]:
                    keep[i] = records[i]
            wanted = [w for w in wanted if w > last]
        return keep

    def finish(self) -> Path:
        """Verifies every chunk and value, then writes the `complete` flag last; returns the cache's path."""
        if self.complete:
            return self.path
        from .verify import store_problems   # verify builds on this module
        self.fold_journal()   # the chunks the ranks of a distributed run wrote
        problems = store_problems(self._store, require_complete=False)
        if problems:
            raise CacheError(f"cannot finish {self.path}: {'; '.join(problems[:5])}")
        if self._store_path == self.path:
            self._store.set_complete()
        else:
            _convert_to_hdf5(self._store, self.path)
            self._store.close()
            shutil.rmtree(self._store_path)
        self.complete = True
        self.close()
        return self.path


def _convert_to_hdf5(src: RawStore, path: Path):
    """Copies a finished staging store into an HDF5 file under a temporary name, then renames it onto `path`.
    The caller holds the store's lock, so a temporary file already there is a dead process's leftover. The
    free space is checked first: HDF5 does not fail cleanly on a full disk."""
    tmp = path.with_name(path.name + ".partial-h5")
    layout = src.attrs["layout"]
    specs = [(split, name, spec) for split in layout["splits"] for name, spec in array_specs(layout, split).items()]
    size = sum(int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize for _, _, (shape, _, dtype) in specs)
    if tmp.exists():
        tmp.unlink()
    need, free = int(size * H5_OVERHEAD[0] + H5_OVERHEAD[1]), shutil.disk_usage(path.parent).free
    if free < need:
        raise CacheError(f"not enough free space for {path}: it needs about {need / 2 ** 20:.1f} MiB and "
                         f"{path.parent} has {free / 2 ** 20:.1f} MiB free; free some space and rerun the same "
                         f"extract command (the extracted features in {staging_path(path)} are kept)")
    with h5py.File(tmp, "w-") as f:
        for split, name, (shape, chunks, dtype) in specs:
            chunks = None if name in ("done", "checksums") or not shape[0] else (min(chunks[0], shape[0]),
                                                                                 *chunks[1:])
            out = f.create_dataset(f"{split}/{name}", shape=shape, dtype=dtype, chunks=chunks)
            _copy_rows(src.array(f"{split}/{name}"), out, layout)
        f.attrs["manifest"] = json.dumps({**src.attrs, "complete": True})   # the flag, after all the data
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------- reader

@dataclass(frozen=True)
class SplitArrays:
    features: list          # one tensor per exit: (N, D_l), or (N, T, D_l) with tokens="all"
    labels: torch.Tensor    # int64 (N,)
    logits: torch.Tensor | None   # (N, K) when the backbone's head is the task's head

    @property
    def num_rows(self) -> int:
        return len(self.labels)


class Cache:
    """A complete cache, read-only. Use as a context manager (or call close()) to release an HDF5 file."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.exists() and staging_path(self.path).exists():
            raise CacheError(f"{self.path} is incomplete (its extraction is unfinished; rerun the same extract "
                             "command to resume)")
        self._store = RawStore(self.path)
        self.manifest = self._store.attrs
        try:
            self._check_manifest()
        except CacheError:
            self.close()
            raise
        self.layout, self.fingerprint, self.format = self.manifest["layout"], self.manifest["fingerprint"], \
            self._store.kind
        self._checksums = {}

    def _check_manifest(self):
        m, where = self.manifest, self.path
        if m["format_version"] not in READABLE_VERSIONS:
            raise CacheError(f"{where} has cache format version {m['format_version']}; this program reads "
                             f"versions {', '.join(map(str, READABLE_VERSIONS))}")
        if not m.get("complete"):
            raise CacheError(f"{where} is incomplete (rerun the same extract command to resume it)")
        problems = cost_problems(m.get("exits") or [])
        if m.get("fingerprint") != fingerprint(m):
            problems.append("the manifest's fingerprint does not match its fields (edited or corrupted manifest)")
        for split in m["layout"]["splits"]:
            done = self._store.array(f"{split}/done")
            if done is None or not np.asarray(done[:]).all():
                problems.append(f"{split}: chunks not done although the cache is marked complete")
        if problems:
            raise CacheError(f"{where}: {problems[0]}; rerun the extract command that made it (with --overwrite "
                             "if the manifest is damaged)")
        if m["format_version"] < 2 and str(where) not in _WARNED:
            _WARNED.add(str(where))
            log.warning("%s has cache format version %s: no chunk checksums, so damaged chunks are not detected; "
                        "add them with `python pipeline.py cache verify --seal %s` (or rebuild it with extract "
                        "--overwrite)", where, m["format_version"], where)

    @property
    def splits(self) -> list[str]:
        return list(self.layout["splits"])

    @property
    def exit_dims(self) -> list[int]:
        return list(self.layout["exit_dims"])

    @property
    def num_classes(self) -> int:
        return self.layout["num_classes"]

    def num_rows(self, split: str) -> int:
        self._check_split(split)
        return self.layout["splits"][split]

    def load_split(self, split: str, device="cpu", dtype=torch.float32, out: list | None = None) -> SplitArrays:
        """The whole split in memory (RAM or a torch device), read in large contiguous blocks. `out`: one tensor
        per exit to read the features into (e.g. the rows of one stacked (L, N, D) tensor, so that no second
        copy is made to stack them)."""
        self._check_split(split)
        return self.read_rows(split, 0, self.layout["splits"][split], device, dtype, out=out)

    def iter_blocks(self, split: str, rows: int | None = None, device="cpu", dtype=torch.float32):
        """Yields (start, SplitArrays) over consecutive row blocks, for splits that do not fit in memory.
        `rows` defaults to about 64 MiB of float16 data per block (a whole number of chunks)."""
        self._check_split(split)
        n = self.layout["splits"][split]
        row_bytes = 2 * sum(d * (self.layout["tokens"] or 1) for d in self.exit_dims)
        for start, stop in row_blocks(n, rows or block_rows(self.layout, row_bytes)):
            yield start, self.read_rows(split, start, stop, device, dtype)

    def read_rows(self, split, start, stop, device="cpu", dtype=torch.float32, out: list | None = None,
                  labels_only: bool = False) -> SplitArrays:
        """Rows [start, stop) of every array (labels_only: of the labels; features [] and logits None), read
        in blocks of whole chunks so that each chunk's checksum is verified (a partly asked chunk is read
        whole); NaN/Inf and labels out of range are refused too. `out`: as in load_split."""
        self._check_split(split)
        specs = array_specs(self.layout, split)
        rows, n = self.layout["chunk_rows"], self.layout["splits"][split]
        if not 0 <= start <= stop <= n:
            raise ValueError(f"rows {start}:{stop} outside {split}'s {n} rows")
        lo, hi = start // rows * rows, min(-(-stop // rows) * rows, n)
        given = {} if out is None else {f"features/{l}": t for l, t in enumerate(out, start=1)}
        out = {}
        for name in ["labels"] if labels_only else data_names(self.layout, split):
            shape, _, stored = specs[name]
            t = given.get(name)
            if t is None:
                t = torch.empty((stop - start, *shape[1:]), dtype=torch.int64 if name == "labels" else dtype,
                                device=device)
            elif tuple(t.shape) != (stop - start, *shape[1:]):
                raise ValueError(f"out tensor for {name} has shape {tuple(t.shape)}, the rows need "
                                 f"{(stop - start, *shape[1:])}")
            row_bytes = np.dtype(stored).itemsize * int(np.prod(shape[1:], dtype=np.int64))
            for a0, a1 in row_blocks(hi - lo, block_rows(self.layout, row_bytes)):
                b0, b1 = lo + a0, lo + a1
                block = self._checked_block(split, name, b0, b1)
                c0, c1 = max(b0, start), min(b1, stop)
                if c0 < c1:
                    t[c0 - start:c1 - start].copy_(torch.from_numpy(block[c0 - b0:c1 - b0]))
            out[name] = t
        feats = [out[f"features/{l}"] for l in range(1, len(self.exit_dims) + 1)] if not labels_only else []
        return SplitArrays(features=feats, labels=out["labels"], logits=out.get("logits"))

    def _checked_block(self, split: str, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of one array (whole chunks), after its checks; a CacheError naming the array,
        rows and chunk otherwise."""
        rows = self.layout["chunk_rows"]
        hint = (f"run `python pipeline.py cache verify {self.path}` to list every damaged chunk, and rerun the "
                "extract command that made the cache to re-extract them")

        def refuse(r0, r1, what):
            raise CacheError(f"{self.path}: {split}/{name} rows {r0}:{r1} (chunk {r0 // rows}) {what}; {hint}")
        with _BLOCK_READ, zarr.config.set(ZARR_BLOCK_READS):
            a = self._store.array(f"{split}/{name}")      # zarr builds the array's read pipeline here
            try:
                block, failed = np.asarray(a[start:stop]), None
            except Exception as err:   # zarr/h5py raise many kinds for a truncated or corrupt chunk file
                block, failed = None, err
        if failed is not None:         # find which chunk
            for r0, r1 in row_blocks(stop - start, rows):
                try:
                    a[start + r0:start + r1]
                except Exception as err:
                    refuse(start + r0, start + r1, f"cannot be read ({_first_line(err)})")
            raise failed
        if name == "labels":
            bad = np.flatnonzero((block < 0) | (block >= self.num_classes))
            what = f"has a label outside [0, {self.num_classes})"
        else:
            bad, what = nonfinite_rows(block), "has NaN/Inf"
        if bad.size:   # named before the checksum: the more useful message
            row = start + int(bad[0])
            refuse(row, row + 1, what)
        crcs = self._split_checksums(split)
        if crcs is not None:
            col = data_names(self.layout, split).index(name)
            for r0, r1 in row_blocks(stop - start, rows):
                if checksum(block[r0:r1]) != crcs[(start + r0) // rows, col]:
                    refuse(start + r0, start + r1, "fails its checksum (deleted, truncated or altered on disk)")
        return block

    def _split_checksums(self, split: str):
        if split not in self._checksums:
            a = self._store.array(f"{split}/checksums")
            self._checksums[split] = None if a is None else np.asarray(a[:])
        return self._checksums[split]

    def _check_split(self, split):
        if split not in self.layout["splits"]:
            raise CacheError(f"no split {split!r} in {self.path} (has {', '.join(self.layout['splits'])})")

    def close(self):
        self._store.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_cache(path) -> Cache:
    """Opens a complete cache for reading; refuses incomplete caches and unknown format versions."""
    return Cache(path)


def find_default_cache(root="cache") -> Path:
    """The single complete cache under `root` (extract's default output folder); else a CacheError."""
    root = Path(root)
    found = []
    for p in sorted(root.glob("*")) if root.is_dir() else []:
        if p.suffix not in (".zarr", ".h5") or ".partial" in p.name:
            continue
        try:
            store = RawStore(p)
        except CacheError:
            continue
        store.close()
        if store.attrs.get("complete"):
            found.append(p)
    if not found:
        raise CacheError(f"no complete cache under {root}/ (run `python pipeline.py extract ...` or pass --cache)")
    if len(found) > 1:
        raise CacheError(f"several complete caches under {root}/ ({', '.join(p.name for p in found)}); "
                         "pass --cache to choose one")
    return found[0]

"""Checks a cache end to end: the complete flag, manifest vs layout and fingerprint, costs, array shapes and
types, every chunk done and matching its checksum (format version 2), finite features and logits, labels in
[0, K). Used by `cache verify`, by the writer before it marks a cache complete, and by a rerun of `extract`
(bad_chunks: the chunks to re-extract); seal_cache adds checksums to a format version 1 cache."""
from pathlib import Path

import numpy as np
import zarr

from .lock import acquire as acquire_lock
from .store import (READABLE_VERSIONS, CacheError, RawStore, array_specs, block_rows, checksum, cost_problems,
                    data_names, fingerprint, nonfinite_rows, row_blocks, staging_path)


def verify_cache(path) -> list[str]:
    """Every problem found in the cache at `path` (an empty list when it is fine)."""
    path = Path(path)
    if not path.exists() and staging_path(path).exists():
        return ["incomplete: the HDF5 file is written when the extraction finishes; rerun the same extract "
                "command to resume"] + store_problems_at(staging_path(path), require_complete=False)
    return store_problems_at(path)


def store_problems_at(path: Path, require_complete: bool = True) -> list[str]:
    try:
        store = RawStore(path)
    except CacheError as err:
        return [str(err)]
    try:
        return store_problems(store, require_complete)
    finally:
        store.close()


def bad_chunks(path: Path) -> dict[str, set]:
    """split -> the chunks that are not done, unreadable, fail their checksum or hold bad values."""
    store = RawStore(path)
    try:
        layout = store.attrs["layout"]
        return {split: set(_split_faults(store, layout, split)[1]) for split in layout["splits"]}
    finally:
        store.close()


def store_problems(store, require_complete: bool = True) -> list[str]:
    attrs = store.attrs
    problems = []
    if attrs.get("format_version") not in READABLE_VERSIONS:
        return [f"unknown cache format version {attrs.get('format_version')} (this program reads "
                f"{', '.join(map(str, READABLE_VERSIONS))})"]
    if require_complete and not attrs.get("complete"):
        problems.append("incomplete: the `complete` flag is not set (rerun the same extract command to resume)")
    if attrs.get("fingerprint") != fingerprint(attrs):
        problems.append("the manifest's fingerprint does not match its fields (edited or corrupted manifest)")
    problems += cost_problems(attrs.get("exits") or [])
    layout = attrs["layout"]
    dims = [e.get("dim") for e in attrs.get("exits", [])]
    if dims != layout["exit_dims"]:
        problems.append(f"manifest exit dims {dims} != stored exit dims {layout['exit_dims']}")
    if attrs.get("num_classes") != layout["num_classes"]:
        problems.append(f"manifest num_classes {attrs.get('num_classes')} != stored {layout['num_classes']}")
    for split in layout["splits"]:
        problems += _split_faults(store, layout, split)[0]
    return problems


def _shown(items: list) -> str:
    return ", ".join(map(str, items[:8])) + (", ..." if len(items) > 8 else "")


def _split_faults(store, layout: dict, split: str) -> tuple[list[str], dict]:
    """(problems, {chunk: reason}) of one split."""
    problems, faults = [], {}
    specs = array_specs(layout, split)
    arrays = {}
    for name, (shape, _, dtype) in specs.items():
        a = store.array(f"{split}/{name}")
        if a is None:
            problems.append(f"{split}/{name}: missing")
        elif tuple(a.shape) != tuple(shape) or np.dtype(a.dtype) != np.dtype(dtype):
            problems.append(f"{split}/{name}: {np.dtype(a.dtype)} {tuple(a.shape)}, expected {dtype} {tuple(shape)}")
        else:
            arrays[name] = a
    if "done" in arrays:
        missing = np.flatnonzero(np.asarray(arrays["done"][:]) == 0)
        if missing.size:
            problems.append(f"{split}: {missing.size} of {arrays['done'].shape[0]} chunks not done ({_shown(missing.tolist())})")
            faults.update({int(i): "not done" for i in missing})
    crcs = np.asarray(arrays["checksums"][:]) if "checksums" in arrays else None
    not_done = set(faults)   # never written: no checksum to compare
    for col, name in enumerate(data_names(layout, split)):
        if name in arrays:
            problems += _array_problems(arrays[name], layout, split, name, None if crcs is None else crcs[:, col],
                                        not_done, faults)
    return problems, faults


def _array_problems(a, layout: dict, split: str, name: str, crcs, not_done: set, faults: dict) -> list[str]:
    """Reads one array in blocks of whole chunks (chunk by chunk where a block cannot be read): unreadable
    chunks, checksum mismatches and bad values, each named with its rows."""
    where, rows, k = f"{split}/{name}", layout["chunk_rows"], layout["num_classes"]
    unreadable, mismatched, bad, first = [], [], 0, None
    row_bytes = np.dtype(a.dtype).itemsize * int(np.prod(a.shape[1:], dtype=np.int64))
    for start, stop in row_blocks(a.shape[0], block_rows(layout, row_bytes)):
        pieces = []
        try:
            pieces.append((start, np.asarray(a[start:stop])))
        except Exception:   # a truncated or corrupt chunk file: find which
            for c0, c1 in row_blocks(stop - start, rows):
                try:
                    pieces.append((start + c0, np.asarray(a[start + c0:start + c1])))
                except Exception:
                    unreadable.append((start + c0) // rows)
        for at, block in pieces:
            for c0, c1 in row_blocks(len(block), rows):
                i = (at + c0) // rows
                if crcs is not None and i not in not_done and checksum(block[c0:c1]) != crcs[i]:
                    mismatched.append(i)
            wrong = np.flatnonzero((block < 0) | (block >= k)) if name == "labels" else nonfinite_rows(block)
            if wrong.size and first is None:
                first = at + int(wrong[0])
            bad += wrong.size
            faults.update({(at + int(r)) // rows: "bad values" for r in wrong})
    problems = []
    for chunks, what in ((unreadable, "unreadable (truncated or corrupt chunk file)"),
                         (mismatched, "fail their checksums (deleted, truncated or altered)")):
        if chunks:
            spans = _shown([f"{i} (rows {i * rows}:{min((i + 1) * rows, a.shape[0])})" for i in chunks])
            problems.append(f"{where}: {len(chunks)} chunk(s) {what}: {spans}; rerun the extract command that made "
                            "the cache to re-extract them")
            faults.update({i: what for i in chunks})
    if bad:
        what = f"labels outside [0, {k})" if name == "labels" else "rows with NaN/Inf"
        problems.append(f"{where}: {bad} {what} (first at row {first})")
    return problems


def seal_cache(path) -> list[str]:
    """Adds chunk checksums to a complete zarr cache of format version 1, computed from its current content,
    after the checks that need none (values, costs); returns the problems that stop it (empty: sealed). The
    checksum arrays are written before the manifest names them, so a killed seal leaves a version 1 cache."""
    path = Path(path)
    with acquire_lock(path):
        problems = store_problems_at(path)
        if problems:
            return problems
        store = RawStore(path)
        attrs = store.attrs
        if attrs["format_version"] >= 2:
            return []
        if store.kind != "zarr":
            return [f"{path} is an HDF5 cache of format version 1: it cannot be sealed in place; rebuild it with "
                    "extract --overwrite"]
        layout = {**attrs["layout"], "checksums": "crc32"}
        group = zarr.open_group(path, mode="r+")
        rows = layout["chunk_rows"]
        for split in layout["splits"]:
            shape, chunks, dtype = array_specs(layout, split)["checksums"]
            crcs = np.zeros(shape, np.uint32)
            for col, name in enumerate(data_names(layout, split)):
                a = store.array(f"{split}/{name}")
                row_bytes = np.dtype(a.dtype).itemsize * int(np.prod(a.shape[1:], dtype=np.int64))
                for start, stop in row_blocks(a.shape[0], block_rows(layout, row_bytes)):
                    block = np.asarray(a[start:stop])
                    for c0, c1 in row_blocks(len(block), rows):
                        crcs[(start + c0) // rows, col] = checksum(block[c0:c1])
            group.create_array(f"{split}/checksums", shape=shape, chunks=chunks, dtype=dtype, compressors=None,
                               fill_value=0, overwrite=True)[:] = crcs
        sealed = {**attrs, "layout": layout, "format_version": 2}
        sealed["fingerprint"] = fingerprint(sealed)
        group.attrs.update(sealed)
        return []

"""Checks a cache end to end: the complete flag, manifest vs layout, array shapes and types, every chunk done,
finite features and logits, labels in [0, K). Used by `cache verify` and by the writer before it marks a cache
complete."""
from pathlib import Path

import numpy as np

from .store import FORMAT_VERSION, CacheError, RawStore, array_specs, block_rows, fingerprint, row_blocks, \
    staging_path


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


def store_problems(store, require_complete: bool = True) -> list[str]:
    attrs = store.attrs
    problems = []
    if attrs.get("format_version") != FORMAT_VERSION:
        return [f"unknown cache format version {attrs.get('format_version')} (this program reads {FORMAT_VERSION})"]
    if require_complete and not attrs.get("complete"):
        problems.append("incomplete: the `complete` flag is not set (rerun the same extract command to resume)")
    if attrs.get("fingerprint") != fingerprint(attrs):
        problems.append("the manifest's fingerprint does not match its fields (edited or corrupted manifest)")
    layout = attrs["layout"]
    dims = [e.get("dim") for e in attrs.get("exits", [])]
    if dims != layout["exit_dims"]:
        problems.append(f"manifest exit dims {dims} != stored exit dims {layout['exit_dims']}")
    if attrs.get("num_classes") != layout["num_classes"]:
        problems.append(f"manifest num_classes {attrs.get('num_classes')} != stored {layout['num_classes']}")
    for split in layout["splits"]:
        problems += _split_problems(store, layout, split)
    return problems


def _split_problems(store, layout: dict, split: str) -> list[str]:
    problems = []
    k = layout["num_classes"]
    for name, (shape, _, dtype) in array_specs(layout, split).items():
        where = f"{split}/{name}"
        a = store.array(where)
        if a is None:
            problems.append(f"{where}: missing")
            continue
        if tuple(a.shape) != tuple(shape) or np.dtype(a.dtype) != np.dtype(dtype):
            problems.append(f"{where}: {np.dtype(a.dtype)} {tuple(a.shape)}, expected {dtype} {tuple(shape)}")
            continue
        if name == "done":
            missing = np.flatnonzero(np.asarray(a[:]) == 0)
            if missing.size:
                shown = ", ".join(map(str, missing[:8])) + (", ..." if missing.size > 8 else "")
                problems.append(f"{split}: {missing.size} of {shape[0]} chunks not done ({shown})")
            continue
        bad, first = 0, None
        row_bytes = np.dtype(dtype).itemsize * int(np.prod(shape[1:], dtype=np.int64))
        for start, stop in row_blocks(shape[0], block_rows(layout, row_bytes)):
            block = np.asarray(a[start:stop])
            wrong = (block < 0) | (block >= k) if name == "labels" else ~np.isfinite(block)
            rows = np.flatnonzero(wrong.reshape(len(block), -1).any(axis=1))
            if rows.size and first is None:
                first = start + int(rows[0])
            bad += int(wrong.sum())
        if bad:
            what = f"labels outside [0, {k})" if name == "labels" else "NaN/Inf values"
            problems.append(f"{where}: {bad} {what} (first at row {first})")
    return problems

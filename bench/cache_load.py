"""What verified reads cost: load every split of a cache with the per-chunk checks (crc32 against the stored
checksums, NaN/Inf, label range) and with bare reads, alternating, and print the times; and the checked read
again with zarr's default read settings instead of cache.store.ZARR_BLOCK_READS.

    python bench/cache_load.py CACHE [--repeats 3]

Use a copy of a format version 2 cache (`cache verify --seal` adds checksums to an old zarr cache).
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import zarr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cache.store as store  # noqa: E402
from cache.store import Cache, open_cache  # noqa: E402


def bare_block(self, split, name, start, stop):
    """Cache._checked_block without its checks: the read alone (with the same zarr settings)."""
    with zarr.config.set(store.ZARR_BLOCK_READS):
        return np.asarray(self._store.array(f"{split}/{name}")[start:stop])


def load_all(path) -> float:
    start = time.perf_counter()
    with open_cache(path) as cache:
        for split in cache.splits:
            cache.load_split(split)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cache")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with open_cache(args.cache) as cache:
        if cache.manifest["format_version"] < 2:
            sys.exit(f"{args.cache} has no chunk checksums; seal a copy first (cache verify --seal)")
    checked_block, block_reads = Cache._checked_block, store.ZARR_BLOCK_READS
    defaults = "checked, zarr's default read settings"
    times = {"checked": [], "bare": [], defaults: []}
    load_all(args.cache)   # warm the page cache
    for _ in range(args.repeats):
        for mode in times:
            Cache._checked_block = bare_block if mode == "bare" else checked_block
            store.ZARR_BLOCK_READS = {} if mode == defaults else block_reads
            times[mode].append(load_all(args.cache))
    Cache._checked_block, store.ZARR_BLOCK_READS = checked_block, block_reads
    for mode, values in times.items():
        print(f"{mode:>8}: {', '.join(f'{t:.2f}' for t in values)} s (median {np.median(values):.2f} s)")
    median = {mode: np.median(values) for mode, values in times.items()}
    print(f"checks' overhead: {median['checked'] / median['bare'] - 1:+.1%}; zarr's defaults take "
          f"{median[defaults] / median['checked']:.2f}x as long")


if __name__ == "__main__":
    main()

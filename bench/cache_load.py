"""What verified reads cost: load every split of a cache with the per-chunk checks (crc32 against the stored
checksums, NaN/Inf, label range) and with bare reads, alternating, and print the times.

    python bench/cache_load.py CACHE [--repeats 3]

Use a copy of a format version 2 cache (`cache verify --seal` adds checksums to an old zarr cache).
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cache.store import Cache, open_cache  # noqa: E402


def bare_block(self, split, name, start, stop):
    """Cache._checked_block without its checks: the read alone."""
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
    checked_block = Cache._checked_block
    times = {"checked": [], "bare": []}
    load_all(args.cache)   # warm the page cache
    for _ in range(args.repeats):
        for mode in times:
            Cache._checked_block = checked_block if mode == "checked" else bare_block
            times[mode].append(load_all(args.cache))
    Cache._checked_block = checked_block
    for mode, values in times.items():
        print(f"{mode:>8}: {', '.join(f'{t:.2f}' for t in values)} s (median {np.median(values):.2f} s)")
    print(f"overhead: {np.median(times['checked']) / np.median(times['bare']) - 1:+.1%}")


if __name__ == "__main__":
    main()

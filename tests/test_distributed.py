"""Extraction on several ranks (torchrun; gloo on the CPU) over the toy tree of test_extract_cli: the cache
equals a one-process extraction byte for byte; a rank killed with SIGKILL leaves a cache readers refuse, and a
rerun on one rank or on two finishes it, identical again. A sweep on two ranks writes the rows of a one-process
sweep."""
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import procs
from cache.lock import lock_path
from cache.store import CacheError, journal_path, open_cache, staging_path
from cache.verify import verify_cache
from test_extract_cli import (ROOT, assert_same_arrays, extract_args, manifest_of, reference, run_cli,  # noqa: F401
                              store_files, toy)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(args, world: int, pause_per_chunk: float = 0.0) -> list:
    port = free_port()
    return [procs.start(procs.rank_extraction, args, rank, world, port, pause_per_chunk) for rank in range(world)]


def join(ranks, timeout: float = 120) -> list:
    deadline = time.monotonic() + timeout
    for proc in ranks:
        proc.join(max(0.0, deadline - time.monotonic()))
    alive = [p for p in ranks if p.is_alive()]
    for proc in alive:
        proc.kill()
    assert not alive, "ranks still running after the timeout"
    return [p.exitcode for p in ranks]


def assert_finished_like(out: Path, reference: Path):
    assert verify_cache(out) == []
    assert not journal_path(out).exists() and not lock_path(out).exists() and not staging_path(out).exists()
    if out.suffix == ".zarr":
        assert store_files(out) == store_files(reference)   # byte-identical chunk files, done masks, checksums
        assert manifest_of(out) == manifest_of(reference)
    assert_same_arrays(out, reference)


def test_torchrun_two_ranks_write_the_one_process_cache_byte_for_byte(toy, reference, tmp_path):
    out = tmp_path / "d.zarr"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(ROOT / "pipeline.py"), *extract_args(toy, out)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip() == str(out)   # rank 0 alone prints the path
    assert_finished_like(out, reference)


def test_two_ranks_into_hdf5_convert_on_rank_0(toy, reference, tmp_path):
    out = tmp_path / "d.h5"
    assert join(start_ranks(extract_args(toy, out, "--format", "hdf5"), 2)) == [0, 0]
    assert out.is_file()
    assert_finished_like(out, reference)


def test_a_second_distributed_extraction_into_the_same_out_stops_on_every_rank(toy, tmp_path):
    from cache.lock import acquire
    out = tmp_path / "c.zarr"
    with acquire(out):   # another writer (this process) holds the cache
        assert join(start_ranks(extract_args(toy, out), 2)) == [1, 1]   # rank 0 names it; rank 1 is quiet
    assert not out.exists()   # no rank touched the store


@pytest.mark.parametrize("killed, resume_ranks", [(1, 1), (0, 2)])
def test_a_killed_rank_then_a_rerun_on_one_or_two_ranks_equals_uninterrupted(toy, reference, tmp_path, killed,
                                                                              resume_ranks):
    out = tmp_path / "k.zarr"
    args = extract_args(toy, out)
    ranks = start_ranks(args, 2, pause_per_chunk=0.05)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and all(p.is_alive() for p in ranks):
        try:
            if len([n for n in os.listdir(journal_path(out)) if not n.startswith(".")]) >= 4:
                break
        except FileNotFoundError:
            pass
        time.sleep(0.002)
    os.kill(ranks[killed].pid, signal.SIGKILL)
    time.sleep(0.3)
    for proc in ranks:   # what torchrun does to the other ranks when one dies
        if proc.is_alive():
            os.kill(proc.pid, signal.SIGTERM)
    codes = join(ranks)
    assert codes[killed] == -signal.SIGKILL, codes
    problems = verify_cache(out)
    assert problems[0].startswith("incomplete") and any("chunks not done" in p for p in problems), problems
    with pytest.raises(CacheError, match="incomplete"):
        open_cache(out)

    if resume_ranks == 1:   # a plain one-process rerun folds the killed run's journal and finishes
        res = run_cli(*args)
        assert res.exit_code == 0, res.output
    else:
        assert join(start_ranks(args, resume_ranks)) == [0] * resume_ranks
    assert_finished_like(out, reference)


def _rows_by_key(path: Path) -> dict:
    """results.parquet rows keyed by what identifies them, timing columns left out."""
    import pyarrow.parquet as pq

    def key(r):
        return tuple(repr(r.get(k)) for k in ("method", "split", "trial", "exit", "threshold", "p"))
    rows = pq.read_table(path / "results.parquet").to_pylist()
    return {key(r): {k: v for k, v in r.items() if "seconds" not in k} for r in rows}


def _close(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return (a != a and b != b) or math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-7)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    return a == b


def test_torchrun_two_ranks_sweep_the_one_process_rows(tmp_path):
    """Each rank trains its share of every pass (two passes here: a grid over bi_switch) as one stack; rank 0
    writes the rows of a one-process run. Not bit for bit: a trial's float rounding depends on the width of the
    stack it trains in (the batched products over trials), about 1e-8 in the weights here, which moves
    temperatures and ECE in the eighth digit; accuracy, cost and every count come out equal."""
    from cache.synthetic import write_synthetic_cache
    cache = write_synthetic_cache(tmp_path / "c.zarr", {"train": 300, "val": 90, "test": 70}, 4, 8, 5, chunk_rows=16)
    args = ["sweep", "--cache", str(cache), "--lambdas", "0.001:1:5", "--grid", "bi_switch=5,1000000",
            "--max-epochs", "5", "--warmup-epochs", "2", "--warmup-patience", "0", "--no-progress"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, str(ROOT / "pipeline.py"), *args, "--out", str(tmp_path / "one")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          f"--master_port={free_port()}", str(ROOT / "pipeline.py"), *args,
                          "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("run directory:") == 1                # rank 0 alone prints the run
    want, got = _rows_by_key(tmp_path / "one"), _rows_by_key(tmp_path / "two")
    assert got.keys() == want.keys() and len(got) > 40
    for key in want:
        bad = [c for c in want[key] if not _close(want[key][c], got[key][c])]
        assert not bad, (key, [(c, want[key][c], got[key][c]) for c in bad])
        assert all(want[key][c] == got[key][c] for c in ("accuracy", "cost_norm", "epochs", "selected")), key
    heads = json.loads((tmp_path / "two" / "heads.json").read_text())
    assert [[t["trial"] for t in g["trials"]] for g in heads["groups"]] == \
        [[t["trial"] for t in g["trials"]] for g in json.loads((tmp_path / "one" / "heads.json").read_text())["groups"]]

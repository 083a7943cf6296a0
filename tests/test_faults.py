"""Stage two and the command line under faults, through the real `pipeline.py` group: NaN/Inf in a cache or in
saved heads, diverging training, bad option values, damaged run files, overwritten runs, two writers of one run
directory, and the top-level handler that turns unexpected faults into one line."""
import errno
import json
import math
import os
import time

import click
import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from cache.synthetic import write_synthetic_cache
from cache.lock import lock_path
from cli.errors import Group
import procs
from heads.results import rundir
from pipeline import cli

SIZES = {"train": 96, "val": 64, "test": 48}
FAST = ["--recipe", "paper", "--max-epochs", "3", "--batch-size", "32", "--bi-switch", "2", "--patience", "2",
        "--device", "cpu",
        "--no-progress"]


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def one_line_error(res, *needles):
    """The command failed with exactly one line of output holding every needle, and no traceback."""
    assert res.exit_code not in (0, None), res.output
    assert "Traceback" not in res.output and (res.exception is None or isinstance(res.exception, SystemExit)), \
        res.output
    lines = [line for line in res.output.splitlines() if line.startswith("Error")]
    assert len(lines) == 1, res.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    return write_synthetic_cache(tmp_path_factory.mktemp("cache") / "tiny.zarr", SIZES, 3, 8, 4, chunk_rows=16)


@pytest.fixture(scope="module")
def finished_run(tiny_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "r"
    res = run("sweep", "--cache", tiny_cache, "--lambdas", "0.01,0.1", "--out", out, *FAST)
    assert res.exit_code == 0, res.output
    return out


def copy_cache(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


# ---- finite or refuse ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("split, name, row, value", [("train", "features/2", 37, np.nan),
                                                     ("test", "features/1", 5, np.inf),
                                                     ("val", "logits", 20, np.nan)])
def test_non_finite_cache_values_stop_stage_two_naming_split_array_and_row(tiny_cache, tmp_path, split, name, row,
                                                                          value):
    cache = copy_cache(tiny_cache, tmp_path / "c.zarr")
    zarr.open_group(cache, mode="r+")[f"{split}/{name}"][row, 0] = value
    res = run("sweep", "--cache", cache, "--lambdas", "0.1", "--out", tmp_path / "r", *FAST)
    one_line_error(res, str(cache), f"{split}/{name} rows {row}:{row + 1}", "NaN/Inf")
    assert not (tmp_path / "r" / rundir.RESULTS).exists()


def test_deleted_chunk_stops_stage_two_and_is_named_by_verify(tiny_cache, tmp_path):
    cache = copy_cache(tiny_cache, tmp_path / "c.zarr")
    (cache / "train" / "features" / "3" / "c" / "2" / "0").unlink()
    res = run("cache", "verify", cache)
    assert res.exit_code == 1 and "train/features/3: 1 chunk(s) fail their checksums" in res.output
    res = run("train", "--cache", cache, "--lam", "0.1", "--out", tmp_path / "r", *FAST)
    one_line_error(res, "train/features/3 rows 32:48 (chunk 2) fails its checksum", "cache verify")
    cache = copy_cache(tiny_cache, tmp_path / "c2.zarr")
    (cache / "train" / "labels" / "c" / "1").unlink()   # labels would read back as class 0
    res = run("sweep", "--cache", cache, "--lambdas", "0.1", "--out", tmp_path / "r2", *FAST)
    one_line_error(res, "train/labels rows 16:32 (chunk 1) fails its checksum")


def test_non_finite_saved_heads_are_refused_not_reused(finished_run, tiny_cache, tmp_path):
    from safetensors.torch import load_file, save_file
    import shutil
    out = tmp_path / "r"
    shutil.copytree(finished_run, out)
    tensors = load_file(out / rundir.HEADS)
    name = next(k for k in tensors if "im_weight" in k)
    before = (out / rundir.RESULTS).read_bytes()
    for bad, needle in ((lambda t: t.fill_(math.nan), "holds NaN/Inf"),
                        (lambda t: t[:, :1].contiguous(), "has shape"),
                        (lambda t: t.to(torch_int32()), "not floating point")):
        broken = dict(tensors)
        broken[name] = bad(tensors[name].clone())
        save_file(broken, out / rundir.HEADS)
        res = run("sweep", "--cache", tiny_cache, "--lambdas", "0.01,0.1", "--out", out, *FAST)
        one_line_error(res, str(out / rundir.HEADS), name, needle, "delete")
        assert (out / rundir.RESULTS).read_bytes() == before


def torch_int32():
    import torch
    return torch.int32


def test_diverging_training_stops_with_a_message_and_writes_no_results(tiny_cache, tmp_path):
    res = run("sweep", "--cache", tiny_cache, "--lambdas", "0.1", "--out", tmp_path / "r", *FAST, "--lr", "1e38")
    one_line_error(res, "training diverged", "lower --lr")
    assert not (tmp_path / "r" / rundir.RESULTS).exists()


@pytest.mark.parametrize("args, needles", [
    (["--lr", "nan"], ["--lr", "not a finite number"]),
    (["--lr", "inf"], ["--lr", "not a finite number"]),
    (["--gate-weight-cap", "nan"], ["--gate-weight-cap"]),
    (["--seed", "-1"], ["--seed"]),
    (["--device", "tpu"], ["--device", "tpu"]),
    (["--batch-size", "100000000"], ["--batch-size"]),
    (["--lambdas", "0.1:1:100000000"], ["--lambdas", "at most"]),
    (["--lambdas", "abc"], ["--lambdas"]),
])
def test_bad_option_values_are_one_line_errors_naming_the_option(tiny_cache, tmp_path, args, needles):
    base = ["sweep", "--cache", tiny_cache, "--out", tmp_path / "r", *FAST]
    for flag, value in zip(args[::2], args[1::2]):
        if flag in base:
            base[base.index(flag) + 1] = value
        else:
            base += [flag, value]
    t0 = time.perf_counter()
    res = run(*base)
    assert time.perf_counter() - t0 < 30   # refused before allocating anything
    one_line_error(res, *needles)
    res = run("train", "--cache", tiny_cache, "--lam", "nan", "--out", tmp_path / "t", *FAST)
    one_line_error(res, "--lam")


def test_a_tiny_validation_split_is_refused_with_what_to_do(tmp_path):
    cache = write_synthetic_cache(tmp_path / "small.zarr", {"train": 32, "val": 12, "test": 48}, 2, 4, 3,
                                  chunk_rows=16)
    res = run("train", "--cache", cache, "--lam", "0.1", "--out", tmp_path / "r", *FAST)
    one_line_error(res, "12 validation", "at least 20", "--limit")


# ---- run directories -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage, needle", [
    (lambda out: (out / rundir.HEADS_INDEX).write_text("{broken"), rundir.HEADS_INDEX),
    (lambda out: (out / rundir.SETTINGS).write_text("[1, 2"), rundir.SETTINGS),
])
def test_broken_json_files_are_named(finished_run, tiny_cache, tmp_path, damage, needle):
    import shutil
    out = tmp_path / "r"
    shutil.copytree(finished_run, out)
    damage(out)
    res = run("sweep", "--cache", tiny_cache, "--lambdas", "0.01,0.1", "--out", out, *FAST)
    one_line_error(res, str(out / needle), "damaged")


@pytest.mark.parametrize("content", [b"PAR1 truncated", b"not parquet at all"])
def test_report_on_a_damaged_or_foreign_results_file_is_one_line(finished_run, tmp_path, content):
    import shutil
    out = tmp_path / "r"
    shutil.copytree(finished_run, out)
    (out / rundir.RESULTS).write_bytes(content)
    one_line_error(run("report", out, "--no-plots"), str(out / rundir.RESULTS), "not a readable results file")
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"x": [1, 2]}), out / rundir.RESULTS)   # a foreign Parquet file
    one_line_error(run("report", out, "--no-plots"), str(out / rundir.RESULTS))


def test_overwrite_removes_the_old_runs_files_and_report_refuses_a_killed_overwrite(finished_run, tiny_cache,
                                                                                    tmp_path, monkeypatch):
    import shutil
    out = tmp_path / "r"
    shutil.copytree(finished_run, out)
    res = run("report", out)
    assert res.exit_code == 0, res.output
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs and (out / rundir.MATCHED).exists()
    # An overwrite with other settings killed mid-way: nothing of the old run may be shown as the new one's.
    from heads.sweep import sweep

    def killed(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(sweep, "train_groups", killed)
    res = run("sweep", "--cache", tiny_cache, "--lambdas", "0.3", "--out", out, *FAST, "--overwrite")
    assert res.exit_code != 0
    assert not list(out.glob("*.png")) and not (out / rundir.MATCHED).exists() and not (out / rundir.RESULTS).exists()
    one_line_error(run("report", out), "holds no results.parquet")
    monkeypatch.undo()
    res = run("sweep", "--cache", tiny_cache, "--lambdas", "0.3", "--out", out, *FAST, "--overwrite")
    assert res.exit_code == 0, res.output
    assert json.loads((out / rundir.SETTINGS).read_text())["identity"]["lambdas"] == [0.3]


def test_report_refuses_results_left_by_an_earlier_run(finished_run, tmp_path):
    import shutil
    out = tmp_path / "r"
    shutil.copytree(finished_run, out)
    settings = json.loads((out / rundir.SETTINGS).read_text())
    rundir.write_settings(out, {**settings, "settings_hash": "0" * 16, "status": "training"})
    one_line_error(run("report", out, "--no-plots"), "left by an earlier run", "did not finish")


def test_compare_refuses_a_tampered_method_part(tiny_cache, tmp_path):
    import pyarrow.parquet as pq
    out = tmp_path / "c"
    args = ["compare", "--cache", tiny_cache, "--methods", "threshold", "--lambdas", "0.1", "--out", out, *FAST]
    assert run(*args).exit_code == 0
    part = out / rundir.PARTS / "threshold.parquet"
    table = pq.read_table(part)
    rows = table.to_pylist()
    rows[0]["accuracy"] = 1.0
    import pyarrow as pa
    pq.write_table(pa.Table.from_pylist(rows).replace_schema_metadata(table.schema.metadata), part)
    one_line_error(run(*args), str(part), "does not match the digest")


def test_two_sweeps_into_one_out(tiny_cache, tmp_path):
    out = tmp_path / "r"
    args = ["sweep", "--cache", tiny_cache, "--lambdas", "0.01,0.1", "--out", out, *FAST]

    first = procs.start(procs.sweep, args, 3.0)
    deadline = time.monotonic() + 60
    while not lock_path(out).exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    one_line_error(run(*args), str(out), "being written by another process", f"pid {first.pid}")
    first.join()
    assert first.exitcode == 0 and (out / rundir.RESULTS).exists() and not lock_path(out).exists()
    res = run(*args)   # afterwards the same command re-uses the heads
    assert res.exit_code == 0 and "re-using the trained heads" in res.output


# ---- the top-level handler -------------------------------------------------------------------------------------
def faulty_group(err):
    @click.group(cls=Group)
    @click.option("--debug", is_flag=True)
    def group(debug):
        pass

    @group.command("boom")
    def boom():
        raise err
    return group


@pytest.mark.parametrize("err, needles", [
    (OSError(errno.ENOSPC, "No space left on device", "/x/c.zarr/train/features/1/c/0/0"),
     ["/x/c.zarr/train/features/1/c/0/0", "no space left", "rerun"]),
    (OSError(errno.EROFS, "Read-only file system", "/ro/c.zarr"), ["/ro/c.zarr", "read-only", "--out"]),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/f/c.zarr"), ["/f/c.zarr", "is a file"]),
    (FileExistsError(errno.EEXIST, "File exists", "runs/x"), ["runs/x", "already exists"]),
    (OSError(errno.ENOSPC, "No space left on device"), ["a write", "no space left"]),
    (MemoryError(), ["out of memory", "--batch-size"]),
    (RuntimeError("something\nelse"), ["RuntimeError: something", "--debug"]),
])
def test_unexpected_faults_become_one_line_and_debug_shows_the_traceback(err, needles, monkeypatch):
    monkeypatch.delenv("JEI_DEBUG", raising=False)
    res = CliRunner().invoke(faulty_group(err), ["boom"])
    assert res.exit_code == 1
    one_line_error(res, *needles)
    res = CliRunner().invoke(faulty_group(err), ["--debug", "boom"])
    assert res.exception is err
    monkeypatch.setenv("JEI_DEBUG", "1")
    assert CliRunner().invoke(faulty_group(err), ["boom"]).exception is err


def test_a_run_out_that_is_a_file_or_under_a_file(tiny_cache, tmp_path):
    (tmp_path / "file").write_text("x")
    one_line_error(run("train", "--cache", tiny_cache, "--lam", "0.1", "--out", tmp_path / "file", *FAST),
                   str(tmp_path / "file"), "is a file where a folder is needed")
    one_line_error(run("train", "--cache", tiny_cache, "--lam", "0.1", "--out", tmp_path / "file" / "r", *FAST),
                   str(tmp_path / "file"), "is a file")

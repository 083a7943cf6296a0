"""`extract`, `costs` and `cache` end to end on timm's tiny random `test_vit` over a class-folder tree of PNGs:
an extraction killed with SIGKILL and rerun equals an uninterrupted one byte for byte, zarr and HDF5 hold the
same arrays, bad input gives one-line errors and never a corrupt cache."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import extract  # noqa: F401  (before timm: see extract/_torchvision.py)
import timm
from cache.store import CacheError, find_default_cache, open_cache, staging_path
from cache.verify import verify_cache
from pipeline import cli
import procs

ROOT = Path(__file__).resolve().parents[1]
K = 3


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A class-folder tree (3 classes x 16 PNGs of 10x12 px) and a test_vit checkpoint whose head has 3
    classes (so the cache holds logits too)."""
    root = tmp_path_factory.mktemp("toy")
    rng = np.random.default_rng(0)
    for c in range(K):
        folder = root / "data" / "train" / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(16):
            Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    torch.manual_seed(1)
    model = timm.create_model("test_vit", num_classes=K, img_size=32)
    torch.save(model.state_dict(), root / "vit.pth")
    return root


@pytest.fixture(scope="module")
def reference(toy):
    """An uninterrupted zarr extraction of the toy tree (2 extra views of every training image)."""
    res = run_cli(*extract_args(toy, toy / "ref.zarr"))
    assert res.exit_code == 0, res.output
    return toy / "ref.zarr"


def extract_args(toy, out, *extra):
    return ["extract", "--backbone", "test_vit", "--img-size", "32", "--weights", str(toy / "vit.pth"),
            "--dataset", "imagefolder", "--data-dir", str(toy / "data"), "--views", "2", "--batch-size", "4",
            "--chunk-rows", "4", "--device", "cpu", "--out", str(out), "--no-progress", *extra]


def run_cli(*args):
    return CliRunner().invoke(cli, list(args))


def store_files(path: Path) -> dict:
    """Every file of a zarr store (relative path -> bytes) except the root metadata, which holds `created`."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and p != path / "zarr.json"}


def manifest_of(path, leave_out=("created",)):
    with open_cache(path) as cache:
        return {k: v for k, v in cache.manifest.items() if k not in leave_out}


def assert_same_arrays(path_a, path_b):
    with open_cache(path_a) as a, open_cache(path_b) as b:
        assert a.fingerprint == b.fingerprint   # names the content, whatever the format
        for split in a.splits:
            x, y = a.load_split(split), b.load_split(split)
            for p, q in zip(x.features + [x.labels, x.logits], y.features + [y.labels, y.logits]):
                assert torch.equal(p, q)


def done_count(store: Path) -> int:
    """Train chunks marked done so far (the `done` array's first chunk file: raw uint8, no compression)."""
    try:
        return int(np.count_nonzero(np.fromfile(store / "train" / "done" / "c" / "0", dtype=np.uint8)))
    except FileNotFoundError:
        return 0


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_sigkill_mid_extraction_then_rerun_equals_uninterrupted(toy, reference, tmp_path, fmt):
    out = tmp_path / ("killed.zarr" if fmt == "zarr" else "killed.h5")
    args = extract_args(toy, out, "--format", fmt)
    store = out if fmt == "zarr" else staging_path(out)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(ROOT / "pipeline.py"), *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while done_count(store) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the extraction ended before it could be killed mid-way"
    problems = verify_cache(out)
    assert problems[0].startswith("incomplete") and any("chunks not done" in p for p in problems)
    with pytest.raises(CacheError, match="incomplete"):
        open_cache(out)

    res = run_cli(*args)   # the same command again resumes
    assert res.exit_code == 0, res.output
    assert verify_cache(out) == []
    if fmt == "zarr":
        assert store_files(out) == store_files(reference)   # byte-identical chunks, array metadata, done masks
        assert manifest_of(out) == manifest_of(reference)
    else:
        assert not staging_path(out).exists()
        assert manifest_of(out, ("created", "format")) == manifest_of(reference, ("created", "format"))
    assert_same_arrays(out, reference)   # and, for hdf5: the same arrays as the zarr cache


def test_extract_end_to_end(toy, reference):
    with open_cache(reference) as z:
        m = z.manifest
        assert m["backbone"] == "test_vit" and m["head_is_task_head"] and m["num_classes"] == K
        assert m["weights"]["sha256"] and m["precision"] == "float32"
        # 48 images: test 1/6, val 1/12, train the rest with 2 extra views each
        assert m["layout"]["splits"] == {"train": 36 * 3, "val": 4, "test": 8}
        assert [e["exit"] for e in m["exits"]] == list(range(1, 7)) and z.exit_dims == [64] * 6
        macs = [e["cumulative_total_macs"] for e in m["exits"]]
        assert all(0 < a < b for a, b in zip(macs, macs[1:]))
        train = z.load_split("train")
        # The stored logits are the backbone's head applied to the last exit's representation (to float16
        # precision): the cache holds what the network computes.
        model = timm.create_model("test_vit", num_classes=K, img_size=32)
        model.load_state_dict(torch.load(toy / "vit.pth", weights_only=True))
        with torch.no_grad():
            head = model.head(model.fc_norm(train.features[-1]))
        assert torch.allclose(head, train.logits, atol=2e-2, rtol=1e-2)
        # Views: rows r, r + 36, r + 72 are views of the same image: same label, different pixels.
        assert torch.equal(train.labels[:36], train.labels[36:72])
        assert not torch.equal(train.features[0][:36], train.features[0][36:72])

    res = run_cli("cache", "verify", str(reference))
    assert res.exit_code == 0 and "ok" in res.output
    res = run_cli("cache", "info", str(reference))
    assert res.exit_code == 0 and "blocks.5" in res.output and "108 rows" in res.output
    # Rerunning a finished extraction changes nothing.
    before = store_files(reference)
    assert run_cli(*extract_args(toy, reference)).exit_code == 0
    assert store_files(reference) == before


def test_default_out_limit_and_find_default_cache(toy, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = extract_args(toy, "x", "--limit", "2")
    args = args[:args.index("--out")] + args[args.index("--out") + 2:]
    res = run_cli(*args)
    assert res.exit_code == 0, res.output
    path = Path(res.output.strip().splitlines()[-1])
    assert path.parent == Path("cache") and path.name.startswith("test_vit-imagefolder-")
    with open_cache(path) as cache:
        assert path.name == f"test_vit-imagefolder-{cache.fingerprint[:10]}.zarr"
        assert cache.layout["splits"] == {"train": 2 * 3, "val": 2, "test": 2}
    assert find_default_cache() == path


def test_refuses_another_extraction_into_the_same_cache(toy, tmp_path):
    out = tmp_path / "c.zarr"
    assert run_cli(*extract_args(toy, out, "--limit", "2")).exit_code == 0
    res = run_cli(*extract_args(toy, out, "--limit", "2", "--split-seed", "5"))
    assert res.exit_code == 1 and "Traceback" not in res.output
    line = res.output.strip()
    assert "\n" not in line and "dataset.split_seed" in line and "--overwrite" in line
    res = run_cli(*extract_args(toy, out, "--limit", "2", "--split-seed", "5", "--overwrite"))
    assert res.exit_code == 0 and open_cache(out).manifest["dataset"]["split_seed"] == 5


def test_nan_weights_stop_the_extraction_before_anything_is_written(toy, tmp_path):
    state = torch.load(toy / "vit.pth", weights_only=True)
    state["blocks.0.norm1.weight"][0] = float("nan")
    torch.save(state, tmp_path / "nan.pth")
    args = extract_args(toy, tmp_path / "c.zarr", "--limit", "2")
    args[args.index("--weights") + 1] = str(tmp_path / "nan.pth")
    res = run_cli(*args)
    assert res.exit_code == 1 and "NaN/Inf" in res.output and "exit 1" in res.output
    problems = verify_cache(tmp_path / "c.zarr")
    assert problems[0].startswith("incomplete") and not any("NaN" in p for p in problems)


@pytest.mark.parametrize("args, message", [
    (["--dataset", "mnist"], "unknown dataset 'mnist'"),
    (["--batch-size", "6"], "must divide one another"),
    (["--device", "cuda:7" if not torch.cuda.is_available() else "nonsense"], "device"),
    (["--num-classes", "2"], "below the 3 classes"),
    (["--data-dir", "/nonexistent"], "imagefolder"),
])
def test_bad_input_is_a_one_line_error(toy, tmp_path, args, message):
    full = extract_args(toy, tmp_path / "c.zarr")
    for flag, value in zip(args[::2], args[1::2]):
        if flag in full:
            full[full.index(flag) + 1] = value
        else:
            full += [flag, value]
    res = run_cli(*full)
    assert res.exit_code != 0 and message in res.output, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert "Traceback" not in res.output and len(lines) <= 3   # usage errors add a usage line and a hint
    assert not (tmp_path / "c.zarr").exists() or verify_cache(tmp_path / "c.zarr")[0].startswith("incomplete")


def test_costs_table_and_json():
    res = run_cli("costs", "--backbone", "test_vit", "--num-classes", "10", "--img-size", "32", "--json")
    assert res.exit_code == 0, res.output
    costs = json.loads(res.output)
    assert costs["backbone"] == "test_vit" and costs["num_classes"] == 10 and len(costs["exits"]) == 6
    totals = [e["cumulative_total_macs"] for e in costs["exits"]]
    assert all(e["cumulative_backbone_macs"] <= t for e, t in zip(costs["exits"], totals))
    assert all(a < b for a, b in zip(totals, totals[1:]))
    res = run_cli("costs", "--backbone", "test_vit", "--num-classes", "10", "--img-size", "32")
    assert res.exit_code == 0 and "blocks.5" in res.output and "100.0%" in res.output
    res = run_cli("costs", "--backbone", "no_such_net", "--num-classes", "10")
    assert res.exit_code == 1 and "unknown backbone" in res.output and "Traceback" not in res.output


# ---------------------------------------------------------------- fault injection and concurrency
# Child processes run the extraction (tests/procs.py: they start in milliseconds); the test kills them with
# SIGKILL at seeded random moments, or competes with them for the same --out.

def started_writing(proc, out: Path) -> float:
    """Waits until the child holds the store's lock (its writing began) or ends; returns the time then. A lock
    file left by a killed child names that child, not this one."""
    from cache.lock import lock_path

    def holder():
        try:
            return json.loads(lock_path(out).read_text() or "{}").get("pid")
        except (FileNotFoundError, ValueError):
            return None
    while holder() != proc.pid and proc.is_alive():
        time.sleep(0.002)
    return time.perf_counter()


def kill_at_random_moments(toy, reference, out, fmt, kills: int, seed: int):
    """Kills extractions into `out` with SIGKILL at seeded random moments of their writing (from taking the lock
    to the end, HDF5 conversion included), each resuming the last, until `kills` kills landed mid-way; then
    finishes the cache and compares it with the uninterrupted one. A run that ends before its kill is compared
    too, and the next one starts afresh."""
    import shutil
    args = extract_args(toy, out, "--format", fmt)
    rng = np.random.default_rng(seed)
    timing = out.with_name("timing" + out.suffix)   # how long the writing takes here: the kills land within it
    proc = procs.start(procs.extraction, extract_args(toy, timing, "--format", fmt))
    began = started_writing(proc, timing)
    proc.join()
    duration = time.perf_counter() - began
    assert proc.exitcode == 0
    landed = 0
    for _ in range(4 * kills):
        proc = procs.start(procs.extraction, args)
        started_writing(proc, out)
        time.sleep(rng.uniform(0.0, duration))
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:   # it ended before the kill
            pass
        proc.join()
        assert proc.exitcode in (0, -signal.SIGKILL), proc.exitcode
        problems = verify_cache(out)
        if not problems:   # it finished before the kill
            assert_same_arrays(out, reference)
            shutil.rmtree(out) if out.is_dir() else out.unlink()
            continue
        assert problems[0].startswith(("incomplete", "no cache at")), problems
        with pytest.raises(CacheError):
            open_cache(out)   # a killed extraction never leaves a cache that readers accept
        landed += problems[0].startswith("incomplete")
        if landed == kills:
            break
    assert landed == kills, f"only {landed} of {kills} kills landed mid-extraction"
    res = run_cli(*args)
    assert res.exit_code == 0, res.output
    assert verify_cache(out) == [] and not staging_path(out).exists()
    assert not list(out.parent.glob(f"{out.name}.*")), "temporary files or a lock left behind"
    if fmt == "zarr":
        assert store_files(out) == store_files(reference)
    assert_same_arrays(out, reference)


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_killed_at_random_moments_then_resumed_equals_uninterrupted(toy, reference, tmp_path, fmt):
    kill_at_random_moments(toy, reference, tmp_path / f"k.{'zarr' if fmt == 'zarr' else 'h5'}", fmt, kills=2,
                           seed=1)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
@pytest.mark.parametrize("seed", [2, 3])
def test_killed_many_times_then_resumed_equals_uninterrupted(toy, reference, tmp_path, fmt, seed):
    kill_at_random_moments(toy, reference, tmp_path / f"k.{'zarr' if fmt == 'zarr' else 'h5'}", fmt, kills=12,
                           seed=seed)


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_a_second_extraction_into_the_same_out_is_refused_and_harms_nothing(toy, reference, tmp_path, fmt):
    from cache.lock import lock_path
    out = tmp_path / ("c.zarr" if fmt == "zarr" else "c.h5")
    args = extract_args(toy, out, "--format", fmt)
    first = procs.start(procs.extraction, args, 0.1)
    deadline = time.monotonic() + 60
    while not lock_path(out).exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    res = run_cli(*args)   # the second writer, while the first holds the lock
    assert res.exit_code == 1 and "Traceback" not in res.output
    line = res.output.strip()
    assert "\n" not in line and "is being written by another process" in line and f"pid {first.pid}" in line
    first.join()
    assert first.exitcode == 0
    assert verify_cache(out) == []
    assert_same_arrays(out, reference)   # the first extraction's cache is whole (not zeroed by the second)
    assert run_cli(*args).exit_code == 0   # and the lock is gone


def test_int32_weights_one_class_trees_and_truncated_images_are_one_line_errors(toy, tmp_path):
    state = torch.load(toy / "vit.pth", weights_only=True)
    state["blocks.0.norm1.weight"] = state["blocks.0.norm1.weight"].to(torch.int32)
    torch.save(state, tmp_path / "int.pth")
    args = extract_args(toy, tmp_path / "a.zarr", "--limit", "2")
    args[args.index("--weights") + 1] = str(tmp_path / "int.pth")
    res = run_cli(*args)
    assert res.exit_code == 1 and "blocks.0.norm1.weight is torch.int32" in res.output and str(tmp_path) in res.output

    one = tmp_path / "one" / "train" / "only"
    one.mkdir(parents=True)
    for i in range(4):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(one / f"{i}.png")
    args = extract_args(toy, tmp_path / "b.zarr")
    args[args.index("--data-dir") + 1] = str(tmp_path / "one")
    res = run_cli(*args)
    assert res.exit_code != 0 and "1 class folder (only)" in res.output and "at least 2" in res.output
    assert not (tmp_path / "b.zarr").exists()

    import shutil
    shutil.copytree(toy / "data", tmp_path / "data")
    bad = tmp_path / "data" / "train" / "class1" / "03.png"
    bad.write_bytes(bad.read_bytes()[:60])
    args = extract_args(toy, tmp_path / "c.zarr")
    args[args.index("--data-dir") + 1] = str(tmp_path / "data")
    res = run_cli(*args)
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 1 and len(lines) == 1 and str(bad) in lines[0] and "unreadable image" in lines[0]
    assert verify_cache(tmp_path / "c.zarr")[0].startswith("incomplete")   # resumable, never marked complete


def test_a_full_disk_is_one_line_naming_the_cache_and_the_rerun_resumes(toy, reference, tmp_path, monkeypatch):
    import errno
    from cache.store import CacheWriter
    write_chunk, written = CacheWriter.write_chunk, []

    def fills_up(self, split, i, *a, **kw):
        if len(written) == 5:
            raise OSError(errno.ENOSPC, "No space left on device")   # as zarr raises it: no file name
        written.append(i)
        return write_chunk(self, split, i, *a, **kw)
    monkeypatch.setattr(CacheWriter, "write_chunk", fills_up)
    out = tmp_path / "c.zarr"
    res = run_cli(*extract_args(toy, out))
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 1 and len(lines) == 1 and str(out) in lines[0] and "no space left" in lines[0]
    assert verify_cache(out)[0].startswith("incomplete")
    monkeypatch.undo()
    assert run_cli(*extract_args(toy, out)).exit_code == 0
    assert store_files(out) == store_files(reference)

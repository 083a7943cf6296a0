"""The feature cache with hand-made arrays: round trips (zarr, HDF5), resumption after a crash, identity
refusal, write-time checks, verification, the reader's blocks, find_default_cache and the `cache` CLI."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from cli.cache import cache_group
from cache.store import (CacheError, create_or_resume, find_default_cache, fingerprint, open_cache,
                         staging_path)
from cache.verify import verify_cache

K, DIMS, ROWS = 3, [4, 6], 4
SPLITS = {"train": 10, "val": 5, "test": 0}


def manifest(**changes):
    m = {"backbone": "tiny", "weights": {"path": None, "sha256": "ab" * 32, "source": "test"}, "num_classes": K,
         "img_size": 32, "tokens": "cls", "head_is_task_head": True,
         "exits": [{"exit": l + 1, "name": f"blocks.{l}", "dim": d, "cumulative_backbone_macs": 100 * (l + 1),
                    "represent_macs": 5, "cumulative_total_macs": 110 * (l + 1)} for l, d in enumerate(DIMS)],
         "dataset": {"name": "toy", "split_seed": 0, "sizes": dict(SPLITS)}}
    for key, value in changes.items():
        if key.startswith("dataset."):
            m["dataset"] = {**m["dataset"], key.split(".", 1)[1]: value}
        else:
            m[key] = value
    return m


def layout(**changes):
    return {"splits": dict(SPLITS), "exit_dims": list(DIMS), "num_classes": K, "with_logits": True,
            "chunk_rows": ROWS, "tokens": None, **changes}


def make_data(seed=0, tokens=None):
    """Per split: features per exit (float16-exact values), labels, logits."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in SPLITS.items():
        tok = () if tokens is None else (tokens,)
        feats = [rng.standard_normal((n, *tok, d)).astype(np.float16) for d in DIMS]
        out[split] = (feats, rng.integers(0, K, n), rng.standard_normal((n, K)).astype(np.float16))
    return out


def write(writer, data, chunks=None):
    for split, (feats, labels, logits) in data.items():
        for i in writer.pending_chunks(split) if chunks is None else chunks.get(split, []):
            a, b = writer.chunk_range(split, i)
            writer.write_chunk(split, i, [f[a:b] for f in feats], labels[a:b], logits[a:b])


def assert_holds(path, data):
    with open_cache(path) as cache:
        for split, (feats, labels, logits) in data.items():
            arrays = cache.load_split(split)
            assert arrays.num_rows == len(labels)
            for got, want in zip(arrays.features, feats):
                assert got.dtype == torch.float32
                np.testing.assert_array_equal(got.numpy(), want.astype(np.float32))
            np.testing.assert_array_equal(arrays.labels.numpy(), labels)
            np.testing.assert_array_equal(arrays.logits.numpy(), logits.astype(np.float32))


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_round_trip_in_any_chunk_order(tmp_path, fmt):
    data = make_data()
    path = tmp_path / ("c.zarr" if fmt == "zarr" else "c.h5")
    w = create_or_resume(path, manifest(), layout(), fmt=fmt)
    assert w.pending_chunks("train") == [0, 1, 2] and w.pending_chunks("test") == []
    write(w, data, {"train": [2, 0], "val": [1, 0]})
    assert w.pending_chunks("train") == [1]
    with pytest.raises(CacheError, match="incomplete"):
        open_cache(path)
    write(w, data)
    assert w.finish() == path
    assert verify_cache(path) == []
    assert_holds(path, data)
    if fmt == "hdf5":
        assert path.is_file() and not staging_path(path).exists()


def test_zarr_and_hdf5_hold_identical_arrays_and_fingerprints(tmp_path):
    data = make_data(1)
    paths = []
    for fmt, name in (("zarr", "a.zarr"), ("hdf5", "a.h5")):
        w = create_or_resume(tmp_path / name, manifest(), layout(), fmt=fmt)
        write(w, data)
        paths.append(w.finish())
    with open_cache(paths[0]) as z, open_cache(paths[1]) as h:
        assert (z.format, h.format) == ("zarr", "hdf5")
        assert z.fingerprint == h.fingerprint   # the fingerprint names the content, not the storage
        for split in SPLITS:
            a, b = z.load_split(split), h.load_split(split)
            for x, y in zip(a.features + [a.labels, a.logits], b.features + [b.labels, b.logits]):
                assert torch.equal(x, y)


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_resume_after_a_crash_rewrites_only_unfinished_chunks(tmp_path, fmt):
    data = make_data(2)
    ref = create_or_resume(tmp_path / "ref.zarr", manifest(), layout())
    write(ref, data)
    ref.finish()

    path = tmp_path / ("c.zarr" if fmt == "zarr" else "c.h5")
    w = create_or_resume(path, manifest(), layout(), fmt=fmt)
    write(w, data, {"train": [0, 2]})
    # A crash mid-chunk: chunk 1's first exit on disk with garbage, its `done` entry never written, and a
    # temp file of zarr's atomic write left behind.
    store = staging_path(path) if fmt == "hdf5" else path
    zarr.open_group(store, mode="r+")["train/features/1"][4:8] = np.full((4, DIMS[0]), 7, np.float16)
    stray = store / "train" / "features" / "1" / "c" / "1" / "0.deadbeef.partial"
    stray.write_bytes(b"half")
    del w

    w = create_or_resume(path, manifest(), layout(), fmt=fmt)
    assert not stray.exists()
    assert w.pending_chunks("train") == [1] and w.pending_chunks("val") == [0, 1]
    write(w, data)
    w.finish()
    assert verify_cache(path) == []
    assert_holds(path, data)
    if fmt == "zarr":   # chunk files byte-identical to the uninterrupted store
        for f in sorted(p for p in (tmp_path / "ref.zarr").rglob("*") if p.is_file() and "c" in p.parts):
            assert (path / f.relative_to(tmp_path / "ref.zarr")).read_bytes() == f.read_bytes(), f
    # Resuming a complete cache is a no-op.
    again = create_or_resume(path, manifest(), layout(), fmt=fmt)
    assert again.complete and again.pending_chunks("train") == [] and again.finish() == path


def test_refuses_a_different_identity_naming_each_field(tmp_path):
    path = tmp_path / "c.zarr"
    w = create_or_resume(path, manifest(), layout())
    write(w, make_data(), {"train": [0]})
    with pytest.raises(CacheError) as err:
        create_or_resume(path, manifest(backbone="other", **{"dataset.split_seed": 1}), layout())
    msg = str(err.value)
    assert "backbone" in msg and "dataset.split_seed" in msg and "tokens" not in msg and "\n" not in msg
    with pytest.raises(CacheError, match="weights.sha256"):
        create_or_resume(path, manifest(weights={"sha256": "cd" * 32}), layout())
    with pytest.raises(CacheError, match="layout.chunk_rows"):
        create_or_resume(path, manifest(), layout(chunk_rows=8))
    with pytest.raises(CacheError, match="format"):
        create_or_resume(path, manifest(), layout(), fmt="hdf5")   # a .zarr path holding a zarr cache
    w = create_or_resume(path, manifest(backbone="other"), layout(), overwrite=True)
    assert w.pending_chunks("train") == [0, 1, 2] and w.manifest["backbone"] == "other"


def test_overwrite_never_deletes_something_that_is_not_a_cache(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "precious.txt").write_text("x")
    with pytest.raises(CacheError, match="not a cache"):
        create_or_resume(tmp_path / "mine", manifest(), layout(), overwrite=True)
    assert (tmp_path / "mine" / "precious.txt").exists()


def test_fingerprint_covers_content_not_bookkeeping():
    base = {**manifest(), "format_version": 1}
    fp = fingerprint(base)
    assert fingerprint({**base, "created": "now", "versions": {"x": 1}, "complete": True, "format": "hdf5"}) == fp
    assert fingerprint({**base, "img_size": 64}) != fp
    assert fingerprint({**base, "dataset": {**base["dataset"], "split_seed": 3}}) != fp


def test_write_chunk_refuses_bad_values_and_writes_nothing(tmp_path):
    data = make_data()
    w = create_or_resume(tmp_path / "c.zarr", manifest(), layout())
    feats, labels, logits = data["train"]
    good = ([f[:4] for f in feats], labels[:4], logits[:4])
    nan = [feats[0][:4].copy(), feats[1][:4]]
    nan[0][1, 2] = np.nan
    with pytest.raises(CacheError, match="NaN/Inf"):
        w.write_chunk("train", 0, nan, *good[1:])
    with pytest.raises(CacheError, match="float16"):   # 1e6 overflows float16 to inf
        w.write_chunk("train", 0, [good[0][0].astype(np.float32) * 0 + 1e6, good[0][1]], *good[1:])
    with pytest.raises(CacheError, match=r"labels outside \[0, 3\)"):
        w.write_chunk("train", 0, good[0], good[1] + K, good[2])
    with pytest.raises(CacheError, match="shape"):
        w.write_chunk("train", 0, [good[0][0][:3], good[0][1]], *good[1:])
    with pytest.raises(CacheError, match="logits missing"):
        w.write_chunk("train", 0, good[0], good[1])
    assert w.pending_chunks("train") == [0, 1, 2]
    with pytest.raises(CacheError, match="chunks not done"):
        w.finish()


def finished(tmp_path, name="c.zarr", **kw):
    w = create_or_resume(tmp_path / name, manifest(), layout(**kw))
    write(w, make_data(tokens=kw.get("tokens")))
    return w.finish()


def test_verify_catches_nan_labels_and_incomplete(tmp_path):
    path = finished(tmp_path)
    group = zarr.open_group(path, mode="r+")
    group["train/features/2"][7, 3] = np.inf
    group["val/logits"][1, 0] = np.nan
    group["val/labels"][3] = K
    group["train/done"][1] = 0
    problems = verify_cache(path)
    assert any("train/features/2: 1 rows with NaN/Inf (first at row 7)" in p for p in problems)
    assert any("val/logits: 1 rows with NaN/Inf" in p for p in problems)
    assert any("val/logits: 1 chunk(s) fail their checksums" in p and "0 (rows 0:4)" in p for p in problems)
    assert any("val/labels: 1 labels outside [0, 3) (first at row 3)" in p for p in problems)
    assert any("train: 1 of 3 chunks not done (1)" in p for p in problems)
    assert not any("incomplete" in p for p in problems)

    w = create_or_resume(tmp_path / "half.zarr", manifest(), layout())
    write(w, make_data(), {"train": [0]})
    problems = verify_cache(tmp_path / "half.zarr")
    assert any(p.startswith("incomplete") for p in problems) and any("2 of 3 chunks" in p for p in problems)
    w = create_or_resume(tmp_path / "half.h5", manifest(), layout(), fmt="hdf5")
    assert verify_cache(tmp_path / "half.h5")[0].startswith("incomplete")
    assert verify_cache(tmp_path / "nothing.zarr") == [f"no cache at {tmp_path / 'nothing.zarr'}"]


def test_open_refuses_unknown_version_and_tampered_manifest(tmp_path):
    path = finished(tmp_path)
    group = zarr.open_group(path, mode="r+")
    group.attrs["img_size"] = 999
    assert any("fingerprint" in p for p in verify_cache(path))
    group.attrs["format_version"] = 99
    with pytest.raises(CacheError, match="format version 99"):
        open_cache(path)


def test_reader_blocks_and_token_layout(tmp_path):
    path = finished(tmp_path, tokens=5)
    with open_cache(path) as cache:
        whole = cache.load_split("train", dtype=torch.float16)
        assert [f.shape for f in whole.features] == [(10, 5, 4), (10, 5, 6)]
        assert whole.features[0].dtype == torch.float16
        blocks = list(cache.iter_blocks("train", rows=4))
        assert [start for start, _ in blocks] == [0, 4, 8]
        for l in range(2):
            assert torch.equal(torch.cat([b.features[l] for _, b in blocks]), whole.features[l].float())
        assert torch.equal(torch.cat([b.labels for _, b in blocks]), whole.labels)
        assert cache.load_split("test").num_rows == 0
        with pytest.raises(CacheError, match="no split 'nope'"):
            cache.load_split("nope")


def test_find_default_cache(tmp_path):
    with pytest.raises(CacheError, match="no complete cache"):
        find_default_cache(tmp_path)
    create_or_resume(tmp_path / "unfinished.zarr", manifest(), layout())
    one = finished(tmp_path, "one.zarr")
    assert find_default_cache(tmp_path) == one
    finished(tmp_path, "two.zarr")
    with pytest.raises(CacheError, match="several complete caches.*one.zarr, two.zarr"):
        find_default_cache(tmp_path)


def test_cache_cli_info_and_verify(tmp_path):
    path = finished(tmp_path)
    runner = CliRunner()
    res = runner.invoke(cache_group, ["info", str(path)])
    assert res.exit_code == 0, res.output
    assert "complete" in res.output and "blocks.1" in res.output and "0.5000" in res.output
    res = runner.invoke(cache_group, ["info", "--json", str(path)])
    assert json.loads(res.output)["fingerprint"] == open_cache(path).fingerprint
    res = runner.invoke(cache_group, ["verify", str(path)])
    assert res.exit_code == 0 and res.output.startswith("ok")
    zarr.open_group(path, mode="r+")["train/labels"][0] = -1
    res = runner.invoke(cache_group, ["verify", str(path)])
    assert res.exit_code == 1 and "problem: train/labels: 1 labels outside" in res.output


# ---------------------------------------------------------------- integrity: checksums, repair, costs, locking

def reference_cache(tmp_path, fmt="zarr"):
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / ("ref.zarr" if fmt == "zarr" else "ref.h5")
    w = create_or_resume(path, manifest(), layout(), fmt=fmt)
    write(w, make_data())
    return w.finish()


def chunk_file(path, split, name, i):
    return path / split / Path(name) / "c" / str(i) / "0" if name.startswith("features") or name == "logits" \
        else path / split / name / "c" / str(i)


@pytest.mark.parametrize("damage", ["delete", "truncate", "alter"])
@pytest.mark.parametrize("name", ["features/2", "labels"])
def test_damaged_zarr_chunk_is_named_refused_and_re_extracted(tmp_path, damage, name):
    path = reference_cache(tmp_path)
    f = chunk_file(path, "train", name, 1)
    if damage == "delete":
        f.unlink()
    elif damage == "truncate":
        f.write_bytes(f.read_bytes()[:5])
    else:
        raw = bytearray(f.read_bytes())
        raw[0] ^= 0x10
        f.write_bytes(bytes(raw))
    problems = verify_cache(path)
    assert problems[0].startswith(f"train/{name}: 1 chunk(s)") and "1 (rows 4:8)" in problems[0]
    assert all(p.startswith(f"train/{name}: ") for p in problems)   # a flipped bit may also give a bad label
    assert ("unreadable" if damage == "truncate" else "checksum") in problems[0]
    with open_cache(path) as cache:
        cache.load_split("val")   # other splits still load
        with pytest.raises(CacheError) as err:
            cache.load_split("train")
    msg = str(err.value)
    assert re.search(rf"train/{name} rows [4-7]:[5-8] \(chunk 1\)", msg) and str(path) in msg and "\n" not in msg
    # Rerunning the writer re-extracts exactly that chunk, and the cache equals the uninterrupted one.
    w = create_or_resume(path, manifest(), layout())
    assert not w.complete and w.pending_chunks("train") == [1] and w.pending_chunks("val") == []
    write(w, make_data())
    w.finish()
    assert verify_cache(path) == []
    assert_holds(path, make_data())


def test_damaged_hdf5_chunk_is_re_extracted_through_a_staging_store(tmp_path):
    import h5py
    path = reference_cache(tmp_path, "hdf5")
    with h5py.File(path, "r+") as f:   # flips stored values without touching the checksums
        f["val/features/1"][5 - 1] = f["val/features/1"][5 - 1] + 1
    problems = verify_cache(path)
    assert len(problems) == 1 and "val/features/1: 1 chunk(s) fail their checksums (deleted, truncated or altered): 1 (rows 4:5)" in problems[0]
    with pytest.raises(CacheError, match=r"val/features/1 rows 4:5 \(chunk 1\) fails its checksum"):
        open_cache(path).load_split("val")
    w = create_or_resume(path, manifest(), layout(), fmt="hdf5")
    assert not path.exists() and staging_path(path).exists()
    assert w.pending_chunks("val") == [1] and w.pending_chunks("train") == []
    write(w, make_data())
    w.finish()
    assert verify_cache(path) == [] and not staging_path(path).exists()
    assert_holds(path, make_data())


def test_costs_and_class_names_are_in_the_fingerprint_and_checked(tmp_path):
    path = reference_cache(tmp_path)
    group = zarr.open_group(path, mode="r+")
    exits = group.attrs["exits"]
    group.attrs["exits"] = [{**e, "cumulative_total_macs": f["cumulative_total_macs"]}
                            for e, f in zip(exits, exits[::-1])]
    problems = verify_cache(path)
    assert any("fingerprint" in p for p in problems) and any("decrease along the exits" in p for p in problems)
    with pytest.raises(CacheError, match="decrease along the exits"):
        open_cache(path)
    base = {**manifest(), "format_version": 2, "class_names": ["a", "b", "c"]}
    assert fingerprint({**base, "class_names": ["a", "c", "b"]}) != fingerprint(base)
    with pytest.raises(CacheError, match="not all positive"):
        create_or_resume(tmp_path / "neg.zarr", manifest(exits=[{**e, "cumulative_total_macs": -1} for e in exits]),
                         layout())


def test_old_caches_without_checksums_are_read_with_a_warning_and_can_be_sealed(tmp_path, caplog):
    import shutil
    path = reference_cache(tmp_path)
    shutil.copytree(path, tmp_path / "ref-copy.zarr")
    group = zarr.open_group(path, mode="r+")
    for split in SPLITS:
        del group[f"{split}/checksums"]
    attrs = dict(group.attrs)
    attrs["layout"] = {k: v for k, v in attrs["layout"].items() if k != "checksums"}
    attrs["format_version"] = 1
    attrs["fingerprint"] = fingerprint(attrs)
    group.attrs.update(attrs)
    assert verify_cache(path) == []
    with caplog.at_level("WARNING"), open_cache(path) as cache:
        cache.load_split("train")
    assert "no chunk checksums" in caplog.text and "--seal" in caplog.text
    with pytest.raises(CacheError, match="format version 1.*--overwrite"):
        create_or_resume(path, manifest(), layout())
    # Sealing adds the checksums of the current content: the cache is then a version 2 cache like a new one.
    res = CliRunner().invoke(cache_group, ["verify", "--seal", str(path)])
    assert res.exit_code == 0, res.output
    with open_cache(path) as cache:
        assert cache.manifest["format_version"] == 2
        assert cache.fingerprint == open_cache(tmp_path / "ref-copy.zarr").fingerprint
    assert verify_cache(path) == []
    chunk_file(path, "val", "labels", 0).unlink()
    assert "val/labels: 1 chunk(s) fail their checksums" in verify_cache(path)[0]


def test_hdf5_conversion_checks_free_space_first(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple
    path = tmp_path / "c.h5"
    w = create_or_resume(path, manifest(), layout(), fmt="hdf5")
    write(w, make_data())
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 ** 6, 10 ** 6 - 100, 100))
    with pytest.raises(CacheError, match="not enough free space for .*c.h5.*rerun the same extract command"):
        w.finish()
    assert not path.exists() and staging_path(path).exists()
    monkeypatch.undo()
    w = create_or_resume(path, manifest(), layout(), fmt="hdf5")
    assert w.finish() == path and verify_cache(path) == []


HOLD_LOCK = """
import sys, time
sys.path.insert(0, {root!r})
from cache.lock import acquire
acquire({path!r})
print("held", flush=True)
time.sleep(60)
"""


def test_one_writer_per_cache_and_stale_locks_are_taken_over(tmp_path):
    import os
    import subprocess
    import sys
    from cache.lock import LockedError, lock_path
    root = str(Path(__file__).resolve().parents[1])
    path = tmp_path / "c.zarr"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK.format(root=root, path=str(path))],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockedError) as err:
            create_or_resume(path, manifest(), layout())
        assert f"pid {holder.pid}" in str(err.value) and "\n" not in str(err.value)
        assert not path.exists()   # nothing created, nothing opened for writing
    finally:
        holder.kill()
        holder.wait()
    assert lock_path(path).exists()   # left behind by the killed holder: stale, taken over
    w = create_or_resume(path, manifest(), layout())
    assert str(os.getpid()) in lock_path(path).read_text()
    write(w, make_data())
    w.finish()
    assert not lock_path(path).exists()


def test_damaged_manifests_and_leftover_temporary_files_are_named(tmp_path):
    path = reference_cache(tmp_path)
    meta = path / "zarr.json"
    meta.write_bytes(meta.read_bytes()[:40])
    problems = verify_cache(path)
    assert len(problems) == 1 and str(meta) in problems[0] and "--overwrite" in problems[0]
    with pytest.raises(CacheError, match="zarr.json is unreadable"):
        open_cache(path)
    h5 = reference_cache(tmp_path / "h", "hdf5")
    h5.write_bytes(h5.read_bytes()[:1000])
    assert str(h5) in verify_cache(h5)[0] and "--overwrite" in verify_cache(h5)[0]
    with pytest.raises(CacheError, match="truncated or corrupt"):
        open_cache(h5)
    leftover = tmp_path / "x.h5.partial-h5"
    leftover.write_bytes(b"\x89HDF\r\n\x1a\n")
    assert "temporary file of an HDF5 conversion" in verify_cache(leftover)[0]


# ---------------------------------------------------------------- ranks of a distributed extraction (journal)

def test_ranks_journal_their_chunks_and_only_verified_records_are_folded(tmp_path):
    """Ranks write disjoint chunks and journal them; the lock holder folds the records whose chunks read back
    with the recorded checksums, and never sets `complete` while a chunk is missing or does not match."""
    from cache.store import journal_path, open_rank_writer
    data = make_data(3)
    ref = create_or_resume(tmp_path / "ref.zarr", manifest(), layout())
    write(ref, data)
    ref.finish()

    path = tmp_path / "c.zarr"
    w0 = create_or_resume(path, manifest(), layout(), rank=0)
    w1 = open_rank_writer(path, 1)
    write(w0, data, {"train": [0], "val": [0]})
    write(w1, data, {"train": [1, 2]})   # val chunk 1 is missing
    assert w0.pending_chunks("train") == [0, 1, 2]   # recorded in the journal, not yet in `done`
    assert sorted(p.name for p in journal_path(path).iterdir()) == ["train.0.r0", "train.1.r1", "train.2.r1",
                                                                     "val.0.r0"]
    with pytest.raises(CacheError, match=r"val: 1 of 2 chunks not done \(1\)"):
        w0.finish()
    assert not zarr.open_group(path).attrs["complete"] and w0.pending_chunks("train") == []
    assert not journal_path(path).exists()   # folded

    # A record that does not match its chunk's data (altered after the record) is not folded.
    write(w1, data, {"val": [1]})
    zarr.open_group(path, mode="r+")["val/labels"][4:5] = (data["val"][1][4] + 1) % K
    with pytest.raises(CacheError, match="not done"):
        w0.finish()
    assert w0.pending_chunks("val") == [1] and not zarr.open_group(path).attrs["complete"]

    # Records of another store (same path, an earlier store) are ignored, even when their checksums match.
    write(w1, data, {"val": [1]})
    record = journal_path(path) / "val.1.r1"
    record.write_text(record.read_text().replace(zarr.open_group(path).attrs["created"], "1999-01-01"))
    with pytest.raises(CacheError, match="not done"):
        w0.finish()

    # A killed run's journal is folded when the store is opened again, by one process or by rank 0 of another.
    write(w1, data, {"val": [1]})
    w0.close()
    w = create_or_resume(path, manifest(), layout())
    assert w.pending_chunks("val") == [] and not journal_path(path).exists()
    assert w.finish() == path and verify_cache(path) == []
    for f in sorted(p for p in (tmp_path / "ref.zarr").rglob("*") if p.is_file() and p.name != "zarr.json"):
        assert (path / f.relative_to(tmp_path / "ref.zarr")).read_bytes() == f.read_bytes(), f


def test_overwrite_and_new_stores_drop_a_stale_journal(tmp_path):
    from cache.store import journal_path, open_rank_writer
    data = make_data(4)
    path = tmp_path / "c.zarr"
    w0 = create_or_resume(path, manifest(), layout(), rank=0)
    write(open_rank_writer(path, 1), data, {"train": [0, 1, 2]})
    w0.close()
    w = create_or_resume(path, manifest(), layout(), overwrite=True)
    assert not journal_path(path).exists() and w.pending_chunks("train") == [0, 1, 2]

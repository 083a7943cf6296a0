"""Stage two past RAM (heads/train/stream.py): the documented streamed order, streamed training equal to resident
training in that order, at most two buffers held, and the command-line options."""
import json
import time

import pytest
import torch
from click.testing import CliRunner

from cache.synthetic import write_synthetic_cache
from cache.store import open_cache
from heads.train.stream import ChunkShuffle, MemorySettings, StreamedSplit, plan_memory
from heads.sweep.lambdas import expand_trials
from heads.sweep.rows import evaluate_group
from heads.sweep.session import Session, train_groups
from heads.train.bilevel import TrainSettings
from pipeline import cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CHUNK, SIZES, EXITS, DIM, K = 16, {"train": 300, "val": 90, "test": 70}, 4, 8, 5
ROW_BYTES = 2 * (EXITS * DIM + K)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return write_synthetic_cache(tmp_path_factory.mktemp("stream") / "c.zarr", SIZES, EXITS, DIM, K, chunk_rows=CHUNK)


def streaming(budget_chunks: int) -> MemorySettings:
    """Every split streamed, with a budget that gives buffers of budget_chunks // 4 chunks."""
    return MemorySettings("stream", budget_chunks * CHUNK * ROW_BYTES / 2 ** 30)


def test_a_streamed_epoch_is_seeded_whole_chunks_per_buffer_and_every_row_once():
    order, n, batch = ChunkShuffle(chunk_rows=16, buffer_chunks=3), 300, 20     # 19 chunks, the last one short
    plan = order.buffers(n, batch, torch.Generator().manual_seed(1))
    again = order.buffers(n, batch, torch.Generator().manual_seed(1))
    other = order.buffers(n, batch, torch.Generator().manual_seed(2))
    assert [c for c, _ in plan] == [c for c, _ in again] and [c for c, _ in plan] != [c for c, _ in other]
    assert all(torch.equal(x, y) for (_, a), (_, b) in zip(plan, again) for x, y in zip(a, b))
    assert sorted(c for chunks, _ in plan for c in chunks) == list(range(19))
    assert [len(chunks) for chunks, _ in plan] == [3] * 6 + [1]
    seen = []
    for chunks, local in plan:
        rows = order.global_rows(chunks, n)
        assert sorted(rows.tolist()) == sorted(r for c in chunks for r in range(16 * c, min(16 * c + 16, n)))
        assert all(len(b) == batch for b in local[:-1]) and 0 < len(local[-1]) <= batch   # short only at the end
        seen += [r for b in local for r in rows[b].tolist()]
    assert sorted(seen) == list(range(n))                                  # every row exactly once
    flat = order.batches(n, batch, torch.Generator().manual_seed(1), "cpu")  # the same order as split rows
    assert torch.equal(torch.cat(flat), torch.tensor(seen))


def test_a_streamed_sweep_trains_and_evaluates_the_resident_models_in_the_same_order(cache):
    settings = TrainSettings(max_epochs=4, warmup_epochs=2)
    trials = expand_trials([0.01, 0.1, 1.0], ())
    with open_cache(cache) as c:
        plan = plan_memory(c, streaming(12))
        assert not any(plan.resident.values()) and plan.order.buffer_chunks == 3
        streamed = Session(c, settings, False, plan)
        resident = Session(c, settings, False, plan_memory(c, MemorySettings("resident")))
        assert isinstance(streamed.data.train, StreamedSplit) and isinstance(streamed.test, StreamedSplit)
        resident.data.train.order = plan.order          # the resident path given the streamed epoch's order
        got, want = (train_groups(s, trials, (), settings)[0] for s in (streamed, resident))
        a, b = got["heads"].state_dict(), want["heads"].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)                     # bit for bit
        numeric = ("accuracy", "cost_norm", "ece", "ece_temp", "epochs")
        rows = [[{k: r[k] for k in numeric} for r in evaluate_group(s, g)]
                for s, g in ((streamed, got), (resident, want))]
        assert rows[0] == rows[1]
        plain = train_groups(Session(c, settings, False), trials, (), settings)[0]["heads"].state_dict()
        assert not all(torch.equal(a[k], plain[k]) for k in a)       # the resident order is another order


def test_a_streamed_split_holds_at_most_two_buffers_and_reads_each_row_once_per_epoch(cache):
    with open_cache(cache) as c:
        order = ChunkShuffle(CHUNK, 2)
        split = StreamedSplit(c, "train", 0, SIZES["train"], True, order)
        buffer = 2 * CHUNK * ROW_BYTES
        epoch = split.epoch(32, torch.Generator().manual_seed(0), "cpu")
        batches = [next(epoch)]
        deadline = time.monotonic() + 30
        while split.held_bytes < 2 * buffer and time.monotonic() < deadline:
            time.sleep(0.01)
        assert split.held_bytes == 2 * buffer     # the next buffer is read while the first one is in use
        batches += list(epoch)
        assert split.read_bytes == SIZES["train"] * ROW_BYTES          # every row read once, nothing twice
        assert split.peak_bytes <= 2 * buffer < split.read_bytes
        assert split.held_bytes == 0
        assert sum(len(labels) for _, labels, _ in batches) == SIZES["train"]
        split.peak_bytes = 0
        blocks = list(split.chunks(40))
        assert split.peak_bytes <= 2 * 40 * ROW_BYTES and split.held_bytes == 0
        assert torch.equal(torch.cat([b[1] for b in blocks]), split.labels)


def test_memory_options_choose_and_record_the_placement(cache, tmp_path):
    base = ["sweep", "--cache", str(cache), "--lambdas", "0.01,1", "--max-epochs", "2", "--warmup-epochs", "1",
            "--warmup-patience", "0", "--thresholds", "none", "--no-progress"]
    res = CliRunner().invoke(cli, base + ["--out", str(tmp_path / "s"), "--memory-budget", "0.00003"])
    assert res.exit_code == 0, res.output
    memory = json.loads((tmp_path / "s" / "settings.json").read_text())["memory"]
    # val (read every epoch) stays resident first; train does not fit what is left after the buffers, test does
    assert {s: v["resident"] for s, v in memory["splits"].items()} == {"train": False, "val": True, "test": True}
    assert memory["train_order"]["chunk_rows"] == CHUNK
    res = CliRunner().invoke(cli, base + ["--out", str(tmp_path / "r"), "--resident", "--memory-budget", "0.00003"])
    assert res.exit_code == 0, res.output
    memory = json.loads((tmp_path / "r" / "settings.json").read_text())["memory"]
    assert all(v["resident"] for v in memory["splits"].values()) and memory["streaming_buffers_gib"] == 0
    for bad in ("0", "inf", "nan", "lots"):
        res = CliRunner().invoke(cli, base + ["--out", str(tmp_path / "x"), "--memory-budget", bad])
        assert res.exit_code == 2 and "--memory-budget" in res.output, (bad, res.output)

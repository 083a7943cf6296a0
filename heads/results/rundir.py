"""The run directory that `train`, `sweep` and `fit` write and `report` reads.

    RUN/settings.json       what the run is and where it stands: settings_hash, identity (command, cache fingerprint,
                            resolved TrainSettings, lambdas, grid, gate thresholds / fit settings), cache (path,
                            fingerprint, backbone, dataset, per-exit costs), status ("training" -> "evaluating" ->
                            "complete"), timings (warm-up, training, evaluation seconds), warnings (lambda range)
    RUN/heads.safetensors   the trained heads, one file: tensor "g<group>/<name>" is entry <name> of the
                            StackedHeads.state_dict() of stacked pass <group> (trials along axis 0); group "warmup"
                            holds the warm-up IMs behind the single-exit rows
    RUN/heads.json          the index: {"settings_hash", "groups": [{"group", "settings" (that pass's TrainSettings),
                            "trials": [{"trial", "lam", grid values...} in stack order], "seconds"}]}
    RUN/history.parquet     the training curves: one row per trial and epoch trained (warm-up and bi-level), columns
                            below; written with the heads, the run's settings_hash in the schema metadata
                            (b"jei.settings_hash"); kept when a rerun re-uses the heads
    RUN/results.parquet     one row per trial and split, columns below; the schema metadata holds the settings.json
                            object (key b"jei.settings", JSON) and the cache fingerprint (b"jei.cache_fingerprint")
    RUN/*.png               plots written by `report` (heads/results/report.py)
    RUN/matched_costs.csv   `report`: accuracy at matched normalised costs and the area under each curve
                            (heads/results/matched.py)
    RUN/methods/<m>.parquet `compare`: the evaluated rows of baseline method m, written as soon as m is done, with
                            the run's settings_hash in the schema metadata; a rerun of the same settings re-uses them

Every file is written to a temporary name in RUN and renamed over the old one, so a killed run never leaves a
half-written file. settings.json is written before training starts (status "training"), the heads and
history.parquet as soon as training ends, results.parquet last; rerunning the same command into the same RUN
re-uses heads of identical settings (heads/sweep/sweep.py) and keeps the history of their training; a run killed during
training writes neither and trains again from the start. One process writes a run directory at a time (lock_run:
RUN.lock beside it).
Everything read back is checked, and a damaged file is a one-line RunFileError naming it: JSON that does not
parse, heads with NaN/Inf or shapes that do not fit the run's cache, a results.parquet that is not this run's
(report refuses results left by an earlier run that --overwrite replaced), method parts whose rows do not match
the digest stored with them.

Columns of results.parquet (null where a column does not apply to a row's method; NaN where a metric is undefined):
    method            "jei": a trained model at gate threshold 0.5 (eq. 4: first exit with P(E^l|x) > 0.5);
                      "jei-threshold": a selected model at another gate threshold (a cost/accuracy curve from one
                      model); "single-exit": every sample leaves at one exit (warm-up IMs; exit L is the backbone's
                      head, or a trained last IM when the cache's head is not the task's), the fixed reference points;
                      `compare` adds the baselines of heads/baselines/methods.py (threshold, threshold-warmup, boosted,
                      l2w: one row per budget p and split; fixed-ims, diffbranch: one per lambda and split) and
                      "jei-budget" (one selected JEI-DNN model with per-exit thresholds on P(E^l|x) fitted on V1 to
                      each budget p: one row per p and split, with that model's trial and lam)
    p                 compare, threshold-gated methods: MSDNet budget parameter p (heads/baselines/thresholds.py),
                      else null
    budget_fractions, exit_thresholds, v1_exit_hist   compare, threshold-gated methods: lists (L) of the target
                      exit shares, the thresholds fitted on V1 (on max softmax; on P(E^l|x) for jei-budget;
                      +inf: exit closed; the last is -inf) and the V1 samples exiting at each exit
    split             "v2" (second half of the validation split: selection, temperature, conformal thresholds) or
                      "test"
    trial             trial id, unique in the run (null for single-exit rows)
    exit              1-based exit of a single-exit row (null otherwise)
    lam               lambda of the trial (null for single-exit rows)
    threshold         gate threshold at inference (0.5 for "jei"; NaN for single-exit rows)
    warmup_epochs, lr, weight_decay   the trial's values (gridded or from the settings), and one more column per
                      other gridded TrainSettings field (e.g. bi_switch)
    selected          sweep/train: the trial of its lambda with the best V2 accuracy among its grid combinations
                      (ties: lower V2 cost, then lower id); fit: the chosen trial. Only "jei" rows are selected.
    n_samples         samples in the split
    accuracy, accuracy_ci_low, accuracy_ci_high         top-1 accuracy of the exited predictions and its 95%
                      bootstrap interval over 10 partitions (appendix 9.1.1)
    cost_macs, cost_macs_ci_low, cost_macs_ci_high      expected inference cost (eq. 1) in Mul-Adds, from the cache's
                      cumulative per-exit costs (eq. 18)
    cost_norm, cost_norm_ci_low, cost_norm_ci_high      cost_macs / IC^L
    ece, ece_temp     ECE of the exited max probability, 15 equal-mass bins (eq. 19), before / after temperature
    temperature       temperature fitted on the V2 exited logits (the same value in both splits' rows)
    conformal_alphas  list: the requested alphas (0.01 .. 0.20)
    coverage_<m>, inefficiency_<m>      lists aligned with conformal_alphas: empirical coverage and mean set size,
                      m in general, ims, strict, gated (appendix 9.3; thresholds fitted on V2)
    reported_alpha    0.05, the target of the 9.3 reporting rule
    reported_coverage_<m>, reported_inefficiency_<m>, reported_alpha_used_<m>   the 9.3 rule: alpha' lowered
                      from 0.05 until the empirical coverage reaches 0.95; the inefficiency there
    exit_hist         list (L): samples exiting at each exit
    exit_acc_exited   list (L): accuracy of each exit's IM on the samples that exit there (NaN where none)
    exit_acc_all      list (L): accuracy of each exit's IM on all samples (figure 3b)
    epochs            bi-level epochs until the kept (best-on-V2) state; warm-up epochs for single-exit rows;
                      compare: epochs of the kept IM state for threshold, boosted, l2w (no warm-up/bi-level split)
    seconds           wall time of the stacked pass that trained the trial divided by its number of trials (the
                      warm-up time for single-exit rows); compare baselines: the method's training time divided by
                      its number of operating points

Columns of history.parquet (JEI-DNN trials of sweep, train, fit and compare's jei part; every value measured on V2
after the epoch, as heads/train/bilevel.py measures it for early stopping):
    trial, group      the trial id (as in results.parquet) and its stacked pass (heads.json)
    lam, lr, weight_decay, warmup_epochs   what identifies the trial, as in results.parquet, and one more column
                      per other gridded TrainSettings field
    phase             "warmup" (the IMs' warm-up the trial starts from, epochs 1..warmup_epochs; shared by the
                      trials of one (lr, weight_decay) pair, repeated for each) or "bilevel"
    epoch             1-based within the phase; a bi-level row of epoch == results' `epochs` is the kept state
    accuracy          this epoch's state: warm-up, the mean over the trained IMs of each one's accuracy on all V2
                      samples; bi-level, the accuracy at the exits taken (gate threshold 0.5)
    cost, objective   bi-level, this epoch's state: mean normalised cost at the exits taken, and the early-stopping
                      objective mean(CE + lam IC_norm) there; NaN for warm-up rows
    best_accuracy, best_cost, best_objective   the kept state after this epoch (warm-up: the mean over IMs of each
                      one's best accuracy so far, cost and objective NaN; bi-level: the state with the lowest
                      objective so far, the one results.parquet evaluates)
    improved          bi-level: this epoch's state became the kept one; warm-up: null
    active            bi-level: the trial trains on after this epoch (no early stop, epochs left); warm-up: null
    im_accuracy       warm-up: list, each trained IM's accuracy this epoch; bi-level: null
"""
import hashlib
import json
import math
import os
import tempfile
from pathlib import Path

import torch

import pyarrow as pa
import pyarrow.parquet as pq

SETTINGS = "settings.json"
RESULTS = "results.parquet"
HEADS = "heads.safetensors"
HEADS_INDEX = "heads.json"
HISTORY = "history.parquet"
META_SETTINGS = b"jei.settings"
META_FINGERPRINT = b"jei.cache_fingerprint"
META_HASH = b"jei.settings_hash"
META_DIGEST = b"jei.rows_sha256"
MATCHED = "matched_costs.csv"
PARTS = "methods"
PLOTS = "*.png"


class RunFileError(ValueError):
    """A damaged or foreign file in a run directory (one-line message naming it and what to do)."""


def lock_run(run: Path):
    """The run directory's writer lock (cache/lock.py); LockedError names the process that holds it."""
    from cache.lock import acquire
    return acquire(Path(run))


def clear_outputs(run: Path) -> None:
    """Removes what an earlier run left that the new one may not rewrite (results, plots, matched costs, method
    parts), so that no file of the old run is ever read as the new one's."""
    run = Path(run)
    for path in [run / RESULTS, run / HISTORY, run / MATCHED, *run.glob(PLOTS), *(run / PARTS).glob("*.parquet")]:
        path.unlink(missing_ok=True)


def _read_json(path: Path):
    try:
        with open(path) as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as err:
        raise RunFileError(f"{path} is damaged ({err}); delete it, or rerun with --overwrite") from None


def _atomic_write(path: Path, write) -> None:
    """Call write(tmp_path) on a temporary file next to path, then rename it over path (atomic on POSIX)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)   # mkstemp makes 0600 files; results are meant to be shared like any file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: Path, obj) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, default=_jsonable)
            f.write("\n")
    _atomic_write(path, write)


def _jsonable(value):
    # numpy scalars and tuples are the only non-JSON values our settings hold
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def settings_hash(identity: dict) -> str:
    """Short hash of what determines a run's numbers (settings, lambdas, grid, cache fingerprint)."""
    text = json.dumps(identity, sort_keys=True, default=_jsonable)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_settings(run: Path) -> dict | None:
    path = Path(run) / SETTINGS
    if not path.exists():
        return None
    settings = _read_json(path)
    if not isinstance(settings, dict):
        raise RunFileError(f"{path} is not a run's settings file; delete it, or rerun with --overwrite")
    return settings


def write_settings(run: Path, settings: dict) -> None:
    write_json(Path(run) / SETTINGS, settings)


def write_results(run: Path, rows: list[dict], settings: dict) -> None:
    """results.parquet from one dict per row; the settings and fingerprint go into the schema metadata."""
    table = pa.Table.from_pylist(rows)
    metadata = dict(table.schema.metadata or {})
    metadata[META_SETTINGS] = json.dumps(settings, default=_jsonable).encode()
    metadata[META_FINGERPRINT] = str(settings["cache"]["fingerprint"]).encode()
    table = table.replace_schema_metadata(metadata)
    _atomic_write(Path(run) / RESULTS, lambda tmp: pq.write_table(table, tmp))


def read_results(run: Path) -> tuple[list[dict], dict]:
    """(rows as dicts, settings from the Parquet metadata); a clear error when RUN holds no results."""
    path = Path(run) / RESULTS
    if not path.exists():
        raise FileNotFoundError(f"{run} holds no {RESULTS} (not a run directory, or the run did not finish)")
    try:
        table = pq.read_table(path)
        settings = json.loads(table.schema.metadata[META_SETTINGS])
    except (pa.ArrowException, OSError, ValueError, KeyError, TypeError) as err:
        raise RunFileError(f"{path} is not a readable results file of this program ({str(err)[:120]}); rerun the "
                           "command that made the run") from None
    current = read_settings(run)
    if current is not None and (current.get("settings_hash") != settings.get("settings_hash")
                                or current.get("status") != "complete"):
        raise RunFileError(f"{path} was left by an earlier run: {run} now holds a run that did not finish "
                           f"(status {current.get('status')!r}); rerun the command that made it")
    return table.to_pylist(), settings


def uniform_rows(rows: list[dict]) -> list[dict]:
    """Every row with every column (None where absent), so that Parquet sees one schema."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return [{k: r.get(k) for k in keys} for r in rows]


def write_history(run: Path, rows: list[dict], settings_hash_: str) -> None:
    """RUN/history.parquet: one row per trial and epoch trained (columns above), the settings_hash in the metadata."""
    table = pa.Table.from_pylist(uniform_rows(rows))
    table = table.replace_schema_metadata({META_HASH: settings_hash_.encode()})
    _atomic_write(Path(run) / HISTORY, lambda tmp: pq.write_table(table, tmp))


def write_part(run: Path, name: str, rows: list[dict], settings_hash_: str) -> None:
    """RUN/methods/<name>.parquet: the finished rows of one method of a `compare` run."""
    table = pa.Table.from_pylist(uniform_rows(rows))
    table = table.replace_schema_metadata({META_HASH: settings_hash_.encode(), META_DIGEST: _rows_digest(table)})
    folder = Path(run) / PARTS
    folder.mkdir(exist_ok=True)
    _atomic_write(folder / f"{name}.parquet", lambda tmp: pq.write_table(table, tmp))


def read_part(run: Path, name: str, settings_hash_: str) -> list[dict] | None:
    """The rows write_part stored for `name`, or None when absent or written under other settings."""
    path = Path(run) / PARTS / f"{name}.parquet"
    if not path.exists():
        return None
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        raise RunFileError(f"{path} is damaged ({str(err)[:120]}); delete it to recompute {name}") from None
    meta = table.schema.metadata or {}
    if meta.get(META_HASH, b"").decode() != settings_hash_:
        return None
    if meta.get(META_DIGEST) != _rows_digest(table):
        raise RunFileError(f"{path} does not match the digest stored with it (edited or damaged); delete it to "
                           f"recompute {name}")
    return table.to_pylist()


def _rows_digest(table) -> bytes:
    """sha256 of a table's rows as Python values (what read_part returns), independent of its metadata."""
    text = json.dumps(table.to_pylist(), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest().encode()


def nearest_lambda(rows: list[dict], lam: float, split: str | None = None) -> dict:
    """The selected JEI-DNN row (of `split`, when given) whose lambda is nearest `lam` in log space (ties: the lower
    trial id): the model `report --lam`, `predict --lam` and EarlyExitModel.from_run mean."""
    if not (lam > 0 and math.isfinite(lam)):
        raise ValueError(f"lambda must be a finite number > 0, got {lam}")
    chosen = [r for r in rows if r["method"] == "jei" and r.get("selected") and split in (None, r["split"])]
    if not chosen:
        raise ValueError("the run has no selected JEI-DNN model")
    return min(chosen, key=lambda r: (abs(math.log(r["lam"]) - math.log(lam)), r["trial"]))


def write_csv(path: Path, rows: list[dict]) -> None:
    """A CSV with one line per dict (columns: the keys of the first row), written atomically."""
    import csv

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    _atomic_write(Path(path), write)


def save_heads(run: Path, groups: list[dict], settings_hash_: str) -> None:
    """groups: [{"group": name, "state": StackedHeads.state_dict(), ...JSON-able keys}] -> heads.safetensors
    (tensor "g<name>/<key>") and heads.json (every group's other keys, in order)."""
    from safetensors.torch import save_file

    tensors = {f"g{g['group']}/{name}": value.detach().to("cpu").contiguous()
               for g in groups for name, value in g["state"].items()}
    index = {"settings_hash": settings_hash_, "groups": [{k: v for k, v in g.items() if k != "state"} for g in groups]}
    _atomic_write(Path(run) / HEADS, lambda tmp: save_file(tensors, tmp))
    write_json(Path(run) / HEADS_INDEX, index)


def load_heads(run: Path) -> dict | None:
    """The heads index with each group's state_dict under "state", or None when RUN holds no heads."""
    from safetensors.torch import load_file

    run = Path(run)
    if not (run / HEADS).exists() or not (run / HEADS_INDEX).exists():
        return None
    index = _read_json(run / HEADS_INDEX)
    try:
        tensors = load_file(run / HEADS)
        groups = index["groups"]
        for group in groups:
            prefix = f"g{group['group']}/"
            group["state"] = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    except Exception as err:   # safetensors' own error types, or an index of another shape
        raise RunFileError(f"{run / HEADS} (with {HEADS_INDEX}) cannot be read ({str(err)[:120]}); delete both to "
                           "retrain") from None
    _check_heads(run, groups)
    return index


def _check_heads(run: Path, groups: list[dict]) -> None:
    """Trained heads re-used from disk must be finite floats shaped for the run's cache (exit dims and classes
    from settings.json, written with them)."""
    cache = (read_settings(run) or {}).get("cache") or {}
    dims, k = [e.get("dim") for e in cache.get("exits") or []], cache.get("num_classes")
    expected = {"gate_weight": (len(dims) - 1, 4), "gate_bias": (len(dims) - 1,)}
    for l, d in enumerate(dims):
        expected.update({f"im_weight.{l}": (d, k), f"im_bias.{l}": (k,)})
    for group in groups:
        for name, value in group["state"].items():
            if name == "epochs_trained":
                continue
            where = f"{run / HEADS}: tensor g{group['group']}/{name}"
            if not value.is_floating_point():
                raise RunFileError(f"{where} is {value.dtype}, not floating point; delete {HEADS} to retrain")
            if not bool(torch.isfinite(value).all()):
                raise RunFileError(f"{where} holds NaN/Inf; delete {HEADS} to retrain")
            want = expected.get(name)
            if dims and k and (want is None or tuple(value.shape[1:]) != want):
                raise RunFileError(f"{where} has shape {tuple(value.shape)}, but the run's cache needs (trials, "
                                   f"{', '.join(map(str, want or ('?',)))}); delete {HEADS} to retrain")

"""`train`, `sweep`, `fit`, `compare` and `report`: stage two from a feature cache to a run directory and its plots.

    python pipeline.py train   --cache CACHE --lam 0.5 --out RUN
    python pipeline.py sweep   --cache CACHE --lambdas 0.01:10 --out RUN --grid warmup_epochs=1:5 --grid lr=0.01,0.003
    python pipeline.py fit     --cache CACHE --target-cost 0.4 --out RUN
    python pipeline.py compare --cache CACHE --lambdas 0.01:10 --out RUN [--methods jei,threshold,boosted,...]
    python pipeline.py report  RUN [--lam 1.0]

--cache may be left out when exactly one complete cache exists under cache/; --out defaults to
runs/<command>-<settings hash>. The training options mirror heads.train.bilevel.TrainSettings (appendix 9.1.2 defaults);
torch and the training code are imported only when a command runs.
"""
import logging
import math
from pathlib import Path

import click

MAX_LAMBDAS = 10_000        # lambdas x grid values of one run: beyond this a typo, not a sweep
MAX_EPOCHS = 100_000
MAX_BUDGET_GB = 1e6          # --memory-budget: beyond this a typo (or inf), not a machine
MIN_VAL_ROWS, MIN_TEST_ROWS = 20, 10   # V2 (half of val) and test feed bootstraps over 10 partitions

log = logging.getLogger(__name__)


class FiniteFloat(click.ParamType):
    """A float that is neither NaN nor +-Inf (click's FLOAT accepts both)."""
    name = "float"

    def convert(self, value, param, ctx):
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


FINITE = FiniteFloat()
COUNT = click.IntRange(1, MAX_EPOCHS)

TRAIN_OPTIONS = (
    click.option("--recipe", type=click.Choice(["converged", "paper"]), default="converged", show_default=True,
                 help="A named set of the options below (explicit options override it): converged = IMs warmed up "
                      "until their V2 accuracy stops improving (at most 30 epochs), then only the gates learn for 4 "
                      "epochs (uniform IM loss, ExitIfMin targets, no CLASSIFIER phase); paper = Algorithm 1 as "
                      "printed (2 warm-up epochs, eq. 30, ExitSubsequent, switches every 200 batches)."),
    click.option("--lr", type=FINITE, default=None, help="Adam learning rate (default 0.01)."),
    click.option("--weight-decay", type=FINITE, default=None, help="Adam L2 weight decay (default 5e-4)."),
    click.option("--batch-size", type=COUNT, default=None,
                 help="Mini-batch size (default 64; 256 for SVHN as in the paper)."),
    click.option("--max-epochs", type=COUNT, default=None,
                 help="Warm-up + bi-level epochs at most (converged 34; paper: the appendix's for the cache's "
                      "dataset, CIFAR-10/SVHN 15, CIFAR-100-LT 20, CIFAR-100 30; else 15)."),
    click.option("--warmup-epochs", type=click.IntRange(0, MAX_EPOCHS), default=None,
                 help="Warm-up epochs of the IMs, the most with --warmup-patience (paper 2; converged 30)."),
    click.option("--warmup-patience", type=click.IntRange(0, MAX_EPOCHS), default=None,
                 help="Stop the warm-up once the IMs' mean V2 accuracy gained < 0.1 pp in this many epochs, at "
                      "most --warmup-epochs epochs (converged 3; 0 = exactly --warmup-epochs, the paper)."),
    click.option("--bi-switch", type=COUNT, default=None,
                 help="Batches between GATE/CLASSIFIER switches (paper 200; converged: never, GATE only)."),
    click.option("--patience", type=COUNT, default=None, help="Epochs without a better V2 objective (default 4)."),
    click.option("--targets", type=click.Choice(["subsequent", "ifmin"]), default=None,
                 help="Gate targets: ExitSubsequent (eq. 31, paper) or ExitIfMin (eq. 32, converged)."),
    click.option("--full-gradient/--no-full-gradient", default=None, help="JEI-DNN-FULL: eq. 29 (default off)."),
    click.option("--im-loss", type=click.Choice(["weighted", "uniform"]), default=None,
                 help="IM loss: weighted by P(G=l|x) (eq. 30, paper) or plain cross-entropy (uniform, converged)."),
    click.option("--gate-weight-cap", type=FINITE, default=None,
                 help="Cap on the gates' class-imbalance weight n_neg/n_pos (default 2; 1 = unweighted BCE)."),
    click.option("--seed", type=click.IntRange(0, 2 ** 63 - 1), default=None,
                 help="Seed of weights and batch order (default 0)."),
    click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)."),
    click.option("--threads", type=click.IntRange(1, 1024), default=None,
                 help="torch (and numba) threads of stage two (default on a CPU: the cores the load average leaves "
                      "free; README, 'Threads', says why)."),
)
RUN_OPTIONS = (
    click.option("--cache", "cache_path", type=click.Path(path_type=Path), default=None,
                 help="Feature cache (default: the only complete cache under cache/)."),
    click.option("--out", type=click.Path(path_type=Path), default=None,
                 help="Run directory (default: runs/<command>-<settings hash>)."),
    click.option("--overwrite", is_flag=True, help="Replace a run of other settings at --out."),
    click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bars on stderr."),
    click.option("--tensorboard", type=click.Path(path_type=Path), default=None, metavar="DIR",
                 callback=lambda ctx, param, value: _tensorboard(ctx, param, value),
                 help="Also write the training history's scalars (history.parquet) for TensorBoard into DIR "
                      "(needs the tensorboard package)."),
)
def _budget(ctx, param, value):
    if value is not None and not 0 < value <= MAX_BUDGET_GB:
        raise click.BadParameter(f"{value:g}: expected GB in (0, {MAX_BUDGET_GB:g}]", ctx, param)
    return value


MEMORY_OPTIONS = (
    click.option("--memory-budget", type=FINITE, default=None, metavar="GB", callback=_budget,
                 help="GiB stage two may hold: splits that do not fit stream from the store (default: 80% of the "
                      "memory available at start)."),
    click.option("--stream/--resident", "stream", default=None,
                 help="Stream every split from the store / hold every split in memory (default: resident when "
                      "the splits fit --memory-budget, streamed otherwise)."),
)
TRAIN_FIELDS = ("lr", "weight_decay", "batch_size", "max_epochs", "warmup_epochs", "warmup_patience", "bi_switch",
                "patience", "targets", "full_gradient", "im_loss", "gate_weight_cap", "seed", "device")


def _options(options):
    def decorate(f):
        for option in reversed(options):
            f = option(f)
        return f
    return decorate


def _train_settings(kwargs: dict, cache_path):
    """TrainSettings from the options given; the others take the paper's value for the cache's dataset (appendix
    9.1.2: max epochs, SVHN's batch size) or the dataclass default."""
    import torch

    from cache.store import CacheError, open_cache
    from heads.train.bilevel import DEFAULT_RECIPE, PAPER_DATASET_DEFAULTS, RECIPES, TrainSettings
    from heads.cpu import use_threads
    recipe = RECIPES[kwargs.pop("recipe", None) or DEFAULT_RECIPE]
    threads = kwargs.pop("threads", None)
    given = {k: kwargs.pop(k) for k in TRAIN_FIELDS}
    given = {k: v for k, v in given.items() if v is not None}
    try:
        with open_cache(cache_path) as cache:
            dataset = cache.manifest["dataset"]["name"]
            rows = {split: cache.num_rows(split) for split in cache.splits}
    except CacheError as err:
        raise click.UsageError(str(err)) from None
    if rows.get("val", 0) < MIN_VAL_ROWS or rows.get("test", 0) < MIN_TEST_ROWS:
        raise click.UsageError(f"{cache_path} has {rows.get('val', 0)} validation and {rows.get('test', 0)} test "
                               f"rows: stage two needs at least {MIN_VAL_ROWS} and {MIN_TEST_ROWS} (its intervals "
                               "bootstrap over 10 partitions of V2, half the validation split, and of test); "
                               "extract with a larger --limit")
    if given.get("batch_size", 0) > rows["train"]:
        raise click.BadParameter(f"{given['batch_size']} exceeds the cache's {rows['train']} training rows",
                                 param_hint="--batch-size")
    given = {**PAPER_DATASET_DEFAULTS.get(dataset, {}), **recipe, **given}
    given.setdefault("device", "cuda" if torch.cuda.is_available() else "cpu")
    _check_device(given["device"])
    use_threads(given["device"], threads)
    try:
        return TrainSettings(**given)
    except ValueError as err:
        raise click.UsageError(str(err)) from None


def _memory(kwargs: dict):
    """MemorySettings from --memory-budget and --stream/--resident (removed from kwargs)."""
    from heads.train.stream import MemorySettings
    stream = kwargs.pop("stream")
    return MemorySettings({None: "auto", True: "stream", False: "resident"}[stream], kwargs.pop("memory_budget"))


def _check_device(name: str):
    import torch
    try:
        device = torch.device(name)
    except RuntimeError:
        raise click.BadParameter(f"unknown device {name!r} (cpu, cuda, cuda:1, ...)", param_hint="--device") from None
    if device.type not in ("cpu", "cuda"):
        raise click.BadParameter(f"{name!r}: stage two runs on cpu or cuda", param_hint="--device")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise click.BadParameter(f"{name!r} asked for, but torch sees {torch.cuda.device_count()} CUDA device(s)",
                                 param_hint="--device")


def _cache(path):
    from cache.store import CacheError, find_default_cache
    if path is not None:
        return path
    try:
        return find_default_cache()
    except CacheError as err:
        raise click.UsageError(str(err)) from None


def _parsed(parse, hint):
    """A click callback that parses with heads.sweep.lambdas' parser and turns its ValueError into a usage error."""
    def callback(ctx, param, value):
        if value is None:
            return None
        from heads.sweep import lambdas
        count = str(value).split(":")[2:3]
        if count and count[0].strip().isdigit() and int(count[0]) > MAX_LAMBDAS:   # before allocating them
            raise click.BadParameter(f"{value!r}: at most {MAX_LAMBDAS} lambdas", param_hint=hint)
        try:
            return getattr(lambdas, parse)(value)
        except ValueError as err:
            raise click.BadParameter(str(err), param_hint=hint) from None
    return callback


def _thresholds(ctx, param, value):
    if value.strip().lower() == "none":
        return ()
    try:
        values = tuple(float(v) for v in value.split(","))
    except ValueError:
        values = ()
    if not values or any(not 0 < v < 1 for v in values):
        raise click.BadParameter(f"{value!r}: expected thresholds in (0, 1) as a,b,c, or 'none'",
                                 param_hint="--thresholds")
    return values


THRESHOLD_OPTION = click.option(
    "--thresholds", default="0.2,0.35,0.65,0.8", show_default=True, callback=_thresholds,
    help="Gate thresholds besides 0.5 traced for the selected models (rows method=jei-threshold), or 'none'.")


def _run(work):
    """Runs a stage-two job; bad input and run-directory conflicts become one-line errors."""
    from torchrun import OtherRankFailed
    try:
        return work()
    except ValueError as err:
        raise click.ClickException(str(err)) from None
    except OtherRankFailed:   # torchrun: the rank that failed printed why
        raise SystemExit(1) from None


def _one_process(command: str):
    """fit and compare do not split their work across torchrun ranks: say so instead of running N copies."""
    import torchrun
    if torchrun.launched():
        raise click.UsageError(f"{command} runs in one process; under torchrun only extract, sweep and train share "
                               "their work across ranks: run `python pipeline.py " + command + " ...`")


def _tensorboard(ctx, param, value):
    if value is None:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise click.ClickException("--tensorboard: the tensorboard package is not installed (pip install "
                                   "tensorboard)") from None
    return value


def write_tensorboard(run: Path, logdir: Path) -> None:
    """RUN/history.parquet as TensorBoard scalars: one event folder per trial (DIR/trial-<id>-lam-<lam>), tags
    <phase>/<column> (accuracy, cost, objective and their best_ values), step = the trial's epochs so far (warm-up,
    then bi-level)."""
    import pyarrow.parquet as pq
    from torch.utils.tensorboard import SummaryWriter

    from heads.results.rundir import HISTORY
    path = Path(run) / HISTORY
    if not path.exists():
        log.warning(f"{path} does not exist: no TensorBoard scalars written")
        return
    trials = {}
    for row in pq.read_table(path).to_pylist():
        trials.setdefault(row["trial"], []).append(row)
    for trial, rows in trials.items():
        warm = sum(r["phase"] == "warmup" for r in rows)
        writer = SummaryWriter(log_dir=str(Path(logdir) / f"trial-{trial}-lam-{rows[0]['lam']:g}"))
        try:
            for r in rows:
                step = r["epoch"] + (warm if r["phase"] == "bilevel" else 0)
                for name in ("accuracy", "cost", "objective", "best_accuracy", "best_cost", "best_objective"):
                    if r[name] is not None and math.isfinite(r[name]):
                        writer.add_scalar(f"{r['phase']}/{name}", r[name], step)
        finally:
            writer.close()
    log.info(f"TensorBoard scalars of {len(trials)} trial(s) in {logdir}")


def _summarise(result, tensorboard=None):
    if result is None:        # a torchrun rank other than 0: rank 0 writes and prints the run
        return
    if tensorboard is not None:
        write_tensorboard(result.path, tensorboard)
    from heads.results.report import results_table
    click.echo(results_table(result.rows))
    for line in result.warnings:
        log.warning(line)
    click.echo(f"run directory: {result.path}")


@click.command("train")
@click.option("--lam", type=FINITE, required=True, help="Cost weight lambda (> 0).")
@_options(RUN_OPTIONS)
@THRESHOLD_OPTION
@_options(MEMORY_OPTIONS)
@_options(TRAIN_OPTIONS)
def train_cmd(lam, cache_path, out, overwrite, progress, thresholds, **kwargs):
    """Train one JEI-DNN model (IMs + gates) from a feature cache, evaluate it, write a run directory."""
    if not lam > 0:
        raise click.BadParameter(f"{lam} must be > 0", param_hint="--lam")
    board = kwargs.pop("tensorboard")
    cache_path = _cache(cache_path)
    memory = _memory(kwargs)
    settings = _train_settings(kwargs, cache_path)
    from heads.sweep.lambdas import SweepSettings
    from heads.sweep.sweep import run_sweep
    result = _run(lambda: run_sweep(_cache(cache_path), SweepSettings((lam,), (), thresholds), settings, out,
                                    command="train", overwrite=overwrite, progress=progress,
                                    memory=memory))
    _summarise(result, board)


@click.command("sweep")
@click.option("--lambdas", default="auto", show_default=True, callback=_parsed("parse_lambda_spec", "--lambdas"),
              help="auto (12 lambdas spanning the cost axis, chosen after the warm-up), auto:N, A:B (20 log-spaced "
                   "points), A:B:N (N points), a,b,c, or one value.")
@click.option("--grid", multiple=True, help="key=values over a TrainSettings field, repeatable: lr=0.01,0.003, "
              "warmup_epochs=1:5 (integer range), weight_decay=1e-5:1e-3:3 (N log-spaced points).")
@_options(RUN_OPTIONS)
@THRESHOLD_OPTION
@_options(MEMORY_OPTIONS)
@_options(TRAIN_OPTIONS)
def sweep_cmd(lambdas, grid, cache_path, out, overwrite, progress, thresholds, **kwargs):
    """Train every lambda (x every grid combination) in one stacked pass, select per lambda on V2, record all."""
    from heads.sweep.lambdas import SweepSettings, check_grid, grid_items, parse_grid
    from heads.sweep.sweep import run_sweep
    board = kwargs.pop("tensorboard")
    try:
        items = grid_items(parse_grid(grid))
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--grid") from None
    cache_path = _cache(cache_path)
    memory = _memory(kwargs)
    settings = _train_settings(kwargs, cache_path)
    try:
        check_grid(settings, items)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--grid") from None
    result = _run(lambda: run_sweep(_cache(cache_path), SweepSettings(lambdas, items, thresholds), settings,
                                    out, overwrite=overwrite, progress=progress, memory=memory))
    _summarise(result, board)


@click.command("fit")
@click.option("--target-cost", type=FINITE, required=True,
              help="Mul-Adds to spend, as a fraction of the full network's (first exit's cost < c <= 1).")
@click.option("--lambdas", default="auto", show_default=True, callback=_parsed("parse_lambda_spec", "--lambdas"),
              help="The sweep whose models are moved to the target: auto, auto:N, A:B, A:B:N, a,b,c, or one value.")
@_options(RUN_OPTIONS)
@THRESHOLD_OPTION
@_options(MEMORY_OPTIONS)
@_options(TRAIN_OPTIONS)
def fit_cmd(target_cost, lambdas, cache_path, out, overwrite, progress, thresholds, **kwargs):
    """The most accurate model on V2 that spends --target-cost: the lambda sweep, each selected model's gates given
    per-exit thresholds fitted on V1 to that budget."""
    _one_process("fit")
    board = kwargs.pop("tensorboard")
    from heads.sweep.fit import FitSettings, fit_target_cost
    try:
        fit = FitSettings(target_cost, lambdas, thresholds)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--target-cost") from None
    cache_path = _cache(cache_path)
    memory = _memory(kwargs)
    settings = _train_settings(kwargs, cache_path)
    result = _run(lambda: fit_target_cost(_cache(cache_path), fit, settings, out, overwrite=overwrite,
                                          progress=progress, memory=memory))
    _summarise(result, board)
    chosen = {r["split"]: r for r in result.rows if r["method"] == "jei-budget" and r["selected"]}
    test, v2 = chosen["test"], chosen["v2"]
    how = (f"one threshold {test['exit_thresholds'][0]:.6g} on P(E|x) for every exit" if math.isnan(test["p"])
           else f"per-exit thresholds on P(E|x) for MSDNet's budget p = {test['p']:.4g}")
    click.echo(f"chosen: lambda {test['lam']:.4g} with {how}, fitted on V1 (V2 cost "
               f"{v2['cost_norm']:.3f}, target {target_cost:g}): test accuracy {test['accuracy']:.4f} "
               f"[{test['accuracy_ci_low']:.4f}, {test['accuracy_ci_high']:.4f}], test cost {test['cost_norm']:.3f} "
               f"of IC^L ({test['cost_macs']:.4g} Mul-Adds), ECE {test['ece']:.4f} -> {test['ece_temp']:.4f} after "
               "temperature")


def _methods(ctx, param, value):
    from heads.sweep.compare import parse_methods
    try:
        return parse_methods(value)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--methods") from None


def _matched(rows, run, split):
    """Prints the matched-cost table (heads/results/matched.py) and writes it to RUN; returns it."""
    from heads.results.matched import matched_costs, matched_table
    from heads.results.rundir import MATCHED, write_csv
    table = _run(lambda: matched_costs(rows, split))
    click.echo(matched_table(table))
    write_csv(Path(run) / MATCHED, table)
    click.echo(f"wrote {Path(run) / MATCHED}")
    return table


@click.command("compare")
@click.option("--methods", default="all", show_default=True, callback=_methods,
              help="all, or a comma-separated list of: jei, threshold, threshold-warmup, boosted, l2w, fixed-ims, "
              "diffbranch.")
@click.option("--lambdas", default="auto", show_default=True, callback=_parsed("parse_lambda_spec", "--lambdas"),
              help="JEI-DNN's sweep and the lambdas of fixed-ims / diffbranch: auto, auto:N, A:B, A:B:N, a,b,c, or "
                   "one value.")
@click.option("--one-process", is_flag=True,
              help="Train every method in this process (default: on a CPU with 2 or more threads, boosted and l2w "
                   "train in a second process on one of them while the rest run here).")
@_options(RUN_OPTIONS)
@THRESHOLD_OPTION
@_options(MEMORY_OPTIONS)
@_options(TRAIN_OPTIONS)
def compare_cmd(methods, lambdas, one_process, cache_path, out, overwrite, progress, thresholds, **kwargs):
    """JEI-DNN and the paper's baselines/ablations from one cache, one shared warm-up, one results.parquet."""
    _one_process("compare")
    board = kwargs.pop("tensorboard")
    from heads.sweep.compare import CompareSettings, run_compare
    cache_path = _cache(cache_path)
    memory = _memory(kwargs)
    settings = _train_settings(kwargs, cache_path)
    try:
        compare = CompareSettings(lambdas, methods, thresholds)
    except ValueError as err:
        raise click.UsageError(str(err)) from None
    result = _run(lambda: run_compare(_cache(cache_path), compare, settings, out, overwrite=overwrite,
                                      progress=progress, memory=memory, parallel=not one_process))
    _summarise(result, board)
    _matched(result.rows, result.path, "test")


@click.command("report")
@click.argument("run", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--lam", type=float, default=None, help="Lambda of the exit decomposition (default: the middle one).")
@click.option("--split", type=click.Choice(["test", "v2"]), default="test", show_default=True)
@click.option("--plots/--no-plots", default=True, show_default=True, help="Write the PNGs into RUN.")
def report_cmd(run, lam, split, plots):
    """Print the results and matched-cost tables of a run directory and write its plots (figures 2, 3, 5, and 9
    for a compare run)."""
    from heads.results.report import results_table, write_compare_plots, write_plots
    from heads.results.rundir import read_results
    try:
        rows, settings = read_results(run)
    except (FileNotFoundError, ValueError) as err:
        raise click.ClickException(str(err)) from None
    identity = settings.get("identity", {})
    click.echo(f"{identity.get('command', 'run')} on {settings['cache']['path']} "
               f"(fingerprint {settings['cache']['fingerprint'][:12]}), settings {settings['settings_hash']}")
    click.echo(results_table(rows, split))
    for line in settings.get("warnings", []):
        log.warning(line)
    table = _matched(rows, run, split)
    if plots:
        for path in _run(lambda: write_plots(rows, run, lam, split) + write_compare_plots(rows, run, table, lam,
                                                                                              split)):
            click.echo(f"wrote {path}")


COMMANDS = (train_cmd, sweep_cmd, fit_cmd, compare_cmd, report_cmd)

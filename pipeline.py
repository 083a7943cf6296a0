#!/usr/bin/env python
"""JEI-DNN on a frozen backbone, in two stages: extract features once, then train exits from the cache.

    python pipeline.py demo                                   # the embedded default, end to end
    python pipeline.py extract --backbone t2t_vit_14 --dataset cifar100 --data-dir DATA --weights CKPT
    python pipeline.py costs   --backbone t2t_vit_14 --num-classes 100 --img-size 224 --json
    python pipeline.py cache info|verify CACHE
    python pipeline.py finetune --backbone t2t_vit_14 --weights CKPT --dataset cifar100 --out TUNED.pth
    python pipeline.py train   --cache CACHE --lam 0.5 --out RUN
    python pipeline.py sweep   --lambdas 0.01:10 --cache CACHE --out RUN
    python pipeline.py compare --cache CACHE --lambdas 0.01:10 --out RUN [--methods jei,threshold,boosted,...]
    python pipeline.py report  RUN
    python pipeline.py predict --run RUN --lam 0.5 IMAGE...

Unexpected faults (full or read-only disk, damaged files) end in one line naming the file (cli/errors.py);
`python pipeline.py --debug COMMAND ...` shows the traceback. Messages go through `logging` to stderr (the result,
tables and paths, to stdout): `--quiet` keeps warnings and errors only, `--verbose` adds debug messages; the
packages only log, this file alone configures logging (configure_logging). This file is only the command group:
every command lives in cli/ (cache.py, extract.py, finetune.py, heads.py, demo.py; predict in deploy/predict.py)
and imports its heavy dependencies when it runs. `pip install -e .` also installs it as the `jei-dnn` command.
"""
import logging
import sys

import click
from tqdm import tqdm

from cli.cache import cache_group
from cli.errors import DEBUG_ENV, Group
from cli.extract import costs_cmd, extract_cmd
from cli.finetune import finetune_cmd
from cli.demo import demo_cmd
from cli.heads import compare_cmd, fit_cmd, report_cmd, sweep_cmd, train_cmd
from deploy.predict import predict_cmd


PACKAGES = ("heads", "cache", "extract", "deploy", "cli", "torchrun", "bench")   # the loggers the options set


class _Formatter(logging.Formatter):
    """INFO as the bare message (the console looks as when the commands printed); the level name before others."""

    def format(self, record):
        message = super().format(record)
        return message if record.levelno == logging.INFO else f"{record.levelname}: {message}"


class TqdmHandler(logging.Handler):
    """Writes each record to the current sys.stderr through tqdm.write, so a line never breaks a progress bar."""

    def emit(self, record):
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


def configure_logging(level: int = logging.INFO) -> None:
    """One stderr handler on the root logger (replacing one installed before: the command line may run several
    times in one process, as in the tests); `level` for this program's loggers, other libraries' stay at WARNING."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, TqdmHandler)]:
        root.removeHandler(handler)
    handler = TqdmHandler()
    handler.setFormatter(_Formatter("%(message)s"))
    root.addHandler(handler)
    for name in PACKAGES:
        logging.getLogger(name).setLevel(level)
    logging.getLogger("__main__").setLevel(level)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--debug", is_flag=True, help=f"Show the traceback of an unexpected error (or set {DEBUG_ENV}=1).")
@click.option("--quiet", "-q", is_flag=True, help="Only warnings and errors on stderr (no progress messages).")
@click.option("--verbose", "-v", is_flag=True, help="Debug messages too.")
def cli(debug, quiet, verbose):
    """Early-exit heads (JEI-DNN) trained from a feature cache of a frozen backbone."""
    if quiet and verbose:
        raise click.UsageError("--quiet and --verbose exclude each other")
    configure_logging(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)


cli.add_command(demo_cmd)
cli.add_command(extract_cmd)
cli.add_command(costs_cmd)
cli.add_command(cache_group)
cli.add_command(finetune_cmd)
for command in (train_cmd, sweep_cmd, fit_cmd, compare_cmd, report_cmd, predict_cmd):
    cli.add_command(command)

if __name__ == "__main__":
    cli()

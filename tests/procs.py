"""Child processes for the fault-injection and concurrency tests. They come from a forkserver whose only work
was importing the program, so a child starts in milliseconds and inherits no thread pools (a plain fork of the
test process, after it trained on OpenMP threads, can hang in the child)."""
import multiprocessing
import os
import sys
import time

from click.testing import CliRunner

import extract  # noqa: F401  (before timm: extract/_torchvision.py)
import timm  # noqa: F401,E402
from pipeline import cli  # noqa: E402

_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload(["procs"])   # this module's imports; nothing that starts numba's OpenMP pool


def start(target, *args) -> multiprocessing.Process:
    proc = _CONTEXT.Process(target=target, args=args)
    proc.start()
    return proc


def _exit_with(args):
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    torch.set_num_threads(1)
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if result.exit_code:     # what the command said, for the test's captured stderr (the exit code alone is mute)
        import traceback
        sys.stderr.write(f"child {os.getpid()} exit {result.exit_code}: {result.output[-2000:]}\n")
        if result.exc_info and not isinstance(result.exception, SystemExit):
            traceback.print_exception(*result.exc_info, file=sys.stderr)
        sys.stderr.flush()
    os._exit(result.exit_code)


def extraction(args, pause_per_chunk: float = 0.0):
    """`extract args`; pause_per_chunk makes a long extraction (a pause before each chunk's write)."""
    if pause_per_chunk:
        from cache.store import CacheWriter
        write_chunk = CacheWriter.write_chunk

        def slow(self, *a, **kw):
            time.sleep(pause_per_chunk)
            return write_chunk(self, *a, **kw)
        CacheWriter.write_chunk = slow
    _exit_with(args)


def sweep(args, pause: float = 0.0):
    """`sweep args` (or any stage-two command) with a pause before training."""
    if pause:
        from heads.sweep import sweep as module
        train_groups = module.train_groups

        def slow(*a, **kw):
            time.sleep(pause)
            return train_groups(*a, **kw)
        module.train_groups = slow
    _exit_with(args)


def rank_extraction(args, rank: int, world: int, port: int, pause_per_chunk: float = 0.0):
    """One rank of a distributed `extract args`, with the environment torchrun gives its workers (gloo on the
    CPU, the rendezvous on 127.0.0.1:port)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    extraction(args, pause_per_chunk)

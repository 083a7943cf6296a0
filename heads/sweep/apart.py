"""One piece of a run's work in a second process, on a core of its own, while this process goes on with the rest.

    apart = SecondProcess(train_some, job, "l2w")   # train_some(job) in a spawned process, on one torch thread
    ...                                             # this process's own work
    result = apart.result()                         # train_some's return value, or its exception raised here
    apart.stop()                                    # always (a finally): ends the process if it still runs

Why a process: the baselines' training steps are small products whose cost is mostly the per-call overhead of
torch and Python, which one thread spends; a second torch thread in the same process barely helps them, and two
Python threads in one process share one interpreter lock (bench/baselines_apart.py; bench/README.md has the
figures). Why spawn: a forked child inherits torch's and numba's thread pools in whatever state they were, which
OpenMP does not support.

The child ignores Ctrl-C (the terminal sends it to both processes): this process stops it (SIGTERM, which the
child turns into an exit that runs its cleanup, so a file it was writing atomically leaves no temporary), so an
interrupted run leaves what the child finished and no half-trained orphan. On Linux the child also ends when this
process dies without stopping it (prctl PR_SET_PDEATHSIG).
"""
import ctypes
import multiprocessing
import pickle
import signal
import sys


class SecondProcessError(RuntimeError):
    """The second process ended without a result (killed, out of memory)."""


def _stopped(signum, frame):
    raise SystemExit(128 + signum)       # unwinds, so that a file being written atomically leaves no temporary


def _child(target, job, conn):
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _stopped)
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)       # PR_SET_PDEATHSIG = 1
        except OSError:
            pass
    from heads.cpu import use_threads
    use_threads("cpu", 1)
    try:
        message = ("ok", target(job))
    except BaseException as err:                                    # noqa: BLE001 (sent to the parent, re-raised)
        try:
            pickle.dumps(err)
            message = ("error", err)
        except Exception:                                           # noqa: BLE001
            message = ("error", RuntimeError(f"{type(err).__name__}: {err}"))
    try:
        conn.send(message)
        conn.close()
    except OSError:                      # the parent has stopped listening (it is stopping this process)
        pass


class SecondProcess:
    """target(job) in a spawned process on one torch (and numba) thread; target and job must be picklable."""

    def __init__(self, target, job, what: str):
        self.job, self.what = job, what
        ctx = multiprocessing.get_context("spawn")
        self._conn, child_conn = ctx.Pipe(duplex=False)
        self._process = ctx.Process(target=_child, args=(target, job, child_conn), daemon=True)
        self._process.start()
        child_conn.close()
        self._message = None

    def ready(self) -> bool:
        """Whether the child has finished (result() will not wait)."""
        return self._message is not None or self._conn.poll()

    def result(self):
        """Waits for the child; its return value, or the exception it raised (SecondProcessError if it died)."""
        if self._message is None:
            try:
                self._message = self._conn.recv()
            except EOFError:
                self._process.join()
                raise SecondProcessError(
                    f"the second process training {self.what} ended without a result (exit code "
                    f"{self._process.exitcode}; killed or out of memory?); rerun, or add --one-process") from None
            self._process.join()
        kind, value = self._message
        if kind == "error":
            raise value
        return value

    def stop(self) -> None:
        """Ends the child if it still runs (after an error or an interrupt here); idempotent."""
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(5)
            if self._process.is_alive():
                self._process.kill()
                self._process.join()
        self._conn.close()

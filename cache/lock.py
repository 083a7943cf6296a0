"""One writer per cache or run directory: an advisory lock file beside it, holding the owner's pid and host.

    with acquire(Path("cache/x.zarr")):   # a second process gets a LockedError naming the holder
        ...

The lock is `flock` on `<path>.lock`. The kernel drops a flock when its holder dies (SIGKILL included), so a lock
file left behind by a killed process is free to take: the next writer locks it and writes its own pid and host.
The file is removed on release; because another process may have opened it just before, every acquirer checks
after locking that the path still names the file it locked (else it retries on the new file). Locks are per
process: a process that already holds a path may take it again (a resumed writer in the same process).
"""
import atexit
import datetime
import errno
import fcntl
import json
import os
import socket
from pathlib import Path

_HELD: dict[str, "Lock"] = {}   # lock file -> the lock this process holds on it


class LockedError(ValueError):
    """Another live process holds the lock: the path cannot be written now (one-line message naming it)."""


def lock_path(path: Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".lock")


class Lock:
    def __init__(self, path: Path):
        self.path = lock_path(path)
        self.target, self._fd, self._count = Path(path), None, 0

    def acquire(self) -> "Lock":
        if self._fd is not None:
            self._count += 1
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                holder = _read_holder(fd)
                os.close(fd)
                if err.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                raise LockedError(f"{self.target} is being written by another process ({holder}); wait for it "
                                  f"to finish or stop it (its lock: {self.path})") from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)   # the holder released and removed this file just before we locked it: take the new one
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": _now()}).encode())
        self._fd, self._count = fd, 1
        _HELD[str(self.path.resolve())] = self
        return self

    def release(self):
        if self._fd is None:
            return
        self._count -= 1
        if self._count > 0:
            return
        _HELD.pop(str(self.path.resolve()), None)
        try:
            os.unlink(self.path)   # still ours: we hold the flock on it
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {info['pid']} on {info['host']} since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


@atexit.register
def _release_all():
    """A process that ends without releasing (an error in a library caller) still removes its lock files."""
    for lock in list(_HELD.values()):
        lock._count = 1
        lock.release()


def acquire(path) -> Lock:
    """Takes the lock of `path` (or re-enters this process's own); LockedError when another process holds it.
    Release it with .release(), or use it as a context manager."""
    key = str(lock_path(path).resolve())
    return (_HELD.get(key) or Lock(path)).acquire()

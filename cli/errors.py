"""The command line's last line of defence: any fault that reaches the top becomes one line naming the file and
what to do, instead of a traceback. `python pipeline.py --debug COMMAND ...` (or JEI_DEBUG=1) shows the traceback.

The packages raise their own one-line errors (CacheError, ValueError, click's exceptions) where they know the
context; this catches what they cannot foresee: the operating system's refusals (full or read-only disk, a path
under a file), memory exhaustion, and decoding errors of damaged files.
"""
import errno
import os

import click

DEBUG_ENV = "JEI_DEBUG"

# errno -> what to do about it (the file is named before)
ADVICE = {
    errno.ENOSPC: "no space left on the device: free some space and rerun the same command (extractions resume "
                  "where they stopped)",
    errno.EDQUOT: "disk quota exceeded: free some space and rerun the same command",
    errno.EROFS: "read-only file system: choose a writable location (--out)",
    errno.EACCES: "permission denied: choose a location you can write (--out) or fix its permissions",
    errno.EPERM: "operation not permitted: choose a location you can write (--out)",
    errno.EEXIST: "already exists: choose another path, or remove it if it is yours",
    errno.ENOTDIR: "a part of this path is a file, not a folder: choose another path",
    errno.EISDIR: "is a folder where a file was expected: choose another path",
    errno.ENOENT: "no such file or folder: check the path",
    errno.ENAMETOOLONG: "file name too long: choose a shorter path",
}


def debugging(ctx: click.Context | None = None) -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0") or bool(ctx and ctx.find_root().params.get("debug"))


def one_line(err: BaseException) -> str:
    """A one-line message for an unexpected fault."""
    from cache.lock import LockedError
    if isinstance(err, LockedError) or type(err).__name__ == "CacheError":   # already one line, with the fix
        return _first_line(err)
    if isinstance(err, MemoryError):
        return "out of memory: lower --batch-size, or use fewer rows (--limit) or lambdas"
    if isinstance(err, OSError) and err.errno == errno.EEXIST and err.filename and os.path.isfile(err.filename):
        return f"{err.filename}: is a file where a folder is needed: choose another path (--out)"
    if isinstance(err, OSError) and err.errno in ADVICE:
        where = err.filename or "a write"
        if getattr(err, "filename2", None):
            where = f"{where} -> {err.filename2}"
        return f"{where}: {ADVICE[err.errno]}"
    if isinstance(err, OSError) and err.filename:
        return f"{err.filename}: {err.strerror or _first_line(err)}"
    return f"{type(err).__name__}: {_first_line(err)} (rerun with --debug or {DEBUG_ENV}=1 for the traceback)"


def _first_line(err: BaseException) -> str:
    lines = [line for line in str(err).splitlines() if line.strip()]
    return lines[0][:300] if lines else type(err).__name__


class Group(click.Group):
    """A click group whose subcommands' unexpected exceptions become one-line errors (exit status 1)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as err:
            if debugging(ctx):
                raise
            raise click.ClickException(one_line(err)) from None

"""How stage two uses the CPU: numba's kernels run on torch's OpenMP threads, and every one of those threads
flushes denormal floats to zero.

    from heads import cpu
    cpu.configure()             # where stage two starts (use_threads, StackEngine); idempotent
    cpu.match_torch_threads()   # before a parallel kernel: configure(), then numba runs torch's thread count

Nothing happens on import: a process that only imports the package (a notebook, a test, another library) keeps
numba's threading layer and its floating-point flags. Every parallel kernel of the package launches through
match_torch_threads, so the shared pool is always set up before numba's first launch.

Shared threads: numba's OpenMP layer loads libgomp.so.1, the copy torch already loaded, so both share one thread
pool. With numba's own pool (workqueue) torch's idle OpenMP threads spin after every torch op while numba's threads
want the same cores, and the training step slows down (README, "Speed", has the measurement). numba's pool start-up
sets OpenMP's thread count to numba's; it is started here, once, and torch's count restored.

Equal thread counts. A parallel numba kernel runs numba's thread count (by default every core), whatever
torch.set_num_threads or OMP_NUM_THREADS said. With torch on one thread the other pool threads sleep, and every
kernel launch then waits until a sleeping thread is woken and scheduled: on a busy machine a whole scheduler tick,
milliseconds for a kernel of microseconds (bench/README.md has the figures). match_torch_threads, called before
each parallel launch, gives numba torch's current count, so one torch thread means a launch on the calling thread.

Denormals: a confident IM puts probabilities below 1.2e-38 (logit gaps > 87), its softmax, logit gradient and the
products that consume them are then denormal, and x86 handles those in microcode, orders of magnitude slower
(README, "Speed", has the figures; tests/test_cpu.py shows the flush itself). torch.set_flush_denormal
sets flush-to-zero and denormals-are-zero (MXCSR) on the calling thread only, and OpenMP threads that already
exist keep their own MXCSR; so the bits are also set from inside a parallel numba loop that runs on every pool
thread. Values below 1.2e-38 become 0: nothing this program computes depends on them.
"""
import os
import platform

import numba
import numpy as np
import torch
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic

FTZ_DAZ = 0x8040                # MXCSR bits: flush-to-zero (15) and denormals-are-zero (6)
_X86 = platform.machine().lower() in ("x86_64", "amd64")
_configured = False


@intrinsic
def _set_mxcsr_ftz_daz(typingctx):
    """MXCSR |= FTZ_DAZ on the executing thread (x86 SSE control register)."""
    def codegen(context, builder, signature, args):
        i32, ptr_type = ir.IntType(32), ir.IntType(8).as_pointer()
        fnty = ir.FunctionType(ir.VoidType(), [ptr_type])
        module = builder.module
        stmxcsr = module.declare_intrinsic("llvm.x86.sse.stmxcsr", fnty=fnty)
        ldmxcsr = module.declare_intrinsic("llvm.x86.sse.ldmxcsr", fnty=fnty)
        slot = builder.alloca(i32)
        ptr = builder.bitcast(slot, ptr_type)
        builder.call(stmxcsr, [ptr])
        builder.store(builder.or_(builder.load(slot), ir.Constant(i32, FTZ_DAZ)), slot)
        builder.call(ldmxcsr, [ptr])
        return context.get_dummy_value()
    return types.void(), codegen


@numba.njit(parallel=True, cache=True)
def _flush_on_every_thread(marks):
    # many more iterations than threads: every thread of the (static) schedule runs some of them
    for i in numba.prange(marks.shape[0]):
        _set_mxcsr_ftz_daz()
        marks[i] = 1


def _share_torch_threads() -> None:
    try:
        from numba.np.ufunc import omppool  # noqa: F401  (is the OpenMP layer loadable?)
        from numba.np.ufunc.parallel import _launch_threads
    except ImportError:
        numba.config.THREADING_LAYER = "workqueue"
        return
    numba.config.THREADING_LAYER = "omp"
    before = torch.get_num_threads()
    _launch_threads()
    torch.set_num_threads(before)


def flush_denormals() -> bool:
    """Flush denormals to zero on this thread and on every thread of the shared pool; False where unsupported."""
    if not torch.set_flush_denormal(True):
        return False
    if _X86:
        _flush_on_every_thread(np.zeros(64 * max(numba.get_num_threads(), torch.get_num_threads()), np.int8))
    return True


def match_torch_threads() -> None:
    """numba's thread count (for launches from this thread) := torch's, capped at the pool numba started."""
    configure()
    n = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
    if numba.get_num_threads() != n:
        numba.set_num_threads(n)


def use_threads(device: str, threads: int | None = None) -> int:
    """Stage two's torch (and so numba's) thread count: `threads` when given; on a CPU device otherwise the cores
    that are free when the command starts (the cores less the 1-minute load average, at least 1, at most torch's
    own count), since on a busy machine every OpenMP parallel region waits for a descheduled thread (README,
    'Threads', has both measurements); a GPU run keeps torch's count unless told. Returns the count."""
    configure()
    if threads is not None:
        torch.set_num_threads(threads)
    elif torch.device(device).type == "cpu":
        free = (os.cpu_count() or 1) - round(os.getloadavg()[0]) if hasattr(os, "getloadavg") else 1
        torch.set_num_threads(max(1, min(torch.get_num_threads(), free)))
    return torch.get_num_threads()


def configure() -> None:
    """Shared threads, then denormal flushing (idempotent)."""
    global _configured
    if _configured:
        return
    _configured = True
    _share_torch_threads()
    flush_denormals()

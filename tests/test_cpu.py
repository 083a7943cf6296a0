"""heads.cpu: numba's kernels share torch's OpenMP threads, and denormals are flushed on all of them, also when
torch's threads existed before heads configured them; importing the package changes none of it."""
import subprocess
import sys
import textwrap
from pathlib import Path

import numba
import numpy as np
import pytest
import torch

from heads import cpu

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not __import__("platform").machine().lower() in ("x86_64", "amd64"), reason="MXCSR is x86")
def test_denormals_flushed_on_every_thread_after_configure():
    # a fresh process: torch's two OpenMP threads exist (and keep denormals) before heads configures the CPU
    script = textwrap.dedent("""
        import torch
        torch.set_num_threads(2)
        x = torch.full((1_000_000,), 1e-40)        # denormal; an elementwise op this size runs on both threads
        before = int(((x * 2) > 0).sum())
        import numba
        from heads import cpu
        cpu.configure()
        after = int(((x * 2) > 0).sum())
        print(before, after, numba.threading_layer(), torch.get_num_threads())
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": ""})
    before, after, layer, threads = out.stdout.split()
    assert int(before) == 1_000_000 and int(after) == 0
    assert layer == "omp" and threads == "2"


@numba.njit(parallel=True)
def _threads_used(marks):
    for i in numba.prange(marks.shape[0]):
        marks[i] = numba.get_thread_id()


@pytest.mark.parametrize("torch_threads", [1, 2])
def test_parallel_kernels_run_torchs_thread_count(torch_threads):
    """After cpu.match_torch_threads a parallel launch uses as many threads as torch (numba's pool permitting):
    with one torch thread, no pool thread has to be woken."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(torch_threads)
        cpu.match_torch_threads()
        marks = np.full(10_000, -1, dtype=np.int64)
        _threads_used(marks)
        assert len(set(marks.tolist())) == min(torch_threads, numba.config.NUMBA_NUM_THREADS)
    finally:
        torch.set_num_threads(before)
        cpu.match_torch_threads()



def test_stage_two_threads_follow_the_free_cores_and_the_option(monkeypatch):
    """A CPU run uses the cores the load average leaves free (at least one, at most torch's count) unless
    --threads says otherwise; a GPU run keeps torch's count."""
    before = torch.get_num_threads()
    monkeypatch.setattr(cpu.os, "cpu_count", lambda: 2)
    try:
        for load, want in ((0.1, 2), (0.7, 1), (1.2, 1), (5.0, 1)):
            torch.set_num_threads(2)
            monkeypatch.setattr(cpu.os, "getloadavg", lambda: (load, 0.0, 0.0))
            assert cpu.use_threads("cpu") == want == torch.get_num_threads(), load
        torch.set_num_threads(1)
        monkeypatch.setattr(cpu.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
        assert cpu.use_threads("cpu") == 1                      # never more than torch's own count
        assert cpu.use_threads("cpu", 2) == 2 and cpu.use_threads("cuda") == 2 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_importing_every_module_leaves_the_process_as_it_was():
    """Importing every module of every package (and pipeline.py) leaves numba's threading layer, the denormal
    flags of torch's threads and matplotlib's backend as the process had them."""
    packages = [p.parent.name for p in sorted(ROOT.glob("*/__init__.py")) if p.parent.name != "tests"]
    script = textwrap.dedent("""
        import importlib, pkgutil, sys
        import matplotlib
        matplotlib.use("pdf")                     # a backend nothing here would choose
        import numba, torch
        torch.set_num_threads(2)
        x = torch.full((1_000_000,), 1e-40)        # denormal; an elementwise op this size runs on both threads
        state = lambda: (numba.config.THREADING_LAYER, int(((x * 2) > 0).sum()), matplotlib.get_backend())
        before = state()
        names = ["pipeline"]
        for package in sys.argv[1:]:
            names += [package] + [m.name for m in pkgutil.walk_packages([package], prefix=f"{package}.")]
        for name in names:
            importlib.import_module(name)
        print(repr((before, state(), len(names))))
    """)
    out = subprocess.run([sys.executable, "-c", script, *packages], cwd=ROOT, capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "", "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    before, after, imported = eval(out.stdout.strip().splitlines()[-1])
    assert before == ("default", 1_000_000, "pdf") and after == before
    assert imported > 40                          # every module really was imported

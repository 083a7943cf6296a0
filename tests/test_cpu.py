"""heads.cpu: numba's kernels share torch's OpenMP threads, and denormals are flushed on all of them, also when
torch's threads existed before heads was imported."""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not __import__("platform").machine().lower() in ("x86_64", "amd64"), reason="MXCSR is x86")
def test_denormals_flushed_on_every_thread_after_import():
    # a fresh process: torch's two OpenMP threads exist (and keep denormals) before heads is imported
    script = textwrap.dedent("""
        import torch
        torch.set_num_threads(2)
        x = torch.full((1_000_000,), 1e-40)        # denormal; an elementwise op this size runs on both threads
        before = int(((x * 2) > 0).sum())
        import numba
        import heads.gate_features  # noqa: F401
        after = int(((x * 2) > 0).sum())
        print(before, after, numba.threading_layer(), torch.get_num_threads())
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": ""})
    before, after, layer, threads = out.stdout.split()
    assert int(before) == 1_000_000 and int(after) == 0
    assert layer == "omp" and threads == "2"

"""Test-wide settings: offline, deterministic."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module: the same arithmetic in every process of a test (subprocesses run with
    OMP_NUM_THREADS=1), so resumed and uninterrupted runs agree bit for bit, and a small shared machine is not
    oversubscribed."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def logging_as_found():
    """Every invocation of pipeline.py's group configures logging for the process (a stderr handler, this
    program's logger levels): undone after each test, so that no test sees messages because another ran first."""
    import logging

    import pipeline
    yield
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, pipeline.TqdmHandler)]:
        root.removeHandler(handler)
    for name in (*pipeline.PACKAGES, "__main__"):
        logging.getLogger(name).setLevel(logging.NOTSET)

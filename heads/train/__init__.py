"""Training from the cache: splits in memory or streamed (data.py, stream.py), the warm-up and
Algorithm 1's bi-level phase for a stack of trials (bilevel.py), the hand-written training step (engine.py) with
its numba kernels (kernels.py), the one stacked Adam (adam.py) and the non-finite checks (finite.py).
Depends on heads.model; never on sweeps, baselines, results or stage one."""

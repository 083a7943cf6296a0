"""Orchestration of training runs into a run directory: lambda sweeps and grids (sweep.py), cost-targeted fits
(fit.py) and the method comparison (compare.py, JEI-DNN beside heads.baselines; apart.py runs a part of it in a
second process). The only part of stage two that writes run directories."""

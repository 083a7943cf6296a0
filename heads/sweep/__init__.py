"""Orchestration of training runs into a run directory: lambda sweeps and grids (sweep.py), cost-targeted fits
(fit.py) and the method comparison (compare.py, JEI-DNN beside heads.baselines). The only part of stage two
that writes run directories."""

"""Stage two: early-exit heads trained, evaluated and compared from a feature cache alone.

The rule (../shared/DESIGN.md): stage two never imports stage one. Nothing under heads/ imports extract/ (nor
deploy/ or cli/); it reads caches through cache/, which knows no model. tests/test_layout.py checks both, and
that the subpackages below import only the ones listed before them (evaluation needs none of them).

    model/       the exit model: IMs, gates, exit distribution and targets
    train/       data splits, warm-up and bi-level training, the training step and its kernels, Adam
    evaluation/  metrics, calibration, conformal sets, one model's operating points
    baselines/   the paper's baselines and ablations, threshold gating
    results/     the run directory, figures, tables, accuracy at matched cost
    sweep/       sweeps, grids, fits and compare into a run directory
    cpu.py       how the kernels share the CPU with torch
"""

"""Evaluation of exit rules on cached outputs: accuracy, cost, calibration (temperature, ECE), conformal sets and
bootstrap intervals (metrics.py), the rows of one model's operating points (evaluate.py) and accuracy at
matched cost (matched.py). numpy and numba only: nothing here trains."""

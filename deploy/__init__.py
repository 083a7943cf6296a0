"""Deployment: a frozen backbone with trained heads that really exits early (runtime.py) and the `predict`
command on image files (predict.py). The only package that imports both stages: extract/ for the backbone,
heads/ for the heads and their calibration."""

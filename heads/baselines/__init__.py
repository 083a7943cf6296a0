"""The paper's baselines and ablations trained from the same cache and warm-up as JEI-DNN (methods.py), and
threshold gating with MSDNet's budget search (thresholds.py). Depends on heads.model, heads.train and
heads.evaluation."""

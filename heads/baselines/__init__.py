"""The paper's baselines and ablations trained from the same cache and warm-up as JEI-DNN: methods.py (the
methods, their operating points, run_baselines), boosted.py (BoostedNet), l2w.py (L2W-DEN), diffbranch.py
(DiffBranch), common.py (what the IM-trained ones share) and thresholds.py (threshold gating, MSDNet's budget
search). Depends on heads.model, heads.train and heads.evaluation."""

"""A run directory (rundir.py: settings, results Parquet, heads checkpoint, atomic writes, locking) and what is
drawn and printed from it (report.py)."""

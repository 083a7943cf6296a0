"""The command line: one module per command family, each a thin call into the packages (cache.py, extract.py,
finetune.py: stage one; heads.py: stage two; demo.py: the embedded default end to end), and errors.py, the
top-level handler that turns unexpected faults into one line. pipeline.py at the root assembles them."""

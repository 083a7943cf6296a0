"""The exit model: stacked IMs and gates (stack.py), the gates' four statistics (gate_features.py) and the exit
distribution, decisions and surrogate targets (exits.py), equations 4-8, 11, 16-17, 30-32 of the paper.
Imports only torch, numpy, numba and heads.cpu."""

"""Optional compiled kernels (built by setup.py); every caller has a pure torch/NumPy fallback."""

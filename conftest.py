"""Root pytest configuration: what the doctest collection over src/ must not import."""
collect_ignore = ["src/kldiv/__main__.py", "setup.py"]

"""Benchmarks against peers, run from the repository root: `python -m bench.<name>` (results in bench/README.md)."""

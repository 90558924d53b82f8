"""Benchmarks (make bench, docs/benchmarks.md). Run each from the repo root as `python -m bench.<name>`."""

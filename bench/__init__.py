"""Benchmarks: `python -m bench` runs the report."""

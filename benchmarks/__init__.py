"""Benchmarks that need a GPU or minutes: `python -m benchmarks SCENARIO [options]` from the repository root.

Results and how to read them are in docs/benchmarks.md; each scenario's --help says what it measures.
"""

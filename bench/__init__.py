"""Benchmarks for bake-ray: each prints ratios measured side by side in one process.

Run one as ``python -m bench.NAME --help`` from the repository root; results and the
commands that produced them are collected in ``BENCHMARKS.md``.
"""

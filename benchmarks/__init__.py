"""Benchmark suite: curvhook against BackPACK, NNGeometry, curvlinops and torch.func.

Run ``python -m benchmarks.run --help``. Results for one machine are in
``docs/benchmarks.md``. The peers are optional: a library that is not
importable is reported as skipped.
"""

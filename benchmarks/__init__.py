"""The eventcore-trio benchmark harness: ``python -m benchmarks --help``."""

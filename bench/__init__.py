"""Benchmarks beside the test suite (docs/benchmarks.md): `homenet bench …` and scripts."""

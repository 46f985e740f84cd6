"""Benchmarks for rmsprop_jax: ``python -m benchmarks --help``."""

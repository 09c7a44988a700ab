"""Benchmarks: prediction, tiling, loading, training and serving, each printing its figures."""

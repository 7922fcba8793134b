"""Benchmarks: the embedded synthetic sequence and the real MTIL datasets."""

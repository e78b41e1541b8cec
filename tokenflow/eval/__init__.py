"""Reconstruction, understanding and generation benchmarks and scorers."""

"""Benchmarks run by bench/*.py scripts and the ``headwise bench`` command."""

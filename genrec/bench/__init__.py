"""Benchmark harnesses behind ``genrec bench``; ``benchmarks/*.py`` are thin entry points to them."""

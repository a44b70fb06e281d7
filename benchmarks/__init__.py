"""Benchmarks of bit_keras against its peers; the front-ends are the scripts benchmark.py, gpu.py and group_norm.py."""

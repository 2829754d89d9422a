"""fastoptim's benchmark tooling: clocks and in-run references (timing), work counts (work), the shape sets of the
spec's models (shapes, tensors), backend names and skips (backends), the pytest plugin the suites run under
(plugin), the regression compare (compare) and `fastoptim bench` (cli).

The pytest-benchmark suites themselves are the repository's bench/bench_*.py; a wheel carries them as
fastoptim/bench/suite/bench/ (setup.py), so that `fastoptim bench` runs from an installed package too.
"""

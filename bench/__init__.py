"""fastoptim's benchmark suite and its tools (see bench/conftest.py for how to write a benchmark)."""

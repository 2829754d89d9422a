"""fastoptim's benchmark suites (pytest-benchmark); the tooling they use is fastoptim.bench."""

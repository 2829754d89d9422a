"""fastoptim's benchmark suite runs under the plugin fastoptim.bench.plugin (options, fixtures, shape sets); its
docstring says how to write a benchmark."""

from fastoptim.bench.plugin import *  # noqa: F401,F403  (pytest reads hooks and fixtures from this module)

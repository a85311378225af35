"""Speed measurements run by hand (``python -m bench.benchmarks.<name>``); never part of the test suite."""

"""Speed measurements run by hand (``python -m pipelines.benchmarks.<name>``); never part of the test suite."""

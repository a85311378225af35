import os

# Tests never try to download weights (the machines are offline; a download attempt only wastes time).
os.environ.setdefault("SAHN_BENCH_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")

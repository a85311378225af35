"""Running benchmarks: training and evaluation loops, cells, shards, Ray and Ray Train, tracking, planning."""

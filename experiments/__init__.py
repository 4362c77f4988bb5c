"""pagedkv's experiments, each run as ``python -m experiments.NAME`` (memory_share, throughput, kernel_bench)."""

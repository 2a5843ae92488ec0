"""Benchmarks: each prints one table of throughputs measured side by side in one run."""

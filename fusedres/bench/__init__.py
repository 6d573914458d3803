"""Benchmark suite behind ``fusedres bench`` (workloads, timing, roofline, reports)."""

"""Benchmarks: each script writes JSON to bench/results/ (see README)."""

"""Benchmark suites behind `nmsparse bench ...`: each compares against a baseline timed in the same run."""

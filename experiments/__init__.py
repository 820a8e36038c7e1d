"""Scenarios, benchmarks and the ``testbed`` command line."""

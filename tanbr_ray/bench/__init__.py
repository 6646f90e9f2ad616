"""Benchmarks behind `tanbr bench ...`: each returns a JSON-ready dict; the CLI prints and writes it."""

"""Benchmarks that print a table and write it, with the command and the machine, under docs/."""

"""kvbench: a harness for benchmarking KV-cache compression methods."""

__version__ = "0.1.0"

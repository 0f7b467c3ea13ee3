"""Compression-method benchmarks: perplexity by size, on other domains and model families, and what a method costs."""

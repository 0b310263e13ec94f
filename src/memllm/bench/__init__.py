"""Benchmarks: inference speed and memory (`inference`), long-term memory scaling (`ltm`), and the
timer both use (`timing`)."""

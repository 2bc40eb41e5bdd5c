"""Demo material: a tiny synthetic image-caption world for the quickstart, tests and benchmarks."""

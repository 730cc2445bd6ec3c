"""Benchmarks: one module per stage, run by `make bench-*`, each writing bench/results/<name>.json.

Figures are ratios to a baseline measured in the same process (interleaved where possible),
because absolute timings on shared machines are noise."""

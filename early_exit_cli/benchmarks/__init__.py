"""The benchmarks behind `early-exit bench` (and `examples/benchmark_*.py`, which run the same `main`).

- `generate`: early-exit generation against plain `generate`, by accuracy level, with and without vocabulary pruning,
  and at several batch sizes;
- `speculative`: self-speculative decoding against plain `generate`, transformers' `assistant_early_exit` and fixed
  drafters;
- `kernels`: passes of a few new positions through the default model's decoder, stock against packed matmuls.

Each module has `build_parser(prog)` and `main(argv, prog)`; each writes a Markdown report (`--output`), the first
two with a plot beside it. They import torch, so the command line's parser imports them only when one is named.
"""

"""Benchmark passes of a few new positions through the default model's decoder: stock against packed matmuls.

The benchmark is `early_exit_cli.benchmarks.kernels` (also `early-exit bench kernels`); this script runs it with the
same options, e.g.

    python examples/benchmark_kernels.py --output docs/kernels-smollm2-135m.md
"""

from early_exit_cli.benchmarks.kernels import main

if __name__ == "__main__":
    main()

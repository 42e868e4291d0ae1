"""Benchmark early-exit generation against plain `generate` on the default model.

The benchmark is `early_exit_cli.benchmarks.generate` (also `early-exit bench generate`); this script runs it with the
same options, e.g.

    python examples/benchmark_generate.py --output docs/generation-smollm2-135m.md
"""

from early_exit_cli.benchmarks.generate import main

if __name__ == "__main__":
    main()

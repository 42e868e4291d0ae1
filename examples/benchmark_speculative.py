"""Benchmark self-speculative decoding against plain `generate` on the default model.

The benchmark is `early_exit_cli.benchmarks.speculative` (also `early-exit bench speculative`); this script runs it
with the same options, e.g.

    python examples/benchmark_speculative.py --output docs/speculative-smollm2-135m.md
"""

from early_exit_cli.benchmarks.speculative import main

if __name__ == "__main__":
    main()

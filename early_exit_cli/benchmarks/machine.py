"""What the benchmark reports say about the machine they ran on: speed ratios depend on the CPU and its libraries
(the matmul forms `early_exit.kernels.tuning` chooses differ between CPUs)."""

from __future__ import annotations

import os

import torch
import transformers

from early_exit.kernels.tuning import cpu_name


def describe_machine() -> str:
    """CPU model and cores, torch threads, and the versions of torch and transformers, for a report."""
    onednn = "available" if torch.backends.mkldnn.is_available() else "unavailable"
    return (
        f"{cpu_name()} ({os.cpu_count()} cores), {torch.get_num_threads()} threads; torch {torch.__version__} "
        f"(oneDNN {onednn}), transformers {transformers.__version__}"
    )

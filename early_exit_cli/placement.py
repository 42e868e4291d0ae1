"""Where the commands and the benchmarks find a model: the shipped heads, and the device and dtype asked for."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

#: The heads shipped with the repository for the default model (not installed with the package).
SHIPPED_HEADS = Path(__file__).resolve().parents[1] / "adapters" / "SmolLM2-135M-Instruct-exits"


def model_placement(args: argparse.Namespace) -> dict[str, Any]:
    """The `from_pretrained` keyword arguments that `--device` and `--dtype` ask for (see
    `parser.add_placement_arguments`); one not given is left out, so the library's default holds. A device that torch
    does not know, or whose hardware this machine lacks, ends the command in one line."""
    placement: dict[str, Any] = {}
    if args.device:
        try:
            kind = torch.device(args.device).type
        except RuntimeError as error:
            raise SystemExit(
                f"--device {args.device} is not a device torch knows; use e.g. cpu, cuda, cuda:1 or mps."
            ) from error
        available = {"cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}
        if kind in available and not available[kind]():
            raise SystemExit(f"--device {args.device}: this machine's torch has no {kind} device; use --device cpu.")
        placement["device_map"] = args.device
    if args.dtype:
        placement["dtype"] = getattr(torch, args.dtype)
    return placement

"""Where the library keeps what it makes once per machine: the default model's de-quantized copy, the matmul forms
timed on this CPU."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """`$EARLY_EXIT_CACHE`, or `~/.cache/early-exit`."""
    return Path(os.environ.get("EARLY_EXIT_CACHE") or Path.home() / ".cache" / "early-exit")

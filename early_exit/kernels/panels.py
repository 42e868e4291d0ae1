"""The project's own C++ kernel for `x @ weight.T` with 1-16 rows of float32: the weight stored in column panels
(`native/panels.cpp`), read once per call for up to 16 rows, four of which accumulate in registers at a time.

On a 2-core Zen 4 EPYC, four rows through SmolLM2-135M's fused gate/up matrices (3072x576, ten streamed from memory
in turn) take 234 us each against 274 for oneDNN's packed product and 291 for MKL's `weight @ x.T`; through its down
projections (576x1536) 124 us against 162; one row about what MKL's two-column product takes (224 us against 227).
Beyond four rows each further group of four sweeps the panel again from the cache, so 8-16 rows lose to oneDNN
(3072x576, 8 rows: 534 us against 329). A row's result is the same whatever rows share its call. It is one of the
forms that `early_exit.kernels.tuning` times, so it runs only where it measures fastest. (`early-exit bench kernels
--dtypes fp32 --rows 1 4 --repeats 10 --sweep --sweep-rows 1 2 4 8 16 --sweep-shapes 3072x576 960x576`.)

The kernel is compiled on first use with the machine's C++ compiler (`torch.utils.cpp_extension`, with ninja) for the
vector instructions torch itself runs with, and kept in torch's extension folder; where it cannot be built (no
compiler) the form is left out with a warning, and `EARLY_EXIT_NATIVE_KERNELS=0` leaves it out without trying.
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path
from types import ModuleType

import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)

SOURCE = Path(__file__).with_name("native") / "panels.cpp"

#: Set to "0" to leave the kernel out (no build is tried).
SWITCH = "EARLY_EXIT_NATIVE_KERNELS"

#: Compiler flags for the vector instructions torch found on this CPU (`torch.backends.cpu.get_cpu_capability`);
#: never `-march=native`, so that a build kept in a shared folder runs on any CPU with the same capability.
_VECTOR_FLAGS = {"AVX512": ["-mavx512f", "-mavx512vl", "-mfma"], "AVX2": ["-mavx2", "-mfma"]}


@cache
def native_panels() -> ModuleType | None:
    """The compiled kernel module (built on the first call of the process, or loaded from an earlier build), or
    `None` where it is switched off or cannot be built."""
    if os.environ.get(SWITCH, "1") == "0":
        return None
    capability = torch.backends.cpu.get_cpu_capability()
    name = f"early_exit_panels_{capability.lower()}"
    try:
        from torch.utils import cpp_extension

        if not _built(name):
            logger.warning("Compiling the panels matmul kernel for this machine (once, about 30 s).")
        return cpp_extension.load(
            name=name, sources=[str(SOURCE)], extra_cflags=["-O3", *_VECTOR_FLAGS.get(capability, [])]
        )
    except Exception as error:  # no compiler, no ninja, a failed build: the other forms remain
        logger.warning(
            "The panels matmul kernel could not be built (%s); few-row products use the library forms. Set %s=0 to "
            "skip the attempt.",
            str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__,
            SWITCH,
        )
        return None


def _built(name: str) -> bool:
    """Whether torch's extension folder holds a build of `name` (so that loading it takes no compilation)."""
    from torch.utils import cpp_extension

    try:  # a private helper of torch's: where it is gone, the build is only announced
        return any(Path(cpp_extension._get_build_directory(name, False)).glob(f"{name}*.so"))
    except (AttributeError, TypeError, OSError):
        return False


def pack_panels(weight: torch.Tensor) -> torch.Tensor:
    """`weight` (out x in, float32) as the kernel's column panels; as much memory as the weight (plus the padding of
    the last panel)."""
    kernel = native_panels()
    if kernel is None:
        raise RuntimeError(f"the panels kernel is not available (see the warning above, or {SWITCH})")
    return kernel.pack_panels(weight.detach())


def panel_linear(rows: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """`rows @ weight.T` for 2-D float32 `rows` and `packed = pack_panels(weight)`: `(len(rows), out_features)`."""
    return native_panels().panel_linear(rows, packed, out_features)

"""The project's own C++ kernel for `x @ weight.T` with 1-16 rows of float32: the weight stored in column panels
(`native/panels.cpp`), read once per call while up to eight rows accumulate in registers.

On a 2-core Zen 4 EPYC, through SmolLM2-135M's fused gate/up matrices (3072x576, ten streamed from memory in turn)
one row takes 228 us against 231 for MKL's two-column product, four rows 244 us against 296 for oneDNN's packed
product and 283 for MKL's `weight @ x.T`, and eight rows 321 us against oneDNN's 320; all 210 of the model's linears
take 14.8 ms at one row, 15.3 at four and 20.6 at eight (oneDNN: 22.3, 20.0, 23.1). Sixteen rows take two sweeps of
eight, and lose to oneDNN (51.8 ms against 29.5). A row's result is the same whatever rows share its call. It is one
of the forms that `early_exit.kernels.tuning` times, so it runs only where it measures fastest. (The sweep table of
`early-exit bench kernels --repeats 30 --dtypes fp32 --sweep --sweep-rows 1 2 4 8 16 --sweep-shapes 3072x576
960x576`.)

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

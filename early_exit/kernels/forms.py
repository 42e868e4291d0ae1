"""The ways of computing `x @ weight.T + bias` that `linear_for_rows` chooses between.

On CPUs `torch.nn.functional.linear` does not always read a weight matrix near the memory bandwidth when it
multiplies it by few rows, and which other form does better depends on the CPU and its math libraries: on a Zen 4
EPYC, MKL's two-column product streams a weight 2-2.5x as fast as `F.linear`'s one-row product, while on a Sapphire
Rapids Xeon it is 2.5x slower and `F.linear` is near the bound for 1-3 rows. So the forms are timed on the machine
itself (`early_exit.kernels.tuning`), not chosen by rules. Besides the libraries' products there is the project's
own kernel for few rows (`early_exit.kernels.panels`), timed alike.
"""

from __future__ import annotations

from enum import Enum

import torch
import torch.nn.functional as F
from torch import nn

from .panels import native_panels, pack_panels, panel_linear


class LinearForm(str, Enum):
    """A way to compute `x @ weight.T + bias`."""

    #: `torch.nn.functional.linear`.
    STOCK = "stock"
    #: One row written twice, `weight @ [x; x].T`, first column kept: MKL's two-column product, for one row.
    DOUBLED_ROW = "doubled_row"
    #: `weight @ x.T`, the weight as the left, row-major operand.
    WEIGHT_MAJOR = "weight_major"
    #: oneDNN's linear on a copy of the weight packed into its blocked layout (`pack_weight`); it has a fixed cost of
    #: ~20 us a call, so it tends to lose on small matrices. Float32 and bfloat16.
    ONEDNN_PACKED = "onednn_packed"
    #: MKL's product with a copy of the weight packed by MKL (`pack_weight`): on a Sapphire Rapids Xeon, 4 rows
    #: through matrices of SmolLM2-135M's decoder shapes in 20.3 ms against `F.linear`'s 23.8 (one row: 16.5 and
    #: 15.2; docs/kernels-smollm2-135m-xeon.md). Float32 only.
    MKL_PACKED = "mkl_packed"
    #: The project's kernel on a copy of the weight in column panels (`early_exit.kernels.panels`): reads the weight
    #: once for up to eight rows in registers, so 2-4 rows cost about what one does. Float32, where it could be built.
    PANELS = "panels"


#: The forms that multiply by a packed copy of the weight; a weight has at most one such copy.
PACKINGS = (LinearForm.ONEDNN_PACKED, LinearForm.MKL_PACKED, LinearForm.PANELS)


#: The row count oneDNN is told to pack for: 4 and 16 give the same layout, faster at 3-16 rows than 1's.
_PACKING_ROWS = 16

#: The dtypes whose products have forms other than `F.linear` (oneDNN packs these two).
FORM_DTYPES = (torch.float32, torch.bfloat16)


def is_plain_matrix(weight: torch.Tensor) -> bool:
    """A dense 2-D tensor of the base types (not a quantized, sharded or otherwise wrapped weight)."""
    return (
        type(weight) in (torch.Tensor, nn.Parameter)
        and weight.layout == torch.strided
        and weight.dim() == 2
        and not weight.is_quantized
    )


def has_forms(weight: torch.Tensor) -> bool:
    """Whether products with `weight` have forms to choose from: a plain matrix of a `FORM_DTYPES` dtype on a CPU."""
    return weight.device.type == "cpu" and weight.dtype in FORM_DTYPES and is_plain_matrix(weight)


def can_pack(weight: torch.Tensor, packing: LinearForm = LinearForm.ONEDNN_PACKED) -> bool:
    """Whether `pack_weight` can pack `weight` for `packing` (its library is built in and takes the weight)."""
    if not has_forms(weight):
        return False
    if packing is LinearForm.MKL_PACKED:
        return torch.backends.mkl.is_available() and weight.dtype == torch.float32
    if packing is LinearForm.PANELS:
        return weight.dtype == torch.float32 and native_panels() is not None
    return packing is LinearForm.ONEDNN_PACKED and torch.backends.mkldnn.is_available()


def pack_weight(weight: torch.Tensor, packing: LinearForm = LinearForm.ONEDNN_PACKED) -> torch.Tensor:
    """A copy of `weight` (out_features x in_features) in the layout that the form `packing` multiplies by (see
    `can_pack`).

    It takes as much memory as the weight itself; only worth making where the form is chosen for some row count.
    """
    with torch.no_grad():
        if packing is LinearForm.MKL_PACKED:
            return torch.ops.mkl._mkl_reorder_linear_weight(weight.detach(), _PACKING_ROWS)
        if packing is LinearForm.PANELS:
            return pack_panels(weight)
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _PACKING_ROWS)


def apply_form(
    form: LinearForm,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    packed: torch.Tensor | None = None,
) -> torch.Tensor:
    """`F.linear(x, weight, bias)` computed in `form` (`packed`: `pack_weight(weight, form)`, for the `PACKINGS`).

    Returns a contiguous `(..., out_features)` tensor, as `F.linear` does, equal to it up to float rounding.
    """
    if form is LinearForm.STOCK:
        return F.linear(x, weight, bias)
    if form is LinearForm.ONEDNN_PACKED:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    in_features = x.shape[-1]
    flat = x.reshape(-1, in_features)
    if form is LinearForm.MKL_PACKED:
        # MKL's kernel takes rows as a matrix, and is told their number (with another it runs `F.linear`).
        return torch.ops.mkl._mkl_linear(flat, packed, weight, bias, flat.shape[0]).view(*x.shape[:-1], -1)
    if form is LinearForm.PANELS:
        out = panel_linear(flat, packed, weight.shape[0])
    # MKL's products below are (out_features, columns); the result is copied to rows-major memory, as `F.linear`
    # returns, so that callers' `view`s work: rows x out_features values, little beside the weight.
    elif form is LinearForm.DOUBLED_ROW:
        if flat.shape[0] != 1:
            raise ValueError(f"the doubled_row form multiplies one row, not {flat.shape[0]}")
        out = torch.mm(weight, torch.cat((flat, flat)).T).select(1, 0).contiguous()
    else:
        out = torch.mm(weight, flat.T).T.contiguous()
    if bias is not None:
        out += bias
    return out.view(*x.shape[:-1], weight.shape[0])

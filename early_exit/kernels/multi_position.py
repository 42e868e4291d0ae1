"""Linear layers in the matmul form that is fastest for the number of positions a decoding step runs.

On CPUs `torch.nn.functional.linear` takes kernels that read a weight matrix at a third of the memory bandwidth for
one row and slower still for 2-16 rows: a pass of 4 new positions through SmolLM2-135M's decoder costs 1.4-1.6x a
pass of one in float32, although a layer costs reading its weights once either way. The same products in other
forms come nearer the bandwidth: `weight @ x.T` for two rows, the same with a single row written twice, and
oneDNN's linear on a copy of the weight packed once into its blocked layout.

`FewPositionLinears` runs the `nn.Linear` modules inside a model in those forms while the current thread is inside
its `with` block; `linear_for_rows` is the function behind it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import torch
import torch.nn.functional as F
from torch import nn

from .scope import ThreadScope


class LinearForm(str, Enum):
    """A way to compute `x @ weight.T + bias`."""

    #: `torch.nn.functional.linear`.
    STOCK = "stock"
    #: One row written twice, `weight @ [x; x].T`, first column kept: MKL's two-column product streams the weight
    #: 2-2.5x as fast as its one-column product (`F.linear`, `weight @ x`).
    DOUBLED_ROW = "doubled_row"
    #: `weight @ x.T`, the weight as the left, row-major operand.
    WEIGHT_MAJOR = "weight_major"
    #: oneDNN's linear on a copy of the weight packed into its blocked layout (`pack_weight`). It has a fixed cost of
    #: ~20 us a call, so it loses to the MKL forms on small matrices.
    PACKED = "packed"


@dataclass(frozen=True)
class _Rule:
    """Up to `max_rows` rows (and, if set, up to `max_in_features` input features) use `packed` where a packed
    weight is at hand and `unpacked` where not."""

    max_rows: int
    packed: LinearForm
    unpacked: LinearForm
    max_in_features: int | None = None


_STOCK, _DOUBLED, _WEIGHT_MAJOR, _PACKED = LinearForm

#: (device type, dtype) -> rules, the first that matches wins; a call no rule matches uses `F.linear`.
#: Measured with `python examples/benchmark_kernels.py --sweep --sweep-shapes 576x1024 576x2048 1024x4096` on a
#: 2-core AMD EPYC (Zen 4, AVX-512 with BF16; torch 2.13, MKL 2024.2, oneDNN 3.12; 33-57 GB/s streaming reads) on
#: random matrices, as many of each shape as SmolLM2-135M has (so that they stream from memory): us per matrix, best
#: of 10 interleaved rounds, fp32:
#:   out x in   form         1 row    2     3     4     8    16   128
#:   576x576    F.linear       120  175   196   158   141   157   549
#:              doubled row     51
#:              weight @ x.T   125   48    57    54    97   142   536
#:              packed          86   90    74    69    85   105   436
#:   576x1536   F.linear       247  389   437   340   308   370  1522
#:              doubled row    143
#:              weight @ x.T   245  125   245   297   407   371  1303
#:              packed         167  190   140   142   178   217  1204
#:   1024x4096  doubled row    875
#:              weight @ x.T   860  876  1059  1180  1702  1368  5824
#:              packed         609  718   513   479   642   808  5255
#:   all 210 linears of the model, ms: F.linear 36.5, 56.4, 62.7, 47.1, 42.9, 49.8, 175.5; the best form
#:   16.9, 15.3, 20.2, 18.6, 23.9, 28.6, 139.7 (reading the weights once takes 7.4-13 ms).
#: So the MKL forms (doubled row, weight @ x.T) slow down from 3 rows once in_features reaches ~1024, and at any row
#: count from ~3072 (1 and 2 rows: even at 2048, packed ahead at 3072 and 4096); packed beats `F.linear` up to 1024
#: rows (F.linear catches up there). In bf16, packed beats every other form at every row count up to 512 (all 210:
#: 13.5, 15.3, 14.7, 12.8, 13.9, 17.4, 72.7 ms against F.linear's 21.1, 20.0, 19.4, 20.0, 21.9, 28.0, 83.9), and
#: the MKL forms lose to `F.linear`.
_RULES: dict[tuple[str, torch.dtype], tuple[_Rule, ...]] = {
    ("cpu", torch.float32): (
        _Rule(1, _DOUBLED, _DOUBLED, max_in_features=2048),
        _Rule(1, _PACKED, _DOUBLED),
        _Rule(2, _WEIGHT_MAJOR, _WEIGHT_MAJOR, max_in_features=2048),
        _Rule(2, _PACKED, _WEIGHT_MAJOR),
        _Rule(4, _WEIGHT_MAJOR, _WEIGHT_MAJOR, max_in_features=1023),
        _Rule(4, _PACKED, _WEIGHT_MAJOR),
        _Rule(16, _PACKED, _WEIGHT_MAJOR, max_in_features=1023),
        _Rule(1024, _PACKED, _STOCK),
    ),
    ("cpu", torch.bfloat16): (_Rule(512, _PACKED, _STOCK),),
}

#: The row count oneDNN is told to pack for: 4 and 16 give the same layout, faster at 3-16 rows than 1's.
_PACKING_ROWS = 16


@functools.lru_cache(maxsize=4096)
def choose_form(rows: int, in_features: int, dtype: torch.dtype, device_type: str, packed: bool) -> LinearForm:
    """The fastest measured form for a product of `rows` rows of `in_features` values of `dtype` on a device of type
    `device_type` (`packed`: whether a packed weight is at hand); `LinearForm.STOCK` where nothing beat `F.linear`."""
    if rows >= 1:
        for rule in _RULES.get((device_type, dtype), ()):
            if rows <= rule.max_rows and (rule.max_in_features is None or in_features <= rule.max_in_features):
                return rule.packed if packed else rule.unpacked
    return LinearForm.STOCK


def packing_pays(weight: torch.Tensor) -> bool:
    """Whether some row count runs faster on a packed copy of `weight` (see `pack_weight`)."""
    if not torch.backends.mkldnn.is_available() or not _is_plain_matrix(weight):
        return False
    return any(rule.packed is LinearForm.PACKED for rule in _RULES.get((weight.device.type, weight.dtype), ()))


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """A copy of `weight` (out_features x in_features) in oneDNN's blocked layout, for `linear_for_rows`.

    It takes as much memory as the weight itself; only worth making where `packing_pays(weight)`.
    """
    with torch.no_grad():
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _PACKING_ROWS)


def linear_for_rows(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, packed: torch.Tensor | None = None
) -> torch.Tensor:
    """`F.linear(x, weight, bias)` in the form that is fastest for the number of rows of `x` (the product of all
    dimensions but the last), its width, dtype and device (see `choose_form`).

    Args:
        x: input, `(..., in_features)`.
        weight: `(out_features, in_features)`, a plain dense tensor.
        bias: `(out_features,)` or `None`.
        packed: `pack_weight(weight)`, made once and kept while `weight` is unchanged; without it the forms that
            need no copy of the weight are used.

    Returns:
        A contiguous `(..., out_features)` tensor, equal to `F.linear`'s up to float rounding. Products that need
        gradients, run under autocast, or mix dtypes or devices go to `F.linear` itself.
    """
    if (
        x.dtype != weight.dtype
        or x.device != weight.device
        or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        or torch.is_autocast_enabled(x.device.type)
    ):
        return F.linear(x, weight, bias)
    in_features = x.shape[-1]
    rows = x.numel() // in_features if in_features else 0
    form = choose_form(rows, in_features, x.dtype, x.device.type, packed is not None)
    if form is LinearForm.STOCK:
        return F.linear(x, weight, bias)
    if form is LinearForm.PACKED:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    flat = x.reshape(rows, in_features)
    # The product is (out_features, columns); the result is copied to rows-major memory, as `F.linear` returns, so
    # that callers' `view`s work: rows x out_features values, little beside the weight.
    if form is LinearForm.DOUBLED_ROW:
        out = torch.mm(weight, torch.cat((flat, flat)).T).select(1, 0).contiguous()
    else:
        out = torch.mm(weight, flat.T).T.contiguous()
    if bias is not None:
        out += bias
    return out.view(*x.shape[:-1], weight.shape[0])


def _is_plain_matrix(weight: torch.Tensor) -> bool:
    """A dense 2-D tensor of the base types (not a quantized, sharded or otherwise wrapped weight)."""
    return (
        type(weight) in (torch.Tensor, nn.Parameter)
        and weight.layout == torch.strided
        and weight.dim() == 2
        and not weight.is_quantized
    )


def _weight_state(weight: torch.Tensor) -> tuple[int, int, int]:
    """What changes when a weight is replaced (the tensor and its address) or updated in place (its version counter;
    inference tensors have none, and cannot be updated in place outside inference mode either)."""
    return id(weight), weight.data_ptr(), 0 if weight.is_inference() else weight._version


@dataclass
class _Linear:
    """One module, the `forward` that stands in for its class's while patched, and the packed copy of its weight
    (with the state of the weight it was packed from)."""

    module: nn.Linear
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None
    packed: torch.Tensor | None = None
    packed_from: tuple[int, int, int] | None = None


class FewPositionLinears(ThreadScope):
    """Run the `nn.Linear` modules inside `module` through `linear_for_rows` while the current thread is inside a
    `with` block of this object.

    Nothing about the model changes for other code: while some thread is inside the block, each linear's `forward`
    is an instance attribute that calls `F.linear` exactly as `nn.Linear.forward` does for every thread not inside
    it, and the attribute is removed when the last block exits (exceptions included). Weights are never modified.

    Make one per model and keep it: with `prepack`, the constructor packs a copy of every weight for which packing
    pays (SmolLM2-135M's decoder layers in float32: 425 MB more, in a third of a second), and each block entry only
    re-packs weights that changed in place or were replaced since. Enter it around a whole decoding loop or step
    rather than around each layer: the first entry patches and the last exit restores every module (~0.3-0.5 ms for
    210 modules).

    Modules whose class overrides `forward`, whose weight is not a plain dense matrix, or that already carry an
    instance-level `forward` (another wrapper's hook) are left alone. Blocks nest and may be entered from several
    threads at once.

    Args:
        module: the model, or any part of it (e.g. its decoder layers).
        prepack: keep packed copies of the weights (memory for speed); without them the forms that need no copy
            are used.
    """

    def __init__(self, module: nn.Module, prepack: bool = True) -> None:
        self._linears = [
            _Linear(child)
            for child in module.modules()
            if isinstance(child, nn.Linear)
            and type(child).forward is nn.Linear.forward
            and _is_plain_matrix(child.weight)
        ]
        for linear in self._linears:
            linear.forward = self._forward_for(linear)
        self._prepack = prepack
        self._patched: list[_Linear] = []
        super().__init__()
        self._refresh_packed()

    @property
    def packed_bytes(self) -> int:
        """Memory held by the packed copies of the weights."""
        return sum(
            linear.packed.numel() * linear.packed.element_size()
            for linear in self._linears
            if linear.packed is not None
        )

    def _open(self) -> None:
        self._refresh_packed()
        self._patch()

    def _close(self) -> None:
        self._restore()

    def _refresh_packed(self) -> None:
        """(Re)pack the weights replaced or updated in place since they were packed."""
        if not self._prepack:
            return
        for linear in self._linears:
            weight = linear.module.weight
            state = _weight_state(weight)
            if linear.packed_from != state:
                linear.packed = pack_weight(weight) if packing_pays(weight) else None
                linear.packed_from = state

    # The instance attribute goes straight into `__dict__`: `nn.Module.__setattr__` would only check that
    # `forward` is no parameter, buffer or submodule, at several microseconds a module.
    def _patch(self) -> None:
        for linear in self._linears:
            attributes = vars(linear.module)
            if "forward" not in attributes:
                attributes["forward"] = linear.forward
                self._patched.append(linear)

    def _restore(self) -> None:
        for linear in self._patched:
            del vars(linear.module)["forward"]
        self._patched.clear()

    def _forward_for(self, linear: _Linear) -> Callable[[torch.Tensor], torch.Tensor]:
        module = linear.module

        def forward(input: torch.Tensor) -> torch.Tensor:
            weight = module.weight
            if not getattr(self._thread, "depth", 0):
                return F.linear(input, weight, module.bias)
            packed = linear.packed
            if packed is not None and linear.packed_from != _weight_state(weight):
                packed = None  # the weight changed inside the block: the next block entry re-packs it
            return linear_for_rows(input, weight, module.bias, packed)

        return forward

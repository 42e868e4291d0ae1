"""Linear layers in the matmul form that is fastest on this machine for the number of positions a decoding step runs.

On CPUs `torch.nn.functional.linear` can read a weight matrix well below the memory bandwidth for one or a few
rows (on a Zen 4 EPYC, a pass of 4 new positions through SmolLM2-135M's decoder costs 1.4-1.6x a pass of one in
float32, although a layer costs reading its weights once either way), and the forms that do better differ between
CPUs (`early_exit.kernels.forms`); `early_exit.kernels.tuning` times them on the machine.

`FewPositionLinears` runs the `nn.Linear` modules inside a model in the timed forms while the current thread is
inside its `with` block; `linear_for_rows` is the function behind it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .forms import LinearForm, apply_form, is_plain_matrix, pack_weight
from .scope import ThreadScope
from .tuning import FormChoice, choice_for, tune_forms


def linear_for_rows(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    packed: torch.Tensor | None = None,
    choice: FormChoice | None = None,
) -> torch.Tensor:
    """`F.linear(x, weight, bias)` in the form timed fastest on this machine for the number of rows of `x` (the
    product of all dimensions but the last) and the shape, dtype and device of `weight`; `F.linear` itself where that
    shape was not timed (see `tune_forms`).

    Args:
        x: input, `(..., in_features)`.
        weight: `(out_features, in_features)`, a plain dense tensor.
        bias: `(out_features,)` or `None`.
        packed: `pack_weight(weight, choice.packing)`, made once and kept while `weight` is unchanged; without it
            the fastest form that needs no copy of the weight is used.
        choice: `choice_for(weight)`, for callers that looked it up once for many calls.

    Returns:
        A contiguous `(..., out_features)` tensor, equal to `F.linear`'s up to float rounding. Products that need
        gradients, run under autocast, or mix dtypes or devices go to `F.linear` itself.
    """
    in_features = x.shape[-1]
    rows = x.numel() // in_features if in_features else 0
    return _linear_in((choice or choice_for(weight)).form(rows, packed is not None), x, weight, bias, packed)


def _linear_in(
    form: LinearForm, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packed: torch.Tensor | None
) -> torch.Tensor:
    """`F.linear(x, weight, bias)` in `form`, or through `F.linear` itself where the forms do not apply (see
    `linear_for_rows`)."""
    if (
        form is LinearForm.STOCK
        or x.dtype != weight.dtype
        or x.device != weight.device
        or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        or torch.is_autocast_enabled(x.device.type)
    ):
        return F.linear(x, weight, bias)
    return apply_form(form, x, weight, bias, packed)


def chosen_form(weight: torch.Tensor, prepack: bool) -> tuple[FormChoice, torch.Tensor | None]:
    """The form choice for `weight` (timed by `tune_forms` beforehand) and, with `prepack`, the packed copy it needs
    (`None` where no row count runs packed)."""
    choice = choice_for(weight)
    packing = choice.packing
    return choice, pack_weight(weight, packing) if prepack and packing else None


def weight_state(weight: torch.Tensor) -> tuple[int, int, int]:
    """What changes when a weight is replaced (the tensor and its address) or updated in place (its version counter;
    inference tensors have none, and cannot be updated in place outside inference mode either)."""
    return id(weight), weight.data_ptr(), 0 if weight.is_inference() else weight._version


@dataclass
class _Linear:
    """One module, the `forward` that stands in for its class's while patched, the form choice for its weight's
    shape and the packed copy of its weight, with the state of the weight those were made for."""

    module: nn.Linear
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None
    choice: FormChoice | None = None
    packed: torch.Tensor | None = None
    made_for: tuple[int, int, int] | None = None


class FewPositionLinears(ThreadScope):
    """Run the `nn.Linear` modules inside `module` through `linear_for_rows` while the current thread is inside a
    `with` block of this object.

    Nothing about the model changes for other code: while some thread is inside the block, each linear's `forward`
    is an instance attribute that calls `F.linear` exactly as `nn.Linear.forward` does for every thread not inside
    it, and the attribute is removed when the last block exits (exceptions included). Weights are never modified.

    Make one per model and keep it: the constructor has the forms of the model's weight shapes timed on this machine
    (`tune_forms`: a few seconds the first time, then read from the forms file) and, with `prepack`, packs a copy of
    every weight that some row count runs fastest packed (all of SmolLM2-135M's decoder in float32 would be 425 MB
    more, made in a third of a second). Each block entry only re-packs weights that changed in place or were
    replaced since, and times again if torch's thread count changed. Enter it around a whole decoding loop or step
    rather than around each layer: the first entry patches and the last exit restores every module (~0.3-0.5 ms for
    210 modules).

    Modules whose class overrides `forward`, whose weight is not a plain dense matrix, or that already carry an
    instance-level `forward` (another wrapper's hook) are left alone, as are those in `exclude`. Blocks nest and may
    be entered from several threads at once.

    Args:
        module: the model, or any part of it (e.g. its decoder layers).
        prepack: keep packed copies of the weights (memory for speed); without them the forms that need no copy
            are used.
        exclude: linears to leave alone (e.g. those whose products `FusedDecoderLayers` makes from its own copies).
    """

    def __init__(self, module: nn.Module, prepack: bool = True, exclude: Iterable[nn.Module] = ()) -> None:
        excluded = {id(linear) for linear in exclude}
        self._linears = [
            _Linear(child)
            for child in module.modules()
            if isinstance(child, nn.Linear)
            and type(child).forward is nn.Linear.forward
            and is_plain_matrix(child.weight)
            and id(child) not in excluded
        ]
        for linear in self._linears:
            linear.forward = self._forward_for(linear)
        self._prepack = prepack
        self._timed_threads: int | None = None
        self._patched: list[_Linear] = []
        super().__init__()
        self._refresh()

    @property
    def packed_bytes(self) -> int:
        """Memory held by the packed copies of the weights (each takes as much as its weight)."""
        return sum(
            linear.module.weight.numel() * linear.module.weight.element_size()
            for linear in self._linears
            if linear.packed is not None
        )

    def _open(self) -> None:
        self._refresh()
        self._patch()

    def _close(self) -> None:
        self._restore()

    def _refresh(self) -> None:
        """Time the forms at the current thread count if not yet done, and look up the choice and (re)pack the weight
        of each module whose weight was replaced or updated in place since."""
        threads = torch.get_num_threads()
        if threads != self._timed_threads:
            tune_forms(linear.module.weight for linear in self._linears)
            self._timed_threads = threads
            for linear in self._linears:
                linear.made_for = None
        for linear in self._linears:
            weight = linear.module.weight
            state = weight_state(weight)
            if linear.made_for != state:
                linear.choice, linear.packed = chosen_form(weight, self._prepack)
                linear.made_for = state

    # The instance attribute goes straight into `__dict__`: `nn.Module.__setattr__` would only check that
    # `forward` is no parameter, buffer or submodule, at several microseconds a module.
    def _patch(self) -> None:
        for linear in self._linears:
            attributes = vars(linear.module)
            # A module whose every row count runs `F.linear` gains nothing from the patch but its cost.
            if "forward" not in attributes and not linear.choice.only_stock(linear.packed is not None):
                attributes["forward"] = linear.forward
                self._patched.append(linear)

    def _restore(self) -> None:
        for linear in self._patched:
            del vars(linear.module)["forward"]
        self._patched.clear()

    def _forward_for(self, linear: _Linear) -> Callable[[torch.Tensor], torch.Tensor]:
        module = linear.module

        # `linear_for_rows` inlined up to the form: most calls of a one-position pass run `F.linear`, and a call more
        # costs microseconds, 1-2% of SmolLM2-135M's pass.
        def forward(input: torch.Tensor) -> torch.Tensor:
            weight = module.weight
            if getattr(self._thread, "depth", 0) and module.in_features:
                packed = linear.packed
                form = linear.choice.form(input.numel() // module.in_features, packed is not None)
                if form is not LinearForm.STOCK:
                    if packed is not None and linear.made_for != weight_state(weight):
                        # The weight changed inside the block: the next block entry re-packs it.
                        packed = None
                        form = linear.choice.form(input.numel() // module.in_features, False)
                    return _linear_in(form, input, weight, module.bias, packed)
            return F.linear(input, weight, module.bias)

        return forward

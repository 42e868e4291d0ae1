"""Compute kernels of the decoding runtime: the matmul forms and the attention that make one- and few-position passes
cheap on CPUs, and the projection onto a pruned vocabulary."""

from .attention import FewPositionAttention, shared_kv_sdpa
from .multi_position import FewPositionLinears, LinearForm, choose_form, linear_for_rows, pack_weight
from .projection import project_rows
from .scope import entered_together

__all__ = [
    "FewPositionAttention",
    "FewPositionLinears",
    "LinearForm",
    "choose_form",
    "entered_together",
    "linear_for_rows",
    "pack_weight",
    "project_rows",
    "shared_kv_sdpa",
]

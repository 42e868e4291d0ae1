"""Compute kernels of the decoding runtime: the matmul forms (timed on the machine) and the attention that make one-
and few-position passes cheap on CPUs, and the projection onto a pruned vocabulary."""

from .attention import FewPositionAttention, shared_kv_sdpa
from .decoder_layers import FusedDecoderLayers, decoding_products
from .forms import LinearForm, pack_weight
from .multi_position import FewPositionLinears, linear_for_rows
from .projection import project_rows
from .scope import entered_together
from .tuning import FormChoice, choice_for, tune_forms

__all__ = [
    "FewPositionAttention",
    "FewPositionLinears",
    "FormChoice",
    "FusedDecoderLayers",
    "LinearForm",
    "choice_for",
    "decoding_products",
    "entered_together",
    "linear_for_rows",
    "pack_weight",
    "project_rows",
    "shared_kv_sdpa",
    "tune_forms",
]

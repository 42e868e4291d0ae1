"""Compute kernels of the decoding runtime: the matmul forms that make one- and few-position passes cheap on CPUs,
and the projection onto a pruned vocabulary."""

from .multi_position import FewPositionLinears, LinearForm, choose_form, linear_for_rows, pack_weight
from .projection import project_rows

__all__ = ["FewPositionLinears", "LinearForm", "choose_form", "linear_for_rows", "pack_weight", "project_rows"]

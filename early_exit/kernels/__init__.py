"""Compute kernels of the decoding runtime: the matmul forms that make few-position passes cheap on CPUs."""

from .projection import project_rows

__all__ = ["project_rows"]

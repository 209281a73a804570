"""Relative positional encodings ``f(r_i - r_j)`` for linear attention.

``build(name, pos_dim=..., num_heads=..., **options)`` makes one by registry name;
``names()`` lists them.
"""

from __future__ import annotations

from .base import RPE, FourierRPE
from .kernel import ShiftInvariantKernelRPE
from .plot import plot

REGISTRY: dict[str, type[RPE]] = {
    "flt-kernel": ShiftInvariantKernelRPE,
}


def names() -> list[str]:
    """Registry names accepted by :func:`build` and ``RPEAttention(rpe=...)``."""
    return sorted(REGISTRY)


def build(name: str, *, pos_dim: int, num_heads: int, **options) -> RPE:
    """Build the RPE registered as ``name``; ValueError names an unknown name or option."""
    if name not in REGISTRY:
        raise ValueError(f"unknown rpe {name!r}; choose one of {names()}")
    try:
        return REGISTRY[name](pos_dim=pos_dim, num_heads=num_heads, **options)
    except TypeError as err:  # unknown keyword
        raise ValueError(f"bad option for rpe {name!r}: {err}") from err


__all__ = ["REGISTRY", "RPE", "FourierRPE", "ShiftInvariantKernelRPE", "build", "names", "plot"]

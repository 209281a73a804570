"""Kernel feature maps: ``phi`` with ``K(x, y) ~ phi(x) . phi(y)``.

Axes: ``...`` leading axes (b batch, n tokens), h heads, d input dim, r features.

A feature map returns ``(phi, log_scale)``: the true features are
``phi * exp(log_scale)[..., None]``. Exponential maps subtract each row's maximum
(``log_scale`` holds it) so that ``phi <= 1`` never overflows; the attention engine
recombines the scales exactly (see :mod:`geolinrpe.ops.linear`). Deterministic maps
return ``log_scale=None``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class FeatureMap(nn.Module):
    """Base class of kernel feature maps.

    Attributes:
        input_dim: size ``d`` of the inputs' last axis.
        num_features: size ``r`` of the features' last axis.
        positive: ``True`` when every feature is ``>= 0``, so that sums of
            ``phi(q) . phi(k)`` (the attention denominators) cannot change sign.
        random: ``True`` when the map holds random draws (``redraw`` changes them).
    """

    input_dim: int
    num_features: int
    positive: bool = True
    random: bool = False

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:  # pragma: no cover - abstract
        """``x [..., d]`` -> ``(phi [..., r], log_scale [...] or None)``."""
        raise NotImplementedError

    def kernel(self, x: Tensor, y: Tensor) -> Tensor:  # pragma: no cover - abstract
        """Exact kernel the map estimates: ``x [..., i, d], y [..., j, d] -> [..., i, j]``."""
        raise NotImplementedError

    def redraw(self, generator: torch.Generator | None = None) -> None:
        """Draw new random features (no-op for deterministic maps)."""

    def extra_repr(self) -> str:
        return f"input_dim={self.input_dim}, num_features={self.num_features}"

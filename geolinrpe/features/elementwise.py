"""Deterministic elementwise feature maps: ReLU, ELU+1 and identity.

The kernel each defines is ``K(x, y) = phi(x) . phi(y)`` exactly (no estimation error).
ELU+1 is the map of Katharopoulos et al. 2020 and of LRPE (Qin et al. 2023).

Axes: ``...`` leading axes, d input dim (= r, the number of features).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .base import FeatureMap


class _ElementwiseFeatures(FeatureMap):
    def __init__(self, input_dim: int) -> None:
        super().__init__()
        if input_dim <= 0:
            raise ValueError(f"input_dim must be positive, got {input_dim}")
        self.input_dim = input_dim
        self.num_features = input_dim

    def features(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: Tensor) -> tuple[Tensor, None]:
        return self.features(x), None

    def kernel(self, x: Tensor, y: Tensor) -> Tensor:
        return self.features(x) @ self.features(y).transpose(-1, -2)


class ReLUFeatures(_ElementwiseFeatures):
    """``phi(x) = max(x, 0)``; non-negative, may be all zero for a token."""

    positive = True

    def features(self, x: Tensor) -> Tensor:
        return F.relu(x)


class ELUFeatures(_ElementwiseFeatures):
    """``phi(x) = elu(x) + 1``; strictly positive."""

    positive = True

    def features(self, x: Tensor) -> Tensor:
        return F.elu(x) + 1.0


class IdentityFeatures(_ElementwiseFeatures):
    """``phi(x) = x``; signed, so pair it with ``normalize="none"``."""

    positive = False

    def features(self, x: Tensor) -> Tensor:
        return x

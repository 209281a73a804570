"""Kernel feature maps ``phi`` with ``K(x, y) ~ phi(x) . phi(y)``."""

from __future__ import annotations

from .base import FeatureMap
from .elementwise import ELUFeatures, IdentityFeatures, ReLUFeatures
from .positive_random import (
    GERFFeatures,
    PositiveRandomFeatures,
    gaussian_orthogonal_matrix,
    optimal_gerf_parameter,
)

FEATURE_MAPS = {
    "favor+": PositiveRandomFeatures,
    "favor++": GERFFeatures,
    "relu": ReLUFeatures,
    "elu": ELUFeatures,
    "identity": IdentityFeatures,
}


def build_feature_map(name: str, input_dim: int, num_features: int = 64, **options) -> FeatureMap:
    """Feature map by name: ``"favor+"`` (softmax kernel), ``"favor++"`` (softmax kernel with
    data-adapted, lower-variance positive features: :class:`GERFFeatures`), ``"relu"``,
    ``"elu"``, ``"identity"``.

    ``num_features`` and ``options`` apply to ``"favor+"`` and ``"favor++"`` (``rho``,
    ``momentum``); elementwise maps have ``input_dim`` features.
    """
    if name not in FEATURE_MAPS:
        raise ValueError(f"unknown kernel {name!r}; choose one of {sorted(FEATURE_MAPS)}")
    if name in ("favor+", "favor++"):
        return FEATURE_MAPS[name](input_dim, num_features, **options)
    if options:
        raise ValueError(f"kernel {name!r} takes no options, got {sorted(options)}")
    return FEATURE_MAPS[name](input_dim)


__all__ = [
    "FEATURE_MAPS",
    "ELUFeatures",
    "FeatureMap",
    "GERFFeatures",
    "IdentityFeatures",
    "PositiveRandomFeatures",
    "ReLUFeatures",
    "build_feature_map",
    "gaussian_orthogonal_matrix",
    "optimal_gerf_parameter",
]

"""Stateless attention math: exact O(n^2) references and the O(n) engine."""

from .exact import feature_attention, masked_kernel_attention, softmax_attention
from .linear import NORMALIZATIONS, linear_attention
from .modes import LogitMode, MaskMode, TokenFeatures
from .packing import PaddedBuckets, to_packed, to_padded

__all__ = [
    "NORMALIZATIONS",
    "LogitMode",
    "MaskMode",
    "PaddedBuckets",
    "TokenFeatures",
    "feature_attention",
    "linear_attention",
    "masked_kernel_attention",
    "softmax_attention",
    "to_packed",
    "to_padded",
]

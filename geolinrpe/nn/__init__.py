"""Layers to attach to your own pipelines."""

from .attention import RPEAttention

__all__ = ["RPEAttention"]

from .block import RPETransformerBlock, RPETransformerEncoder, use_reference  # noqa: E402
from .exact import ExactRPEAttention  # noqa: E402
from .reciprocal import ReciprocalEnergy  # noqa: E402

__all__ += [
    "ExactRPEAttention",
    "RPETransformerBlock",
    "RPETransformerEncoder",
    "ReciprocalEnergy",
    "use_reference",
]

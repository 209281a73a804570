"""Layers to attach to your own pipelines."""

from .attention import RPEAttention

__all__ = ["RPEAttention"]

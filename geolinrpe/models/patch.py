r"""``PatchTransformer``: a vision transformer on patch tokens with a 2D RPE.

Axes: n patches, b/g images, L most patches, c channels, p grid dimension.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..nn.block import RPETransformerEncoder, merge_attention_options, pool, read_batch

__all__ = ["PatchTransformer"]

POOLINGS = ("mean", "max")


class PatchTransformer(nn.Module):
    r"""ViT-style classifier on patch tokens whose positions enter only through an RPE.

    Patches (flattened pixels, :func:`geolinrpe.data.image_to_patches`) are embedded
    linearly and attend in O(n) with a relative positional encoding of their grid positions
    ``(row, column)``; no absolute position embedding and no class token (whose position
    an RPE could not place): the logits come from the pooled tokens. Following the ViT of
    Dosovitskiy et al. (https://arxiv.org/abs/2010.11929) with the RPE attention of
    Choromanski et al. (FLT, https://arxiv.org/abs/2302.01925):

    .. math::

        h^{(0)}_i = W x_i, \qquad h^{(L)} = \mathrm{Encoder}(h^{(0)}, r), \qquad
        \mathrm{logits}_g = W_o \operatorname{pool}_{i \in g} h^{(L)}_i

    Works with any RPE of ``pos_dim`` dimensions, e.g. ``"rope"`` (axial RoPE),
    ``"flt-kernel"``, ``"flt-gm"``, ``"string"``, or ``"toeplitz-fft"`` (mask mode; its
    ``max_offset`` defaults to ``grid_size - 1``).

    Args:
        in_channels: patch dimension ``c`` (``C * ph * pw``).
        num_classes: classes.
        pos_dim: grid dimension (default 2).
        embed_dim: channels (default 128).
        num_heads: attention heads (default 4).
        num_layers: transformer blocks (default 4).
        attention: ``"linear"`` (default) or ``"exact"`` (the O(n^2) baseline).
        rpe: RPE registry name (default ``"rope"``) or ``None`` (no RPE).
        rpe_options: options of the RPE.
        mode: ``"logit"``, ``"mask"`` or ``None`` (default: the RPE's first mode).
        kernel: kernel feature map (default ``None``: the layer's, ELU in mask mode,
            FAVOR+ otherwise).
        num_features: random kernel features (default 64).
        mlp_ratio: block MLP width ratio (default 4.0).
        dropout: dropout in the blocks (default 0.0).
        pooling: ``"mean"`` (default) or ``"max"``.
        grid_size: patches per axis, int or ``pos_dim`` ints (default ``None``); only used
            to default ``toeplitz-fft``'s ``max_offset``.
        attention_options: further :class:`~geolinrpe.nn.RPEAttention` options.

    Shapes:
        input: a PyG ``Batch`` with ``x [n, in_channels]``, ``pos [n, pos_dim]``,
        ``batch [n]``, or the dict of :func:`geolinrpe.data.collate_padded` with
        ``x [b, L, in_channels]``, ``pos [b, L, pos_dim]``, ``key_padding_mask [b, L]``;
        output: logits ``[g, num_classes]``.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        pos_dim: int = 2,
        embed_dim: int = 128,
        num_heads: int = 4,
        num_layers: int = 4,
        attention: str = "linear",
        rpe: str | None = "rope",
        rpe_options: dict | None = None,
        mode: str | None = None,
        kernel: str | None = None,
        num_features: int = 64,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        pooling: str = "mean",
        grid_size: int | Sequence[int] | None = None,
        attention_options: dict | None = None,
    ) -> None:
        super().__init__()
        for name, value in (
            ("in_channels", in_channels),
            ("num_classes", num_classes),
            ("pos_dim", pos_dim),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        rpe_options = dict(rpe_options or {})
        if rpe == "toeplitz-fft" and "max_offset" not in rpe_options:
            if grid_size is None:
                raise ValueError("rpe='toeplitz-fft' needs grid_size (or rpe_options max_offset)")
            sizes = [grid_size] * pos_dim if isinstance(grid_size, int) else list(grid_size)
            if len(sizes) != pos_dim or not all(isinstance(s, int) and s >= 1 for s in sizes):
                raise ValueError(f"grid_size must be a positive int or {pos_dim} of them")
            rpe_options["max_offset"] = tuple(s - 1 for s in sizes)
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.pos_dim = pos_dim
        self.pooling = pooling
        self.embed = nn.Linear(in_channels, embed_dim)
        options = merge_attention_options(
            dict(
                rpe=rpe,
                pos_dim=pos_dim,
                mode=mode,
                kernel=kernel,
                num_features=num_features,
                rpe_options=rpe_options,
            ),
            attention_options,
        )
        self.encoder = RPETransformerEncoder(
            num_layers, embed_dim, num_heads, mlp_ratio, dropout, attention, **options
        )
        self.head = nn.Linear(embed_dim, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Reset every learnable parameter (RPE parameters included)."""
        self.embed.reset_parameters()
        self.encoder.reset_parameters()
        self.head.reset_parameters()

    def redraw(self, generator: torch.Generator | None = None) -> None:
        """Draw new random features in every attention layer."""
        self.encoder.redraw(generator)

    def forward(self, data: Any) -> Tensor:
        """Logits ``[g, num_classes]``; see the class docstring for inputs."""
        tokens = read_batch(data, ("x", "pos"))
        x, pos = tokens.fields["x"], tokens.fields["pos"]
        batch, mask = tokens.batch, tokens.key_padding_mask
        if x.shape[-1] != self.in_channels:
            raise ValueError(
                f"x has {x.shape[-1]} channels, expected in_channels={self.in_channels}"
            )
        if pos.shape != x.shape[:-1] + (self.pos_dim,):
            raise ValueError(
                f"pos must be {list(x.shape[:-1]) + [self.pos_dim]}, got {list(pos.shape)}"
            )
        h = self.embed(x)
        if mask is not None:
            h = h.masked_fill(mask.unsqueeze(-1), 0.0)
        if h.shape[0]:  # an empty batch (no images or no patches) has nothing to attend to
            h = self.encoder(h, pos.to(h.dtype), batch, mask)
        return self.head(pool(h, batch, mask, self.pooling, tokens.num_graphs))

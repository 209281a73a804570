r"""``PointCloudTransformer``: shape classification and part segmentation of 3D point clouds.

Axes: n points, b/g clouds, L longest cloud, c channels, k radial basis functions.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..nn.block import RPETransformerEncoder, merge_attention_options, pool, read_batch

__all__ = ["PointCloudTransformer"]

TASKS = ("classification", "segmentation")
CLOUD_POOLINGS = ("mean", "max", "mean+max")


class PointCloudTransformer(nn.Module):
    r"""Linear-attention transformer over the points of point clouds with a 3D RPE.

    Each point starts from rotation-invariant radial features, its distance to the cloud's
    centroid ``c_g`` on a Gaussian basis (optionally with user features ``x_i``), and the
    points attend to each other in O(n) with an RPE ``f(r_i - r_j)``
    (FourierLearner-Transformer, Choromanski et al., AISTATS 2024,
    https://arxiv.org/abs/2302.01925):

    .. math::

        h^{(0)}_i = W\,[\phi(|r_i - c_g|), x_i], \qquad
        h^{(L)} = \mathrm{Encoder}(h^{(0)}, r), \qquad
        \text{classification: } \mathrm{MLP}(\operatorname{pool}_{i \in g} h^{(L)}_i), \quad
        \text{segmentation: } \mathrm{MLP}([h^{(L)}_i, \operatorname{pool}_{j \in g} h^{(L)}_j])

    with ``phi_k(d) = exp(-((d - mu_k) / w)^2)`` (``mu_k`` evenly spaced on ``[0,
    max_radius]``). Invariances: translation and permutation always; rotation when the
    attention is rotation invariant (``rpe=None``, or ``rpe="flt-radial"`` with
    ``rpe_options={"rotation": "frame"}`` for clouds with a well-defined PCA frame) and the
    user features ``x`` are invariant.

    Args:
        num_classes: classes (or part labels for segmentation).
        task: ``"classification"`` (default: logits per cloud) or ``"segmentation"``
            (logits per point).
        in_channels: extra per-point features ``x`` read from the batch (default 0: none).
        embed_dim: channels (default 128).
        num_heads: attention heads (default 8).
        num_layers: transformer blocks (default 4).
        attention: ``"linear"`` (default) or ``"exact"`` (the O(n^2) baseline).
        rpe: 3D RPE registry name (default ``"flt-radial"``) or ``None`` (no RPE).
        rpe_options: options of the RPE.
        mode: ``"logit"``, ``"mask"`` or ``None`` (default: the RPE's first mode).
        kernel: kernel feature map (default ``None``: the layer's, ELU in mask mode,
            FAVOR+ otherwise).
        num_features: random kernel features (default 64).
        mlp_ratio: block MLP width ratio (default 4.0).
        dropout: dropout in the blocks and the head (default 0.0).
        pooling: ``"mean"`` (default), ``"max"`` or ``"mean+max"`` (concatenated).
        num_radial: radial basis functions (default 16).
        max_radius: largest centroid distance the basis covers (default 2.0: the
            :class:`~geolinrpe.data.SyntheticShapes` scale; use the data's scale).
        attention_options: further :class:`~geolinrpe.nn.RPEAttention` options.

    Shapes:
        input: a PyG ``Batch`` with ``pos [n, 3]``, ``batch [n]`` (and ``x [n, in_channels]``)
        or the dict of :func:`geolinrpe.data.collate_padded` with ``pos [b, L, 3]``,
        ``key_padding_mask [b, L]`` (and ``x``);
        output: classification ``[g, num_classes]``; segmentation ``[n, num_classes]``
        (``[b, L, num_classes]`` for a padded batch, 0 at padding).
    """

    def __init__(
        self,
        num_classes: int,
        task: str = "classification",
        in_channels: int = 0,
        embed_dim: int = 128,
        num_heads: int = 8,
        num_layers: int = 4,
        attention: str = "linear",
        rpe: str | None = "flt-radial",
        rpe_options: dict | None = None,
        mode: str | None = None,
        kernel: str | None = None,
        num_features: int = 64,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        pooling: str = "mean",
        num_radial: int = 16,
        max_radius: float = 2.0,
        attention_options: dict | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        if pooling not in CLOUD_POOLINGS:
            raise ValueError(f"pooling must be one of {CLOUD_POOLINGS}, got {pooling!r}")
        if not isinstance(in_channels, int) or in_channels < 0:
            raise ValueError(f"in_channels must be a non-negative int, got {in_channels!r}")
        if not isinstance(num_radial, int) or num_radial < 1:
            raise ValueError(f"num_radial must be a positive int, got {num_radial!r}")
        if not max_radius > 0:
            raise ValueError(f"max_radius must be positive, got {max_radius!r}")
        self.num_classes = num_classes
        self.task = task
        self.in_channels = in_channels
        self.pooling = pooling
        self.register_buffer("centers", torch.linspace(0.0, max_radius, num_radial))
        self.width = max_radius / max(num_radial - 1, 1)
        self.input = nn.Linear(num_radial + in_channels, embed_dim)
        options = merge_attention_options(
            dict(
                rpe=rpe,
                pos_dim=3,
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
        pooled = embed_dim * (2 if pooling == "mean+max" else 1)
        head_in = pooled + (embed_dim if task == "segmentation" else 0)
        self.head = nn.Sequential(
            nn.Linear(head_in, embed_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(embed_dim, num_classes),
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Reset every learnable parameter (RPE parameters included)."""
        self.input.reset_parameters()
        self.encoder.reset_parameters()
        for layer in (self.head[0], self.head[3]):
            layer.reset_parameters()

    def redraw(self, generator: torch.Generator | None = None) -> None:
        """Draw new random features in every attention layer."""
        self.encoder.redraw(generator)

    def forward(self, data: Any) -> Tensor:
        """Logits; see the class docstring for shapes."""
        keys = ("pos", "x") if self.in_channels else ("pos",)
        tokens = read_batch(data, keys)
        pos, batch, mask = tokens.fields["pos"], tokens.batch, tokens.key_padding_mask
        if pos.shape[-1] != 3 or pos.dim() != (2 if batch is not None else 3):
            raise ValueError(f"pos must be [n, 3] or [b, L, 3], got {list(pos.shape)}")
        centroid = pool(pos, batch, mask, "mean", tokens.num_graphs)
        centroid = centroid[batch] if batch is not None else centroid[:, None]
        dist = (pos - centroid).norm(dim=-1, keepdim=True)
        feats = torch.exp(-(((dist - self.centers) / self.width) ** 2))
        if self.in_channels:
            x = tokens.fields["x"]
            if x.shape != pos.shape[:-1] + (self.in_channels,):
                raise ValueError(
                    f"x must be {list(pos.shape[:-1]) + [self.in_channels]}, got {list(x.shape)}"
                )
            feats = torch.cat([feats, x.to(feats.dtype)], -1)
        if mask is not None:
            feats = feats.masked_fill(mask.unsqueeze(-1), 0.0)
        h = self.input(feats)
        if h.shape[0]:  # an empty batch (no clouds or no points) has nothing to attend to
            h = self.encoder(h, pos, batch, mask)
        pooled = self._pool(h, batch, mask, tokens.num_graphs)
        if self.task == "classification":
            return self.head(pooled)
        glob = pooled[batch] if batch is not None else pooled[:, None].expand(-1, h.shape[1], -1)
        out = self.head(torch.cat([h, glob], -1))
        if mask is not None:
            out = out.masked_fill(mask.unsqueeze(-1), 0.0)
        return out

    def _pool(self, h: Tensor, batch, mask, num_graphs: int) -> Tensor:
        if self.pooling == "mean+max":
            return torch.cat([pool(h, batch, mask, r, num_graphs) for r in ("mean", "max")], dim=-1)
        return pool(h, batch, mask, self.pooling, num_graphs)

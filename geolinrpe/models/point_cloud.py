r"""``PointCloudTransformer``: classification and per-point segmentation of 3D point clouds.

Axes: n points, b/g clouds, L longest cloud, c channels, k radial basis functions, e edges.

* :class:`PointCloudTransformer`: an optional local stage (:class:`LocalAggregation` over
  k-nearest-neighbour graphs), then global O(n) attention with a 3D RPE over all points.
* :func:`pointcept_batch`: Pointcept's ``(coord, feat, offset)`` as ``(pos, x, batch)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..nn.block import RPETransformerEncoder, merge_attention_options, pool, read_batch
from ..ops.packing import to_packed
from .radius import knn_graph

__all__ = ["LocalAggregation", "PointCloudTransformer", "pointcept_batch"]

TASKS = ("classification", "segmentation")
CLOUD_POOLINGS = ("mean", "max", "mean+max")
LOCAL_STAGES = (None, "knn")


def pointcept_batch(data: Mapping) -> dict[str, Tensor]:
    """Pointcept's point dict as the packed layout of :func:`~geolinrpe.nn.read_batch`.

    Pointcept (Point Transformer V3 and its pipelines) passes ``coord [n, 3]``, ``feat [n, c]``
    (optional) and ``offset [g]``, the cumulative cloud sizes (``offset[-1] == n``).

    Returns:
        ``{"pos": coord, "x": feat, "batch": batch [n]}`` (``x`` only when ``feat`` is given).
    """
    coord, offset = data.get("coord"), data.get("offset")
    if not isinstance(coord, Tensor) or coord.dim() != 2:
        raise ValueError(f"coord must be a tensor [n, 3], got {getattr(coord, 'shape', coord)}")
    if not isinstance(offset, Tensor) or offset.dim() != 1 or offset.is_floating_point():
        raise ValueError(f"offset must be an integer tensor [g], got {offset!r}")
    offset = offset.long()
    sizes = torch.diff(offset, prepend=offset.new_zeros(1))
    if offset.numel() == 0 or bool((sizes < 0).any()) or int(offset[-1]) != coord.shape[0]:
        raise ValueError(
            f"offset must be non-decreasing cumulative cloud sizes ending at n = "
            f"{coord.shape[0]}, got {offset.tolist()[:8]}"
        )
    out = {
        "pos": coord,
        "batch": torch.repeat_interleave(torch.arange(len(sizes), device=coord.device), sizes),
    }
    feat = data.get("feat")
    if feat is not None:
        if not isinstance(feat, Tensor) or feat.shape[0] != coord.shape[0]:
            raise ValueError(f"feat must be a tensor [{coord.shape[0]}, c], got {feat!r}")
        out["x"] = feat
    return out


class LocalAggregation(nn.Module):
    r"""One residual PointNet++-style step over a neighbour graph:

    .. math::

        m_{ij} = \mathrm{GELU}\bigl(A x_j + B x_i + C \phi(|r_j - r_i|)\bigr), \qquad
        h_i \leftarrow h_i + W \max_{j \in N(i)} m_{ij}, \qquad x = \mathrm{LN}(h)

    with ``phi`` a Gaussian basis of ``num_radial`` functions on ``[0, radius]``. ``A x`` and
    ``B x`` are computed per point and gathered, so an edge costs one ``[num_radial, c]``
    product. It sees distances only: invariant to rotations, translations and permutations.

    Shapes: ``h [n, c]``, ``pos [n, 3]``, ``edge_index [2, e]`` (``[j, i]``) -> ``[n, c]``.
    """

    def __init__(self, channels: int, radius: float, num_radial: int = 16) -> None:
        super().__init__()
        self.register_buffer("centers", torch.linspace(0.0, radius, num_radial))
        self.width = radius / max(num_radial - 1, 1)
        self.norm = nn.LayerNorm(channels)
        self.node = nn.Linear(channels, 2 * channels)
        self.edge = nn.Linear(num_radial, channels, bias=False)
        self.out = nn.Linear(channels, channels)

    def reset_parameters(self) -> None:
        for layer in (self.norm, self.node, self.edge, self.out):
            layer.reset_parameters()

    def forward(self, h: Tensor, pos: Tensor, edge_index: Tensor) -> Tensor:
        j, i = edge_index
        a, b = self.node(self.norm(h)).chunk(2, -1)
        dist = (pos[j] - pos[i]).norm(dim=-1, keepdim=True)
        basis = torch.exp(-(((dist - self.centers) / self.width) ** 2)).to(h.dtype)
        message = nn.functional.gelu(a[j] + b[i] + self.edge(basis))
        index = i[:, None].expand_as(message)
        agg = torch.full_like(h, -torch.inf).scatter_reduce(0, index, message, "amax")
        return h + self.out(agg.masked_fill(agg == -torch.inf, 0.0))


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
    max_radius]``). With ``local="knn"``, ``local_layers`` :class:`LocalAggregation` steps over
    each point's ``local_k`` nearest neighbours (:func:`~geolinrpe.models.knn_graph`, cell
    lists: O(n)) run before the encoder; ``num_layers=0`` leaves out the global attention (the
    local-only baseline). Invariances: translation and permutation always; rotation when the
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
        local: ``None`` (default: no local stage) or ``"knn"``.
        local_k: neighbours per point of the local stage (default 16).
        local_layers: :class:`LocalAggregation` steps (default 2).
        local_radius: range of the local stage's distance basis (default 0.5, in the unit of
            ``pos``; about the largest ``local_k``-th neighbour distance).

    Shapes:
        input: a PyG ``Batch`` with ``pos [n, 3]``, ``batch [n]`` (and ``x [n, in_channels]``),
        a Pointcept-style dict with ``coord [n, 3]``, ``offset [g]`` (and ``feat [n,
        in_channels]``; see :func:`pointcept_batch`), or the dict of
        :func:`geolinrpe.data.collate_padded` with ``pos [b, L, 3]``,
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
        local: str | None = None,
        local_k: int = 16,
        local_layers: int = 2,
        local_radius: float = 0.5,
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
        if local not in LOCAL_STAGES:
            raise ValueError(f"local must be one of {LOCAL_STAGES}, got {local!r}")
        for name, value in (("local_k", local_k), ("local_layers", local_layers)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(num_layers, int) or num_layers < (0 if local else 1):
            raise ValueError(
                f"num_layers must be an int >= {0 if local else 1} "
                f"(0 only with a local stage), got {num_layers!r}"
            )
        self.num_classes = num_classes
        self.task = task
        self.in_channels = in_channels
        self.pooling = pooling
        self.register_buffer("centers", torch.linspace(0.0, max_radius, num_radial))
        self.width = max_radius / max(num_radial - 1, 1)
        self.input = nn.Linear(num_radial + in_channels, embed_dim)
        self.local_k = local_k
        self.local_stage = nn.ModuleList(
            LocalAggregation(embed_dim, local_radius) for _ in range(local_layers if local else 0)
        )
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
        self.encoder = (
            RPETransformerEncoder(
                num_layers, embed_dim, num_heads, mlp_ratio, dropout, attention, **options
            )
            if num_layers
            else None
        )
        self.final_norm = None if num_layers else nn.LayerNorm(embed_dim)
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
        for module in (*self.local_stage, self.encoder, self.final_norm):
            if module is not None:
                module.reset_parameters()
        for layer in (self.head[0], self.head[3]):
            layer.reset_parameters()

    def redraw(self, generator: torch.Generator | None = None) -> None:
        """Draw new random features in every attention layer."""
        if self.encoder is not None:
            self.encoder.redraw(generator)

    def forward(self, data: Any) -> Tensor:
        """Logits; see the class docstring for shapes."""
        if isinstance(data, Mapping) and "offset" in data and "coord" in data:
            data = pointcept_batch(data)
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
            h = self._local(h, pos, batch, mask)
            if self.encoder is not None:
                h = self.encoder(h, pos, batch, mask)
            else:
                h = self.final_norm(h)
                h = h if mask is None else h.masked_fill(mask.unsqueeze(-1), 0.0)
        pooled = self._pool(h, batch, mask, tokens.num_graphs)
        if self.task == "classification":
            return self.head(pooled)
        glob = pooled[batch] if batch is not None else pooled[:, None].expand(-1, h.shape[1], -1)
        out = self.head(torch.cat([h, glob], -1))
        if mask is not None:
            out = out.masked_fill(mask.unsqueeze(-1), 0.0)
        return out

    def _local(self, h: Tensor, pos: Tensor, batch, mask) -> Tensor:
        """The local stage on the packed points (a dense batch is packed, then padded back)."""
        if not self.local_stage:
            return h
        if batch is None:
            padding = torch.zeros(pos.shape[:2], dtype=torch.bool, device=pos.device)
            padding = padding if mask is None else mask
            (packed, batch), valid = to_packed(h, padding), ~padding
            out = h.new_zeros(h.shape)
            out[valid] = self._local_packed(packed, pos[valid], batch)
            return out
        return self._local_packed(h, pos, batch)

    def _local_packed(self, h: Tensor, pos: Tensor, batch: Tensor) -> Tensor:
        edge_index = knn_graph(pos.detach(), self.local_k, batch)
        for layer in self.local_stage:
            h = layer(h, pos, edge_index)
        return h

    def _pool(self, h: Tensor, batch, mask, num_graphs: int) -> Tensor:
        if self.pooling == "mean+max":
            return torch.cat([pool(h, batch, mask, r, num_graphs) for r in ("mean", "max")], dim=-1)
        return pool(h, batch, mask, self.pooling, num_graphs)

r"""Pre-norm transformer blocks and encoders around :class:`~geolinrpe.nn.RPEAttention`.

Axes: b batch, n tokens, c channels, g graphs, p position dim.

* :class:`RPETransformerBlock`: ``x + Attn(LN(x)), then x + MLP(LN(x))``.
* :class:`RPETransformerEncoder`: a stack of blocks and a final LayerNorm.
* :func:`build_attention`: ``"linear"`` (:class:`RPEAttention`), ``"exact"``
  (:class:`ExactRPEAttention`, the O(n^2) baseline), a factory or a module.
* :func:`use_reference`: run every block of a model through its attention's O(n^2)
  :meth:`~geolinrpe.nn.RPEAttention.reference` (tests, baselines).
* :func:`read_batch` and :func:`pool`: the two batch layouts (packed PyG ``Batch`` or the
  padded dict of :func:`geolinrpe.data.collate_padded`) and per-graph readouts over them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ..rpe import REGISTRY, names
from .attention import RPEAttention
from .exact import ExactRPEAttention

__all__ = [
    "ATTENTIONS",
    "RPETransformerBlock",
    "RPETransformerEncoder",
    "TokenBatch",
    "attention_option_names",
    "build_attention",
    "merge_attention_options",
    "pool",
    "read_batch",
    "use_reference",
]

#: ``attention=`` names: the O(n) layer and its exact O(n^2) baseline
ATTENTIONS: dict[str, type[RPEAttention]] = {"linear": RPEAttention, "exact": ExactRPEAttention}
ACTIVATIONS = {"gelu": nn.GELU, "silu": nn.SiLU}
POOLINGS = ("sum", "mean", "max")


def attention_option_names() -> list[str]:
    """Keyword options of :class:`RPEAttention` other than ``embed_dim`` and ``num_heads``."""
    params = inspect.signature(RPEAttention.__init__).parameters
    return [n for n in params if n not in ("self", "embed_dim", "num_heads")]


def build_attention(
    embed_dim: int,
    num_heads: int,
    attention: str | Callable[..., nn.Module] | nn.Module = "linear",
    **options: Any,
) -> nn.Module:
    """An attention module with the call signature of :class:`RPEAttention`.

    Args:
        embed_dim, num_heads: as for :class:`RPEAttention`.
        attention: ``"linear"`` (:class:`RPEAttention`), ``"exact"``
            (:class:`ExactRPEAttention`), a factory called as
            ``attention(embed_dim, num_heads, **options)``, or a module (used as it is; no
            ``options`` then).
        options: :class:`RPEAttention` keyword options (``rpe``, ``pos_dim``, ``mode``,
            ``kernel``, ``num_features``, ``causal``, ``normalize``, ``center_positions``,
            ``chunk_size``, ``bias``, ``rpe_options``); an unknown one raises ``ValueError``.
            ``mode=None`` picks the RPE's first supported mode (``"logit"``, or ``"mask"``
            for mask-only families such as ``toeplitz-fft``).
    """
    if isinstance(attention, nn.Module):
        if options:
            raise ValueError(f"options {sorted(options)} given with an attention module instance")
        return attention
    options = _resolve_mode(options)
    if isinstance(attention, str):
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {sorted(ATTENTIONS)}, got {attention!r}")
        unknown = sorted(set(options) - set(attention_option_names()))
        if unknown:
            raise ValueError(
                f"unknown attention options {unknown}; RPEAttention takes "
                f"{attention_option_names()}"
            )
        return ATTENTIONS[attention](embed_dim, num_heads, **options)
    if callable(attention):
        return attention(embed_dim, num_heads, **options)
    raise ValueError(
        f"attention must be a name, a factory or a module, got {type(attention).__name__}"
    )


def merge_attention_options(explicit: dict[str, Any], extra: dict | None) -> dict[str, Any]:
    """``explicit`` options plus a user's ``attention_options`` dict; ``ValueError`` when the
    dict repeats an explicit option (a model argument) or is not a dict."""
    if extra is None:
        return dict(explicit)
    if not isinstance(extra, Mapping):
        raise ValueError(f"attention_options must be a dict, got {type(extra).__name__}")
    clash = sorted(set(explicit) & set(extra))
    if clash:
        raise ValueError(f"attention_options repeats {clash}: pass them as model arguments")
    return {**explicit, **extra}


def _resolve_mode(options: dict[str, Any]) -> dict[str, Any]:
    """``mode=None``: the RPE's first supported mode (``"logit"`` for most families,
    ``"mask"`` for the mask-only ones such as ``toeplitz-fft``; ``"logit"`` without RPE)."""
    if "mode" not in options or options["mode"] is not None:
        return options
    rpe = options.get("rpe")
    if isinstance(rpe, str):
        if rpe not in REGISTRY:
            raise ValueError(f"unknown rpe {rpe!r}; choose one of {names()}")
        modes = REGISTRY[rpe].modes
    else:
        modes = getattr(rpe, "modes", ("logit",))
    return {**options, "mode": modes[0]}


class RPETransformerBlock(nn.Module):
    r"""Pre-norm transformer block with RPE attention.

    .. math::

        x \leftarrow x + \mathrm{Drop}(\mathrm{Attn}(\mathrm{LN}_1(x), r)), \qquad
        x \leftarrow x + \mathrm{Drop}(W_2\, \mathrm{Drop}(\sigma(W_1 \mathrm{LN}_2(x))))

    with ``Attn`` an :class:`RPEAttention` (O(n), FLT/Performer, Choromanski et al.,
    https://arxiv.org/abs/2302.01925) or any module with its call signature, and ``sigma``
    GELU or SiLU. Padded rows of a dense batch are set to 0 on output.

    Args:
        embed_dim: channels ``c``.
        num_heads: attention heads.
        mlp_ratio: hidden width of the MLP over ``embed_dim`` (default 4).
        dropout: dropout on the attention output and in the MLP (default 0.0).
        attention: ``"linear"`` (default), ``"exact"``, a factory or a module
            (:func:`build_attention`).
        activation: ``"gelu"`` (default) or ``"silu"``.
        **attention_options: passed to the attention (``rpe="flt-kernel"``, ``pos_dim=3``,
            ``mode``, ``kernel``, ``num_features``, ``causal``, ``rpe_options``, ...).

    Shapes:
        packed: ``x [n, c]``, ``pos [n, p]``, ``batch [n]`` -> ``[n, c]``;
        dense: ``x [b, n, c]``, ``pos [b, n, p]``, ``key_padding_mask [b, n]`` -> ``[b, n, c]``;
        ``cell [g, p, p]`` for periodic RPEs (exactly as :class:`RPEAttention`).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        attention: str | Callable[..., nn.Module] | nn.Module = "linear",
        activation: str = "gelu",
        **attention_options: Any,
    ) -> None:
        super().__init__()
        if not (isinstance(mlp_ratio, (int, float)) and mlp_ratio > 0):
            raise ValueError(f"mlp_ratio must be positive, got {mlp_ratio!r}")
        if not (isinstance(dropout, (int, float)) and 0 <= dropout < 1):
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        hidden = max(1, round(embed_dim * mlp_ratio))
        self.embed_dim = embed_dim
        self.norm1 = nn.LayerNorm(embed_dim)
        self.attention = build_attention(embed_dim, num_heads, attention, **attention_options)
        self.norm2 = nn.LayerNorm(embed_dim)
        self.mlp = nn.Sequential(
            nn.Linear(embed_dim, hidden),
            ACTIVATIONS[activation](),
            nn.Dropout(dropout),
            nn.Linear(hidden, embed_dim),
        )
        self.dropout = nn.Dropout(dropout)
        #: set by :func:`use_reference`: options of ``attention.reference`` to use instead
        self.reference_options: dict[str, str] | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Reset norms, MLP and attention projections (an RPE keeps its parameters)."""
        self.norm1.reset_parameters()
        self.norm2.reset_parameters()
        for layer in (self.mlp[0], self.mlp[3]):
            layer.reset_parameters()
        if hasattr(self.attention, "reset_parameters"):
            self.attention.reset_parameters()

    def forward(
        self,
        x: Tensor,
        pos: Tensor | None = None,
        batch: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        cell: Tensor | None = None,
    ) -> Tensor:
        """One block; shapes as in the class docstring."""
        h = self.norm1(x)
        extra = {} if cell is None else {"cell": cell}
        if self.reference_options is not None:
            h = self.attention.reference(
                h, pos, batch, key_padding_mask, **self.reference_options, **extra
            )
        else:
            h = self.attention(h, pos, batch, key_padding_mask, **extra)
        x = x + self.dropout(h)
        x = x + self.dropout(self.mlp(self.norm2(x)))
        if key_padding_mask is not None:
            x = x.masked_fill(key_padding_mask.unsqueeze(-1), 0.0)
        return x


class RPETransformerEncoder(nn.Module):
    r"""A stack of :class:`RPETransformerBlock` and a final LayerNorm.

    Every block has its own attention (and RPE) built with the same options.

    Args:
        num_layers: blocks.
        embed_dim, num_heads, mlp_ratio, dropout, attention, activation: per block
            (:class:`RPETransformerBlock`; ``attention`` may not be a module instance here).
        final_norm: end with a LayerNorm (default ``True``; pre-norm blocks need it).
        **attention_options: as for :class:`RPETransformerBlock`.

    Shapes:
        as :class:`RPETransformerBlock`.
    """

    def __init__(
        self,
        num_layers: int,
        embed_dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        attention: str | Callable[..., nn.Module] = "linear",
        activation: str = "gelu",
        final_norm: bool = True,
        **attention_options: Any,
    ) -> None:
        super().__init__()
        if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers < 1:
            raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
        if isinstance(attention, nn.Module):
            raise ValueError("an encoder builds one attention per block: pass a name or factory")
        self.blocks = nn.ModuleList(
            RPETransformerBlock(
                embed_dim, num_heads, mlp_ratio, dropout, attention, activation, **attention_options
            )
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(embed_dim) if final_norm else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Reset every block, its RPE's parameters and the final norm."""
        for block in self.blocks:
            block.reset_parameters()
            rpe = getattr(block.attention, "rpe", None)
            if rpe is not None and hasattr(rpe, "reset_parameters"):
                rpe.reset_parameters()
        if isinstance(self.norm, nn.LayerNorm):
            self.norm.reset_parameters()

    def redraw(self, generator: torch.Generator | None = None) -> None:
        """Draw new random features in every attention that has them."""
        for block in self.blocks:
            if hasattr(block.attention, "redraw"):
                block.attention.redraw(generator)

    def forward(
        self,
        x: Tensor,
        pos: Tensor | None = None,
        batch: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        cell: Tensor | None = None,
    ) -> Tensor:
        """All blocks, then the final norm (padded rows stay 0)."""
        for block in self.blocks:
            x = block(x, pos, batch, key_padding_mask, cell)
        x = self.norm(x)
        if key_padding_mask is not None:
            x = x.masked_fill(key_padding_mask.unsqueeze(-1), 0.0)
        return x


@contextmanager
def use_reference(module: nn.Module, kernel: str = "exact", rpe: str = "exact") -> Iterator[None]:
    """Within the context, every :class:`RPETransformerBlock` in ``module`` calls its
    attention's O(n^2) ``reference(..., kernel=kernel, rpe=rpe)`` instead of ``forward``.

    ``kernel="exact", rpe="exact"`` turns a linear model into its exact-attention baseline
    (what ``attention="exact"`` builds); ``"features", "features"`` is the explicit quadratic
    form of the current random draws, equal to the linear path to rounding error.
    """
    for name, value in (("kernel", kernel), ("rpe", rpe)):
        if value not in ("features", "exact"):
            raise ValueError(f"{name} must be 'features' or 'exact', got {value!r}")
    blocks = [m for m in module.modules() if isinstance(m, RPETransformerBlock)]
    saved = [b.reference_options for b in blocks]
    for block in blocks:
        block.reference_options = {"kernel": kernel, "rpe": rpe}
    try:
        yield
    finally:
        for block, options in zip(blocks, saved, strict=True):
            block.reference_options = options


class TokenBatch(NamedTuple):
    """A batch of token sets in one of the two layouts (see :func:`read_batch`).

    Attributes:
        fields: the requested node (and graph) fields, e.g. ``{"z": ..., "pos": ...}``:
            ``[n, ...]`` packed or ``[b, L, ...]`` dense; graph fields ``[g, ...]``.
        batch: packed graph ids ``[n]`` (``None`` when dense).
        key_padding_mask: dense ``[b, L]``, True = padding (``None`` when packed or when
            a dense batch has no padding).
        num_graphs: ``g``.
    """

    fields: dict[str, Tensor]
    batch: Tensor | None
    key_padding_mask: Tensor | None
    num_graphs: int

    @property
    def dense(self) -> bool:
        return self.batch is None


def read_batch(
    data: Any,
    node_keys: Sequence[str],
    optional_keys: Sequence[str] = (),
    dense_dims: int = 3,
) -> TokenBatch:
    """Read the fields of a packed or a dense batch.

    Args:
        data: a PyG ``Data``/``Batch`` (packed; no ``batch`` attribute = one graph), a dict
            from :func:`geolinrpe.data.collate_padded` (dense, with ``key_padding_mask``), or
            a dict with ``batch`` (packed). A dict with neither is dense (without padding)
            when its first node field has ``dense_dims`` dimensions, else one packed graph.
        node_keys: required fields; ``ValueError`` names a missing one.
        optional_keys: fields read when present (``cell``, ``pbc``, ...).
        dense_dims: dimensions of ``node_keys[0]`` in the dense layout (default 3, e.g.
            ``pos [b, L, p]``; 2 for ``z [b, L]``).
    """
    mapping = isinstance(data, Mapping)

    def get(key: str):
        return data.get(key) if mapping else getattr(data, key, None)

    fields = {}
    for key in node_keys:
        value = get(key)
        if not isinstance(value, Tensor):
            raise ValueError(f"the batch has no tensor field {key!r}")
        fields[key] = value
    for key in optional_keys:
        value = get(key)
        if isinstance(value, Tensor):
            fields[key] = value
    first = fields[node_keys[0]]
    mask = data.get("key_padding_mask") if mapping else None
    batch = get("batch")
    if mask is not None or (mapping and batch is None and first.dim() == dense_dims):
        if mask is not None and (mask.dtype != torch.bool or mask.shape != first.shape[:2]):
            raise ValueError(
                f"key_padding_mask must be bool {list(first.shape[:2])}, "
                f"got {mask.dtype} {list(mask.shape)}"
            )
        return TokenBatch(fields, None, mask, first.shape[0])
    if batch is None:
        batch = torch.zeros(first.shape[0], dtype=torch.long, device=first.device)
    num_graphs = None if mapping else getattr(data, "num_graphs", None)
    if num_graphs is None:
        num_graphs = int(batch[-1]) + 1 if batch.numel() else 0
    return TokenBatch(fields, batch, None, int(num_graphs))


def pool(
    x: Tensor,
    batch: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    reduce: str = "mean",
    num_graphs: int | None = None,
) -> Tensor:
    """Per-graph ``sum``, ``mean`` or ``max`` of token features.

    Shapes:
        packed ``x [n, c]`` with ``batch [n]`` -> ``[g, c]``; dense ``x [b, L, c]`` with an
        optional ``key_padding_mask [b, L]`` (padding excluded) -> ``[b, c]``.
    """
    if reduce not in POOLINGS:
        raise ValueError(f"reduce must be one of {POOLINGS}, got {reduce!r}")
    if batch is None and x.dim() == 3:
        valid = None if key_padding_mask is None else ~key_padding_mask.unsqueeze(-1)
        if reduce == "max":
            filled = x if valid is None else x.masked_fill(~valid, float("-inf"))
            return filled.amax(1).nan_to_num(0.0, neginf=0.0)
        total = (x if valid is None else x * valid).sum(1)
        if reduce == "sum":
            return total
        count = x.shape[1] if valid is None else valid.sum(1).clamp_min(1)
        return total / count
    if batch is None:
        batch = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    if num_graphs is None:
        num_graphs = int(batch[-1]) + 1 if batch.numel() else 0
    shape = (num_graphs,) + tuple(x.shape[1:])
    index = batch.view((-1,) + (1,) * (x.dim() - 1)).expand_as(x)
    if reduce == "max":
        out = x.new_full(shape, float("-inf")).scatter_reduce(0, index, x, "amax")
        return out.nan_to_num(0.0, neginf=0.0)
    total = x.new_zeros(shape).index_add(0, batch, x)
    if reduce == "sum":
        return total
    count = torch.bincount(batch, minlength=num_graphs).clamp_min(1).to(x.dtype)
    return total / count.view((-1,) + (1,) * (x.dim() - 1))

r"""RPE attention inside PyTorch Geometric's graph transformers (GPS, Performer).

PyG's :class:`~torch_geometric.nn.conv.GPSConv` calls its global attention as
``attn(h, mask=mask)`` on the dense batch of :func:`~torch_geometric.utils.to_dense_batch`
(``mask`` True for real nodes), but only when ``attn`` is a
:class:`torch.nn.MultiheadAttention` or a :class:`~torch_geometric.nn.attention.PerformerAttention`:
any other module assigned to ``gps.attn`` is skipped without a word (the output then equals
the layer without attention), and positions never reach it.

* :class:`PerformerRPEAttention` is a drop-in for ``PerformerAttention``: the same call
  ``attn(x [b, n, c], mask [b, n])`` with PyG's mask convention, plus ``pos [b, n, p]``,
  computed by :class:`~geolinrpe.nn.RPEAttention`. It subclasses ``PerformerAttention`` so
  that ``GPSConv`` dispatches to it; positions reach it inside ``GPSConv`` through
  :meth:`PerformerRPEAttention.positions`.
* :class:`RPEGPSConv` is ``GPSConv`` with that attention and a ``pos`` argument:
  ``RPEGPSConv(channels, conv, heads, rpe="flt-kernel", pos_dim=3)(x, edge_index, batch,
  pos=pos)``.

Shapes: ``x [n, c]``, ``pos [n, p]``, ``batch [n]`` (packed, as PyG batches them); the
attention sees them as dense ``[b, n_max, ...]`` with PyG's ``mask`` (True = node), which is
the complement of :class:`~geolinrpe.nn.RPEAttention`'s ``key_padding_mask`` (True = padding).

Invariances: those of :class:`~geolinrpe.nn.RPEAttention` (permutation equivariant within each
graph; translation invariant in ``pos``), composed with the local message passing's own.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn
from torch_geometric.nn.attention import PerformerAttention
from torch_geometric.nn.conv import GPSConv
from torch_geometric.utils import to_dense_batch

from .attention import RPEAttention

__all__ = ["PerformerRPEAttention", "RPEGPSConv"]


class PerformerRPEAttention(PerformerAttention):
    r"""RPE attention with the call signature of PyG's ``PerformerAttention``.

    Args:
        channels: node feature size ``c``.
        heads: attention heads (``channels`` must be divisible by it).
        rpe: an RPE registry name, an :class:`~geolinrpe.rpe.RPE`, or ``None`` (plain linear
            attention, no positions needed). (default ``"flt-kernel"``)
        pos_dim: position dimension ``p``. (default 3)
        dropout: dropout on the attention output, as ``PerformerAttention``. (default 0)
        **options: further keyword arguments of :class:`~geolinrpe.nn.RPEAttention`
            (``mode``, ``kernel``, ``num_features``, ``rpe_options``, ...).

    Shapes:
        ``x [b, n, c]``, ``mask [b, n]`` (True = node, PyG's convention; ``None`` = all
        nodes), ``pos [b, n, p]`` -> ``[b, n, c]``.
    """

    def __init__(
        self,
        channels: int,
        heads: int,
        rpe: Any = "flt-kernel",
        pos_dim: int = 3,
        dropout: float = 0.0,
        **options: Any,
    ) -> None:
        nn.Module.__init__(self)  # PerformerAttention's own projections are not used
        self.channels, self.heads = channels, heads
        self.attention = RPEAttention(channels, heads, rpe=rpe, pos_dim=pos_dim, **options)
        self.dropout = nn.Dropout(dropout)
        self._pos: Tensor | None = None

    @contextmanager
    def positions(self, pos: Tensor, batch: Tensor | None = None) -> Iterator[None]:
        """Within the block, calls without ``pos`` use ``pos [n, p]`` of the packed nodes
        (laid out by ``to_dense_batch(pos, batch)``, as ``GPSConv`` lays out ``x``)."""
        dense, _ = to_dense_batch(pos, batch)
        self._pos = dense
        try:
            yield
        finally:
            self._pos = None

    def forward(self, x: Tensor, mask: Tensor | None = None, pos: Tensor | None = None) -> Tensor:
        """Attend over the nodes of each graph; see the class docstring for shapes."""
        if pos is None:
            pos = self._pos
        if pos is None:
            if self.attention.rpe is not None:
                raise ValueError(
                    "PerformerRPEAttention needs positions: pass pos [b, n, p], or call it inside "
                    "'with attn.positions(pos, batch):' (as GPSConv does not pass them)"
                )
            pos = x.new_zeros(*x.shape[:-1], 1)
        if mask is not None and mask.shape != x.shape[:-1]:
            raise ValueError(f"mask must have shape {list(x.shape[:-1])}, got {list(mask.shape)}")
        padding = None if mask is None else ~mask.bool()
        return self.dropout(self.attention(x, pos, key_padding_mask=padding))

    def _reset_parameters(self) -> None:  # the name GPSConv.reset_parameters calls
        self.attention.reset_parameters()

    def reset_parameters(self) -> None:
        self._reset_parameters()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.channels}, heads={self.heads}, {self.attention})"


class RPEGPSConv(GPSConv):
    r"""PyG's GPS layer (Rampášek et al., NeurIPS 2022) with O(n) RPE attention as its global
    attention: ``out = MLP(local(x) + attention(x, pos))`` with residuals and norms as in
    :class:`~torch_geometric.nn.conv.GPSConv`.

    Args:
        channels: node feature size.
        conv: the local message passing layer (or ``None``), as for ``GPSConv``.
        heads: attention heads. (default 1)
        dropout, act, act_kwargs, norm, norm_kwargs: as for ``GPSConv``.
        rpe, pos_dim, attn_kwargs: the attention (:class:`PerformerRPEAttention`).

    Shapes:
        ``x [n, c]``, ``edge_index [2, e]``, ``batch [n]``, ``pos [n, p]`` -> ``[n, c]``.
    """

    def __init__(
        self,
        channels: int,
        conv: nn.Module | None,
        heads: int = 1,
        dropout: float = 0.0,
        act: str = "relu",
        act_kwargs: dict[str, Any] | None = None,
        norm: str | None = "batch_norm",
        norm_kwargs: dict[str, Any] | None = None,
        rpe: Any = "flt-kernel",
        pos_dim: int = 3,
        attn_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(
            channels, conv, heads=heads, dropout=dropout, act=act, act_kwargs=act_kwargs,
            norm=norm, norm_kwargs=norm_kwargs, attn_type="performer",
        )  # fmt: skip
        self.attn = PerformerRPEAttention(
            channels, heads, rpe=rpe, pos_dim=pos_dim, dropout=0.0, **(attn_kwargs or {})
        )
        self.attn_type = "rpe"

    def forward(
        self,
        x: Tensor,
        edge_index: Any,
        batch: Tensor | None = None,
        pos: Tensor | None = None,
        **kwargs: Any,
    ) -> Tensor:
        """Local message passing plus RPE attention over each graph's nodes at ``pos``."""
        if pos is None:
            return super().forward(x, edge_index, batch, **kwargs)
        with self.attn.positions(pos, batch):
            return super().forward(x, edge_index, batch, **kwargs)

r"""``ExactRPEAttention``: the O(n^2) exact-attention baseline in the same code path.

Axes: b batch, n tokens, c channels, g graphs, L longest graph, h heads.

The baseline that every linear model is compared with: exact softmax attention with the same
RPE as a dense bias (logit mode, Graphormer-3D-style), or exact kernel attention masked by the
closed-form ``f`` (mask mode), computed by :meth:`RPEAttention.reference` with
``kernel="exact", rpe="exact"``. It has exactly the parameters and buffers of
:class:`~geolinrpe.nn.RPEAttention`, so state dicts move between the two.
"""

from __future__ import annotations

from torch import Tensor

from ..ops.checks import check_batch
from ..ops.packing import to_packed, to_padded
from .attention import RPEAttention

__all__ = ["ExactRPEAttention"]


class ExactRPEAttention(RPEAttention):
    r"""Exact O(n^2) attention with the same parameters as :class:`RPEAttention`.

    .. math::

        \text{logit mode:}\quad
        \mathrm{out}_i = \frac{\sum_j e^{q_i \cdot k_j / \sqrt{d} + f(r_i - r_j)} v_j}
                              {\sum_j e^{q_i \cdot k_j / \sqrt{d} + f(r_i - r_j)}},
        \qquad
        \text{mask mode:}\quad
        \mathrm{out}_i = \frac{\sum_j K(q_i, k_j) f(r_i - r_j) v_j}{Z_i}

    with the closed-form ``f`` of the RPE and the exact kernel ``K`` that the random
    features estimate (``Z_i`` as ``normalize``): ``forward`` is
    ``self.reference(x, pos, batch, key_padding_mask, kernel="exact", rpe="exact", cell=cell)``.
    A packed batch of several graphs is padded first (one dense ``[g, L, L]`` score block
    per head instead of a block-diagonal ``[n, n]`` one: memory ``O(h sum_g L^2)``, not
    ``O(h n^2)``), which gives the same numbers.

    Args:
        as :class:`RPEAttention` (same constructor, parameters and buffers).

    Shapes:
        as :class:`RPEAttention`: dense ``x [b, n, c]``, ``pos [b, n, p]``,
        ``key_padding_mask [b, n]`` -> ``[b, n, c]``; packed ``x [n, c]``, ``pos [n, p]``,
        ``batch [n]`` -> ``[n, c]``; ``cell [g, p, p]`` for periodic RPEs.
    """

    def forward(
        self,
        x: Tensor,
        pos: Tensor | None = None,
        batch: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        cell: Tensor | None = None,
    ) -> Tensor:
        """Exact attention; see the class docstring for shapes."""
        exact = dict(kernel="exact", rpe="exact", cell=cell)
        paddable = (
            isinstance(x, Tensor)
            and x.dim() == 2
            and isinstance(batch, Tensor)
            and key_padding_mask is None
            and (pos is None or (isinstance(pos, Tensor) and pos.dim() == 2 and len(pos) == len(x)))
        )
        graphs = check_batch(batch, x.shape[0], x.device, allow_empty=True) if paddable else 0
        if paddable and (graphs is None or graphs > 1):  # None: compiling, count unknown
            dense_x, mask = to_padded(x, batch)
            dense_pos = None if pos is None else to_padded(pos, batch)[0]
            out = self.reference(dense_x, dense_pos, None, mask, **exact)
            return to_packed(out, mask)[0]
        return self.reference(x, pos, batch, key_padding_mask, **exact)

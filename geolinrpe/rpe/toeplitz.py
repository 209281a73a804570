r"""Toeplitz RPE: a learned bias per grid offset, applied exactly by FFT.

Luo et al., `"Stable, Fast and Accurate: Kernelized Attention with Relative Positional
Encoding" <https://arxiv.org/abs/2106.12566>`_ (NeurIPS 2021).

Axes: b batch, n/i/j tokens, h heads, d head dim, e value dim, p position dim.

Tokens sit on a regular grid (1D sequence indices, 2D image-patch ``(row, col)``); the mask
``f_h(Delta) = exp(b_h[Delta])`` of an integer offset ``Delta = r_i - r_j`` multiplies the
kernel, and because ``f_h(r_i - r_j)`` is a (block-)Toeplitz matrix the masked sums are
convolutions over the grid: :func:`~geolinrpe.ops.toeplitz.toeplitz_attention` computes
them by FFT in ``O(r e n log n)``, exactly (no random features for the RPE).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..features.base import FeatureMap
from ..ops.checks import eager_checks
from ..ops.linear import HALF, _check_inputs
from ..ops.modes import MaskMode
from ..ops.packing import PaddedBuckets
from ..ops.toeplitz import NORMALIZATIONS, toeplitz_attention
from .base import RPE

#: ``|r - round(r)|`` above which a position is not on the integer grid
INTEGER_TOLERANCE = 1e-3
#: largest ``|r|`` accepted as a grid coordinate
MAX_COORDINATE = 2**31


class ToeplitzRPE(RPE):
    r"""Per-offset learned bias ``exp(b_h[r_i - r_j])`` on a regular grid (``"toeplitz-fft"``).

    Kernelized attention with a Toeplitz relative positional encoding from Luo et al.,
    `"Stable, Fast and Accurate: Kernelized Attention with Relative Positional Encoding"
    <https://arxiv.org/abs/2106.12566>`_ (NeurIPS 2021), for mask mode with any feature map:

    .. math::

        \mathrm{out}_i = \frac{\sum_j \phi(q_i)^\top \phi(k_j)\, e^{b_h[r_i - r_j]}\, v_j}
        {\sum_j \phi(q_i)^\top \phi(k_j)\, e^{b_h[r_i - r_j]}}

    :meth:`attend` (which :class:`~geolinrpe.nn.RPEAttention` calls in place of the chunked
    engine) places each sequence's tokens on a grid, shifted by their per-axis minimum (the
    layer centres positions by floor(mean + 1/2), so coordinates may be negative; offsets do not
    change), and runs the FFT operator :func:`~geolinrpe.ops.toeplitz.toeplitz_attention`.
    Packed batches run per size bucket of graphs, so no graph sees another.

    Positions must be integers (within ``1e-3``) and every sequence must span at most
    ``max_offset + 1`` cells per axis; otherwise ``ValueError`` names ``pos``. Tokens may
    occupy any subset of the grid, several tokens may share a cell. ``causal`` (1D only)
    means offsets ``r_i - r_j >= 0``; it equals the layer's token-order causality because
    positions must then strictly increase along each sequence.

    ``exp(b) > 0``, so with positive feature maps the masked denominator (the default) is
    positive; ``"none"`` is also allowed. The engine's ``"kernel"`` normalisation is not:
    the featurizer carries no separate mask. The zero initialisation is neutral
    (``exp(0) = 1``: plain linear attention).

    References: :meth:`pairwise` gives the dense ``exp(b[r_i - r_j])`` and
    :meth:`reference_attention` masks the kernel with it for either ``rpe`` (nothing is
    estimated, ``f_hat = f``), so ``RPEAttention.reference(kernel="features" or "exact",
    rpe="exact")`` is the O(n^2) target. The featurizer has no RPE features: a reference
    built from them alone (the layer's ``kernel="features", rpe="features"``, which calls
    :func:`~geolinrpe.ops.feature_attention` directly) is plain linear attention.

    Args:
        pos_dim: grid dimension ``p`` (1 sequences, 2 image-patch grids; any ``p`` works:
            the FFTs run on about ``2^p`` times the cells of the largest bounding box).
        num_heads: heads ``h`` (one bias table each).
        max_offset: largest ``|r_i - r_j|`` per axis (int or ``pos_dim`` ints): a sequence
            may span ``max_offset + 1`` cells per axis. No default: it sets the parameter count.

    Shapes:
        ``bias``: ``[h, 2 max_offset_1 + 1, .., 2 max_offset_p + 1]`` (entry ``max_offset``
        of each axis is offset 0);
        ``closed_form(delta [..., p])`` -> ``[..., h]``;
        ``pairwise(pos [b, n, p])`` -> ``[b, h, i, j]``;
        ``attend``: ``q, k [b, n, h, d]``, ``v [b, n, h, e]``, ``pos [b, n, p]`` (packed:
        ``[n, h, *]``, ``[n, p]`` with ``batch [n]``) -> ``[b, n, h, e]`` (``[n, h, e]``).
    """

    modes = ("mask",)
    integer_positions = True
    uses_engine = False

    def __init__(self, pos_dim: int, num_heads: int, max_offset: int | Sequence[int]) -> None:
        super().__init__(pos_dim, num_heads)
        offsets = (max_offset,) * pos_dim if isinstance(max_offset, int) else tuple(max_offset)
        if len(offsets) != pos_dim or not all(
            isinstance(m, int) and not isinstance(m, bool) and m >= 0 for m in offsets
        ):
            raise ValueError(
                f"max_offset must be a non-negative int or {pos_dim} of them, got {max_offset!r}"
            )
        self.max_offset = offsets
        self.bias = nn.Parameter(torch.empty((num_heads,) + tuple(2 * m + 1 for m in offsets)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Zero bias: ``exp(0) = 1``, plain linear attention."""
        with torch.no_grad():
            self.bias.zero_()

    # ------------------------------------------------------------------ contract
    def kernel_input_dim(self, head_dim: int, mode: str) -> int:
        return head_dim

    def normalizations(self, mode: str) -> tuple[str, ...]:
        """``("masked", "none")``: no separate mask, so no ``"kernel"`` denominator."""
        return NORMALIZATIONS

    def featurizer(self, feature_map: FeatureMap, input_scale: float, mode: str) -> MaskMode:
        """Kernel features only (the bias is applied by :meth:`attend`)."""
        if mode not in self.modes:
            raise ValueError(f"mode must be 'mask' for {type(self).__name__}, got {mode!r}")
        return MaskMode(feature_map, None, input_scale)

    def redraw(self, generator: torch.Generator | None = None) -> None:
        """No-op: nothing is random."""

    def closed_form(self, delta: Tensor) -> Tensor:
        """``f(delta) = exp(b[delta])``: integer offsets ``delta [..., p]`` -> ``[..., h]``.

        Offsets beyond ``max_offset`` (outside the learned table) give 0.
        """
        return self._lookup(delta, "delta")

    def pairwise(self, pos: Tensor, exact: bool = False) -> Tensor:
        """Dense ``exp(b[r_i - r_j])``: ``pos [b, n, p]`` -> ``[b, h, i, j]`` (O(n^2)).

        ``exact`` is ignored (nothing is estimated). Pairs beyond ``max_offset`` give 0, so
        that padding and other graphs of a packed batch, which references mask, may lie
        anywhere on the integer grid; :meth:`attend` refuses such pairs within a sequence.
        Non-integer offsets raise ``ValueError`` naming ``pos``.
        """
        delta = pos.unsqueeze(-2) - pos.unsqueeze(-3)  # [b, i, j, p]
        return self._lookup(delta, "pos").movedim(-1, -3)

    def reference_attention(
        self, q: Tensor, k: Tensor, v: Tensor, pos: Tensor, **options
    ) -> Tensor:
        """O(n^2) attention with the dense :meth:`pairwise` mask (see :class:`RPE`).

        ``rpe="features"`` is the exact mask too: nothing is estimated (``f_hat = f``), and
        the featurizer's features carry no encoding, so they must not stand in for it.
        """
        return super().reference_attention(q, k, v, pos, **{**options, "rpe": "exact"})

    def _lookup(self, delta: Tensor, name: str) -> Tensor:
        rounded = delta.round()
        check = eager_checks() and delta.numel()
        if check and not bool(((delta - rounded).abs() <= INTEGER_TOLERANCE).all()):
            raise ValueError(f"{name} must hold integer grid offsets for {type(self).__name__}")
        limit = torch.tensor(self.max_offset, dtype=delta.dtype, device=delta.device)
        inside = (rounded.abs() <= limit).all(-1)
        index = (torch.minimum(torch.maximum(rounded, -limit), limit) + limit).long()
        logits = self.bias.to(delta.dtype)[(slice(None),) + tuple(index.unbind(-1))]
        return torch.where(inside, torch.exp(logits), 0.0).movedim(0, -1)

    # ------------------------------------------------------------------ grid
    def grid(
        self, pos: Tensor, key_padding_mask: Tensor | None = None, causal: bool = False
    ) -> tuple[Tensor, tuple[int, ...]]:
        """Validated grid cells of dense ``pos [b, n, p]``.

        Returns ``(grid_pos [b, n, p] long, grid_shape)``: each sequence shifted by its
        valid tokens' per-axis minimum, ``grid_shape`` the largest extent over the batch.
        Padded tokens (``key_padding_mask`` True) are ignored and get cell 0. With
        ``causal`` the positions must strictly increase along each sequence.
        """
        valid = torch.ones(pos.shape[:2], dtype=torch.bool, device=pos.device)
        if key_padding_mask is not None:
            valid = ~key_padding_mask
        pos = pos.masked_fill(~valid[..., None], 0)
        rounded = pos.round()
        if eager_checks() and not bool(
            (torch.isfinite(pos) & (rounded.abs() < MAX_COORDINATE)).all()
            and ((pos - rounded).abs() <= INTEGER_TOLERANCE).all()
        ):
            raise ValueError(
                f"pos must hold integer grid coordinates (sequence indices, patch (row, col)) "
                f"below {MAX_COORDINATE} in magnitude for {type(self).__name__}"
            )
        cells = rounded.long()
        wide = torch.iinfo(torch.long).max
        low = cells.masked_fill(~valid[..., None], wide).amin(1)  # [b, p]
        high = cells.masked_fill(~valid[..., None], -wide).amax(1)
        empty = ~valid.any(1)[:, None]  # rows without valid tokens
        low, high = low.masked_fill(empty, 0), high.masked_fill(empty, 0)
        extent = (high - low + 1).amax(0).tolist()
        if any(e > m + 1 for e, m in zip(extent, self.max_offset, strict=True)):
            raise ValueError(
                f"pos spans {extent} grid cells per axis within a sequence, but "
                f"max_offset={self.max_offset} allows at most {[m + 1 for m in self.max_offset]}"
            )
        grid_pos = (cells - low[:, None]).masked_fill(~valid[..., None], 0)
        if causal:
            order = grid_pos[..., 0].masked_fill(~valid, -1)
            before = torch.cat([order.new_full((order.shape[0], 1), -1), order[:, :-1]], 1)
            if bool((valid & (order <= before.cummax(1).values)).any()):
                raise ValueError(
                    "pos must strictly increase along each sequence with causal=True "
                    "(the FFT's causality is by grid offset, the layer's by token order)"
                )
        return grid_pos, tuple(extent)

    # ------------------------------------------------------------------ attention
    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        pos: Tensor | None,
        *,
        featurizer: MaskMode,
        key_padding_mask: Tensor | None = None,
        batch: Tensor | None = None,
        causal: bool = False,
        normalize: str = "masked",
        chunk_size: int | None = None,
        check_finite: bool = True,
        **options,
    ) -> Tensor:
        """FFT Toeplitz attention; options as for :func:`~geolinrpe.ops.linear_attention`.

        ``featurizer`` must be this RPE's (kernel features only). ``chunk_size`` is
        validated and otherwise unused: the FFT has no token chunks (it chunks kernel
        features by a memory budget). Unknown options raise ``ValueError``.
        """
        if options:
            raise ValueError(f"unknown option(s) {sorted(options)} for {type(self).__name__}")
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
        if not isinstance(causal, bool):
            raise ValueError(f"causal must be a bool, got {causal!r}")
        if causal and self.pos_dim != 1:
            raise ValueError(f"causal needs pos_dim=1 (a sequence), got pos_dim={self.pos_dim}")
        if chunk_size is not None and (
            not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size <= 0
        ):
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        if not isinstance(featurizer, MaskMode) or featurizer.rpe is not None:
            raise ValueError(
                "featurizer must be the kernel-only MaskMode of ToeplitzRPE.featurizer, "
                f"got {type(featurizer).__name__}"
            )
        if pos is None:
            raise ValueError(f"pos is required by {type(self).__name__}")
        packed = batch is not None
        _check_inputs(q, k, v, pos, key_padding_mask, batch, packed, check_finite)
        out_dtype = v.dtype
        if out_dtype in HALF:  # features and FFTs in float32
            q, k, v = q.float(), k.float(), v.float()
        run = dict(featurizer=featurizer, causal=causal, normalize=normalize)
        with torch.autocast(device_type=v.device.type, enabled=False):
            if not packed:
                out = self._attend_dense(q, k, v, pos, key_padding_mask=key_padding_mask, **run)
            else:
                out = v.new_empty(v.shape)
                layout = PaddedBuckets(batch)
                for index, mask in layout.buckets:
                    qb, kb, vb, pb = (layout.gather(t, index, mask) for t in (q, k, v, pos))
                    dense = self._attend_dense(qb, kb, vb, pb, key_padding_mask=mask, **run)
                    layout.scatter(out, dense, index, mask)
        return out.to(out_dtype)

    def _attend_dense(self, q, k, v, pos, *, featurizer, key_padding_mask, causal, normalize):
        grid_pos, grid_shape = self.grid(pos, key_padding_mask, causal)
        fq, fk = featurizer.query(q, None), featurizer.key(k, None)
        return toeplitz_attention(
            fq.phi,
            fk.phi,
            v,
            self.bias,
            grid_pos,
            grid_shape,
            query_log_scale=fq.log_scale,
            key_log_scale=fk.log_scale,
            key_padding_mask=key_padding_mask,
            causal=causal,
            normalize=normalize,
        )

    def extra_repr(self) -> str:
        return f"pos_dim={self.pos_dim}, num_heads={self.num_heads}, max_offset={self.max_offset}"

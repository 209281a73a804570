r"""Stochastic positional encoding (SPE): sineSPE and convSPE.

Liutkus et al., `"Relative Positional Encoding for Transformers with Linear Complexity"
<https://arxiv.org/abs/2105.08399>`_ (ICML 2021); reference code
https://github.com/aliutkus/spe (``spe.py``: ``SineSPE``, ``ConvSPE``, ``SPEFilter``).

Axes: b batch, n tokens, h heads, d channels (the kernel feature map's features, SPE's
``dim``), p position dim, k sines, c cos/sin, r realisations (the encoded features
the engine sees), t tokens flattened, a and b filter taps.

**The encoding.** Per head and channel ``d``, a pair of zero-mean random processes
``Qbar_d(u), Kbar_d(u)`` over positions has the stationary cross-covariance
``E[Qbar_d(u) Kbar_d(u')] = P_d(u - u')``. ``R`` independent realisations give codes
``Qbar [n, h, d, R]``, and the kernel features ``phi(q)``, ``phi(k)`` (any feature map, its
``r`` features being the channels) become

.. math::

    \hat q_n = R^{-1/2} \sum_d \phi(q_n)_d \, \bar Q_d(u_n), \qquad
    \hat k_m = R^{-1/2} \sum_d \phi(k_m)_d \, \bar K_d(u_m) \in \mathbb{R}^R,

    \mathbb{E}[\hat q_n \cdot \hat k_m] = \sum_d \phi(q_n)_d \, \phi(k_m)_d \, P_d(u_n - u_m),

since the noise is independent across channels (the cross-channel terms have zero mean).
This is *not* a kernel times one mask ``f``: every channel has its own ``P_d``. The
featurizer returns ``qhat`` as the engine's ``phi`` (``R`` features, ``psi = None``); the
feature map's ``log_scale`` passes through, because the encoding is linear in ``phi``.
The reference code scales each side by ``(R d)^{-1/4}``; ``R^{-1/2}`` differs by the global
factor ``sqrt(R / d)``, which cancels in normalised attention and makes ``qhat . khat`` an
unbiased estimate of the weight itself (so ``normalize="none"`` is meaningful).

**Gating** (``SPEFilter(gated=True)`` of the reference code, followed exactly): a learned
``g_d = sigmoid(gate_d)`` in ``(0, 1)`` and position-independent noise ``eps_d`` (a buffer)
mix a constant into the codes,

.. math::

    \bar Q_d \leftarrow \sqrt{1 - g_d}\, \bar Q_d + \sqrt{g_d}\, \epsilon_d, \qquad
    \bar K_d \leftarrow \sqrt{1 - g_d}\, \bar K_d + \sqrt{g_d}\, \epsilon_d, \qquad
    P_d \leftarrow (1 - g_d) P_d + g_d,

so ``g -> 0`` is fully positional and ``g -> 1`` is position-free kernel attention.

**Normalisation.** The paper feeds ``qhat, khat`` to linear attention as ordinary features:
numerator *and* denominator use the encoded features, ``out_n = sum_m (qhat_n . khat_m) v_m
/ sum_m qhat_n . khat_m``: the engine's ``normalize="masked"``, the layer's default here
(:meth:`SPE.normalizations` allows ``"masked"`` and ``"none"``). ``"kernel"`` is refused:
with ``psi = None`` the engine would compute the same masked denominator under that name,
and a denominator from the un-encoded ``phi(q) . phi(k)`` would need a second set of
features that the engine does not take.
``qhat . khat`` is signed, and so is the target ``sum_d phi_d phi_d P_d`` whenever some
``P_d`` is negative (sineSPE with offsets, convSPE with signed filters): the denominator can
approach 0 and the output is then unbounded, for the exact target as well as for the
estimate. Gating (``P_d + g_d``) and positive feature maps push the denominator away from 0;
nothing is clamped.

**Positions.** :meth:`SPE.encode_positions` (called by :class:`~geolinrpe.nn.RPEAttention`)
subtracts each sequence's first valid token's position, so through the layer SPE is exactly
translation invariant for every draw, also in causal layers (the first token is in every
token's past) and after the layer's centring. Called directly, the featurizer uses the
positions as given: a shift by ``s`` is then a different draw of the same distribution
(sineSPE rotates each ``(cos, sin)`` noise pair by ``2 pi f s``; convSPE translates the noise
by ``s``), so the output is invariant in distribution only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..features.base import FeatureMap
from ..ops.checks import eager_checks
from ..ops.exact import allowed_pairs, masked_kernel_attention
from ..ops.modes import TokenFeatures
from .base import RPE, _check_positive_ints

#: ``|u - round(u)|`` above which a convSPE position is not on the integer grid (the
#: layer's centring and re-basing leave rounding errors far below this)
INTEGER_TOLERANCE = 1e-3
#: elements of the per-slice gathered noise ``[R, h, d, t, taps]`` in :class:`ConvSPE`
CODE_BUDGET = 2**23


class SPE(RPE):
    """Base class of stochastic positional encodings (mask mode only).

    Args:
        pos_dim: position dimension ``p``.
        num_heads: heads ``h``.
        dim: channels ``d``: the number of features of the kernel feature map
            (``head_dim`` for ``"elu"``/``"relu"``/``"identity"``, ``num_features`` for
            ``"favor+"``; :class:`~geolinrpe.nn.RPEAttention` fills it when it builds the
            encoding by name).
        num_realizations: realisations ``R`` (default 64); the engine sees ``R`` features.
        gated: learn a per-channel gate mixing the code with a constant (default ``True``,
            as the reference ``SPEFilter``).

    Subclasses register the white noise as a buffer ``noise`` and implement
    :meth:`positional_codes`, :meth:`positional_kernel`, :meth:`encode` and
    :meth:`reset_parameters` (ending in ``super().reset_parameters()``).
    """

    modes = ("mask",)

    def __init__(
        self,
        pos_dim: int,
        num_heads: int,
        dim: int,
        num_realizations: int = 64,
        gated: bool = True,
    ) -> None:
        super().__init__(pos_dim, num_heads)
        _check_positive_ints(dim=dim, num_realizations=num_realizations)
        if not isinstance(gated, bool):
            raise ValueError(f"gated must be a bool, got {gated!r}")
        self.dim = dim
        self.num_realizations = num_realizations
        self.gated = gated
        if gated:
            self.gate = nn.Parameter(torch.empty(num_heads, dim))
            self.register_buffer("gate_noise", torch.empty(num_heads, dim, num_realizations))

    # ------------------------------------------------------------------ contract
    def kernel_input_dim(self, head_dim: int, mode: str) -> int:
        return head_dim

    def featurizer(self, feature_map: FeatureMap, input_scale: float, mode: str) -> SPEFeaturizer:
        if mode not in self.modes:
            raise ValueError(
                f"mode must be 'mask' for {type(self).__name__}: SPE encodes the kernel "
                f"features and has no logit-bias form, got {mode!r}"
            )
        return SPEFeaturizer(feature_map, self, input_scale)

    def normalizations(self, mode: str) -> tuple[str, ...]:
        """``("masked", "none")``: with ``psi = None`` the engine's ``"kernel"`` denominator
        would be ``sum qhat . khat``, i.e. ``"masked"`` under a misleading name."""
        return ("masked", "none")

    def pairwise(self, pos: Tensor, exact: bool = False) -> Tensor:
        raise NotImplementedError(
            f"{type(self).__name__} has one kernel P_d per channel, not a single mask f: "
            "use code_kernel() or spe_reference()"
        )

    def reference_attention(
        self,
        q,
        k,
        v,
        pos,
        *,
        featurizer,
        mode,
        normalize,
        kernel="exact",
        rpe="exact",
        key_padding_mask=None,
        batch=None,
        causal=False,
    ):
        """Exact O(n^2) SPE target (:func:`spe_reference`, the analytic ``P_d``) on the
        layer's kernel features; ``rpe="features"`` (the realised codes) is the layer's
        explicit-feature form, and ``kernel="exact"`` needs a deterministic feature map."""
        if rpe != "exact":
            raise ValueError("SPE: rpe='features' is reference(kernel='features', rpe='features')")
        if kernel == "exact" and featurizer.feature_map.random:
            raise ValueError("SPE with random kernel features: use kernel='features'")
        return spe_reference(
            q,
            k,
            v,
            pos,
            self,
            featurizer.feature_map,
            input_scale=featurizer.input_scale,
            key_padding_mask=key_padding_mask,
            batch=batch,
            causal=causal,
            normalize=normalize,
        )

    def encode_positions(
        self,
        pos: Tensor,
        *,
        batch: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        cell: Tensor | None = None,
    ) -> Tensor:
        """Positions relative to each sequence's (graph's) first valid token.

        Makes the codes, hence the layer, exactly translation invariant for every draw;
        padded tokens get position 0.
        """
        if batch is not None:
            counts = torch.bincount(batch)
            first = torch.cumsum(counts, 0) - counts
            return pos - pos[first][batch]
        if key_padding_mask is None:
            return pos - pos[..., :1, :]
        first = (~key_padding_mask).to(torch.uint8).argmax(-1)  # first valid token of a row
        origin = torch.gather(pos, -2, first[..., None, None].expand(-1, 1, pos.shape[-1]))
        return torch.where(key_padding_mask[..., None], 0.0, pos - origin)

    # ------------------------------------------------------------------ parameters
    def reset_parameters(self) -> None:
        if self.gated:
            with torch.no_grad():
                self.gate.normal_()  # reference: torch.randn(code_shape)
        self.redraw()

    @torch.no_grad()
    def redraw(self, generator: torch.Generator | None = None) -> None:
        """Draw new white noise for the codes (and for the gate's constant code)."""
        self.noise.copy_(_randn_like(self.noise, generator))
        if self.gated:
            self.gate_noise.copy_(_randn_like(self.gate_noise, generator))

    # ------------------------------------------------------------------ codes
    def positional_codes(self, pos: Tensor, query: bool) -> Tensor:  # pragma: no cover
        """Ungated ``Qbar`` (``query``) or ``Kbar``: ``pos [..., p]`` -> ``[..., h, d, R]``."""
        raise NotImplementedError

    def positional_kernel(self, delta: Tensor) -> Tensor:  # pragma: no cover - abstract
        """Ungated ``P_d(delta)``: ``delta [..., p]`` -> ``[..., h, d]``."""
        raise NotImplementedError

    def codes(self, pos: Tensor, query: bool = True) -> Tensor:
        """Codes ``Qbar`` or ``Kbar`` with gating: ``pos [..., p]`` -> ``[..., h, d, R]``.

        Per realisation ``E[Qbar(u) Kbar(u')] = P_d(u - u')`` (:meth:`code_kernel`).
        """
        codes = self.positional_codes(pos, query)
        if not self.gated:
            return codes
        gate = torch.sigmoid(self.gate).to(codes.dtype)[..., None]
        return (1 - gate).sqrt() * codes + gate.sqrt() * self.gate_noise.to(codes.dtype)

    def code_kernel(self, delta: Tensor) -> Tensor:
        """Analytic ``P_d(delta)``, gating included: ``delta [..., p]`` -> ``[..., h, d]``."""
        kernel = self.positional_kernel(delta)
        if not self.gated:
            return kernel
        gate = torch.sigmoid(self.gate).to(kernel.dtype)
        return (1 - gate) * kernel + gate

    def encode(self, phi: Tensor, pos: Tensor, query: bool) -> Tensor:  # pragma: no cover
        """``qhat`` or ``khat``: ``phi [..., h, d]``, ``pos [..., p]`` -> ``[..., h, R]``.

        Equals ``R^-1/2 sum_d phi_d codes(pos)_d``; subclasses avoid forming all codes at once.
        """
        raise NotImplementedError

    def _gate_term(self, phi: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(sqrt(1 - g) phi, R^-1/2 sum_d sqrt(g) phi eps)``; ``(phi, None)`` ungated."""
        if not self.gated:
            return phi, None
        gate = torch.sigmoid(self.gate).to(phi.dtype)
        noise = self.gate_noise.to(phi.dtype)
        const = torch.einsum("...hd,hdr->...hr", phi * gate.sqrt(), noise)
        return phi * (1 - gate).sqrt(), const / math.sqrt(self.num_realizations)

    def extra_repr(self) -> str:
        return (
            f"pos_dim={self.pos_dim}, num_heads={self.num_heads}, dim={self.dim}, "
            f"num_realizations={self.num_realizations}, gated={self.gated}"
        )


class SineSPE(SPE):
    r"""Sinusoidal SPE (``"spe-sine"``): ``P_d`` a sum of ``K`` learned cosines, 1D positions.

    From Liutkus et al., `"Relative Positional Encoding for Transformers with Linear
    Complexity" <https://arxiv.org/abs/2105.08399>`_ (ICML 2021); parameters, constraints
    and initialisation follow the reference ``SineSPE``. Per head and channel ``d``:

    .. math::

        \bar Q_d(u) = \sum_{k=1}^K \lambda_{dk} \big[\cos(2\pi f_{dk} u + \theta_{dk})\,
            z_{dk}^{c} + \sin(2\pi f_{dk} u + \theta_{dk})\, z_{dk}^{s}\big], \qquad
        \bar K_d(u) = \text{the same with } \theta = 0,

        P_d(\Delta) = \sum_{k=1}^K \lambda_{dk}^2 \cos(2 \pi f_{dk} \Delta + \theta_{dk}),

    with ``f = sigmoid(freqs) / 2`` in ``(0, 1/2)`` cycles per position unit,
    ``theta = offsets``, ``lambda = softplus(gains) / sqrt(2K)`` and white noise
    ``z ~ N(0, 1)`` (buffer ``noise [h, d, 2K, R]``, pairs ``(cos, sin)`` per sine;
    :meth:`redraw` renews it). Positions may be real-valued (time stamps).
    See :mod:`geolinrpe.rpe.spe` for gating, normalisation and invariance.

    Args:
        pos_dim: must be 1.
        num_heads: heads ``h``.
        dim: channels ``d`` = the kernel feature map's ``num_features``.
        num_realizations: ``R`` (default 64).
        num_sines: ``K`` (default 1).
        gated: per-channel gate (default ``True``).

    Shapes:
        ``codes(pos [..., 1])`` -> ``[..., h, d, R]``; ``code_kernel(delta [..., 1])`` ->
        ``[..., h, d]``; ``encode(phi [..., h, d], pos [..., 1])`` -> ``[..., h, R]``.
    """

    def __init__(
        self,
        pos_dim: int,
        num_heads: int,
        dim: int,
        num_realizations: int = 64,
        num_sines: int = 1,
        gated: bool = True,
    ) -> None:
        if pos_dim != 1:
            raise ValueError(f"pos_dim must be 1 for SineSPE (1D positions), got {pos_dim!r}")
        super().__init__(pos_dim, num_heads, dim, num_realizations, gated)
        _check_positive_ints(num_sines=num_sines)
        self.num_sines = num_sines
        shape = (num_heads, dim, num_sines)
        self.freqs = nn.Parameter(torch.empty(shape))
        self.offsets = nn.Parameter(torch.empty(shape))
        self.gains = nn.Parameter(torch.empty(shape))
        self.register_buffer("noise", torch.empty(*shape[:2], 2 * num_sines, num_realizations))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for param in (self.freqs, self.offsets, self.gains):
                param.normal_()
            self.gains /= self.gains.norm(dim=-1, keepdim=True).sqrt() / 2
            self.freqs -= 4.0  # low initial frequencies: long-range attention
        super().reset_parameters()

    def _spectrum(self, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        """``(f, theta, lambda)``, each ``[h, d, K]``."""
        freqs = torch.sigmoid(self.freqs.to(dtype)) / 2
        amplitude = F.softplus(self.gains.to(dtype)) / math.sqrt(2 * self.num_sines)
        return freqs, self.offsets.to(dtype), amplitude

    def _omega(self, pos: Tensor, query: bool, dtype: torch.dtype) -> Tensor:
        """``lambda [cos, sin](2 pi f u + theta)``: ``pos [..., 1]`` -> ``[..., h, d, 2K]``."""
        freqs, offsets, amplitude = self._spectrum(dtype)
        phase = 2 * math.pi * freqs * pos.to(dtype)[..., None, None, :]
        if query:
            phase = phase + offsets
        omega = torch.stack([torch.cos(phase), torch.sin(phase)], dim=-1) * amplitude[..., None]
        return omega.flatten(-2)

    def positional_codes(self, pos: Tensor, query: bool) -> Tensor:
        dtype = self.freqs.dtype
        omega = self._omega(pos, query, dtype)
        return torch.einsum("...hdc,hdcr->...hdr", omega, self.noise.to(dtype))

    def positional_kernel(self, delta: Tensor) -> Tensor:
        freqs, offsets, amplitude = self._spectrum(delta.dtype)
        phase = 2 * math.pi * freqs * delta[..., None, None, :] + offsets
        return (amplitude.pow(2) * torch.cos(phase)).sum(-1)

    def encode(self, phi: Tensor, pos: Tensor, query: bool) -> Tensor:
        # contract phi with the 2K-term expansion before the noise: never forms [.., d, R]
        phi, const = self._gate_term(phi)
        weighted = phi[..., None] * self._omega(pos, query, phi.dtype)  # [..., h, d, 2K]
        noise = self.noise.to(phi.dtype).flatten(1, 2)  # [h, d * 2K, R]
        out = torch.einsum("...hx,hxr->...hr", weighted.flatten(-2), noise)
        out = out / math.sqrt(self.num_realizations)
        return out if const is None else out + const

    def extra_repr(self) -> str:
        return super().extra_repr() + f", num_sines={self.num_sines}"


class ConvSPE(SPE):
    r"""Convolutional SPE (``"spe-conv"``): learned filters on white noise over an integer grid.

    From Liutkus et al., `"Relative Positional Encoding for Transformers with Linear
    Complexity" <https://arxiv.org/abs/2105.08399>`_ (ICML 2021), as the reference
    ``ConvSPE``: one white-noise field ``Z_d`` on the integer lattice per head, channel and
    realisation, filtered by a query and a key filter (a cross-correlation, as torch's convolutions,
    over ``kernel_size`` taps ``t``, evaluated at the tokens' positions only):

    .. math::

        \bar Q_d(u) = \sum_t \varphi^Q_d[t]\, Z_d(u + t), \qquad
        \bar K_d(u) = \sum_t \varphi^K_d[t]\, Z_d(u + t),

        P_d(\Delta) = \sum_t \varphi^Q_d[t]\, \varphi^K_d[t + \Delta],

    the cross-correlation of the two filters (``phi^Q`` convolved with the reversed ``phi^K``),
    zero unless ``|Delta_i| < kernel_size_i``. Two filters, as in the paper and the
    reference code, so ``P_d`` can be asymmetric (directional); it reduces to the
    autocorrelation of one filter when they are equal. Filters start uniform in
    ``[0, 1) / sqrt(prod(kernel_size) / 2)`` (reference).

    Positions must be integer grid coordinates (sequence indices, patch ``(row, col)``):
    a ValueError names ``pos`` otherwise. Through :class:`~geolinrpe.nn.RPEAttention`
    positions are taken relative to each sequence's first token
    (:meth:`~SPE.encode_positions`), so any common shift (also the layer's centring) is
    fine; they must then lie in ``(-grid_size, grid_size)`` per dimension. The noise is a
    buffer ``noise [R, h, d, *(2 grid_size + kernel_size - 2)]`` (memory
    ``R h d prod(2 grid_size + kernel_size - 2)``); :meth:`redraw` renews it. Padded
    tokens' positions must be grid points too (the layer sets them to 0).

    Args:
        pos_dim: 1 (sequences), 2 (image patch grids), 3 (voxels); any ``p`` works, the
            noise buffer grows as ``(2 grid_size)^p``.
        num_heads: heads ``h``.
        dim: channels ``d`` = the kernel feature map's ``num_features``.
        grid_size: largest sequence extent per dimension (int or ``pos_dim`` ints).
        kernel_size: filter taps per dimension (int or ``pos_dim`` ints; default 16).
        num_realizations: ``R`` (default 64).
        gated: per-channel gate (default ``True``).

    Shapes:
        ``codes(pos [..., p])`` -> ``[..., h, d, R]``; ``code_kernel(delta [..., p])`` ->
        ``[..., h, d]``; ``encode(phi [..., h, d], pos [..., p])`` -> ``[..., h, R]``;
        ``query_filter``, ``key_filter``: ``[h, d, *kernel_size]``.
    """

    integer_positions = True

    def __init__(
        self,
        pos_dim: int,
        num_heads: int,
        dim: int,
        grid_size: int | tuple[int, ...],
        kernel_size: int | tuple[int, ...] = 16,
        num_realizations: int = 64,
        gated: bool = True,
    ) -> None:
        super().__init__(pos_dim, num_heads, dim, num_realizations, gated)
        self.grid_size = _per_dim("grid_size", grid_size, pos_dim)
        self.kernel_size = _per_dim("kernel_size", kernel_size, pos_dim)
        filter_shape = (num_heads, dim, *self.kernel_size)
        self.query_filter = nn.Parameter(torch.empty(filter_shape))
        self.key_filter = nn.Parameter(torch.empty(filter_shape))
        extent = tuple(2 * g + k - 2 for g, k in zip(self.grid_size, self.kernel_size, strict=True))
        self.register_buffer("noise", torch.empty(num_realizations, num_heads, dim, *extent))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        scale = math.sqrt(math.prod(self.kernel_size) / 2)
        with torch.no_grad():
            for filt in (self.query_filter, self.key_filter):
                filt.uniform_().div_(scale)
        super().reset_parameters()

    def grid_index(self, pos: Tensor) -> Tensor:
        """Integer positions ``pos [..., p]`` -> noise-buffer indices ``[..., p]`` (validated)."""
        rounded = pos.round()
        fractional = eager_checks() and pos.numel()
        if fractional and bool(((pos - rounded).abs() > INTEGER_TOLERANCE).any()):
            raise ValueError(
                "pos must hold integer grid coordinates for ConvSPE (a regular grid: sequence "
                "indices or patch (row, col)); got non-integer positions"
            )
        index = rounded.long()
        limit = torch.tensor(self.grid_size, device=pos.device)
        if pos.numel() and bool((index.abs() >= limit).any()):
            raise ValueError(
                f"pos must lie in (-grid_size, grid_size) per dimension, grid_size="
                f"{self.grid_size} (relative to each sequence's first token in RPEAttention); "
                "increase grid_size"
            )
        return index + limit - 1

    def positional_codes(self, pos: Tensor, query: bool) -> Tensor:
        lead = pos.shape[:-1]
        index = self.grid_index(pos).reshape(-1, self.pos_dim)
        codes = self._codes_at(index, query, self.query_filter.dtype)  # [t, h, d, R]
        return codes.reshape(*lead, *codes.shape[1:])

    def _taps(self, device: torch.device) -> Tensor:
        """Filter tap offsets ``[T, p]`` in the filters' row-major order."""
        axes = [torch.arange(k, device=device) for k in self.kernel_size]
        return torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, self.pos_dim)

    def _codes_at(self, index: Tensor, query: bool, dtype: torch.dtype) -> Tensor:
        """Filtered noise at buffer indices ``[t, p]`` -> ``[t, h, d, R]``.

        Gathers the noise under every tap (``[R, h, d, t, T]``) and contracts with the filter:
        the convolution evaluated at the tokens only.
        """
        flat = _row_major(index[:, None] + self._taps(index.device), self.noise.shape[3:])
        noise = self.noise.flatten(3)[..., flat].to(dtype)  # [R, h, d, t, T]
        filt = (self.query_filter if query else self.key_filter).to(dtype).flatten(2)
        return torch.einsum("rhdta,hda->thdr", noise, filt)

    def positional_kernel(self, delta: Tensor) -> Tensor:
        rounded = delta.round()
        tolerance = INTEGER_TOLERANCE
        if eager_checks() and delta.numel() and bool(((delta - rounded).abs() > tolerance).any()):
            raise ValueError("pos differences must be integers for ConvSPE (a regular grid)")
        h, d, k = self.num_heads, self.dim, self.kernel_size
        span = [2 * size - 1 for size in k]  # lags -(k - 1) .. k - 1 per dimension
        # table[lag] = sum over tap pairs (t, t + lag) of phi_q[t] phi_k[t + lag]
        taps = self._taps(delta.device)
        lag = _row_major(taps[None, :] - taps[:, None] + taps.new_tensor(k) - 1, span)
        filters = self.query_filter.flatten(2), self.key_filter.flatten(2)
        pairs = torch.einsum("hda,hdb->hdab", *filters).flatten(2)
        table = pairs.new_zeros(h, d, math.prod(span)).index_add(-1, lag.flatten(), pairs)
        offset = rounded.long() + torch.tensor(k, device=delta.device) - 1
        inside = ((offset >= 0) & (offset < offset.new_tensor(span))).all(-1)
        flat = _row_major(torch.where(inside[..., None], offset, 0), span)
        values = table.to(delta.dtype)[..., flat].movedim((0, 1), (-2, -1))
        return torch.where(inside[..., None, None], values, 0.0)

    def encode(self, phi: Tensor, pos: Tensor, query: bool) -> Tensor:
        # slices of tokens keep the [R, h, d, t, T] gathered noise within CODE_BUDGET elements
        lead, h, d = phi.shape[:-2], self.num_heads, self.dim
        index = self.grid_index(pos).reshape(-1, self.pos_dim)
        phi, const = self._gate_term(phi)
        flat_phi = phi.reshape(-1, h, d)
        taps = math.prod(self.kernel_size)
        step = max(1, CODE_BUDGET // (h * d * self.num_realizations * taps))
        out = [
            torch.einsum(
                "thd,thdr->thr",
                flat_phi[start : start + step],
                self._codes_at(index[start : start + step], query, phi.dtype),
            )
            for start in range(0, flat_phi.shape[0], step)
        ]
        out = torch.cat(out).reshape(*lead, h, self.num_realizations)
        out = out / math.sqrt(self.num_realizations)
        return out if const is None else out + const

    def extra_repr(self) -> str:
        return (
            super().extra_repr() + f", grid_size={self.grid_size}, kernel_size={self.kernel_size}"
        )


class SPEFeaturizer:
    """Engine featurizer of an :class:`SPE`: ``phi = qhat`` (``R`` features), no ``psi``.

    Args:
        feature_map: kernel feature map with ``num_features == spe.dim``.
        spe: the :class:`SPE` module.
        input_scale: factor on q and k before the feature map (``d**-0.25`` for FAVOR+).
    """

    has_mask = False
    num_rpe_features = 0

    def __init__(self, feature_map: FeatureMap, spe: SPE, input_scale: float = 1.0) -> None:
        if feature_map.num_features != spe.dim:
            raise ValueError(
                f"dim={spe.dim} of {type(spe).__name__} must equal the kernel "
                f"feature map's num_features={feature_map.num_features} (SPE's channels are "
                "the kernel features)"
            )
        self.feature_map = feature_map
        self.spe = spe
        self.input_scale = input_scale
        self.num_features = spe.num_realizations

    def _features(self, x: Tensor, pos: Tensor | None, query: bool) -> TokenFeatures:
        if pos is None:
            raise ValueError(f"pos is required: {type(self.spe).__name__} encodes positions")
        phi, log_scale = self.feature_map(x * self.input_scale)
        return TokenFeatures(self.spe.encode(phi, pos, query), log_scale, None)

    def query(self, q: Tensor, pos: Tensor | None) -> TokenFeatures:
        return self._features(q, pos, query=True)

    def key(self, k: Tensor, pos: Tensor | None) -> TokenFeatures:
        return self._features(k, pos, query=False)


def spe_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pos: Tensor,
    spe: SPE,
    feature_map: FeatureMap,
    *,
    input_scale: float = 1.0,
    key_padding_mask: Tensor | None = None,
    batch: Tensor | None = None,
    causal: bool = False,
    normalize: str = "masked",
) -> Tensor:
    """Exact SPE target: weights ``sum_d phi(q_i)_d phi(k_j)_d P_d(r_i - r_j)``, O(n^2 d).

    The expectation of the encoded weights over the noise, with the analytic
    :meth:`SPE.code_kernel` and the feature map's current features.

    Args:
        q, k: ``[b, n, h, d_head]`` (dense) or ``[n, h, d_head]`` (packed, with ``batch``).
        v: ``[b, n, h, e]`` or ``[n, h, e]``.
        pos: ``[b, n, p]`` or ``[n, p]``.
        spe: the :class:`SPE`; feature_map: its kernel feature map.
        input_scale: factor on q and k before the feature map (default 1.0).
        key_padding_mask, batch, causal: layout, as :func:`geolinrpe.ops.linear_attention`.
        normalize: ``"masked"`` (default; denominator ``sum_j`` of the weights) or ``"none"``.

    Returns:
        Same layout as ``v``.
    """
    if normalize not in ("masked", "none"):
        raise ValueError(
            f"normalize must be 'masked' or 'none' for SPE (the engine's 'kernel' equals "
            f"'masked' without psi), got {normalize!r}"
        )
    packed = batch is not None
    if packed:
        q, k, v, pos = q[None], k[None], v[None], pos[None]
    phi_q, scale_q = feature_map(q * input_scale)
    phi_k, scale_k = feature_map(k * input_scale)
    code = spe.code_kernel(pos[:, :, None] - pos[:, None, :]).to(phi_q.dtype)  # [b, i, j, h, d]
    weights = torch.einsum("bihd,bjhd,bijhd->bhij", phi_q, phi_k, code)
    if scale_k is not None:  # true features: phi * exp(log_scale); shift by a constant
        allowed = allowed_pairs(q.shape[1], key_padding_mask, batch, causal, q.device)
        total = scale_q.transpose(1, 2)[..., None] + scale_k.transpose(1, 2)[:, :, None, :]
        total = total.masked_fill(~allowed, float("-inf"))
        shift = 0.0 if normalize == "none" else total.amax(-1, keepdim=True).clamp_min(-1e30)
        weights = weights * torch.exp(total - shift)
    if packed:
        weights, v = weights[0], v[0]
    return masked_kernel_attention(
        weights,
        v,
        None,
        key_padding_mask=key_padding_mask,
        batch=batch,
        causal=causal,
        normalize=normalize,
    )


def _per_dim(name: str, value: int | tuple[int, ...], pos_dim: int) -> tuple[int, ...]:
    values = (value,) * pos_dim if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(values, (tuple, list)) or len(values) != pos_dim:
        raise ValueError(f"{name} must be an int or {pos_dim} ints, got {value!r}")
    for v in values:
        _check_positive_ints(**{name: v})
    return tuple(values)


def _row_major(index: Tensor, sizes) -> Tensor:
    """Linear index of ``index [..., p]`` in a row-major grid of ``sizes``."""
    flat = torch.zeros_like(index[..., 0])
    for axis, size in enumerate(sizes):
        flat = flat * size + index[..., axis]
    return flat


def _randn_like(buffer: Tensor, generator: torch.Generator | None) -> Tensor:
    device = buffer.device if generator is None else generator.device
    noise = torch.randn(buffer.shape, generator=generator, device=device, dtype=buffer.dtype)
    return noise.to(buffer.device)

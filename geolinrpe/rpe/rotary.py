r"""Rotary encodings: position-dependent orthogonal maps of queries and keys (RoPE, STRING).

Axes: ``...`` leading axes (b batch, n tokens; i/j query/key tokens in the references),
h heads, d size of the transformed vectors, m rotation pairs (``d / 2``, one frequency each),
p position dim, r kernel features.

These families are not masks ``f(r_i - r_j)``. Each maps a vector ``x`` at position ``r`` to
``M(r) x``, where ``M`` is an orthogonal representation of the translations,
``M(a + b) = M(a) M(b)``, ``M(0) = I``, ``M(r)^T = M(-r)``. Hence, for every ``a, b``,

.. math::

    \langle M(r_i) a, M(r_j) b \rangle = a^\top M(r_j - r_i) b,

which depends on ``r_j - r_i`` only. :class:`OrthogonalMapRPE` turns any such ``M`` into a
featurizer for the O(n) engine (:mod:`geolinrpe.ops.linear`) in two modes:

* ``mode="logit"`` (RoPE-softmax): transform q and k *before* the kernel feature map,
  ``phi(M(r_i) q_i d^-1/4) . phi(M(r_j) k_j d^-1/4)`` with FAVOR+ features estimates
  ``exp(q_i^T M(r_j - r_i) k_j / sqrt(d))``: softmax attention on the rotated q, k
  (:func:`rotary_softmax_reference`). A rotation keeps ``|q|``, so the positive random
  features are as well conditioned as without the encoding, and every weight is positive
  (``normalize="masked"`` is the softmax). Translation invariance holds *in distribution*,
  not per draw: translating every position by ``t`` replaces the projection ``W`` by
  ``W M(t)``, a draw with the same law (Gaussian rows stay Gaussian, orthogonal blocks stay
  orthogonal) but a different draw. ``RPEAttention(center_positions=True)`` (its default for
  bidirectional layers) makes it exact for every draw.
* ``mode="mask"`` (LRPE style, Qin et al. 2023): transform the kernel *features*,
  ``phi'(q_i) = M(r_i) phi(q_i)`` and ``phi'(k_j) = M(r_j) phi(k_j)``, so the weight
  ``phi(q_i)^T M(r_j - r_i) phi(k_j)`` is relative for every draw of a random feature map
  and exact with a deterministic one (:func:`rotary_kernel_reference`). ``M`` acts on the
  ``r`` kernel features, so ``dim`` must equal the feature map's ``num_features``.
  **Normalisation:** ``phi'`` is signed even when ``phi`` is positive, so the engine's
  ``"masked"`` denominator ``sum_j phi'(q_i) . phi'(k_j)`` (which is also what
  ``normalize="kernel"`` becomes, since these featurizers carry no separate mask) is a
  signed sum that can be 0 for valid inputs (three tokens at 0, 1, 2 with a pair frequency
  ``2 pi / 3`` sum ``1 - 1/2 - 1/2 = 0``; with 1+ELU features and frequencies spread over
  ``(0, pi)``, about half the rows of random inputs had a denominator ``<= 0``). Use
  ``normalize="none"``, as the TransNormer-style linear attention that LRPE ships in does
  (no denominator; the attention output is normalised afterwards, e.g. by RMSNorm). The
  unrotated denominator ``sum_j phi(q_i) . phi(k_j)`` is positive, but the engine cannot
  compute it from these features; :func:`rotary_kernel_reference` offers it as
  ``normalize="kernel"`` for comparison.

:class:`RoPE` is the block-diagonal rotation of Su et al. (axial in 2D/3D), :class:`STRING`
conjugates it by a learned orthogonal matrix. ``geolinrpe.rpe.lrpe`` holds the LRPE
family on the same base. None has a scalar ``f``: ``pairwise`` raises and points to the
reference functions here.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..features.base import FeatureMap
from ..features.positive_random import PositiveRandomFeatures
from ..ops.exact import allowed_pairs
from ..ops.modes import TokenFeatures
from .base import RPE

MODES = ("logit", "mask")
REFERENCE_NORMALIZATIONS = ("none", "masked", "kernel")


def _check_dim(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def axial_frequencies(dim: int, pos_dim: int, base: float = 10000.0) -> tuple[Tensor, Tensor]:
    """Axial RoPE frequencies for ``dim`` features and ``pos_dim`` coordinates.

    The ``dim`` axis is split into ``pos_dim`` contiguous groups of ``g = dim / pos_dim``
    entries; pair ``k`` of a group (entries ``2k, 2k + 1``) turns with coordinate ``p`` of
    its group at ``theta_k = base^(-2k / g)``, ``k = 0 .. g/2 - 1``.

    Returns:
        ``(theta [m], axis [m])``: float64 frequencies and the coordinate of each pair.
    """
    _check_dim("dim", dim)
    _check_dim("pos_dim", pos_dim)
    if dim % (2 * pos_dim):
        raise ValueError(
            f"dim={dim} must be divisible by 2 * pos_dim = {2 * pos_dim}: each of the "
            f"{pos_dim} coordinates rotates its own group of 2x2 pairs"
        )
    if not base > 0:
        raise ValueError(f"base must be positive, got {base!r}")
    group = dim // pos_dim
    k = torch.arange(group // 2, dtype=torch.float64)
    theta = (base ** (-2.0 * k / group)).repeat(pos_dim)
    axis = torch.arange(pos_dim).repeat_interleave(group // 2)
    return theta, axis


def rotate_pairs(x: Tensor, angle: Tensor) -> Tensor:
    """Rotate the pairs ``(x_2k, x_2k+1)`` of ``x [..., d]`` by ``angle [..., m]`` (``m = d/2``).

    ``(a, b) -> (a cos - b sin, a sin + b cos)``: the block-diagonal rotation
    ``exp(sum_k angle_k J_k)`` with ``J_k = [[0, -1], [1, 0]]`` on pair ``k``.
    """
    a, b = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = torch.cos(angle).to(x.dtype), torch.sin(angle).to(x.dtype)
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)


class OrthogonalMapRPE(RPE):
    r"""Base class of RPEs that act by an orthogonal representation ``M(r)`` of translations.

    Subclasses implement :meth:`transform` (``x -> M(r) x`` on the last axis) with
    ``M(a + b) = M(a) M(b)``; the base builds the featurizers of both modes (module
    docstring) and raises in :meth:`pairwise`.

    Args:
        pos_dim: position dimension ``p``.
        num_heads: number of heads ``h`` (each head has its own ``M``).
        dim: size ``d`` of the vectors ``M(r)`` acts on: the head dim in logit mode, the
            kernel feature count ``r`` in mask mode.

    ``output_dim`` (default ``dim``) is the size of ``transform``'s output; a subclass may
    set it larger (the unitary LRPE returns ``[Re, Im]``, ``2 d`` reals): the FAVOR+ input
    in logit mode and the engine's feature count in mask mode. Only inner products of
    transformed vectors matter, so ``M(0)`` need not be ``I``: the references use
    ``<M(0) a, M(r_j - r_i) b>``.

    Shapes:
        ``transform(x [..., h, d], pos [..., p])`` -> ``[..., h, output_dim]``.
    """

    modes = MODES

    def __init__(self, pos_dim: int, num_heads: int, dim: int) -> None:
        super().__init__(pos_dim, num_heads)
        _check_dim("dim", dim)
        self.dim = dim
        self.output_dim = dim

    def transform(self, x: Tensor, pos: Tensor) -> Tensor:  # pragma: no cover - abstract
        """``M(pos) x``: ``x [..., h, d]``, ``pos [..., p]`` -> ``[..., h, d]``."""
        raise NotImplementedError

    def forward(self, x: Tensor, pos: Tensor) -> Tensor:
        """Apply ``M(pos)``: the same as :meth:`transform`."""
        return self.transform(x, pos)

    def _check_transform_inputs(self, x: Tensor, pos: Tensor) -> None:
        if x.dim() < 2 or x.shape[-2:] != (self.num_heads, self.dim):
            raise ValueError(
                f"{type(self).__name__} transforms x [..., h={self.num_heads}, d={self.dim}], "
                f"got {list(x.shape)}"
            )
        if pos.shape[-1] != self.pos_dim or pos.shape[:-1] != x.shape[:-2]:
            raise ValueError(
                f"pos must have shape {list(x.shape[:-2]) + [self.pos_dim]}, got {list(pos.shape)}"
            )

    def kernel_input_dim(self, head_dim: int, mode: str) -> int:
        _check_mode(mode)
        if mode == "logit" and head_dim != self.dim:
            raise ValueError(
                f"in logit mode {type(self).__name__} rotates q and k, so dim={self.dim} must "
                f"equal the head dim {head_dim}"
            )
        return self.output_dim if mode == "logit" else head_dim

    def featurizer(
        self, feature_map: FeatureMap, input_scale: float, mode: str
    ) -> OrthogonalMapFeaturizer:
        return OrthogonalMapFeaturizer(feature_map, self, input_scale, mode)

    def pairwise(self, pos: Tensor, exact: bool = False) -> Tensor:
        raise ValueError(
            f"{type(self).__name__} has no scalar f(r_i - r_j): it maps q and k (or their kernel "
            "features) by orthogonal M(r), so the positional factor q^T M(r_j - r_i) k depends "
            "on q and k. For O(n^2) references use geolinrpe.rpe.rotary.rotary_softmax_reference "
            "(logit mode) or geolinrpe.rpe.rotary.rotary_kernel_reference (mask mode)."
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
        """Exact O(n^2) target: :func:`rotary_softmax_reference` (logit mode, needs
        ``kernel="exact"``) or :func:`rotary_kernel_reference` on the layer's kernel features
        (mask mode; ``kernel="exact"`` only for deterministic maps). The map ``M`` is exact
        either way, so ``rpe`` makes no difference."""
        layout = dict(key_padding_mask=key_padding_mask, batch=batch, causal=causal)
        if mode == "logit":
            if kernel != "exact":
                raise ValueError("logit mode: the reference is the exact softmax (kernel='exact')")
            return rotary_softmax_reference(q, k, v, pos, self, **layout)
        if kernel == "exact" and featurizer.feature_map.random:
            raise ValueError("mask mode with random features: use kernel='features'")
        return rotary_kernel_reference(
            q,
            k,
            v,
            pos,
            self,
            featurizer.feature_map,
            input_scale=featurizer.input_scale,
            normalize=normalize,
            **layout,
        )

    def redraw(self, generator: torch.Generator | None = None) -> None:
        """No-op: the encoding holds no random draws that are renewed in training."""

    def extra_repr(self) -> str:
        return f"pos_dim={self.pos_dim}, num_heads={self.num_heads}, dim={self.dim}"


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


class OrthogonalMapFeaturizer:
    """Featurizer of an :class:`OrthogonalMapRPE` (see the module docstring).

    Args:
        feature_map: kernel feature map; :class:`~geolinrpe.features.PositiveRandomFeatures`
            on ``d`` inputs in logit mode, any map with ``num_features = rpe.dim`` in mask mode.
        rpe: the encoding.
        input_scale: factor on q and k before the feature map (``d**-0.25`` for FAVOR+).
        mode: ``"logit"`` (transform q, k) or ``"mask"`` (transform the features).

    No mask rides along (``psi`` is ``None``): the positional information is inside ``phi``,
    so the engine's ``"kernel"`` normalisation equals ``"masked"`` here.
    """

    has_mask = False
    num_rpe_features = 0

    def __init__(
        self, feature_map: FeatureMap, rpe: OrthogonalMapRPE, input_scale: float, mode: str
    ) -> None:
        _check_mode(mode)
        name = type(rpe).__name__
        if mode == "logit":
            if not isinstance(feature_map, PositiveRandomFeatures):
                raise ValueError(
                    f"logit mode with {name} estimates the softmax exp(q^T M k / sqrt(d)) and "
                    f"needs kernel='favor+' (positive random features), got "
                    f"{type(feature_map).__name__}; elementwise maps are not rotation invariant"
                )
            if feature_map.input_dim != rpe.output_dim:
                raise ValueError(
                    f"logit mode: the feature map has input_dim={feature_map.input_dim} but "
                    f"{name} maps vectors of dim={rpe.dim} to {rpe.output_dim}"
                )
        elif feature_map.num_features != rpe.dim:
            raise ValueError(
                f"mask mode: {name} rotates the kernel features, so dim={rpe.dim} must equal "
                f"the feature map's num_features={feature_map.num_features}"
            )
        self.feature_map = feature_map
        self.rpe = rpe
        self.input_scale = input_scale
        self.mode = mode
        self.num_features = feature_map.num_features if mode == "logit" else rpe.output_dim

    def _features(self, x: Tensor, pos: Tensor) -> TokenFeatures:
        if pos is None:
            raise ValueError(f"{type(self.rpe).__name__} needs positions (pos is None)")
        if self.mode == "logit":
            phi, log_scale = self.feature_map(self.rpe.transform(x, pos) * self.input_scale)
            return TokenFeatures(phi, log_scale, None)
        phi, log_scale = self.feature_map(x * self.input_scale)
        return TokenFeatures(self.rpe.transform(phi, pos), log_scale, None)

    def query(self, q: Tensor, pos: Tensor) -> TokenFeatures:
        return self._features(q, pos)

    def key(self, k: Tensor, pos: Tensor) -> TokenFeatures:
        return self._features(k, pos)


class AxialRotation(nn.Module):
    r"""Per-head block-diagonal rotation ``R(r)`` with axial frequencies (the RoPE map).

    Pair ``k`` (entries ``2k, 2k+1``) turns by ``theta_hk r_(axis k)``; ``theta`` starts at
    :func:`axial_frequencies` and is a parameter when ``learnable``. Shared by
    :class:`RoPE`, :class:`STRING` and the rotation LRPEs.

    Args:
        pos_dim: position dimension ``p``; ``dim`` must be divisible by ``2p``.
        num_heads: number of heads ``h``.
        dim: size ``d`` of the rotated vectors.
        base: frequency base (default 10000.0).
        learnable: learn ``theta [h, d/2]`` (default ``False``: fixed frequencies, computed
            in float64 on each call and cast to the positions' dtype).

    Shapes:
        ``forward(x [..., h, d], pos [..., p])`` -> ``[..., h, d]``;
        ``generators()`` -> ``[h, p, d, d]`` with ``R(r) = exp(sum_c r_c L_c)``.
    """

    def __init__(
        self, pos_dim: int, num_heads: int, dim: int, base: float = 10000.0, learnable: bool = False
    ) -> None:
        super().__init__()
        _, axis = axial_frequencies(dim, pos_dim, base)  # validates the options
        self.pos_dim, self.num_heads, self.dim = pos_dim, num_heads, dim
        self.base = float(base)
        self.learnable = bool(learnable)
        group = dim // pos_dim
        # integer buffers survive .half() / .float(): the fixed frequencies are recomputed
        # in float64 on each call instead of being stored in the module's dtype
        self.register_buffer("axis", axis, persistent=False)
        self.register_buffer("rank", torch.arange(dim // 2) % (group // 2), persistent=False)
        self.group = group
        self.theta = nn.Parameter(torch.empty(num_heads, dim // 2)) if self.learnable else None
        self.reset_parameters()

    def initial_frequencies(self) -> Tensor:
        """``base^(-2k/g)`` in float64: ``[m]``."""
        return self.base ** (-2.0 * self.rank.to(torch.float64) / self.group)

    def reset_parameters(self) -> None:
        if self.theta is not None:
            with torch.no_grad():
                self.theta.copy_(self.initial_frequencies().expand_as(self.theta))

    def frequencies(self, dtype: torch.dtype | None = None) -> Tensor:
        """``theta [h, m]``: the parameter, or the fixed frequencies, in ``dtype``."""
        if self.theta is not None:
            return self.theta if dtype is None else self.theta.to(dtype)
        theta = self.initial_frequencies().to(dtype or torch.get_default_dtype())
        return theta.expand(self.num_heads, -1)

    def angles(self, pos: Tensor) -> Tensor:
        """Rotation angles ``theta_hk r_(axis k)``: ``pos [..., p]`` -> ``[..., h, m]``."""
        coords = pos[..., self.axis].unsqueeze(-2)  # [..., 1, m]
        return coords * self.frequencies(pos.dtype)

    def forward(self, x: Tensor, pos: Tensor) -> Tensor:
        return rotate_pairs(x, self.angles(pos))

    def generators(self, dtype: torch.dtype | None = None) -> Tensor:
        """Commuting skew-symmetric generators of ``R`` in ``dtype``: ``[h, p, d, d]``."""
        theta = self.frequencies(dtype)
        gen = theta.new_zeros(self.num_heads, self.pos_dim, self.dim, self.dim)
        k = torch.arange(self.dim // 2, device=gen.device)
        heads = torch.arange(self.num_heads, device=gen.device)[:, None]
        gen[heads, self.axis, 2 * k + 1, 2 * k] = theta  # d/dt (a, b) = theta (-b, a)
        gen[heads, self.axis, 2 * k, 2 * k + 1] = -theta
        return gen

    def extra_repr(self) -> str:
        return f"base={self.base}, learnable={self.learnable}"


class RoPE(OrthogonalMapRPE):
    r"""Rotary position embedding, 1D or axial 2D/3D (``"rope"``).

    Su et al., "RoFormer: Enhanced Transformer with Rotary Position Embedding", 2021,
    https://arxiv.org/abs/2104.09864; axial RoPE for images: Heo et al., "Rotary Position
    Embedding for Vision Transformer", ECCV 2024, https://arxiv.org/abs/2403.13298.

    ``M(r)`` is block diagonal: the ``d`` axis is split into ``p`` groups of
    ``g = d / p`` entries, and pair ``k`` of group ``c`` (entries ``2k, 2k+1`` of the group)
    is turned by the angle ``theta_k r_c`` with ``theta_k = base^(-2k/g)``:

    .. math::

        M(r) = \bigoplus_{c, k} \begin{pmatrix} \cos\theta_k r_c & -\sin\theta_k r_c \\
            \sin\theta_k r_c & \cos\theta_k r_c \end{pmatrix},
        \qquad M(r_i)^\top M(r_j) = M(r_j - r_i).

    Positions are real coordinates (any units; ``theta`` is in radians per unit).

    Args:
        pos_dim: position dimension ``p``; ``dim`` must be divisible by ``2p``.
        num_heads: number of heads ``h``.
        dim: size ``d`` of the rotated vectors (head dim in logit mode, kernel features in
            mask mode).
        base: frequency base (default 10000.0).
        learnable: learn the per-head frequencies ``rotation.theta [h, d/2]`` (default
            ``False``: fixed); the axis assignment stays fixed.

    Shapes:
        ``transform(x [..., h, d], pos [..., p])`` -> ``[..., h, d]``.
    """

    def __init__(
        self,
        pos_dim: int,
        num_heads: int,
        dim: int,
        base: float = 10000.0,
        learnable: bool = False,
    ) -> None:
        super().__init__(pos_dim, num_heads, dim)
        self.rotation = AxialRotation(pos_dim, num_heads, dim, base, learnable)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.rotation.reset_parameters()

    def transform(self, x: Tensor, pos: Tensor) -> Tensor:
        self._check_transform_inputs(x, pos)
        return self.rotation(x, pos)


class STRING(OrthogonalMapRPE):
    r"""Cayley-STRING: RoPE conjugated by a learned orthogonal matrix (``"string"``).

    Schenck et al., "Learning the RoPEs: Better 2D and 3D Position Encodings with STRING",
    ICML 2025, https://arxiv.org/abs/2502.02562.

    STRING is ``M(r) = exp(sum_c r_c L_c)`` with commuting skew-symmetric generators
    ``L_c``. Every such family is ``L_c = P^T L_c^RoPE P`` for an orthogonal ``P``; the
    Cayley form learns ``P`` from a skew-symmetric ``S = A - A^T`` (``A`` free, per head):

    .. math::

        P = (I - S)(I + S)^{-1}, \qquad M(r) = P^\top \mathrm{RoPE}(r) P,
        \qquad M(r_i)^\top M(r_j) = P^\top \mathrm{RoPE}(r_j - r_i) P = M(r_j - r_i),

    exactly, for every ``S`` (``I + S`` is always invertible). ``A = 0`` at initialisation
    (``P = I``: plain RoPE). The leading ``P^T`` cancels in every inner product but is kept so
    that ``M`` is a representation (``M(a + b) = M(a) M(b)``), which the relative-position
    references rely on. Cost: two ``d x d`` products per token and head, plus one ``d x d``
    solve per head and call.

    Args:
        pos_dim: position dimension ``p``; ``dim`` must be divisible by ``2p``.
        num_heads: number of heads ``h``.
        dim: size ``d`` of the transformed vectors.
        base: RoPE frequency base (default 10000.0).
        learnable: learn the RoPE frequencies too (default ``False``); ``A`` is always learned.

    Shapes:
        ``transform(x [..., h, d], pos [..., p])`` -> ``[..., h, d]``;
        ``orthogonal_matrix()`` -> ``P [h, d, d]``; ``generators()`` -> ``L [h, p, d, d]``.
    """

    def __init__(
        self,
        pos_dim: int,
        num_heads: int,
        dim: int,
        base: float = 10000.0,
        learnable: bool = False,
    ) -> None:
        super().__init__(pos_dim, num_heads, dim)
        self.rotation = AxialRotation(pos_dim, num_heads, dim, base, learnable)
        self.skew_param = nn.Parameter(torch.empty(num_heads, dim, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.rotation.reset_parameters()
        with torch.no_grad():
            self.skew_param.zero_()

    def orthogonal_matrix(self) -> Tensor:
        """Cayley transform ``P = (I + S)^-1 (I - S)`` of ``S = A - A^T``: ``[h, d, d]``."""
        skew = self.skew_param - self.skew_param.transpose(-1, -2)
        eye = torch.eye(self.dim, dtype=skew.dtype, device=skew.device)
        return torch.linalg.solve(eye + skew, eye - skew)

    def generators(self) -> Tensor:
        """Commuting skew-symmetric ``L_c = P^T L_c^RoPE P``: ``[h, p, d, d]``."""
        basis = self.orthogonal_matrix()[:, None]  # [h, 1, d, d]
        return basis.transpose(-1, -2) @ self.rotation.generators(basis.dtype) @ basis

    def transform(self, x: Tensor, pos: Tensor) -> Tensor:
        self._check_transform_inputs(x, pos)
        basis = self.orthogonal_matrix().to(x.dtype)
        y = torch.einsum("hde,...he->...hd", basis, x)
        return torch.einsum("hed,...he->...hd", basis, self.rotation(y, pos))


# ---------------------------------------------------------------- O(n^2) references


def _relative_keys(x: Tensor, pos: Tensor, rpe: OrthogonalMapRPE) -> Tensor:
    """``M(r_j - r_i) x_j`` for all pairs: ``x [b, j, h, d]``, ``pos`` -> ``[b, i, j, h, d']``.

    Uses relative displacements only, never the absolute ``M(r)`` that the featurizers use.
    """
    delta = pos[:, None, :, :] - pos[:, :, None, :]  # [b, i, j, p]: r_j - r_i
    return rpe.transform(x[:, None].expand(-1, pos.shape[1], -1, -1, -1), delta)


def _origin(x: Tensor, pos: Tensor, rpe: OrthogonalMapRPE) -> Tensor:
    """``M(0) x`` (``x`` itself for a representation; ``P x`` for LRPE's ``core(P x)``)."""
    return rpe.transform(x, torch.zeros_like(pos))


def _finish(out: Tensor, key_padding_mask: Tensor | None, packed: bool) -> Tensor:
    if key_padding_mask is not None:
        out = out.masked_fill(key_padding_mask[..., None, None], 0)
    return out[0] if packed else out


def rotary_softmax_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pos: Tensor,
    rpe: OrthogonalMapRPE,
    *,
    key_padding_mask: Tensor | None = None,
    batch: Tensor | None = None,
    causal: bool = False,
) -> Tensor:
    r"""Exact softmax attention with an orthogonal-map RPE (the logit-mode target), O(n^2).

    ``out_i = sum_j softmax_j(q_i^T M(r_j - r_i) k_j / sqrt(d)) v_j``, computed from the
    relative maps ``M(r_j - r_i)`` (equal to softmax attention on ``M(r_i) q_i``,
    ``M(r_j) k_j``). Memory ``O(n^2 h d)``: for tests and small baselines.

    Args:
        q, k: ``[b, n, h, d]`` or packed ``[n, h, d]``; v: ``[b, n, h, e]`` or ``[n, h, e]``.
        pos: ``[b, n, p]`` or ``[n, p]``.
        rpe: any :class:`OrthogonalMapRPE` with ``dim = d``.
        key_padding_mask, batch, causal: as :func:`geolinrpe.ops.linear_attention`.

    Returns:
        Same layout as ``v``; padded queries output 0.
    """
    packed = batch is not None
    if packed:
        q, k, v, pos = q[None], k[None], v[None], pos[None]
    keys = _relative_keys(k, pos, rpe)
    logits = torch.einsum("bihd,bijhd->bhij", _origin(q, pos, rpe), keys) / math.sqrt(q.shape[-1])
    allowed = allowed_pairs(q.shape[1], key_padding_mask, batch, causal, q.device)
    logits = logits.masked_fill(~allowed, float("-inf"))
    weights = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # rows with no key -> 0
    out = torch.einsum("bhij,bjhe->bihe", weights, v)
    return _finish(out, key_padding_mask, packed)


def rotary_kernel_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pos: Tensor,
    rpe: OrthogonalMapRPE,
    feature_map: FeatureMap,
    *,
    input_scale: float = 1.0,
    normalize: str = "none",
    key_padding_mask: Tensor | None = None,
    batch: Tensor | None = None,
    causal: bool = False,
) -> Tensor:
    r"""Exact mask-mode attention on transformed kernel features, O(n^2).

    ``w_ij = phi(q_i)^T M(r_j - r_i) phi(k_j)`` with ``phi = feature_map(. * input_scale)``
    (true features, log-scales applied; ``<M(0) phi(q_i), M(r_j - r_i) phi(k_j)>`` for maps
    with ``M(0) != I`` such as LRPE's ``core(P x)``), computed from relative maps only, and

    * ``normalize="none"``: ``out_i = sum_j w_ij v_j`` (what LRPE uses; the engine's
      ``"none"``);
    * ``"masked"``: divided by ``sum_j w_ij`` (signed; what the engine's ``"masked"`` and
      ``"kernel"`` compute for these featurizers);
    * ``"kernel"``: divided by the *unrotated* ``sum_j phi(q_i) . phi(k_j)``, positive for
      positive maps. The engine cannot produce this one from the transformed features.

    Args:
        q, k, v, pos, key_padding_mask, batch, causal: as :func:`rotary_softmax_reference`.
        rpe: an :class:`OrthogonalMapRPE` with ``dim = feature_map.num_features``.
        feature_map: the kernel feature map (deterministic for an exact target).
        input_scale: factor on q and k before the map.
        normalize: ``"none"``, ``"masked"`` or ``"kernel"``.
    """
    if normalize not in REFERENCE_NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {REFERENCE_NORMALIZATIONS}, got {normalize!r}")
    packed = batch is not None
    if packed:
        q, k, v, pos = q[None], k[None], v[None], pos[None]
    allowed = allowed_pairs(q.shape[1], key_padding_mask, batch, causal, q.device)
    (phi_q, scale_q), (phi_k, scale_k) = (feature_map(t * input_scale) for t in (q, k))
    keys = _relative_keys(phi_k, pos, rpe)
    weights = torch.einsum("bihr,bijhr->bhij", _origin(phi_q, pos, rpe), keys)
    kernel = torch.einsum("bihr,bjhr->bhij", phi_q, phi_k)
    if scale_k is not None:  # true features are phi * exp(log_scale)
        total = scale_q.transpose(1, 2)[..., None] + scale_k.transpose(1, 2)[:, :, None, :]
        total = total.masked_fill(~allowed, float("-inf"))
        shift = 0.0 if normalize == "none" else total.amax(-1, keepdim=True).clamp_min(-1e30)
        weights, kernel = weights * torch.exp(total - shift), kernel * torch.exp(total - shift)
    weights = weights.masked_fill(~allowed, 0.0)
    out = torch.einsum("bhij,bjhe->bihe", weights, v)
    if normalize != "none":
        den = (weights if normalize == "masked" else kernel.masked_fill(~allowed, 0.0)).sum(-1)
        den = den.transpose(1, 2)
        out = out / torch.where(den == 0, torch.ones_like(den), den)[..., None]
    return _finish(out, key_padding_mask, packed)

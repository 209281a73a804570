r"""RPE base classes: the contract with the attention layer, and Fourier RPEs.

Axes: ``...`` leading axes (b batch, n tokens), p position dim, h heads, m frequencies.

:class:`RPE` is what :class:`~geolinrpe.nn.RPEAttention` accepts: it names the combination
modes it supports, the kernel feature map's input size in each, and builds the featurizer
(:mod:`geolinrpe.ops.modes`) that the O(n) engine calls; ``pairwise`` gives the dense
``f(r_i - r_j)`` for the O(n^2) references.

:class:`FourierRPE` estimates ``f(Delta) = \int g(xi) exp(2 pi i xi . Delta) dxi`` from
random frequencies.

A family defines its spectrum by :meth:`FourierRPE.spectrum`: ``m`` frequencies ``xi`` per
head, drawn from a proposal ``p``, and importance weights ``a = g(xi) / p(xi)``. With
``c = cos(2 pi xi . r)`` and ``s = sin(2 pi xi . r)`` the features

* ``split="query"`` (mask mode): ``psi_q = m^-1/2 [a c, a s]``, ``psi_k = m^-1/2 [c, s]``;
* ``split="symmetric"`` (logit mode): ``psi_q = m^-1/2 a t^-1 [c, s]``,
  ``psi_k = m^-1/2 t [c, s]`` with ``t = (a^2 + delta^2)^(1/4)`` (``delta = 0.01``)

* ``split="exp"`` (product mode): as ``"query"`` with the weights of :meth:`exp_spectrum`,
  the deterministic features of the mask ``exp(f)``

The first two give ``psi_q(r_i) . psi_k(r_j) = m^-1 sum_l a_l cos(2 pi xi_l . (r_i - r_j))``,
an unbiased estimate of ``Re f(r_i - r_j)`` that depends on ``r_i - r_j`` only, for every
draw. The symmetric split keeps ``|psi_q| ~ |psi_k| ~ sqrt|a|``, which is what the positive
random features of logit mode need for low variance; the plain ``sign(a) sqrt|a|`` split
would have an infinite derivative at ``a = 0``, the neutral initialisation, and ``delta``
smooths it (``t`` is C-infinity in ``a``, ``|psi_k| = 0.1`` at ``a = 0``). Only ``g`` is learned;
frequency draws are buffers (``redraw`` renews them).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..features.base import FeatureMap
from ..ops.exact import kernel_matrix, masked_kernel_attention, softmax_attention
from ..ops.linear import linear_attention
from ..ops.modes import Featurizer, LogitMode, MaskMode, ProductMode

#: softening of the symmetric split, ``t = (a^2 + SPLIT_SOFTENING^2)^(1/4)``
SPLIT_SOFTENING = 1e-2


def _check_positive_ints(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def per_head(name: str, value: float | Sequence[float], num_heads: int, positive: bool) -> Tensor:
    """An initial value per head (float64 ``[h]``) from a scalar or ``num_heads`` values.

    Multi-scale heads (e.g. length scales ``[0.5, 1, 2, 4]``) let one layer look at several
    ranges from the start, as ALiBi's per-head slopes do for sequences.
    """
    values = torch.as_tensor(value, dtype=torch.float64).reshape(-1)
    if values.numel() == 1:
        values = values.expand(num_heads)
    if values.numel() != num_heads:
        raise ValueError(
            f"{name} must be a number or {num_heads} values (one per head), got {value!r}"
        )
    if not bool(torch.isfinite(values).all()) or (positive and not bool((values > 0).all())):
        kind = "positive" if positive else "finite"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return values.clone()


class RPE(nn.Module):
    """Base class of every relative positional encoding the attention layer accepts.

    Args:
        pos_dim: dimension ``p`` of the positions.
        num_heads: number of heads ``h`` (each head has its own encoding).

    Subclasses set :attr:`modes` and implement :meth:`kernel_input_dim`,
    :meth:`featurizer`, :meth:`pairwise` and :meth:`redraw`.
    """

    #: combination modes this RPE supports (``"logit"``, ``"mask"``)
    modes: tuple[str, ...] = ()
    #: needs a lattice ``cell`` per graph (periodic encodings)
    periodic: bool = False
    #: positions must be integers (the layer centres them by floor(mean + 1/2): exact under
    #: integer shifts)
    integer_positions: bool = False
    #: the encoding of a token depends on all tokens of its graph (not allowed with causal)
    uses_whole_graph: bool = False
    #: :meth:`attend` runs the chunked engine on :meth:`featurizer`, whose explicit O(n^2)
    #: form is :func:`~geolinrpe.ops.feature_attention` (False: an algorithm of its own)
    uses_engine: bool = True

    def attend(self, q: Tensor, k: Tensor, v: Tensor, pos: Tensor | None, **options) -> Tensor:
        """O(n) attention with this encoding; ``options`` as for
        :func:`~geolinrpe.ops.linear_attention` (``featurizer``, layout, ``causal``,
        ``normalize``, ``chunk_size``, ``check_finite``). Default: the chunked engine;
        families with their own algorithm (FFT Toeplitz) override it."""
        return linear_attention(q, k, v, pos, **options)

    def normalizations(self, mode: str) -> tuple[str, ...]:
        """Normalisations valid in ``mode``; the first is the layer's default.

        Logit mode is a softmax (``"masked"``); in mask mode ``"kernel"`` (safe with signed
        estimates) is the default. Families whose features carry no separate mask override
        this, because for them the engine's ``"kernel"`` denominator is not the unmasked one.
        """
        return ("masked",) if mode == "logit" else ("kernel", "masked", "none")

    def __init__(self, pos_dim: int, num_heads: int) -> None:
        super().__init__()
        _check_positive_ints(pos_dim=pos_dim, num_heads=num_heads)
        self.pos_dim = pos_dim
        self.num_heads = num_heads

    def encode_positions(
        self,
        pos: Tensor,
        *,
        batch: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        cell: Tensor | None = None,
    ) -> Tensor:
        """Per-token tensor the featurizer and :meth:`pairwise` receive as ``pos``.

        ``pos [..., n, p]`` (already centred by the layer); ``cell [g, p, p]`` for periodic
        encodings (one per graph of ``batch``, or per row of a dense batch). Default: ``pos``.
        """
        return pos

    def kernel_input_dim(self, head_dim: int, mode: str) -> int:  # pragma: no cover - abstract
        """Input size of the kernel feature map in ``mode`` for queries of size ``head_dim``."""
        raise NotImplementedError

    def featurizer(
        self, feature_map: FeatureMap, input_scale: float, mode: str
    ) -> Featurizer:  # pragma: no cover - abstract
        """The featurizer the engine calls in ``mode``."""
        raise NotImplementedError

    def pairwise(self, pos: Tensor, exact: bool = False) -> Tensor:  # pragma: no cover
        """Dense ``f(r_i - r_j)``: ``pos [b, n, p]`` -> ``[b, h, i, j]`` (O(n^2), references)."""
        raise NotImplementedError

    def reference_attention(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        pos: Tensor,
        *,
        featurizer: Featurizer,
        mode: str,
        normalize: str,
        kernel: str = "exact",
        rpe: str = "exact",
        key_padding_mask: Tensor | None = None,
        batch: Tensor | None = None,
        causal: bool = False,
    ) -> Tensor:
        """O(n^2) attention with this encoding (what ``RPEAttention.reference`` calls).

        ``kernel``/``rpe``: ``"exact"`` (the kernel, resp. ``f``, that the features
        estimate) or ``"features"`` (the current draws). Default: the dense ``f`` of
        :meth:`pairwise` as a logit bias (logit mode, exact softmax kernel) or as a mask
        on the kernel (mask mode). Same layouts as :func:`~geolinrpe.ops.linear_attention`.
        """
        packed = batch is not None
        dense = (lambda t: t[None]) if packed else (lambda t: t)  # noqa: E731
        unpack = (lambda t: t[0]) if packed else (lambda t: t)  # noqa: E731
        layout = dict(key_padding_mask=key_padding_mask, batch=batch, causal=causal)
        values = unpack(self.pairwise(dense(pos), exact=rpe == "exact"))
        if mode == "logit" or (mode == "product" and rpe == "exact"):
            if kernel != "exact":
                raise ValueError(f"{mode} mode has no kernel='features' reference with rpe='exact'")
            return softmax_attention(q, k, v, values, **layout)
        if mode == "product":  # the mask exp(f) of the current features
            values = unpack(self.pairwise(dense(pos), exact=False, transform="exp"))
        kmat = unpack(kernel_matrix(featurizer, dense(q), dense(k), exact=kernel == "exact"))
        return masked_kernel_attention(kmat, v, values, normalize=normalize, **layout)

    def redraw(self, generator: torch.Generator | None = None) -> None:  # pragma: no cover
        """Draw new random quantities (no-op for deterministic encodings)."""
        raise NotImplementedError


class FourierRPE(RPE):
    """Base class of RPEs estimated with random Fourier features (both modes).

    Args:
        pos_dim: dimension ``p`` of the positions.
        num_heads: number of heads ``h`` (each head has its own ``f``).
        num_frequencies: number ``m`` of frequencies per head; features have ``2m`` entries.

    Subclasses implement :meth:`spectrum`, :meth:`closed_form` and :meth:`redraw`.
    In logit mode ``f`` is the additive logit bias, in mask mode the multiplicative mask.
    """

    #: mask first: the layer's default mode (``benchmarks/RESULTS.md``: mask mode learns the
    #: RPE on QM9 where logit mode's FAVOR+ noise on ``[q, psi]`` swamps it)
    modes = ("mask", "logit")
    #: estimates ``f_hat`` can be negative (true for cosine features)
    signed: bool = True
    #: ``query_features``/``key_features`` accept a precomputed ``spectrum``
    takes_spectrum: bool = True

    def __init__(self, pos_dim: int, num_heads: int, num_frequencies: int) -> None:
        super().__init__(pos_dim, num_heads)
        _check_positive_ints(num_frequencies=num_frequencies)
        self.num_frequencies = num_frequencies

    def kernel_input_dim(self, head_dim: int, mode: str) -> int:
        return head_dim + self.num_features if mode == "logit" else head_dim

    def normalizations(self, mode: str) -> tuple[str, ...]:
        """Product mode estimates a softmax: ``"masked"`` only."""
        return ("masked",) if mode == "product" else super().normalizations(mode)

    def featurizer(self, feature_map: FeatureMap, input_scale: float, mode: str) -> Featurizer:
        if mode == "logit":
            return LogitMode(feature_map, self, input_scale)
        if mode == "product":
            return ProductMode(feature_map, self, input_scale)
        return MaskMode(feature_map, self, input_scale)

    def exp_spectrum(self) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        """``(xi [h, m, p], weight [h, m])`` whose estimate ``m^-1 sum_l a_l cos(2 pi xi_l .
        Delta)`` is the mask ``exp(f(Delta))`` (product mode; families that list it in
        :attr:`modes`)."""
        raise NotImplementedError(f"{type(self).__name__} has no product mode")

    @property
    def num_features(self) -> int:
        """Size ``2m`` of ``psi_q`` and ``psi_k``."""
        return 2 * self.num_frequencies

    def spectrum(self) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        """``(xi [h, m, p], weight [h, m])``: frequencies and importance weights ``g/p``."""
        raise NotImplementedError

    def closed_form(self, delta: Tensor) -> Tensor:  # pragma: no cover - abstract
        """Exact ``Re f(delta)``: ``delta [..., p]`` -> ``[..., h]``."""
        raise NotImplementedError

    def redraw(self, generator: torch.Generator | None = None) -> None:  # pragma: no cover
        """Draw new frequencies."""
        raise NotImplementedError

    def _cos_sin(self, pos: Tensor, split: str = "query", spectrum=None):
        if spectrum is None:
            spectrum = self.exp_spectrum() if split == "exp" else self.spectrum()
        xi, weight = spectrum
        phase = 2 * math.pi * torch.einsum("...p,hmp->...hm", pos, xi.to(pos.dtype))
        return torch.cos(phase), torch.sin(phase), weight.to(pos.dtype)

    def query_features(
        self, pos: Tensor, split: str = "query", spectrum: tuple[Tensor, Tensor] | None = None
    ) -> Tensor:
        """``psi_q``: ``pos [..., p]`` -> ``[..., h, 2m]`` (see the module docstring).

        ``spectrum``: the ``(xi, weight)`` of :meth:`spectrum` (or :meth:`exp_spectrum` for
        ``split="exp"``) when the caller already has it (featurizers compute it once per
        forward, not once per chunk)."""
        cos, sin, weight = self._cos_sin(pos, split, spectrum)
        if split in ("query", "exp"):
            factor = weight
        elif split == "symmetric":
            factor = weight / _split_scale(weight)
        else:
            raise ValueError(f"split must be 'query', 'symmetric' or 'exp', got {split!r}")
        scale = factor / math.sqrt(self.num_frequencies)
        return torch.cat([cos * scale, sin * scale], dim=-1)

    def key_features(
        self, pos: Tensor, split: str = "query", spectrum: tuple[Tensor, Tensor] | None = None
    ) -> Tensor:
        """``psi_k``: ``pos [..., p]`` -> ``[..., h, 2m]`` (as :meth:`query_features`)."""
        cos, sin, weight = self._cos_sin(pos, split, spectrum)
        if split in ("query", "exp"):
            scale = torch.ones_like(weight) / math.sqrt(self.num_frequencies)
        elif split == "symmetric":
            scale = _split_scale(weight) / math.sqrt(self.num_frequencies)
        else:
            raise ValueError(f"split must be 'query', 'symmetric' or 'exp', got {split!r}")
        return torch.cat([cos * scale, sin * scale], dim=-1)

    def estimate(self, delta: Tensor, transform: str | None = None) -> Tensor:
        """The estimate ``f_hat(delta) = m^-1 sum_l a_l cos(2 pi xi_l . delta)`` with the
        current frequencies (``transform="exp"``: the product-mode mask ``exp(f)``, weights
        of :meth:`exp_spectrum`). ``delta [..., p]`` -> ``[..., h]``.
        """
        xi, weight = self.exp_spectrum() if transform == "exp" else self.spectrum()
        phase = 2 * math.pi * torch.einsum("...p,hmp->...hm", delta, xi.to(delta.dtype))
        return (torch.cos(phase) * weight.to(delta.dtype)).mean(-1)

    def pairwise(self, pos: Tensor, exact: bool = False, transform: str | None = None) -> Tensor:
        """Dense ``f(r_i - r_j)`` for references: ``pos [b, n, p]`` -> ``[b, h, i, j]``.

        ``exact=True`` uses :meth:`closed_form`, otherwise the current draw's estimate;
        ``transform="exp"`` gives ``exp(f)`` (exact) or the product-mode mask's estimate.
        Costs O(n^2): for tests and baselines only.
        """
        delta = pos.unsqueeze(-2) - pos.unsqueeze(-3)  # [b, i, j, p]
        if exact:
            values = self.closed_form(delta)
            values = values.exp() if transform == "exp" else values
        else:
            values = self.estimate(delta, transform)
        return values.movedim(-1, -3)

    def extra_repr(self) -> str:
        return (
            f"pos_dim={self.pos_dim}, num_heads={self.num_heads}, "
            f"num_frequencies={self.num_frequencies}"
        )


def _split_scale(weight: Tensor) -> Tensor:
    """``t = (a^2 + delta^2)^(1/4)``: ``~sqrt|a|`` for ``|a| >> delta``, smooth at 0."""
    return (weight.pow(2) + SPLIT_SOFTENING**2).pow(0.25)

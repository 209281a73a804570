r"""The two ways of combining kernel features with RPE features (``docs/math.md``).

Axes: b batch, n tokens, h heads, d head dim, p position dim, r kernel features,
m RPE features (``2 x`` frequencies).

* :class:`MaskMode` (row-wise Kronecker): the attention weight of query i and key j is
  ``K(q_i, k_j) f(r_i - r_j)``, estimated by ``(phi(q_i) . phi(k_j)) (psi_q(r_i) . psi_k(r_j))``:
  features ``phi (x) psi`` of rank ``r * m``, which the engine never materialises. Works
  with any feature map. Translation invariant for every draw (``psi_q . psi_k`` depends
  on ``r_i - r_j`` only).
* :class:`LogitMode` (concatenation): ``q~ = [q / d^1/4, psi_q(r)]``, ``k~ = [k / d^1/4, psi_k(r)]``
  and positive random features of ``q~, k~`` estimate
  ``exp(q~ . k~) = exp(q . k / sqrt(d) + f_hat(r_i - r_j))``: softmax attention with the
  learned bias. All weights stay positive; the cost is a Performer with ``d + m`` inputs.
  The RPE's importance weights are split ``sqrt`` per side (``split="symmetric"``).
  Translation invariant only in expectation over the random projection, because the
  projection does not commute with the phase shift of ``psi``.

A mode is a *featurizer*: ``query(q, pos)`` and ``key(k, pos)`` return
:class:`TokenFeatures` for any slice of tokens, so the engine can compute features chunk
by chunk and keep memory O(n (d + m)). A featurizer that needs a statistic of the whole
input first (:class:`GoogleLogitMode`'s key stabiliser) has ``prepare(q, k, pos)``, which the
engine and the explicit references call once before any features.
``calibrate(q, k, pos, valid)`` passes the feature map's inputs to an adaptive map's
``calibrate`` (FAVOR++, :class:`~geolinrpe.features.GERFFeatures`);
:func:`calibrate_featurizer` does it for any featurizer.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple, Protocol

import torch
from torch import Tensor

from ..features.base import FeatureMap
from ..features.positive_random import PositiveRandomFeatures

if TYPE_CHECKING:
    from ..rpe.base import FourierRPE


class TokenFeatures(NamedTuple):
    """Features of a slice of tokens.

    Attributes:
        phi: kernel features ``[b, n, h, r]``; true features are ``phi * exp(log_scale)``.
        log_scale: ``[b, n, h]`` or ``None`` (deterministic maps).
        psi: RPE features ``[b, n, h, m]`` (mask mode) or ``None``.
    """

    phi: Tensor
    log_scale: Tensor | None
    psi: Tensor | None


class Featurizer(Protocol):
    """What the engine needs: per-slice query and key features."""

    has_mask: bool
    num_features: int  # r
    num_rpe_features: int  # m (0 without a mask)

    def query(self, q: Tensor, pos: Tensor | None) -> TokenFeatures: ...

    def key(self, k: Tensor, pos: Tensor | None) -> TokenFeatures: ...


class SpectrumCache:
    """Optional reuse of a Fourier RPE's spectrum across the slices of one forward pass.

    ``cache_spectrum = True`` computes ``rpe.spectrum()`` (``exp_spectrum()`` for
    ``split == "exp"``) once and reuses it for every slice. Only for a featurizer that lives
    for one forward pass (``RPEAttention`` builds one per call and sets it): a cached
    spectrum ignores later parameter changes and shares its autograd graph.
    """

    rpe = None
    split = "query"
    cache_spectrum = False
    _cached = None

    def _spectrum(self):
        """The cached ``(xi, weight)``, or ``None`` (the RPE computes it per slice)."""
        if not (self.cache_spectrum and getattr(self.rpe, "takes_spectrum", False)):
            return None
        if self._cached is None:
            self._cached = self.rpe.exp_spectrum() if self.split == "exp" else self.rpe.spectrum()
        return self._cached

    def _psi(self, pos: Tensor, query: bool) -> Tensor:
        spectrum = self._spectrum()
        options = {} if spectrum is None else {"spectrum": spectrum}
        if query:
            return self.rpe.query_features(pos, self.split, **options)
        return self.rpe.key_features(pos, self.split, **options)


class MaskMode(SpectrumCache):
    """Kernel features ``phi(q * input_scale)`` times the RPE mask ``psi_q . psi_k``.

    Args:
        feature_map: any :class:`~geolinrpe.features.FeatureMap` on the head dim.
        rpe: a :class:`~geolinrpe.rpe.FourierRPE`, or ``None`` for plain linear attention.
        input_scale: factor on q and k before the feature map (``d**-0.25`` for FAVOR+,
            so that the kernel is ``exp(q . k / sqrt(d))``).
    """

    def __init__(
        self, feature_map: FeatureMap, rpe: FourierRPE | None = None, input_scale: float = 1.0
    ) -> None:
        self.feature_map = feature_map
        self.rpe = rpe
        self.input_scale = input_scale
        self.has_mask = rpe is not None
        self.num_features = feature_map.num_features
        self.num_rpe_features = 0 if rpe is None else rpe.num_features

    #: the RPE features' weights (``FourierRPE.query_features`` split)
    split = "query"

    def _features(self, x: Tensor, pos: Tensor | None, query: bool) -> TokenFeatures:
        phi, log_scale = self.feature_map(x * self.input_scale)
        if self.rpe is None:
            return TokenFeatures(phi, log_scale, None)
        return TokenFeatures(phi, log_scale, self._psi(pos, query).to(phi.dtype))

    def query(self, q: Tensor, pos: Tensor | None) -> TokenFeatures:
        return self._features(q, pos, query=True)

    def key(self, k: Tensor, pos: Tensor | None) -> TokenFeatures:
        return self._features(k, pos, query=False)

    @torch.no_grad()
    def calibrate(
        self, q: Tensor, k: Tensor, pos: Tensor | None, valid: Tensor | None = None
    ) -> None:
        """Calibrate an adaptive feature map on ``q * input_scale`` and ``k * input_scale``
        (``valid`` broadcastable to ``q.shape[:-1]``; no-op for other maps)."""
        calibrate = getattr(self.feature_map, "calibrate", None)
        if calibrate is not None:
            calibrate(q * self.input_scale, k * self.input_scale, valid)


class ProductMode(MaskMode):
    """Kernel features ``phi(q * input_scale)`` times the deterministic mask ``exp(f)``.

    ``exp(q . k / sqrt(d) + f(Delta)) = exp(q . k / sqrt(d)) exp(f(Delta))``: the biased softmax
    of logit mode, factorised. The kernel features (FAVOR+ / FAVOR++ on ``d`` inputs) estimate
    the first factor, and the RPE's features with the weights of its ``exp_spectrum`` (a
    quadrature rule for the Fourier transform of ``exp(f) - 1``, plus 1 at the zero
    frequency) the second. Same engine as :class:`MaskMode`, with the ``"masked"``
    normalisation (the softmax denominator).
    """

    split = "exp"


class LogitMode(SpectrumCache):
    """Positive random features of ``[q / d^1/4, psi_q(r)]`` and ``[k / d^1/4, psi_k(r)]``.

    Args:
        feature_map: :class:`~geolinrpe.features.PositiveRandomFeatures` (or its subclass
            :class:`~geolinrpe.features.GERFFeatures`) with ``input_dim = d + rpe.num_features``.
        rpe: the :class:`~geolinrpe.rpe.FourierRPE` whose estimate becomes the logit bias.
        input_scale: factor on q and k (``d**-0.25``).
    """

    has_mask = False
    num_rpe_features = 0

    def __init__(self, feature_map: FeatureMap, rpe: FourierRPE, input_scale: float) -> None:
        if not isinstance(feature_map, PositiveRandomFeatures):
            raise ValueError(
                "logit mode estimates exp(q.k/sqrt(d) + f) and needs kernel='favor+' or "
                "'favor++' "
                f"(positive random features), got {type(feature_map).__name__}"
            )
        self.feature_map = feature_map
        self.rpe = rpe
        self.input_scale = input_scale
        self.num_features = feature_map.num_features

    split = "symmetric"

    def _features(self, x: Tensor, pos: Tensor, query: bool) -> TokenFeatures:
        psi = self._psi(pos, query)
        joint = torch.cat([x * self.input_scale, psi.to(x.dtype)], dim=-1)
        phi, log_scale = self.feature_map(joint)
        return TokenFeatures(phi, log_scale, None)

    def query(self, q: Tensor, pos: Tensor) -> TokenFeatures:
        return self._features(q, pos, query=True)

    def key(self, k: Tensor, pos: Tensor) -> TokenFeatures:
        return self._features(k, pos, query=False)

    @torch.no_grad()
    def calibrate(self, q: Tensor, k: Tensor, pos: Tensor, valid: Tensor | None = None) -> None:
        """Calibrate an adaptive feature map on the joint vectors ``[q / d^1/4, psi_q(r)]``
        and ``[k / d^1/4, psi_k(r)]`` of all tokens (``valid`` broadcastable to
        ``q.shape[:-1]``; no-op for other maps)."""
        calibrate = getattr(self.feature_map, "calibrate", None)
        if calibrate is None:
            return
        psi_q = self.rpe.query_features(pos, split="symmetric").to(q.dtype)
        psi_k = self.rpe.key_features(pos, split="symmetric").to(k.dtype)
        calibrate(
            torch.cat([q * self.input_scale, psi_q], dim=-1),
            torch.cat([k * self.input_scale, psi_k], dim=-1),
            valid,
        )


class GoogleLogitMode:
    r"""Logit mode in the conventions of Google's FLT code (``flt-gm``, ``convention="google"``).

    Reproduces scenic's ``sharp_masked_favor_attention`` and imp's ``general_favor_attention``
    (``flt=True``) with ``exp_softmax_kernel_transformation``: with ``rho`` from
    :meth:`~geolinrpe.rpe.GaussianMixtureRPE.google_ratio`, ``c = cos(2 pi xi . r)``,
    ``s = sin(2 pi xi . r)`` and ``T = (d + 2m)^-1/4``,

    .. math::

        x = T\,[q,\ d^{1/4} m^{-1/2} \rho c,\ d^{1/4} m^{-1/2} \rho s], \qquad
        \phi(x) = (\exp(W x - \mathrm{stab} - |x|^2/2) + 10^{-6}) / \sqrt{r},

    the same for keys. ``stab`` is the maximum of ``W x`` over the features for a query, and
    over all keys, heads and batch rows (padded keys included) for a key; :meth:`prepare`
    computes the latter in one O(n) pass before the engine runs (the engine calls it). The
    features are returned as they are (no ``log_scale``), as Google's code uses them, so the
    ``1e-6`` enters exactly as there. The stabilisers carry no gradient (Google's do; they
    cancel exactly without the ``1e-6``).

    Args:
        feature_map: :class:`~geolinrpe.features.PositiveRandomFeatures` whose ``projection``
            ``W [r, d + 2m]`` is Google's projection matrix
            (:meth:`~geolinrpe.features.PositiveRandomFeatures.set_projection`).
        rpe: a :class:`~geolinrpe.rpe.GaussianMixtureRPE` with ``convention="google"``.
    """

    has_mask = False
    num_rpe_features = 0
    #: Google's ``numerical_stabilizer`` of ``exp_softmax_kernel_transformation``
    EPSILON = 1e-6
    #: elements of ``W x`` per slice in :meth:`prepare`
    PREPARE_BUDGET = 2**22

    def __init__(self, feature_map: FeatureMap, rpe) -> None:
        if type(feature_map) is not PositiveRandomFeatures:
            raise ValueError(
                "convention='google' reproduces FAVOR+ (kernel='favor+'), got "
                f"{type(feature_map).__name__}"
            )
        self.feature_map = feature_map
        self.rpe = rpe
        self.num_features = feature_map.num_features
        self.key_stabilizer: Tensor | None = None

    def _logits(self, x: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:
        """``(W x [..., h, r], |x|^2 / 2 [..., h, 1])`` of the joint vectors."""
        d, m = x.shape[-1], self.rpe.num_frequencies
        xi, rho = self.rpe.google_ratio()
        phase = 2 * math.pi * torch.einsum("...p,hmp->...hm", pos.to(x.dtype), xi.to(x.dtype))
        snippet = rho.to(x.dtype) * (d**0.25 / math.sqrt(m))
        joint = torch.cat([x, torch.cos(phase) * snippet, torch.sin(phase) * snippet], dim=-1)
        joint = joint * (d + 2 * m) ** -0.25
        dash = torch.einsum("...d,rd->...r", joint, self.feature_map.projection.to(x.dtype))
        return dash, joint.pow(2).sum(-1, keepdim=True) / 2

    @torch.no_grad()
    def prepare(self, q: Tensor, k: Tensor, pos: Tensor) -> None:
        """The key stabiliser: ``max W x`` over every key, head and batch row given."""
        keys, where = k.reshape(-1, *k.shape[-2:]), pos.reshape(-1, pos.shape[-1])
        step = max(1, self.PREPARE_BUDGET // (k.shape[-2] * self.num_features))
        self.key_stabilizer = max(
            self._logits(keys[i : i + step], where[i : i + step])[0].amax()
            for i in range(0, keys.shape[0], step)
        )

    def query(self, q: Tensor, pos: Tensor) -> TokenFeatures:
        dash, diag = self._logits(q, pos)
        stab = dash.detach().amax(-1, keepdim=True)
        phi = (torch.exp(dash - stab - diag) + self.EPSILON) / math.sqrt(self.num_features)
        return TokenFeatures(phi, None, None)

    def key(self, k: Tensor, pos: Tensor) -> TokenFeatures:
        if self.key_stabilizer is None:
            raise RuntimeError("GoogleLogitMode.prepare(q, k, pos) must run before key()")
        dash, diag = self._logits(k, pos)
        stab = self.key_stabilizer.to(dash.dtype)
        phi = (torch.exp(dash - stab - diag) + self.EPSILON) / math.sqrt(self.num_features)
        return TokenFeatures(phi, None, None)


def prepare_featurizer(featurizer: Featurizer, q: Tensor, k: Tensor, pos: Tensor | None) -> None:
    """Run ``featurizer.prepare(q, k, pos)`` if it has one (whole-input statistics)."""
    prepare = getattr(featurizer, "prepare", None)
    if prepare is not None:
        prepare(q, k, pos)


class _Captured(Exception):
    """Raised by :func:`calibrate_featurizer`'s hook once it holds the map's input."""

    def __init__(self, value: Tensor) -> None:
        super().__init__()
        self.value = value


def _raise_captured(module, args):
    raise _Captured(args[0])


@torch.no_grad()
def calibrate_featurizer(
    featurizer: Featurizer, q: Tensor, k: Tensor, pos: Tensor | None, valid: Tensor | None = None
) -> None:
    """Calibrate ``featurizer.feature_map`` (if it has ``calibrate``) on what it receives.

    Featurizers with a ``calibrate`` method (:class:`MaskMode`, :class:`LogitMode`) do it
    themselves. For any other featurizer (SPE, rotary encodings, ...) a forward pre-hook
    catches the feature map's input in ``featurizer.query(q, pos)`` and
    ``featurizer.key(k, pos)`` and stops before the features are computed.
    """
    feature_map = getattr(featurizer, "feature_map", None)
    if getattr(feature_map, "calibrate", None) is None:
        return
    own = getattr(featurizer, "calibrate", None)
    if own is not None:
        own(q, k, pos, valid)
        return
    inputs = []
    handle = feature_map.register_forward_pre_hook(_raise_captured)
    try:
        for call, t in ((featurizer.query, q), (featurizer.key, k)):
            try:
                call(t, pos)
            except _Captured as captured:
                inputs.append(captured.value)
            else:  # pragma: no cover - a featurizer that never calls its feature map
                return
    finally:
        handle.remove()
    feature_map.calibrate(inputs[0], inputs[1], valid)

r"""Stochastic positional encoding (SPE): sineSPE and convSPE.

Liutkus et al., `"Relative Positional Encoding for Transformers with Linear Complexity"
<https://arxiv.org/abs/2105.08399>`_ (ICML 2021); reference code
https://github.com/aliutkus/spe (``spe.py``: ``SineSPE``, ``ConvSPE``, ``SPEFilter``).

Axes: b batch, n tokens, h heads, d channels (SPE's ``dim``: the head dim with placement
``"before"``, the kernel feature map's features with ``"after"``), p position dim, k sines,
c cos/sin, r realisations, t tokens flattened, a and b filter taps.

**The encoding.** Per head and channel ``d``, a pair of zero-mean random processes
``Qbar_d(u), Kbar_d(u)`` over positions has the stationary cross-covariance
``E[Qbar_d(u) Kbar_d(u')] = P_d(u - u')``. ``R`` independent realisations give unit codes
``Qbar [n, h, d, R]``, and vectors ``x_q, x_k [.., h, d]`` are encoded as

.. math::

    \hat q_n = c \sum_d x_{q,n,d} \, \bar Q_d(u_n), \qquad
    \hat k_m = c \sum_d x_{k,m,d} \, \bar K_d(u_m) \in \mathbb{R}^R,

    \mathbb{E}[\hat q_n \cdot \hat k_m] = c^2 R \sum_d x_{q,n,d} \, x_{k,m,d} \, P_d(u_n - u_m),

since the noise is independent across channels (the cross-channel terms have zero mean).
This is *not* a kernel times one mask ``f``: every channel has its own ``P_d``.

**Placement** (``placement=``, :attr:`SPE.placement`):

* ``"before"`` (default; the paper's Fig. 1 and the reference code's order): ``x = q, k``,
  the raw per-head queries and keys (``dim`` = head dim), and the kernel feature map reads
  ``qhat, khat`` (its ``input_dim`` is ``R``, :meth:`SPE.kernel_input_dim`): the engine's
  ``phi`` is ``phi(qhat)``. With a softmax map (FAVOR+, FAVOR++) this is the reference
  pipeline ``SPEFilter`` then Performer: the map's input is ``R^-1/2 d^-1/4 sum_d q_d
  Qbar_d`` (the reference's ``(R d)^-1/4`` codes times the Performer's data normaliser
  ``R^-1/4``; :class:`SPEFeaturizer`), so the exact kernel it estimates is the softmax
  ``exp(qhat . khat / sqrt(R))`` of the reference-scaled codes, whose expectation inside
  the exponent is the usual ``sum_d q_d k_d P_d / sqrt(d)``. ``layer.reference(kernel=
  "exact", rpe="features")`` is that softmax for the current draw; there is no closed-form
  expectation over the codes (``rpe="exact"`` is refused).
* ``"after"``: ``x = phi(q), phi(k)``, the kernel features (``dim`` = their number, any
  feature map); the engine's ``phi`` is ``qhat`` (``R`` features). The encoding is linear
  in ``phi``, so the feature map's ``log_scale`` passes through, and the exact target
  ``sum_d phi(q)_d phi(k)_d P_d`` has a closed form (:func:`spe_reference`). The order of a
  linear-transformer variant of the reference (``elu + 1`` first).

For the identity kernel the two placements agree. The mode is ``"mask"`` for both: the
engine contract is the same (features, no ``psi``), and the layer's ``"logit"`` mode means
an additive bias ``f`` inside a softmax, which SPE is not (its ``P_d`` multiplies each
channel of ``q . k``), so no second mode name is introduced.

**Code scale** (``code_scale=``): ``c = (R d)^{-1/4}`` per side, ``"reference"`` (the
reference code; default with ``"before"``, where :meth:`SPE.encode` then equals
``SPEFilter``'s ``qhat``), or ``c = R^{-1/2}``, ``"unbiased"`` (default with ``"after"``:
``qhat . khat`` is an unbiased estimate of the weight itself, so ``normalize="none"`` is
meaningful). They differ by ``sqrt(R / d)`` in ``qhat . khat``, which cancels in normalised
linear attention on ``qhat`` (``"after"``) but not in a softmax or unnormalised attention; with
``"before"`` and a softmax map the feature map's input is the same for both (above).

**Noise.** White noise lives in buffers (``noise``, ``gate_noise``; in the state dict) and is
renewed by :meth:`SPE.redraw` or, with ``fresh_noise=True`` (the reference code's behaviour),
at every layer call: :meth:`SPE.featurizer` redraws, and the layer builds one featurizer per
call, so its queries and keys share the draw; buffers are replaced, not written in place, so
graphs of earlier calls stay valid. :meth:`SPE.set_noise` injects draws in this layout;
``load_reference`` (:meth:`SineSPE.load_reference`, :meth:`ConvSPE.load_reference`) loads the
reference code's parameters and draws in its layout (``docs/reproducing.md``).

**Gating** (``SPEFilter(gated=True)`` of the reference code, followed exactly): a learned
``g_d = sigmoid(gate_d)`` in ``(0, 1)`` and position-independent noise ``eps_d`` (a buffer)
mix a constant into the codes,

.. math::

    \bar Q_d \leftarrow \sqrt{1 - g_d}\, \bar Q_d + \sqrt{g_d}\, \epsilon_d, \qquad
    \bar K_d \leftarrow \sqrt{1 - g_d}\, \bar K_d + \sqrt{g_d}\, \epsilon_d, \qquad
    P_d \leftarrow (1 - g_d) P_d + g_d,

so ``g -> 0`` is fully positional and ``g -> 1`` is position-free kernel attention.

**Normalisation.** The paper feeds ``qhat, khat`` to attention as ordinary features:
numerator *and* denominator use the encoded features (with ``"after"``, ``out_n = sum_m
(qhat_n . khat_m) v_m / sum_m qhat_n . khat_m``; with ``"before"``, the same with
``phi(qhat)``, the Performer's denominator): the engine's ``normalize="masked"``, the layer's
default here
(:meth:`SPE.normalizations` allows ``"masked"`` and ``"none"``). ``"kernel"`` is refused:
with ``psi = None`` the engine would compute the same masked denominator under that name,
and a denominator from the un-encoded ``phi(q) . phi(k)`` would need a second set of
features that the engine does not take.
``qhat . khat`` is signed, and so is the target ``sum_d phi_d phi_d P_d`` whenever some
``P_d`` is negative (sineSPE with offsets, convSPE with signed filters) and the placement is
``"after"`` (with ``"before"`` a positive map keeps every weight positive): the denominator can
approach 0 and the output is then unbounded, for the exact target as well as for the
estimate. Gating (``P_d + g_d``) and positive feature maps push the denominator away from 0;
nothing is clamped.

**Positions.** :meth:`SPE.encode_positions` (called by :class:`~geolinrpe.nn.RPEAttention`)
subtracts each sequence's first valid token's position (sequence indices then are the
reference code's positions ``0, 1, ...``, also in left-padded rows), so through the layer
SPE is exactly translation invariant for every draw, also in causal layers (the first
token is in every token's past) and after the layer's centring. Called directly, the
featurizer uses the positions as given: a shift by ``s`` is then a different draw of the
same distribution (sineSPE rotates each ``(cos, sin)`` noise pair by ``2 pi f s``; convSPE
translates the noise by ``s``), so the output is invariant in distribution only.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..features.base import FeatureMap
from ..features.positive_random import PositiveRandomFeatures
from ..ops.checks import eager_checks
from ..ops.exact import allowed_pairs, masked_kernel_attention
from ..ops.modes import TokenFeatures
from .base import RPE, _check_positive_ints

#: ``|u - round(u)|`` above which a convSPE position is not on the integer grid (the
#: layer's centring and re-basing leave rounding errors far below this)
INTEGER_TOLERANCE = 1e-3
#: elements of the per-slice gathered noise ``[R, h, d, t, taps]`` in :class:`ConvSPE`
CODE_BUDGET = 2**23
#: where the encoding acts: on the raw queries and keys (the paper's and the reference code's
#: order) or on the kernel features
PLACEMENTS = ("before", "after")
#: ``"reference"``: codes times ``(R d)^-1/4`` per side (the reference code); ``"unbiased"``:
#: ``R^-1/2`` on one side's worth, so that ``qhat . khat`` estimates the weight itself
CODE_SCALES = ("reference", "unbiased")


class SPE(RPE):
    """Base class of stochastic positional encodings (mask mode only).

    Args:
        pos_dim: position dimension ``p``.
        num_heads: heads ``h``.
        dim: channels ``d``: the head dim with placement ``"before"``; with ``"after"`` the
            number of features of the kernel feature map (``head_dim`` for
            ``"elu"``/``"relu"``/``"identity"``, ``num_features`` for ``"favor+"``).
            :class:`~geolinrpe.nn.RPEAttention` fills it when it builds the encoding by name.
        num_realizations: realisations ``R`` (default 64): the feature map's input size
            (``"before"``) or the engine's features (``"after"``).
        gated: learn a per-channel gate mixing the code with a constant (default ``True``,
            as the reference ``SPEFilter``).
        placement: ``"before"`` (default: SPE on the raw q and k, then the kernel feature
            map, as the paper and reference code) or ``"after"`` (SPE on the kernel features).
        code_scale: ``"reference"`` (codes times ``(R d)^-1/4``, the reference code) or
            ``"unbiased"`` (``R^-1/2``); ``None`` (default): ``"reference"`` with
            ``"before"``, ``"unbiased"`` with ``"after"``.
        fresh_noise: redraw the noise at every :meth:`featurizer` call, i.e. every layer
            call (default ``False``: buffers kept until :meth:`redraw`).

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
        placement: str = "before",
        code_scale: str | None = None,
        fresh_noise: bool = False,
    ) -> None:
        super().__init__(pos_dim, num_heads)
        _check_positive_ints(dim=dim, num_realizations=num_realizations)
        for name, value in (("gated", gated), ("fresh_noise", fresh_noise)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be a bool, got {value!r}")
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
        if code_scale is None:  # the reference code's convention where it is the paper's order
            code_scale = "reference" if placement == "before" else "unbiased"
        if code_scale not in CODE_SCALES:
            raise ValueError(f"code_scale must be one of {CODE_SCALES}, got {code_scale!r}")
        self.dim = dim
        self.num_realizations = num_realizations
        self.gated = gated
        self.placement = placement
        self.code_scale = code_scale
        self.fresh_noise = fresh_noise
        if gated:
            self.gate = nn.Parameter(torch.empty(num_heads, dim))
            self.register_buffer("gate_noise", torch.empty(num_heads, dim, num_realizations))

    # ------------------------------------------------------------------ contract
    @classmethod
    def dim_is_head_dim(cls, options: dict) -> bool:
        """Whether ``dim`` is the head dim for these constructor ``options`` (placement
        ``"before"``) rather than the kernel features (``"after"``); used by
        :class:`~geolinrpe.nn.RPEAttention` to fill ``dim``."""
        default = inspect.signature(cls.__init__).parameters["placement"].default
        return options.get("placement", default) == "before"

    def kernel_input_dim(self, head_dim: int, mode: str) -> int:
        """``R`` (the feature map reads ``qhat``) before, ``head_dim`` after."""
        return self.num_realizations if self.placement == "before" else head_dim

    @property
    def code_factor(self) -> float:
        """Factor on the unit-variance codes in :meth:`encode`: ``(R d)^-1/4``
        (``code_scale="reference"``) or ``R^-1/2`` (``"unbiased"``)."""
        if self.code_scale == "reference":
            return (self.num_realizations * self.dim) ** -0.25
        return self.num_realizations**-0.5

    def featurizer(self, feature_map: FeatureMap, input_scale: float, mode: str) -> SPEFeaturizer:
        """The engine's featurizer; with ``fresh_noise`` it first redraws the noise (one draw
        per featurizer: :class:`~geolinrpe.nn.RPEAttention` builds one per call, so the
        queries and keys of a call share it)."""
        if mode not in self.modes:
            raise ValueError(
                f"mode must be 'mask' for {type(self).__name__} (SPE has no logit-bias form; "
                f"placement='before'/'after' chooses where it acts), got {mode!r}"
            )
        if self.fresh_noise:
            self.redraw()
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
        """O(n^2) references.

        Placement ``"after"``: the exact SPE target (:func:`spe_reference`, the analytic
        ``P_d``) on the layer's kernel features; ``rpe="features"`` (the realised codes) is
        the layer's explicit-feature form, and ``kernel="exact"`` needs a deterministic
        feature map. Placement ``"before"``: ``kernel="exact", rpe="features"`` is the exact
        kernel on the realised ``qhat, khat`` (:func:`spe_kernel_reference`; for a softmax
        map the exact softmax ``exp(qhat . khat / sqrt(R))`` of the reference code's order);
        ``rpe="exact"`` is refused (no closed form: the expectation over the codes of a
        nonlinear kernel of ``qhat``).
        """
        layout = dict(key_padding_mask=key_padding_mask, batch=batch, causal=causal)
        if self.placement == "before":
            if rpe == "exact":
                raise ValueError(
                    "SPE with placement='before' has no closed-form target (the kernel acts "
                    "on the encoded qhat): use rpe='features'"
                )
            return spe_kernel_reference(q, k, v, pos, featurizer, normalize=normalize, **layout)
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
        """Draw new white noise for the codes (and for the gate's constant code).

        The buffers are replaced, not written in place: a graph built on the previous draw
        keeps it (``fresh_noise`` redraws during training).
        """
        self.noise = _randn_like(self.noise, generator)
        if self.gated:
            self.gate_noise = _randn_like(self.gate_noise, generator)

    @torch.no_grad()
    def set_noise(self, noise: Tensor, gate_noise: Tensor | None = None) -> None:
        """Use given standard-normal draws: ``noise`` in this class's buffer layout
        (``self.noise.shape``) and, when gated, ``gate_noise [h, d, R]`` (``None`` keeps the
        current one). Unit variance: the code scale is applied in :meth:`encode`. Replaces
        the buffers (copies, on their device and dtype); ValueError on a wrong shape or
        non-finite values. ``fresh_noise=True`` overwrites them at the next call."""
        self.noise = _checked_noise("noise", noise, self.noise)
        if gate_noise is not None:
            if not self.gated:
                raise ValueError("gate_noise is only for gated SPE (gated=True)")
            self.gate_noise = _checked_noise("gate_noise", gate_noise, self.gate_noise)

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

        Equals ``c sum_d phi_d codes(pos)_d`` (``c`` = :attr:`code_factor`; ``phi`` the raw
        queries or keys before, the kernel features after); subclasses avoid forming all
        codes at once.
        """
        raise NotImplementedError

    def _gate_term(self, phi: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(sqrt(1 - g) phi, c sum_d sqrt(g) phi eps)`` with ``c`` the :attr:`code_factor`;
        ``(phi, None)`` ungated."""
        if not self.gated:
            return phi, None
        gate = torch.sigmoid(self.gate).to(phi.dtype)
        noise = self.gate_noise.to(phi.dtype)
        const = torch.einsum("...hd,hdr->...hr", phi * gate.sqrt(), noise)
        return phi * (1 - gate).sqrt(), const * self.code_factor

    @torch.no_grad()
    def _load_reference_gate(self, params: dict, gate_noise: Tensor | None) -> None:
        """The reference ``SPEFilter``'s ``gate [h, d]`` and its ``torch.randn(h, d, R)``."""
        if "gate" in params:
            if not self.gated:
                raise ValueError("params has 'gate' but this SPE is not gated")
            self.gate.copy_(_checked_noise("gate", params["gate"], self.gate))
        if gate_noise is not None:
            if not self.gated:
                raise ValueError("gate_noise is only for gated SPE (gated=True)")
            self.gate_noise = _checked_noise("gate_noise", gate_noise, self.gate_noise)

    def _check_reference_keys(self, params: dict, names: tuple[str, ...]) -> dict:
        params = dict(params or {})
        unknown = sorted(set(params) - set(names) - {"gate"})
        if unknown:
            raise ValueError(
                f"unknown reference parameter(s) {unknown} for {type(self).__name__}; expected "
                f"{sorted(names + ('gate',))} (strip module prefixes)"
            )
        return params

    def extra_repr(self) -> str:
        return (
            f"pos_dim={self.pos_dim}, num_heads={self.num_heads}, dim={self.dim}, "
            f"num_realizations={self.num_realizations}, gated={self.gated}, "
            f"placement={self.placement!r}, code_scale={self.code_scale!r}, "
            f"fresh_noise={self.fresh_noise}"
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
    :meth:`redraw` renews it; it is the reference forward's ``torch.randn(1, h, d, 2K, R)``
    without the leading 1: :meth:`load_reference`). Positions may be real-valued (time
    stamps). See :mod:`geolinrpe.rpe.spe` for placement, code scale, gating, normalisation
    and invariance.

    Args:
        pos_dim: must be 1.
        num_heads: heads ``h``.
        dim: channels ``d``: the head dim (``"before"``) or the kernel feature map's
            ``num_features`` (``"after"``).
        num_realizations: ``R`` (default 64).
        num_sines: ``K`` (default 1).
        gated: per-channel gate (default ``True``).
        placement, code_scale, fresh_noise: see :class:`SPE`.

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
        placement: str = "before",
        code_scale: str | None = None,
        fresh_noise: bool = False,
    ) -> None:
        if pos_dim != 1:
            raise ValueError(f"pos_dim must be 1 for SineSPE (1D positions), got {pos_dim!r}")
        super().__init__(
            pos_dim, num_heads, dim, num_realizations, gated, placement, code_scale, fresh_noise
        )
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
        out = torch.einsum("...hx,hxr->...hr", weighted.flatten(-2), noise) * self.code_factor
        return out if const is None else out + const

    @torch.no_grad()
    def load_reference(
        self,
        params: dict | None = None,
        noise: Tensor | None = None,
        gate_noise: Tensor | None = None,
    ) -> None:
        """Load the reference code's parameters and draws (``docs/reproducing.md``).

        Args:
            params: the reference ``SineSPE``'s ``freqs``, ``offsets``, ``gains``
                ``[h, d, K]`` and ``SPEFilter``'s ``gate [h, d]`` by those names (any subset;
                the same parametrisation as here, copied unchanged).
            noise: the reference forward's ``torch.randn(1, h, d, 2K, R)`` (before its
                ``/ sqrt(2K)`` and gains): this class's ``noise`` with a leading 1.
            gate_noise: ``SPEFilter``'s ``torch.randn(h, d, R)`` (its ``gating_noise`` times
                ``(d R)^(1/4)``).

        With ``code_scale="reference"`` :meth:`encode` then equals the reference
        ``SPEFilter`` output at positions ``0, 1, ...``, which is what the layer uses
        (positions relative to each sequence's first valid token).
        """
        params = self._check_reference_keys(params, ("freqs", "offsets", "gains"))
        for name in ("freqs", "offsets", "gains"):
            if name in params:
                param = getattr(self, name)
                param.copy_(_checked_noise(name, params[name], param))
        if noise is not None:
            want = (1, *self.noise.shape)
            if tuple(noise.shape) != want:
                raise ValueError(f"noise must have shape {list(want)}, got {list(noise.shape)}")
            self.set_noise(noise[0])
        self._load_reference_gate(params, gate_noise)

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
    ``[0, 1) / sqrt(prod(kernel_size) / 2)`` (reference). The reference's ``conv_q`` filters
    the *key* code and ``conv_k`` the query code: :meth:`load_reference` swaps them.

    Positions must be integer grid coordinates (sequence indices, patch ``(row, col)``):
    a ValueError names ``pos`` otherwise. Through :class:`~geolinrpe.nn.RPEAttention`
    positions are taken relative to each sequence's first token
    (:meth:`~SPE.encode_positions`), so any common shift (also the layer's centring) is
    fine; they must then lie in ``(-grid_size, grid_size)`` per dimension. The noise is a
    buffer ``noise [R, h, d, *(2 grid_size + kernel_size - 2)]`` (memory
    ``R h d prod(2 grid_size + kernel_size - 2)``); the code at relative position ``u``
    reads it at ``u + grid_size - 1 + t`` (the reference's ``z [R, h d, *(4 kernel_size +
    s)]`` at ``u + kernel_size + t``: :meth:`load_reference`); :meth:`redraw` renews it. Padded
    tokens' positions must be grid points too (the layer sets them to 0).

    Args:
        pos_dim: 1 (sequences), 2 (image patch grids), 3 (voxels); any ``p`` works, the
            noise buffer grows as ``(2 grid_size)^p``.
        num_heads: heads ``h``.
        dim: channels ``d``: the head dim (``"before"``) or the kernel feature map's
            ``num_features`` (``"after"``).
        grid_size: largest sequence extent per dimension (int or ``pos_dim`` ints).
        kernel_size: filter taps per dimension (int or ``pos_dim`` ints; default 16).
        num_realizations: ``R`` (default 64).
        gated: per-channel gate (default ``True``).
        placement, code_scale, fresh_noise: see :class:`SPE`.

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
        placement: str = "before",
        code_scale: str | None = None,
        fresh_noise: bool = False,
    ) -> None:
        super().__init__(
            pos_dim, num_heads, dim, num_realizations, gated, placement, code_scale, fresh_noise
        )
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
        out = torch.cat(out).reshape(*lead, h, self.num_realizations) * self.code_factor
        return out if const is None else out + const

    @torch.no_grad()
    def load_reference(
        self,
        params: dict | None = None,
        noise: Tensor | None = None,
        gate_noise: Tensor | None = None,
    ) -> None:
        """Load the reference code's parameters and draws (``docs/reproducing.md``).

        Args:
            params: the reference ``ConvSPE``'s ``conv_q.weight`` and ``conv_k.weight``
                ``[h d, 1, *kernel_size]`` and ``SPEFilter``'s ``gate [h, d]`` (any subset).
                The reference computes ``kbar = conv_q(z)`` and ``qbar = conv_k(z)``:
                ``conv_q.weight`` is this class's ``key_filter`` and ``conv_k.weight`` its
                ``query_filter`` (both cross-correlations, the same orientation).
            noise: the reference forward's ``torch.randn(R, h d, *(4 kernel_size + s))``
                for a code of extent ``s <= grid_size`` per dimension. Its code at grid
                point ``u`` (``0 <= u < s``) reads ``z[u + kernel_size + t]``, this class's
                the buffer at ``u + grid_size - 1 + t``: that window of the buffer is
                replaced, the rest keeps the current draw (positions outside ``[0, s)``
                are not defined by the reference draw).
            gate_noise: ``SPEFilter``'s ``torch.randn(h, d, R)`` (its ``gating_noise`` times
                ``(d R)^(1/4)``).
        """
        names = ("conv_q.weight", "conv_k.weight")
        params = self._check_reference_keys(params, names)
        h, d = self.num_heads, self.dim
        for name, filt in zip(names, (self.key_filter, self.query_filter), strict=True):
            if name in params:
                weight = torch.as_tensor(params[name])
                want = (h * d, 1, *self.kernel_size)
                if tuple(weight.shape) != want:
                    raise ValueError(
                        f"{name} must have shape {list(want)}, got {list(weight.shape)}"
                    )
                filt.copy_(_checked_noise(name, weight.reshape(filt.shape), filt))
        if noise is not None:
            lead = (self.num_realizations, h * d)
            if tuple(noise.shape[:2]) != lead or noise.dim() != 2 + self.pos_dim:
                raise ValueError(
                    f"noise must have shape [{lead[0]}, {lead[1]}, *(4 kernel_size + s)], got "
                    f"{list(noise.shape)}"
                )
            window_ours, window_theirs = [], []
            for axis, (g, k) in enumerate(zip(self.grid_size, self.kernel_size, strict=True)):
                extent = noise.shape[2 + axis] - 4 * k
                if not 1 <= extent <= g:
                    raise ValueError(
                        f"noise has {noise.shape[2 + axis]} samples on axis {axis}: the "
                        f"reference draws 4 kernel_size + s with 1 <= s <= grid_size={g}"
                    )
                window_ours.append(slice(g - 1, g + extent + k - 2))
                window_theirs.append(slice(k, 2 * k + extent - 1))
            theirs = noise.reshape(self.num_realizations, h, d, *noise.shape[2:])
            buffer = self.noise.clone()
            buffer[(..., *window_ours)] = theirs[(..., *window_theirs)].to(buffer)
            self.set_noise(buffer)
        self._load_reference_gate(params, gate_noise)

    def extra_repr(self) -> str:
        return (
            super().extra_repr() + f", grid_size={self.grid_size}, kernel_size={self.kernel_size}"
        )


class SPEFeaturizer:
    """Engine featurizer of an :class:`SPE`; no ``psi``.

    * placement ``"after"``: ``phi = qhat = encode(phi(q * input_scale))`` (``R`` features);
      the feature map has ``num_features == spe.dim``.
    * placement ``"before"``: ``phi = phi(encode(q) * kernel_scale)``; the feature map has
      ``input_dim == R`` and ``q`` has ``spe.dim`` channels (the head dim). For a softmax map
      (:class:`~geolinrpe.features.PositiveRandomFeatures`, FAVOR+ and FAVOR++)
      ``kernel_scale = input_scale * R^-1/2 / code_factor``: the map's input is
      ``input_scale R^-1/2 sum_d q_d Qbar_d`` whatever the code scale, i.e. with the layer's
      ``input_scale = d^-1/4`` the reference code's Performer input (``(R d)^-1/4`` codes
      times the data normaliser ``R^-1/4``), so ``E[x_q . x_k] = sum_d q_d k_d P_d / sqrt(d)``,
      the usual temperature. Other maps read ``encode(q) * input_scale``.

    Args:
        feature_map: the kernel feature map (see above for its size).
        spe: the :class:`SPE` module.
        input_scale: factor on the feature map's inputs as the layer computes it for the
            head dim (``d**-0.25`` for FAVOR+, else 1).
    """

    has_mask = False
    num_rpe_features = 0

    def __init__(self, feature_map: FeatureMap, spe: SPE, input_scale: float = 1.0) -> None:
        name = type(spe).__name__
        self.kernel_scale = input_scale
        if spe.placement == "before":
            if feature_map.input_dim != spe.num_realizations:
                raise ValueError(
                    f"the kernel feature map has input_dim={feature_map.input_dim}, but {name} "
                    f"with placement='before' feeds it num_realizations={spe.num_realizations} "
                    "encoded features"
                )
            self.num_features = feature_map.num_features
            if isinstance(feature_map, PositiveRandomFeatures):
                self.kernel_scale = input_scale * spe.num_realizations**-0.5 / spe.code_factor
        else:
            if feature_map.num_features != spe.dim:
                raise ValueError(
                    f"dim={spe.dim} of {name} must equal the kernel feature map's "
                    f"num_features={feature_map.num_features} (with placement='after' SPE's "
                    "channels are the kernel features)"
                )
            self.num_features = spe.num_realizations
        self.feature_map = feature_map
        self.spe = spe
        self.input_scale = input_scale

    def encoded(self, x: Tensor, pos: Tensor, query: bool) -> Tensor:
        """The feature map's input with placement ``"before"``: ``encode(x) * kernel_scale``."""
        if x.shape[-1] != self.spe.dim:
            raise ValueError(
                f"q and k have {x.shape[-1]} channels per head, but {type(self.spe).__name__} "
                f"with placement='before' has dim={self.spe.dim} (the head dim)"
            )
        return self.spe.encode(x, pos, query) * self.kernel_scale

    def _features(self, x: Tensor, pos: Tensor | None, query: bool) -> TokenFeatures:
        if pos is None:
            raise ValueError(f"pos is required: {type(self.spe).__name__} encodes positions")
        if self.spe.placement == "before":
            phi, log_scale = self.feature_map(self.encoded(x, pos, query))
            return TokenFeatures(phi, log_scale, None)
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
    _check_spe_normalize(normalize)
    if spe.placement == "before":
        raise ValueError(
            "spe_reference is the target of placement='after'; with placement='before' use "
            "spe_kernel_reference (the exact kernel on the realised qhat, khat)"
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


def spe_kernel_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pos: Tensor,
    featurizer: SPEFeaturizer,
    *,
    key_padding_mask: Tensor | None = None,
    batch: Tensor | None = None,
    causal: bool = False,
    normalize: str = "masked",
) -> Tensor:
    """Exact kernel attention on the realised ``qhat, khat`` (placement ``"before"``), O(n^2).

    The feature map's kernel on its inputs ``x = encode(q) * kernel_scale``
    (:class:`SPEFeaturizer`): for a softmax map ``exp(x_q . x_k)``, i.e. with the layer's
    scales the softmax ``exp(qhat . khat / sqrt(R))`` of ``(R d)^-1/4``-scaled codes (the
    reference code's order), which its random features estimate. Same arguments and layout
    as :func:`spe_reference`.
    """
    _check_spe_normalize(normalize)
    if featurizer.spe.placement != "before":
        raise ValueError("spe_kernel_reference is for placement='before'")
    packed = batch is not None
    if packed:
        q, k, v, pos = q[None], k[None], v[None], pos[None]
    if key_padding_mask is not None:
        pos = pos.masked_fill(key_padding_mask[..., None], 0)
    xq, xk = (
        featurizer.encoded(t, pos, query).transpose(1, 2) for t, query in ((q, True), (k, False))
    )
    fm = featurizer.feature_map
    if isinstance(fm, PositiveRandomFeatures):  # exp(x.y), shifted per row unless unnormalised
        logits = xq @ xk.transpose(-1, -2)
        allowed = allowed_pairs(q.shape[1], key_padding_mask, batch, causal, q.device)
        logits = logits.masked_fill(~allowed, float("-inf"))
        shift = 0.0 if normalize == "none" else logits.amax(-1, keepdim=True).clamp_min(-1e30)
        weights = torch.exp(logits - shift)
    else:
        weights = fm.kernel(xq, xk)
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


def _check_spe_normalize(normalize: str) -> None:
    if normalize not in ("masked", "none"):
        raise ValueError(
            f"normalize must be 'masked' or 'none' for SPE (the engine's 'kernel' equals "
            f"'masked' without psi), got {normalize!r}"
        )


def _checked_noise(name: str, value: Tensor, like: Tensor) -> Tensor:
    """``value`` as a finite float tensor of ``like``'s shape, copied to its device and dtype."""
    value = torch.as_tensor(value)
    if tuple(value.shape) != tuple(like.shape) or not value.is_floating_point():
        raise ValueError(
            f"{name} must be a float tensor of shape {list(like.shape)}, got "
            f"{value.dtype} {list(value.shape)}"
        )
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} must be finite")
    return value.detach().to(device=like.device, dtype=like.dtype, copy=True)


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

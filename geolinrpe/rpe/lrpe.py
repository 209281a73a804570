r"""LRPE: linearized relative positional encodings (Qin et al., TMLR 2023).

Qin et al., "Linearized Relative Positional Encoding", TMLR 2023,
https://arxiv.org/abs/2307.09270 (code: https://github.com/OpenNLPLab/Lrpe, and the
``Lrpe`` module of https://github.com/OpenNLPLab/lra).

Axes: ``...`` leading axes (b batch, n tokens), h heads, d size of the input vectors (the
kernel feature count ``r`` in mask mode), m frequencies, p position dim.

Every LRPE maps a vector ``x`` of token ``s`` to ``T_s x = Lambda_s (P x)``: a fixed or learned
matrix ``P`` followed by a "core" ``Lambda_s`` with ``Lambda_s^H Lambda_t = Lambda_(t-s)``, as
the authors' ``Lrpe.forward`` (``core(P x)``, no ``P^T`` after). Inner products are relative
for every ``P``:

.. math::

    \langle T_s a, T_t b \rangle = \mathrm{Re}\,(P a)^H \Lambda_{t-s} (P b).

``T_0 = P`` need not be ``I`` and ``T`` is not a representation (``T_s T_t != T_(s+t)``);
only these inner products enter the attention and the references of
:mod:`geolinrpe.rpe.rotary` (which use ``<T_0 a, T_(t-s) b>``).

Cores (the authors' ``core_matrix``) and registry names:

* :class:`UnitaryLRPE` (``"lrpe-unitary"``, core 4 "complex exp", the paper's *unitary*
  solution): ``Lambda_s = diag(exp(i theta_k s))`` on ``d`` complex coordinates, one
  frequency per coordinate, ``theta_k = base^(-2k/d)``, ``k < d``. A real ``P x`` is a complex
  vector with zero imaginary part; the output is ``[Re, Im]``, ``2 d`` reals (the authors'
  ``cat([q.real, q.imag], -1)``), so ``output_dim = 2 d``: the engine sees ``2 r`` features in
  mask mode and FAVOR+ gets ``2 d`` inputs in logit mode. For real ``y = P x``:
  ``[y cos(theta s), y sin(theta s)]`` and ``<T_s a, T_t b> = sum_k y_k z_k cos(theta_k (t-s))``.
  This is *not* RoPE (which is ``"rope"``).
* :class:`OrthogonalLRPE` (``"lrpe-orthogonal"``, core 1 "rope", the *orthogonal* solution):
  the block-diagonal 2x2 rotation of RoPE, ``theta_k = base^(-2k/e)`` for the ``e = d``
  (``d - 1`` if ``d`` is odd: the last coordinate is left alone) rotated coordinates, after a
  Householder ``P`` by default (the authors' ``l_ro``).
* :class:`PermutationLRPE` (``"lrpe-permutation"``, core 3, the *permutation* solution):
  ``(Lambda_s y)_j = y_(sigma^s(j))`` for a permutation ``sigma``; integer 1D positions only.

``P`` (the authors' ``p_matrix``), argument ``p`` of every core:

* ``"identity"`` (1);
* ``"householder"`` (3): ``P y = y - 2 v (v . y)``; fixed (``householder_learned=False``,
  the authors' default): ``v ~ N(0, I)`` normalised once and used as stored; learned:
  ``v`` is a parameter used as ``v / (|v| + 1e-6)`` (the authors' ``eps``);
* ``"fourier"`` (4): the unitary DFT ``fft(y, norm="ortho")``; complex, so unitary core only;
* a fixed real matrix ``[d, d]`` or ``[h, d, d]``: DCT-II (2) and the odd-even permutation (5)
  are :func:`fixed_p_matrix` ``("dct" | "odd_even", d)``.

Parameters are per head (``theta [h, m]``, ``householder [h, d]``, ``permutation [h, d]``);
the authors share one set across heads: to load theirs, repeat it per head (every setter
accepts the shared shape and does so). ``docs/reproducing.md`` maps all their options.

Modes: ``"mask"`` (the paper's: the core acts on kernel features, 1+ELU in the paper, so
``dim`` = the feature map's ``num_features``) and ``"logit"`` (on q, k before FAVOR+,
``dim`` = head dim); see :class:`~geolinrpe.rpe.rotary.OrthogonalMapRPE`.

Normalisation (mask mode). The transformed features are signed, so the engine's
``"masked"`` denominator ``sum_t phi'(q_s) . phi'(k_t)`` can vanish or change sign for valid
inputs (see :mod:`geolinrpe.rpe.rotary`). The authors' attention has no denominator and
normalises the output instead: ``RPEAttention(normalize="none", output_norm="layernorm")``.
Exact O(n^2) references: :func:`~geolinrpe.rpe.rotary.rotary_kernel_reference` (mask mode)
and :func:`~geolinrpe.rpe.rotary.rotary_softmax_reference` (logit mode).

Positions: the authors use token indices ``0 .. l-1``; only differences matter, so
``RPEAttention``'s centring changes nothing but rounding. Real coordinates are accepted by
the rotation and unitary cores (axial in 2D/3D: the ``d`` axis is split into ``p`` groups,
one per coordinate); the permutation core needs integers.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..ops.checks import eager_checks
from .rotary import OrthogonalMapRPE, axial_frequencies, rotate_pairs

P_CHOICES = ("identity", "householder", "fourier")
FIXED_P_MATRICES = ("dct", "odd_even")
HOUSEHOLDER_EPS = 1e-6  # the authors' eps in v / (|v| + eps) for a learned v


def fixed_p_matrix(kind: str, dim: int) -> Tensor:
    """The authors' other fixed ``P`` as a float64 matrix ``[d, d]`` for ``p=``.

    * ``"dct"`` (their ``p_matrix=2``): the orthonormal DCT-II,
      ``P_kn = sqrt(2/d) cos(pi (2n + 1) k / (2 d))``, row 0 times ``1/sqrt(2)``;
    * ``"odd_even"`` (``p_matrix=5``): ``(P y)_2k = y_k``, ``(P y)_(2k+1) = y_(c + k)`` with
      ``c = d - d // 2`` (their ``odd_even_permutation``).
    """
    if not isinstance(dim, int) or isinstance(dim, bool) or dim <= 0:
        raise ValueError(f"dim must be a positive int, got {dim!r}")
    if kind == "dct":
        n = torch.arange(dim, dtype=torch.float64)
        matrix = torch.cos(math.pi * (2 * n[None, :] + 1) * n[:, None] / (2 * dim))
        matrix = matrix * math.sqrt(2.0 / dim)
        matrix[0] /= math.sqrt(2.0)
        return matrix
    if kind == "odd_even":
        j = torch.arange(dim)
        source = torch.where(j % 2 == 0, j // 2, dim - dim // 2 + j // 2)
        return torch.eye(dim, dtype=torch.float64)[source]
    raise ValueError(f"kind must be one of {FIXED_P_MATRICES}, got {kind!r}")


class LRPE(OrthogonalMapRPE):
    """Base class of the LRPE family: ``x -> core_s(P x)`` (module docstring).

    Args:
        pos_dim: position dimension ``p``.
        num_heads: number of heads ``h``.
        dim: size ``d`` of the input vectors (kernel features in mask mode).
        p: ``"identity"``, ``"householder"``, ``"fourier"`` (unitary core only) or a fixed
            real matrix ``[d, d]`` / ``[h, d, d]`` (any matrix keeps the inner products
            relative; :func:`fixed_p_matrix` gives the authors' DCT and odd-even ones).
        householder_learned: learn the Householder vector (``p="householder"`` only).

    Subclasses implement :meth:`core` (``Lambda_s``) on ``P x``.
    """

    #: whether the core takes the complex ``P = "fourier"``
    complex_core = False

    def __init__(
        self,
        pos_dim: int,
        num_heads: int,
        dim: int,
        p: str | Tensor = "identity",
        householder_learned: bool = False,
    ) -> None:
        super().__init__(pos_dim, num_heads, dim)
        name = type(self).__name__
        self.householder_learned = bool(householder_learned)
        if isinstance(p, Tensor):
            if p.is_complex() or not p.is_floating_point():
                raise ValueError(f"p as a matrix must be a real floating tensor, got {p.dtype}")
            matrix = self._per_head(p, (dim, dim), "p")
            if not bool(torch.isfinite(matrix).all()):
                raise ValueError("p must be finite")
            self.p_kind = "matrix"
            self.register_buffer("p_matrix", matrix.detach().clone())
        elif isinstance(p, str) and p in P_CHOICES:
            self.p_kind = p
        else:
            raise ValueError(
                f"p must be one of {P_CHOICES} or a real matrix [d, d] / [h, d, d], got {p!r}"
            )
        if self.p_kind != "matrix":
            self.p_matrix = None
        if self.p_kind == "fourier" and not self.complex_core:
            raise ValueError(
                f"p='fourier' makes P x complex: only the unitary core (UnitaryLRPE, "
                f"'lrpe-unitary') takes it, not {name}"
            )
        if self.householder_learned and self.p_kind != "householder":
            raise ValueError(
                f"householder_learned=True needs p='householder', got p={self.p_kind!r}"
            )
        if self.p_kind != "householder":
            self.householder = None
        elif self.householder_learned:
            self.householder = nn.Parameter(torch.empty(num_heads, dim))
        else:
            self.register_buffer("householder", torch.empty(num_heads, dim))

    def _per_head(self, value, tail: tuple[int, ...], name: str) -> Tensor:
        """``value`` of shape ``tail`` (shared by the heads, as the authors') or ``[h, *tail]``
        -> ``[h, *tail]``."""
        value = torch.as_tensor(value)
        if tuple(value.shape) == tail:
            return value.expand(self.num_heads, *tail)
        if tuple(value.shape) != (self.num_heads, *tail):
            raise ValueError(
                f"{name} must have shape {list(tail)} (shared by all heads) or "
                f"{[self.num_heads, *tail]} (per head), got {list(value.shape)}"
            )
        return value

    def reset_parameters(self) -> None:
        """Draw a new Householder vector (``N(0, I)``; normalised once when fixed)."""
        if self.householder is not None:
            with torch.no_grad():
                self.householder.normal_()
                if not self.householder_learned:
                    self.householder.div_(self.householder.norm(dim=-1, keepdim=True))

    @torch.no_grad()
    def set_householder(self, v: Tensor) -> None:
        """Set the stored Householder vector ``v [d]`` (repeated per head) or ``[h, d]``.

        Stored as given (the authors' ``v``): a fixed ``v`` should have unit norm (``P`` is
        then a reflection); a learned one is used as ``v / (|v| + 1e-6)``.
        """
        if self.householder is None:
            raise ValueError(f"set_householder needs p='householder', this one has {self.p_kind!r}")
        v = self._per_head(v, (self.dim,), "v")
        if not bool(torch.isfinite(v).all()) or bool((v.norm(dim=-1) == 0).any()):
            raise ValueError("the Householder vector must be finite and nonzero")
        self.householder.copy_(v)

    def householder_vector(self, dtype: torch.dtype | None = None) -> Tensor:
        """The vector ``v [h, d]`` that ``P = I - 2 v v^T`` uses (after the learned
        normalisation)."""
        v = self.householder if dtype is None else self.householder.to(dtype)
        if self.householder_learned:
            v = v / (v.norm(dim=-1, keepdim=True) + HOUSEHOLDER_EPS)
        return v

    def apply_p(self, x: Tensor) -> Tensor:
        """``P x`` for the real choices of ``P``: ``[..., h, d]`` -> ``[..., h, d]``."""
        if self.p_kind == "householder":
            v = self.householder_vector(x.dtype)
            return x - 2 * torch.einsum("...hd,hd->...h", x, v).unsqueeze(-1) * v
        if self.p_kind == "matrix":
            return torch.einsum("hde,...he->...hd", self.p_matrix.to(x.dtype), x)
        if self.p_kind == "fourier":  # pragma: no cover - the unitary core handles it
            raise ValueError("P = 'fourier' is complex: use the unitary core")
        return x

    def core(self, y: Tensor, pos: Tensor) -> Tensor:  # pragma: no cover - abstract
        """``Lambda_pos y``: ``y [..., h, d]`` -> ``[..., h, output_dim]``."""
        raise NotImplementedError

    def transform(self, x: Tensor, pos: Tensor) -> Tensor:
        """``core_pos(P x)``: ``x [..., h, d]``, ``pos [..., p]`` -> ``[..., h, output_dim]``."""
        self._check_transform_inputs(x, pos)
        return self.core(self.apply_p(x), pos)

    def extra_repr(self) -> str:
        learned = (
            f", householder_learned={self.householder_learned}" if self.householder_learned else ""
        )
        return super().extra_repr() + f", p={self.p_kind!r}" + learned


class _PhaseLRPE(LRPE):
    """LRPE whose core turns by angles ``theta_k r_(axis k)``: rotation and unitary cores.

    ``theta [h, m]`` is a parameter (``learnable``) or a persistent buffer (fixed); it starts
    at ``base^(-2k/g)`` or at the ``theta`` given to the constructor (what
    :meth:`reset_parameters` restores); :meth:`set_theta` sets it at any time.
    """

    def _init_theta(
        self, initial: Tensor, axis: Tensor, base: float, learnable: bool, theta: Tensor | None
    ) -> None:
        self.base = float(base)
        self.learnable = bool(learnable)
        self.num_frequencies = initial.numel()
        self.register_buffer("axis", axis, persistent=False)
        if theta is not None:
            initial = self._check_theta(theta)
        self._initial_theta = initial.to(torch.float64).expand(self.num_heads, -1).clone()
        values = torch.empty(self.num_heads, self.num_frequencies)
        if self.learnable:
            self.theta = nn.Parameter(values)
        else:
            self.register_buffer("theta", values)

    def _check_theta(self, theta) -> Tensor:
        theta = self._per_head(theta, (self.num_frequencies,), "theta")
        if not theta.is_floating_point() or not bool(torch.isfinite(theta).all()):
            raise ValueError("theta must be a finite real tensor")
        return theta

    def reset_parameters(self) -> None:
        super().reset_parameters()
        with torch.no_grad():
            self.theta.copy_(self._initial_theta)

    @torch.no_grad()
    def set_theta(self, theta: Tensor) -> None:
        """Set the frequencies: ``theta [m]`` (repeated per head) or ``[h, m]``."""
        self.theta.copy_(self._check_theta(theta))

    def frequencies(self, dtype: torch.dtype | None = None) -> Tensor:
        """``theta [h, m]`` in ``dtype``."""
        return self.theta if dtype is None else self.theta.to(dtype)

    def angles(self, pos: Tensor) -> Tensor:
        """``theta_hk r_(axis k)``: ``pos [..., p]`` -> ``[..., h, m]``."""
        return pos[..., self.axis].unsqueeze(-2) * self.frequencies(pos.dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", base={self.base}, learnable={self.learnable}"


class UnitaryLRPE(_PhaseLRPE):
    r"""Unitary LRPE, the paper's unitary solution (``"lrpe-unitary"``, the authors' core 4).

    Qin et al., TMLR 2023, https://arxiv.org/abs/2307.09270.

    .. math::

        T_s x = \bigl[\mathrm{Re}\, z, \mathrm{Im}\, z\bigr], \quad
        z = e^{i \theta s} \odot (P x), \qquad
        \langle T_s a, T_t b \rangle = \mathrm{Re} \sum_k \overline{(P a)_k} (P b)_k
        e^{i \theta_k (t - s)},

    one frequency per coordinate, ``theta_k = base^(-2k/g)``, ``k < g``, ``g = d / p`` (axial
    groups for ``p > 1``; ``g = d`` in 1D, as the authors). Output ``2 d`` reals
    (``output_dim``). ``P`` real (identity, Householder, a matrix) or ``"fourier"``.

    Args:
        pos_dim: position dimension ``p`` (1 in the paper; axial for 2, 3); ``d % p == 0``.
        num_heads: number of heads ``h``.
        dim: size ``d`` of the input vectors.
        base: frequency base (default 10000.0).
        learnable: learn ``theta [h, d]`` (the authors' ``theta_learned``; default ``False``).
        theta: initial frequencies ``[d]`` or ``[h, d]`` (default ``base^(-2k/g)``).
        p: ``"identity"`` (default), ``"householder"`` (the authors' ``l_un``), ``"fourier"``
            or a real matrix (:class:`LRPE`).
        householder_learned: learn the Householder vector.

    Shapes:
        ``transform(x [..., h, d], pos [..., p])`` -> ``[..., h, 2 d]``.
    """

    complex_core = True

    def __init__(
        self,
        pos_dim: int,
        num_heads: int,
        dim: int,
        base: float = 10000.0,
        learnable: bool = False,
        theta: Tensor | None = None,
        p: str | Tensor = "identity",
        householder_learned: bool = False,
    ) -> None:
        super().__init__(pos_dim, num_heads, dim, p, householder_learned)
        if dim % pos_dim:
            raise ValueError(
                f"dim={dim} must be divisible by pos_dim={pos_dim}: each coordinate turns "
                "its own group of complex coordinates"
            )
        if not base > 0:
            raise ValueError(f"base must be positive, got {base!r}")
        group = dim // pos_dim
        k = torch.arange(group, dtype=torch.float64)
        initial = (base ** (-2.0 * k / group)).repeat(pos_dim)
        axis = torch.arange(pos_dim).repeat_interleave(group)
        self._init_theta(initial, axis, base, learnable, theta)
        self.output_dim = 2 * dim
        self.reset_parameters()

    def transform(self, x: Tensor, pos: Tensor) -> Tensor:
        if self.p_kind != "fourier":
            return super().transform(x, pos)
        self._check_transform_inputs(x, pos)
        z = torch.fft.fft(x, dim=-1, norm="ortho")  # complex P x
        return self.core(z.real, pos, z.imag)

    def core(self, y: Tensor, pos: Tensor, imag: Tensor | None = None) -> Tensor:
        """``[Re, Im]`` of ``exp(i theta s) (y + i imag)`` (``imag`` 0 when ``None``)."""
        angles = self.angles(pos)
        cos, sin = torch.cos(angles).to(y.dtype), torch.sin(angles).to(y.dtype)
        if imag is None:
            return torch.cat([y * cos, y * sin], dim=-1)
        return torch.cat([y * cos - imag * sin, y * sin + imag * cos], dim=-1)


class OrthogonalLRPE(_PhaseLRPE):
    r"""Orthogonal LRPE: RoPE's block rotation after ``P`` (``"lrpe-orthogonal"``, core 1).

    Qin et al., TMLR 2023, https://arxiv.org/abs/2307.09270, orthogonal solution.

    .. math::

        T_s x = R_s P x, \qquad \langle T_s a, T_t b \rangle = (P a)^\top R_{t-s} (P b),

    ``R_s`` the block-diagonal 2x2 rotation of :class:`~geolinrpe.rpe.RoPE`,
    ``(y_2k, y_2k+1) -> (y_2k cos - y_2k+1 sin, y_2k sin + y_2k+1 cos)`` by ``theta_k s``,
    ``theta_k = base^(-2k/e)``, ``k < e/2``, ``e = d`` (``d - 1`` for odd ``d`` in 1D: the last
    coordinate is not turned, as the authors). Axial groups for ``p > 1``
    (``d`` divisible by ``2p``). Default ``P``: a fixed Householder reflection (the authors'
    ``l_ro`` with ``learnable=True``). Until this release ``P`` was learned and applied on
    both sides (``H R_s H``); the weights ``<H R_s H a, H R_t H b> = <R_s H a, R_t H b>`` are
    the same, so only the default (fixed ``v``, as the authors) changed.

    Args:
        pos_dim: position dimension ``p``.
        num_heads: number of heads ``h``.
        dim: size ``d`` of the input vectors.
        base: frequency base (default 10000.0).
        learnable: learn ``theta [h, m]`` (the authors' ``theta_learned``; default ``False``).
        theta: initial frequencies ``[m]`` or ``[h, m]``, ``m = e / 2`` (default
            ``base^(-2k/e)``; the authors' ``theta_type`` b and c: ``docs/reproducing.md``).
        p: ``"householder"`` (default), ``"identity"`` (RoPE on the inputs) or a real matrix.
        householder_learned: learn the Householder vector (default ``False``).

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
        theta: Tensor | None = None,
        p: str | Tensor = "householder",
        householder_learned: bool = False,
    ) -> None:
        super().__init__(pos_dim, num_heads, dim, p, householder_learned)
        turned = dim - dim % 2 if pos_dim == 1 else dim
        if turned < 2:
            raise ValueError(f"dim={dim}: the rotation core needs at least one pair (dim >= 2)")
        initial, axis = axial_frequencies(turned, pos_dim, base)  # validates the options
        self.turned = turned
        self._init_theta(initial, axis, base, learnable, theta)
        self.reset_parameters()

    def core(self, y: Tensor, pos: Tensor) -> Tensor:
        angles = self.angles(pos)
        if self.turned == self.dim:
            return rotate_pairs(y, angles)
        return torch.cat([rotate_pairs(y[..., : self.turned], angles), y[..., self.turned :]], -1)


class PermutationLRPE(LRPE):
    r"""Permutation LRPE: ``Lambda_s = Q^s`` for a permutation (``"lrpe-permutation"``, core 3).

    Qin et al., TMLR 2023, https://arxiv.org/abs/2307.09270, permutation solution.

    With a permutation ``sigma`` of the ``d`` indices (one per head),
    ``(Q^s y)_j = y_(sigma^s(j))`` for every integer ``s`` (negative too), so
    ``<Q^s P a, Q^t P b> = (P a)^T Q^(t-s) P b``; ``T_s x = Q^s P x``. The authors index a table
    ``expanded[s] = expanded[s-1].gather(-1, sigma)``: the same ``sigma^s``. Here ``sigma^s`` is
    read off the cycles of ``sigma`` in O(1) per entry; the period of ``s -> Q^s`` is the lcm
    of the cycle lengths (offsets that differ by it are indistinguishable).

    Positions must be integers (``pos_dim = 1``); fractional positions raise ``ValueError``.
    Padded slots must hold integers too (the engine zeroes them). ``RPEAttention``
    centres integer positions by ``floor(mean + 1/2)`` (``integer_positions``), so they stay
    integers and the output is exactly invariant under integer shifts.

    Args:
        pos_dim: must be 1.
        num_heads: number of heads ``h``.
        dim: size ``d`` of the permuted vectors (any positive int).
        seed: seed of the permutation draw (default ``None``: the global torch RNG).
        permutation: ``sigma`` as a long tensor ``[d]`` (all heads, as the authors'
            ``randperm(d)``) or ``[h, d]``; kept by :meth:`reset_parameters` (default: drawn).
        p: ``"identity"`` (default), ``"householder"`` (the authors' ``l_per``) or a real matrix.
        householder_learned: learn the Householder vector.

    Shapes:
        ``transform(x [..., h, d], pos [..., 1])`` -> ``[..., h, d]``.
    """

    integer_positions = True

    def __init__(
        self,
        pos_dim: int,
        num_heads: int,
        dim: int,
        seed: int | None = None,
        permutation: Tensor | None = None,
        p: str | Tensor = "identity",
        householder_learned: bool = False,
    ) -> None:
        if pos_dim != 1:
            raise ValueError(
                "PermutationLRPE needs pos_dim=1 (integer sequence positions), "
                f"got pos_dim={pos_dim}"
            )
        super().__init__(pos_dim, num_heads, dim, p, householder_learned)
        self.seed = seed
        self._given = None if permutation is None else self._check_permutation(permutation)
        for name in ("permutation", "cycle_order", "cycle_start", "cycle_rank", "cycle_length"):
            self.register_buffer(name, torch.empty(num_heads, dim, dtype=torch.long))
        self.reset_parameters()

    def _check_permutation(self, permutation) -> Tensor:
        perm = torch.as_tensor(permutation)
        if perm.dtype.is_floating_point or perm.dtype.is_complex or perm.dtype == torch.bool:
            raise ValueError(f"permutation must be an integer tensor, got {perm.dtype}")
        perm = self._per_head(perm.long().cpu(), (self.dim,), "permutation")
        identity = torch.arange(self.dim).expand_as(perm)
        if not torch.equal(perm.sort(dim=-1).values, identity):
            raise ValueError(
                f"permutation must hold each of 0 .. {self.dim - 1} once per head, got {perm}"
            )
        return perm.clone()

    def reset_parameters(self) -> None:
        """Redraw the Householder vector; draw ``sigma`` from ``seed`` unless it was given."""
        super().reset_parameters()
        if self._given is not None:
            perm = self._given
        else:
            generator = None if self.seed is None else torch.Generator().manual_seed(self.seed)
            perm = torch.stack(
                [torch.randperm(self.dim, generator=generator) for _ in range(self.num_heads)]
            )
        self.permutation.copy_(perm)
        self._index_cycles()

    @torch.no_grad()
    def set_permutation(self, permutation: Tensor) -> None:
        """Set ``sigma``: a long tensor ``[d]`` (repeated per head) or ``[h, d]``; rebuilds the
        cycle tables. Kept by :meth:`reset_parameters` from then on."""
        self._given = self._check_permutation(permutation)
        self.permutation.copy_(self._given)
        self._index_cycles()

    @torch.no_grad()
    def _index_cycles(self) -> None:
        """Cycle tables: ``sigma^s(j) = order[start_j + (rank_j + s) mod length_j]``."""
        for h, sigma in enumerate(self.permutation.tolist()):
            order, start, rank, length = [], [0] * self.dim, [0] * self.dim, [0] * self.dim
            seen = [False] * self.dim
            for first in range(self.dim):
                if seen[first]:
                    continue
                cycle, j = [], first
                while not seen[j]:
                    seen[j] = True
                    cycle.append(j)
                    j = sigma[j]
                for position, j in enumerate(cycle):
                    start[j], rank[j], length[j] = len(order), position, len(cycle)
                order.extend(cycle)
            for name, values in (
                ("cycle_order", order),
                ("cycle_start", start),
                ("cycle_rank", rank),
                ("cycle_length", length),
            ):
                getattr(self, name)[h] = torch.tensor(values)

    def power_index(self, steps: Tensor) -> Tensor:
        """``sigma^s(j)`` for integer ``steps [...]`` -> ``[..., h, d]`` (long)."""
        s = steps[..., None, None]
        slot = self.cycle_start + torch.remainder(self.cycle_rank + s, self.cycle_length)
        order = self.cycle_order.expand(slot.shape)
        return torch.gather(order, -1, slot)

    def core(self, y: Tensor, pos: Tensor) -> Tensor:
        steps = pos[..., 0]
        if pos.is_floating_point():
            if eager_checks() and (
                not bool(torch.isfinite(steps).all()) or bool((steps != steps.round()).any())
            ):
                raise ValueError(
                    "PermutationLRPE needs integer positions (P^s is undefined for fractional s); "
                    "padded slots too."
                )
            steps = steps.round().long()
        return torch.gather(y, -1, self.power_index(steps))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", seed={self.seed}"

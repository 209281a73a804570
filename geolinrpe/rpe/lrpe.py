r"""LRPE: linearized relative positional encodings by unitary maps (Qin et al., TMLR 2023).

Qin et al., "Linearized Relative Positional Encoding", TMLR 2023,
https://arxiv.org/abs/2307.09270 (code: https://github.com/OpenNLPLab/Lrpe).

Axes: ``...`` leading axes (b batch, n tokens), h heads, d size of the transformed vectors
(the kernel feature count ``r`` in mask mode), m rotation pairs (``d / 2``), p position dim.

LRPE maps token ``s`` by ``M_s`` with ``M_s^H M_t = M_(t-s)``, so
``<M_s phi(q_s), M_t phi(k_t)> = phi(q_s)^H M_(t-s) phi(k_t)`` is relative. Three
solutions of the paper, all real orthogonal here:

* :class:`UnitaryLRPE` (``"lrpe-unitary"``): ``M_s = diag(exp(i theta s))`` on complex
  numbers made of feature pairs, real and imaginary parts kept side by side: the
  block-diagonal 2x2 rotation ``R_s`` of RoPE, applied to kernel features.
* :class:`OrthogonalLRPE` (``"lrpe-orthogonal"``): ``M_s = H R_s H`` with the learned
  Householder reflection ``H = I - 2 u u^T / |u|^2`` (``H = H^T = H^-1``), so
  ``M_s^T M_t = H R_(t-s) H = M_(t-s)``.
* :class:`PermutationLRPE` (``"lrpe-permutation"``): ``M_s = P^s`` for a fixed random
  permutation ``P`` of the feature axis, ``(P^s x)_j = x_(sigma^s(j))``; integer 1D
  positions only (``P^s`` is undefined for fractional ``s``).

All share :class:`LRPE`, built on :class:`~geolinrpe.rpe.rotary.OrthogonalMapRPE`: mode
``"mask"`` (the paper's: after the kernel feature map, 1+ELU in the paper, ``dim`` = the
map's ``num_features``) and mode ``"logit"`` (before FAVOR+ features, ``dim`` = head dim).

Normalisation (mask mode). The transformed features are signed, so the engine's
``"masked"`` denominator ``sum_t phi'(q_s) . phi'(k_t)`` can vanish or change sign for valid
inputs (see :mod:`geolinrpe.rpe.rotary`). The TransNormer-style attention that LRPE ships
in has no denominator and normalises the output instead; we follow it: use
``normalize="none"`` (and a norm after the attention if needed). The positive unrotated
denominator is available in :func:`~geolinrpe.rpe.rotary.rotary_kernel_reference`
(``normalize="kernel"``) only.
Exact O(n^2) references: :func:`~geolinrpe.rpe.rotary.rotary_kernel_reference` (mask mode)
and :func:`~geolinrpe.rpe.rotary.rotary_softmax_reference` (logit mode).

Positions are real coordinates for the rotation solutions (axial in 2D/3D, as RoPE), and
``dim`` must be even (divisible by ``2 pos_dim``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..ops.checks import eager_checks
from .rotary import AxialRotation, OrthogonalMapRPE, RoPE


class LRPE(OrthogonalMapRPE):
    """Base class of the LRPE family: ``x -> M_s x`` with ``M_s^T M_t = M_(t-s)``.

    Args:
        pos_dim: position dimension ``p``.
        num_heads: number of heads ``h``.
        dim: size ``d`` of the transformed vectors (kernel features in mask mode).
    """


class UnitaryLRPE(RoPE, LRPE):
    r"""Unitary LRPE: complex rotation of feature pairs (``"lrpe-unitary"``).

    Qin et al., TMLR 2023, https://arxiv.org/abs/2307.09270, unitary solution.

    Feature pairs form complex numbers ``z_k = x_2k + i x_2k+1`` and
    ``M_s z_k = exp(i theta_k s) z_k``; real and imaginary parts are stored side by side, so
    ``M_s`` is the block-diagonal rotation

    .. math::

        M_s = \bigoplus_k \begin{pmatrix} \cos\theta_k s & -\sin\theta_k s \\
            \sin\theta_k s & \cos\theta_k s \end{pmatrix}, \qquad
        \langle M_s a, M_t b \rangle = \mathrm{Re} \sum_k \bar a_k b_k e^{i \theta_k (t - s)}.

    ``theta_k = base^(-2k/d)`` (per head; axial groups for ``pos_dim > 1``), fixed or learned.

    Args:
        pos_dim: position dimension ``p`` (1 in the paper; axial for 2, 3).
        num_heads: number of heads ``h``.
        dim: size ``d`` of the transformed vectors, divisible by ``2p``.
        base: frequency base (default 10000.0).
        learnable: learn ``theta`` (default ``False``).

    Shapes:
        ``transform(x [..., h, d], pos [..., p])`` -> ``[..., h, d]``.
    """

    # the same map as RoPE; in mask mode it acts on kernel features, as in the LRPE paper


class OrthogonalLRPE(LRPE):
    r"""Orthogonal LRPE: rotation conjugated by a learned Householder reflection.

    Qin et al., TMLR 2023, https://arxiv.org/abs/2307.09270, orthogonal solution
    (``"lrpe-orthogonal"``).

    .. math::

        H = I - 2 \frac{u u^\top}{|u|^2}, \qquad M_s = H R_s H, \qquad
        M_s^\top M_t = H R_{t-s} H = M_{t-s},

    with ``R_s`` the rotation of :class:`UnitaryLRPE` and ``u [h, d]`` learned per head
    (initialised ``N(0, I)``; ``u = 0`` is undefined). Cost ``O(d)`` per token: ``H`` is
    applied as ``x - 2 u (u . x) / |u|^2``.

    Args:
        pos_dim: position dimension ``p``.
        num_heads: number of heads ``h``.
        dim: size ``d`` of the transformed vectors, divisible by ``2p``.
        base: frequency base (default 10000.0).
        learnable: learn ``theta`` too (default ``False``; ``u`` is always learned).

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
        self.householder = nn.Parameter(torch.empty(num_heads, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.rotation.reset_parameters()
        with torch.no_grad():
            self.householder.normal_()

    def reflect(self, x: Tensor) -> Tensor:
        """``H x`` for ``x [..., h, d]``."""
        u = self.householder.to(x.dtype)
        coef = 2 * torch.einsum("...hd,hd->...h", x, u) / u.pow(2).sum(-1)
        return x - coef.unsqueeze(-1) * u

    def transform(self, x: Tensor, pos: Tensor) -> Tensor:
        self._check_transform_inputs(x, pos)
        return self.reflect(self.rotation(self.reflect(x), pos))


class PermutationLRPE(LRPE):
    r"""Permutation LRPE: ``M_s = P^s`` for a fixed random permutation (``"lrpe-permutation"``).

    Qin et al., TMLR 2023, https://arxiv.org/abs/2307.09270, permutation solution.

    With a permutation ``sigma`` of the ``d`` feature indices (one per head),
    ``(P^s x)_j = x_(sigma^s(j))`` for every integer ``s`` (negative too), so
    ``P^s P^t = P^(s+t)`` and ``<P^s a, P^t b> = <a, P^(t-s) b>``. ``sigma^s`` is read off
    the cycles of ``sigma`` in O(1) per entry. The period of ``s -> P^s`` is the lcm of the
    cycle lengths: offsets that differ by it are indistinguishable.

    Positions must be integers (``pos_dim = 1``); fractional positions raise ``ValueError``.
    Padded slots must hold integers too (the engine zeroes them). ``RPEAttention``
    centres integer positions by ``floor(mean + 1/2)`` (``integer_positions``), so they stay
    integers and the output is exactly invariant under integer shifts.

    Args:
        pos_dim: must be 1.
        num_heads: number of heads ``h``.
        dim: size ``d`` of the permuted vectors (any positive int).
        seed: seed of the permutation draw (default ``None``: the global torch RNG).

    Shapes:
        ``transform(x [..., h, d], pos [..., 1])`` -> ``[..., h, d]``.
    """

    integer_positions = True

    def __init__(self, pos_dim: int, num_heads: int, dim: int, seed: int | None = None) -> None:
        if pos_dim != 1:
            raise ValueError(
                "PermutationLRPE needs pos_dim=1 (integer sequence positions), "
                f"got pos_dim={pos_dim}"
            )
        super().__init__(pos_dim, num_heads, dim)
        self.seed = seed
        for name in ("permutation", "cycle_order", "cycle_start", "cycle_rank", "cycle_length"):
            self.register_buffer(name, torch.empty(num_heads, dim, dtype=torch.long))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        generator = None if self.seed is None else torch.Generator().manual_seed(self.seed)
        perms = [torch.randperm(self.dim, generator=generator) for _ in range(self.num_heads)]
        self.permutation.copy_(torch.stack(perms))
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

    def transform(self, x: Tensor, pos: Tensor) -> Tensor:
        self._check_transform_inputs(x, pos)
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
        return torch.gather(x, -1, self.power_index(steps))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", seed={self.seed}"

r"""Real spherical harmonics in pure PyTorch (component normalisation), up to any degree.

Axes: e edges (vectors), l degree, m order.

:func:`spherical_harmonics` returns ``Y [e, (lmax + 1)^2]``: for each degree ``l`` the
``2l + 1`` real harmonics ``Y_lm(u)`` of the unit vector ``u = v / |v|``, ordered
``m = -l..l``, normalised so that ``sum_m Y_lm(u)^2 = 2l + 1`` for every ``u`` (e3nn's
``normalization="component"``; ``sqrt(4 pi)`` times the orthonormal harmonics). The addition
theorem holds: ``sum_m Y_lm(u) Y_lm(w) = (2l + 1) P_l(u . w)``.

Construction, with ``u = (x, y, z)``: ``C_m + i S_m = (x + i y)^m`` by the recurrence
``C_(m+1) = x C_m - y S_m``, ``S_(m+1) = x S_m + y C_m``, and the associated Legendre
functions divided by ``(1 - z^2)^(m/2)``:
``Q_m^m = (2m - 1)!!``, ``Q_(m+1)^m = (2m + 1) z Q_m^m``,
``Q_l^m = ((2l - 1) z Q_(l-1)^m - (l + m - 1) Q_(l-2)^m) / (l - m)``; then
``Y_l0 = N_l0 Q_l^0``, ``Y_l(+m) = sqrt(2) N_lm Q_l^m C_m``, ``Y_l(-m) = sqrt(2) N_lm Q_l^m S_m``
with ``N_lm = sqrt((2l + 1) (l - m)! / (l + m)!)``. Only polynomials of ``x, y, z``: no
angles, so no singularity at the poles, and gradients are defined for every ``v != 0``.

Within each degree the basis is an orthogonal transform of e3nn's (e3nn orients its
harmonics around the y axis): quantities invariant under rotations, such as the power
spectrum ``sum_m A_lm^2`` that :class:`~geolinrpe.models.molecule.MoleculeTransformer`
uses, are identical. No e3nn dependency.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import Tensor

__all__ = ["spherical_harmonics"]


@lru_cache(maxsize=64)
def _norms(lmax: int) -> tuple[tuple[float, ...], ...]:
    """``N_lm`` for ``m = 0..l`` (times ``sqrt(2)`` for ``m > 0``)."""
    return tuple(
        tuple(
            math.sqrt((2 * l + 1) * math.factorial(l - m) / math.factorial(l + m))
            * (math.sqrt(2.0) if m else 1.0)
            for m in range(l + 1)
        )
        for l in range(lmax + 1)
    )


def spherical_harmonics(lmax: int, vectors: Tensor, eps: float = 0.0) -> Tensor:
    """Real spherical harmonics of degrees ``0..lmax`` of the directions of ``vectors``.

    Args:
        lmax: largest degree (``>= 0``).
        vectors: ``[..., 3]``, need not be unit length (a zero vector gives the polynomials'
            finite values at the origin, not NaN).
        eps: added to the norm before dividing (default 0).

    Returns:
        ``[..., (lmax + 1)^2]``: degree ``l`` at ``[l^2, (l + 1)^2)``, orders ``-l..l``.
    """
    if not isinstance(lmax, int) or lmax < 0:
        raise ValueError(f"lmax must be a non-negative int, got {lmax!r}")
    if vectors.shape[-1:] != (3,):
        raise ValueError(f"vectors must have shape [..., 3], got {list(vectors.shape)}")
    norm = vectors.norm(dim=-1, keepdim=True)
    unit = vectors / torch.where(norm > 0, norm + eps, torch.ones_like(norm))
    x, y, z = unit.unbind(-1)
    ones = torch.ones_like(z)
    cos, sin = [ones], [torch.zeros_like(z)]  # C_m, S_m
    for _ in range(lmax):
        cos, sin = cos + [x * cos[-1] - y * sin[-1]], sin + [x * sin[-1] + y * cos[-1]]
    norms = _norms(lmax)
    out: list[Tensor | None] = [None] * (lmax + 1) ** 2
    for m in range(lmax + 1):
        double_factorial = math.prod(range(2 * m - 1, 0, -2))  # (2m - 1)!!
        q_prev, q = None, ones * double_factorial  # Q_m^m
        for l in range(m, lmax + 1):
            if l == m + 1:
                q_prev, q = q, (2 * m + 1) * z * q
            elif l > m + 1:
                q_prev, q = q, ((2 * l - 1) * z * q - (l + m - 1) * q_prev) / (l - m)
            centre = l * l + l  # index of m = 0 within degree l
            if m == 0:
                out[centre] = norms[l][0] * q
            else:
                out[centre + m] = norms[l][m] * q * cos[m]
                out[centre - m] = norms[l][m] * q * sin[m]
    return torch.stack(out, -1)  # type: ignore[arg-type]

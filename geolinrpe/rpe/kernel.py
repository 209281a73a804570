r"""FLT RPE from a shift-invariant kernel with learnable per-head bandwidth and amplitude.

``f_h(Delta) = a_h k(|Delta| / l_h)``; its spectral density is sampled by
reparametrisation, ``xi = eps / (2 pi l_h)`` with fixed ``eps``, so gradients reach ``l_h``
through the frequencies and the importance weights are the constant ``a_h``.

Kernels:

* ``"gaussian"``: ``k(u) = exp(-u^2 / 2)``, spectral density ``N(0, (2 pi l)^-2 I)``.

Axes: ``...`` leading axes, p position dim, h heads, m frequencies.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..features.positive_random import gaussian_orthogonal_matrix
from .base import FourierRPE

KERNELS = ("gaussian",)


class ShiftInvariantKernelRPE(FourierRPE):
    r"""``f_h(Delta) = amplitude_h exp(-|Delta|^2 / (2 lengthscale_h^2))`` (``"flt-kernel"``).

    Args:
        pos_dim: position dimension ``p`` (any positive int).
        num_heads: number of heads ``h``.
        num_frequencies: frequencies ``m`` per head (default 16).
        kernel: ``"gaussian"``.
        lengthscale: initial bandwidth ``l`` in position units (default 1.0).
        amplitude: initial ``a`` (default 1.0; use 0.0 for a neutral logit-mode bias).
        orthogonal: draw the base frequencies in orthogonal blocks (default ``True``).

    Shapes:
        ``spectrum()`` -> ``xi [h, m, p]``, ``weight [h, m]``;
        ``closed_form(delta [..., p])`` -> ``[..., h]``.
    """

    def __init__(
        self,
        pos_dim: int,
        num_heads: int,
        num_frequencies: int = 16,
        kernel: str = "gaussian",
        lengthscale: float = 1.0,
        amplitude: float = 1.0,
        orthogonal: bool = True,
    ) -> None:
        super().__init__(pos_dim, num_heads, num_frequencies)
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        if not lengthscale > 0:
            raise ValueError(f"lengthscale must be positive, got {lengthscale}")
        self.kernel = kernel
        self.orthogonal = orthogonal
        self.init_lengthscale = float(lengthscale)
        self.init_amplitude = float(amplitude)
        self.log_lengthscale = nn.Parameter(torch.empty(num_heads))
        self.amplitude = nn.Parameter(torch.empty(num_heads))
        self.register_buffer("base_frequencies", torch.empty(num_heads, num_frequencies, pos_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.log_lengthscale.fill_(math.log(self.init_lengthscale))
            self.amplitude.fill_(self.init_amplitude)
        self.redraw()

    @torch.no_grad()
    def redraw(self, generator: torch.Generator | None = None) -> None:
        eps = torch.stack(
            [
                gaussian_orthogonal_matrix(
                    self.num_frequencies,
                    self.pos_dim,
                    orthogonal=self.orthogonal,
                    generator=generator,
                )
                for _ in range(self.num_heads)
            ]
        )
        self.base_frequencies.copy_(eps.to(self.base_frequencies))

    @property
    def lengthscale(self) -> Tensor:
        return self.log_lengthscale.exp()

    def spectrum(self) -> tuple[Tensor, Tensor]:
        xi = self.base_frequencies / (2 * math.pi * self.lengthscale)[:, None, None]
        weight = self.amplitude[:, None].expand(-1, self.num_frequencies)
        return xi, weight

    def closed_form(self, delta: Tensor) -> Tensor:
        sq = delta.pow(2).sum(-1, keepdim=True)  # [..., 1]
        ls = self.lengthscale.to(delta.dtype)
        return self.amplitude.to(delta.dtype) * torch.exp(-sq / (2 * ls**2))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", kernel={self.kernel!r}"

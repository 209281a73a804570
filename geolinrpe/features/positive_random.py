"""FAVOR+ positive random features for the softmax kernel ``K(x, y) = exp(x . y)``.

Choromanski et al., "Rethinking Attention with Performers", ICLR 2021.

``phi(x) = exp(W x - |x|^2 / 2) / sqrt(r)`` with the rows of ``W [r, d]`` drawn from
``N(0, I)``; ``E[phi(x) . phi(y)] = exp(x . y)`` and every feature is positive.
Orthogonal blocks (rows orthogonal within each block of ``d``, norms chi-distributed so
that each row is still marginally ``N(0, I)``) lower the variance.

Axes: ``...`` leading axes, d input dim, r features.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import FeatureMap


def gaussian_orthogonal_matrix(
    rows: int,
    cols: int,
    *,
    orthogonal: bool = True,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """Random ``[rows, cols]`` matrix whose rows are marginally ``N(0, I_cols)``.

    With ``orthogonal=True`` the rows come in blocks of ``cols`` mutually orthogonal rows
    (QR of a Gaussian matrix) rescaled by independent chi(``cols``) norms.
    """
    if rows <= 0 or cols <= 0:
        raise ValueError(f"rows and cols must be positive, got rows={rows}, cols={cols}")
    gauss = torch.randn(rows, cols, generator=generator, dtype=torch.float64, device=device)
    if not orthogonal:
        return gauss.to(dtype)
    blocks = []
    for _ in range(math.ceil(rows / cols)):
        g = torch.randn(cols, cols, generator=generator, dtype=torch.float64, device=device)
        qmat, rmat = torch.linalg.qr(g)
        # sign fix makes Q Haar-distributed
        qmat = qmat * torch.sign(torch.diagonal(rmat)).unsqueeze(0)
        blocks.append(qmat.T)
    ortho = torch.cat(blocks)[:rows]
    return (ortho * gauss.norm(dim=1, keepdim=True)).to(dtype)


class PositiveRandomFeatures(FeatureMap):
    r"""FAVOR+ features of the softmax kernel ``exp(x . y)``.

    Args:
        input_dim: size ``d`` of the inputs. Scale inputs yourself (the attention layer
            feeds ``q / d**0.25``) so that ``exp(x . y)`` is the kernel you want.
        num_features: number ``r`` of random features (default 64).
        orthogonal: draw orthogonal blocks (default ``True``).

    Shapes:
        ``x [..., d]`` -> ``phi [..., r]``, ``log_scale [...]``.

    Each row is stabilised by its own maximum: ``phi = exp(Wx - |x|^2/2 - max) / sqrt(r)``
    and ``log_scale = max`` (detached), so ``phi * exp(log_scale)`` are the true features.
    """

    positive = True
    random = True

    def __init__(self, input_dim: int, num_features: int = 64, orthogonal: bool = True) -> None:
        super().__init__()
        if input_dim <= 0:
            raise ValueError(f"input_dim must be positive, got {input_dim}")
        if num_features <= 0:
            raise ValueError(f"num_features must be positive, got {num_features}")
        self.input_dim = input_dim
        self.num_features = num_features
        self.orthogonal = orthogonal
        self.register_buffer("projection", torch.empty(num_features, input_dim))
        self.redraw()

    @torch.no_grad()
    def redraw(self, generator: torch.Generator | None = None) -> None:
        w = gaussian_orthogonal_matrix(
            self.num_features, self.input_dim, orthogonal=self.orthogonal, generator=generator
        )
        self.projection.copy_(w.to(self.projection))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logits = torch.einsum("...d,rd->...r", x, self.projection.to(x.dtype))
        logits = logits - 0.5 * x.pow(2).sum(-1, keepdim=True)
        log_scale = logits.detach().amax(-1)
        phi = torch.exp(logits - log_scale.unsqueeze(-1)) / math.sqrt(self.num_features)
        return phi, log_scale

    def kernel(self, x: Tensor, y: Tensor) -> Tensor:
        return torch.exp(x @ y.transpose(-1, -2))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", orthogonal={self.orthogonal}"

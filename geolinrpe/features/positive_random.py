"""FAVOR+ positive random features for the softmax kernel ``K(x, y) = exp(x . y)``.

Choromanski et al., "Rethinking Attention with Performers", ICLR 2021.

``phi(x) = exp(W x - |x|^2 / 2) / sqrt(r)`` with the rows of ``W [r, d]`` drawn from
``N(0, I)``; ``E[phi(x) . phi(y)] = exp(x . y)`` and every feature is positive.
Orthogonal blocks (rows orthogonal within each block of ``d``, norms chi-distributed so
that each row is still marginally ``N(0, I)``) lower the variance.

:class:`GERFFeatures` ("FAVOR++", Likhosherstov et al., "Chefs' Random Tables:
Non-Trigonometric Random Features", NeurIPS 2022) generalises FAVOR+ with a parameter
``A <= 0`` chosen from the data to minimise the variance.

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

    @torch.no_grad()
    def set_projection(self, matrix: Tensor) -> None:
        """Load a given projection ``W [r, d]`` (for example a published run's; Google's
        FAVOR+ code builds it from ``PRNGKey(seed)`` in JAX). :meth:`redraw` replaces it."""
        matrix = torch.as_tensor(matrix)
        shape = tuple(self.projection.shape)
        if tuple(matrix.shape) != shape or not matrix.is_floating_point():
            raise ValueError(
                f"matrix must be a float tensor of shape [num_features, input_dim] = "
                f"{list(shape)}, got {list(matrix.shape)}"
            )
        if not bool(torch.isfinite(matrix).all()):
            raise ValueError("matrix must be finite")
        self.projection.copy_(matrix)

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


def optimal_gerf_parameter(rho: Tensor | float) -> Tensor:
    r"""FAVOR++'s variance-optimal ``A* = (1 - 2 rho - sqrt((2 rho + 1)^2 + 8 rho)) / 16``.

    ``rho = mean_{i,j} |x_i + y_j|^2 / d >= 0``; ``A*(0) = 0`` (FAVOR+) and ``A* <= 0``.
    Computed as ``-(2 rho + t / (1 + sqrt(1 + t))) / 16`` with ``t = 12 rho + 4 rho^2`` (the
    same number without the cancellation of ``1 - sqrt(1 + t)`` for small ``rho``).
    """
    rho = torch.as_tensor(rho).clamp_min(0)
    t = rho * (12 + 4 * rho)
    return -(2 * rho + t / (1 + torch.sqrt(1 + t))) / 16


class GERFFeatures(PositiveRandomFeatures):
    r"""FAVOR++: generalised exponential random features of ``exp(x . y)``, optimal ``A``.

    Likhosherstov et al., "Chefs' Random Tables: Non-Trigonometric Random Features",
    NeurIPS 2022. With ``omega ~ N(0, I_d)`` (the rows of ``projection``) and ``A <= 0``:

    ``f_A(omega, x) = D exp(A |omega|^2 + B omega . x - |x|^2 / 2)``,
    ``B = sqrt(1 - 4A)``, ``D = (1 - 4A)^(d/4)``,

    ``phi(x) = [f_A(omega_l, x)]_l / sqrt(r)``. For every ``A < 1/8``,
    ``E[f_A(omega, x) f_A(omega, y)] = exp(x . y)``: the estimate ``phi(x) . phi(y)`` is
    unbiased whatever ``A`` is, every feature is positive, and ``A = 0`` is FAVOR+. Only the
    variance depends on ``A``:

    ``log(E[f_A(omega,x)^2 f_A(omega,y)^2] / exp(2 x.y))
    = (d/2) log((1-4A)^2 / (1-8A)) + |x + y|^2 / (1-8A)``.

    Averaged over the query/key pairs, with ``rho = mean_{i,j} |x_i + y_j|^2 / d``, it is
    minimised by ``A* = (1 - 2 rho - sqrt((2 rho + 1)^2 + 8 rho)) / 16 <= 0``
    (:func:`optimal_gerf_parameter`). ``mean_{i,j} |x_i + y_j|^2 = mean|x|^2 + mean|y|^2
    + 2 mean(x) . mean(y)`` costs O(n); :meth:`calibrate` estimates it from the inputs (all
    valid vectors passed, batch rows and heads pooled).

    ``rho`` is a buffer (saved in checkpoints; DDP broadcasts it from rank 0 with the other
    buffers). The forward pass never changes it, so ``A`` is constant during one attention
    call: chunked, padded, packed and causal paths use the same features and stay exact
    against the explicit-feature reference. :class:`~geolinrpe.nn.RPEAttention` calls
    :meth:`calibrate` in training mode only; eval mode never changes ``rho``.

    Args:
        input_dim, num_features, orthogonal: as :class:`PositiveRandomFeatures`.
        rho: ``None`` (default: adaptive, estimated by :meth:`calibrate`) or a fixed
            ``rho >= 0`` (fixed ``A = A*(rho)``; :meth:`calibrate` is then a no-op).
        momentum: weight of a new estimate in the exponential moving average of ``rho``
            (default 0.1); the first calibration sets ``rho`` directly.

    Before the first calibration ``A = 0``: the features equal FAVOR+'s exactly.
    Stabilisation as FAVOR+: ``log D + A |omega|^2`` sit inside the logits before the
    row maximum is subtracted.
    """

    def __init__(
        self,
        input_dim: int,
        num_features: int = 64,
        orthogonal: bool = True,
        rho: float | None = None,
        momentum: float = 0.1,
    ) -> None:
        if rho is not None and not (isinstance(rho, (int, float)) and math.isfinite(rho)):
            raise ValueError(f"rho must be None or a finite float >= 0, got {rho!r}")
        if rho is not None and rho < 0:
            raise ValueError(f"rho must be None or a finite float >= 0, got {rho!r}")
        if not (isinstance(momentum, (int, float)) and 0 < momentum <= 1):
            raise ValueError(f"momentum must be in (0, 1], got {momentum!r}")
        super().__init__(input_dim, num_features, orthogonal)
        self.adaptive = rho is None
        self.momentum = float(momentum)
        self.register_buffer("rho", torch.tensor(0.0 if rho is None else float(rho)))
        self.register_buffer("calibrated", torch.tensor(rho is not None))

    @property
    def A(self) -> Tensor:  # noqa: N802 - the paper's name
        """The current ``A = A*(rho)`` (0-d tensor, ``<= 0``)."""
        return optimal_gerf_parameter(self.rho)

    @torch.no_grad()
    def calibrate(self, x: Tensor, y: Tensor, valid: Tensor | None = None) -> None:
        """Update ``rho`` from query inputs ``x [..., d]`` and key inputs ``y [..., d]``.

        ``valid``: boolean mask of the vectors to use, broadcastable to ``x.shape[:-1]`` and
        ``y.shape[:-1]`` (``None``: all). The estimate of this call,
        ``(mean|x|^2 + mean|y|^2 + 2 mean(x) . mean(y)) / d`` over the valid vectors, sets
        ``rho`` at the first call and enters an exponential moving average (``momentum``)
        afterwards. No valid vector: nothing changes. No-op with a fixed ``rho``.
        """
        if not self.adaptive:
            return
        for name, t in (("x", x), ("y", y)):
            if t.shape[-1] != self.input_dim:
                raise ValueError(f"{name} has {t.shape[-1]} features, expected {self.input_dim}")
        work = torch.float32 if x.device.type == "mps" else torch.float64
        count_x, sum_x, sq_x = _moments(x, valid, work)
        count_y, sum_y, sq_y = _moments(y, valid, work)
        ok = (count_x > 0) & (count_y > 0)
        cx, cy = count_x.clamp_min(1), count_y.clamp_min(1)
        pair = sq_x / cx + sq_y / cy + 2 * (sum_x / cx) @ (sum_y / cy)
        estimate = (pair / self.input_dim).clamp_min(0)
        rho = self.rho.to(work)
        blended = torch.where(self.calibrated, rho + self.momentum * (estimate - rho), estimate)
        self.rho.copy_(torch.where(ok, blended, rho))
        self.calibrated.logical_or_(ok)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        a = self.A.to(device=x.device, dtype=x.dtype)
        w = self.projection.to(x.dtype)
        logits = torch.einsum("...d,rd->...r", x, w) * torch.sqrt(1 - 4 * a)
        logits = logits + a * w.pow(2).sum(-1) + 0.25 * self.input_dim * torch.log1p(-4 * a)
        logits = logits - 0.5 * x.pow(2).sum(-1, keepdim=True)
        log_scale = logits.detach().amax(-1)
        phi = torch.exp(logits - log_scale.unsqueeze(-1)) / math.sqrt(self.num_features)
        return phi, log_scale

    def extra_repr(self) -> str:
        rho = "adaptive" if self.adaptive else f"{float(self.rho):g}"
        return super().extra_repr() + f", rho={rho}, momentum={self.momentum}"


def _moments(x: Tensor, valid: Tensor | None, work: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Count, sum ``[d]`` and sum of squared norms of the valid vectors of ``x [..., d]``."""
    flat = x.detach().to(work).reshape(-1, x.shape[-1])
    if valid is None:
        weight = flat.new_ones(flat.shape[0])
    else:
        weight = torch.broadcast_to(valid, x.shape[:-1]).reshape(-1).to(work)
    return weight.sum(), weight @ flat, weight @ flat.pow(2).sum(-1)

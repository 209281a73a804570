r"""Kernelized attention with a Toeplitz RPE on a regular grid, by FFT, and its O(n^2) reference.

Luo et al., `"Stable, Fast and Accurate: Kernelized Attention with Relative Positional
Encoding" <https://arxiv.org/abs/2106.12566>`_ (NeurIPS 2021).

Axes: b batch, n/i/j tokens, h heads, r kernel features, e value dim (``e'`` with the ones
column of the denominator), p grid dim, g grid cells.

Tokens sit on the cells ``g_i`` of a grid of shape ``(E_1, .., E_p)`` (1D sequence indices,
2D patch ``(row, col)``; any subset of the cells, several tokens may share one). With a
per-offset bias ``b_h[Delta]``, ``Delta = g_i - g_j``, the weights are

.. math::

    w_{ij} = \phi(q_i) \cdot \phi(k_j) \, C_{ij}, \qquad C_{ij} = \exp(b_h[g_i - g_j]),

and ``C`` is (block-)Toeplitz, so for every kernel feature ``r`` and value channel ``e``

.. math::

    \mathrm{num}_{ie} = \sum_r \phi(q_i)_r \, (c * U_{re})[g_i], \qquad
    U_{re}[g] = \sum_{j : g_j = g} \phi(k_j)_r \, v_{je},

a (``p``-dimensional) linear convolution of the key grid ``U`` with the kernel
``c[Delta] = exp(b[Delta])`` over the offsets ``-(E-1) .. E-1``: scatter the keys onto a zero
grid, multiply spectra (FFT of size ``>= 2E - 1`` per axis, so the circular convolution does
not wrap), gather at the queries. Cost ``O(b h r e' G log G)`` with ``G`` the padded grid
size, exact up to FFT rounding (no random features for the RPE).

* ``normalize="masked"``: ``out_i = num_i / sum_j w_ij`` (a ones column rides along with
  ``v``). ``exp(b) > 0``, so with positive feature maps the denominator is positive.
* ``normalize="none"``: ``out_i = num_i``.
* ``causal`` (1D only): only offsets ``g_i - g_j >= 0`` (the kernel is zero at negative
  offsets), i.e. key j is visible to query i when it sits at or before i on the grid.
* ``key_padding_mask``: padded keys' features are zeroed (they leave numerator and
  denominator), their grid positions are ignored, padded queries output 0.

Stabilisation: exponential feature maps give per-token ``log_scale`` (true features
``phi exp(log_scale)``). Keys enter as ``phi_k exp(log_scale - c)`` with ``c`` the
per-(sequence, head) maximum over valid keys, and the kernel as ``exp(b - max b)`` per head;
both constants cancel in the masked ratio and are multiplied back with ``"none"``.

Precision: the FFT's rounding error is relative to the largest values of each
convolution (about ``eps log G`` times them), not to each output, so an output whose sums
are much smaller than the largest ones loses relative accuracy. Bidirectional sums have
similar sizes (float32 vs the float64 reference: ``3e-8`` max abs error at ``n = 4096``),
but causal prefix sums grow along the sequence: early tokens' sums are ``~n`` times smaller
than the last ones (float32 FFTs gave ``1.5e-3`` max abs error at ``n = 4096``), so causal
convolutions always run in float64 (about 2x the time of float32). Large dynamic ranges of
a learned bias (``exp(b)`` spanning more than ``1 / eps``) have the same effect.
float16/bfloat16 inputs are computed in float32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .checks import check_floating, check_key_padding_mask, check_same_device_dtype
from .linear import HALF

NORMALIZATIONS = ("masked", "none")
#: elements of per-chunk working memory (32 MiB in float32); kernel features are processed
#: in chunks so that the key grids, their spectra and the gathered outputs fit
FFT_BUDGET = 2**23


def toeplitz_attention(
    phi_q: Tensor,
    phi_k: Tensor,
    v: Tensor,
    bias: Tensor,
    grid_pos: Tensor,
    grid_shape: tuple[int, ...],
    *,
    query_log_scale: Tensor | None = None,
    key_log_scale: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    causal: bool = False,
    normalize: str = "masked",
) -> Tensor:
    r"""Kernelized attention with the Toeplitz mask ``exp(b[g_i - g_j])`` by FFT.

    See the module docstring for the math. Inputs are kernel *features* (the feature map is
    applied by the caller), so any feature map works.

    Args:
        phi_q, phi_k: kernel features ``[b, n, h, r]``.
        v: values ``[b, n, h, e]``.
        bias: per-offset bias ``[h, 2 L_1 - 1, .., 2 L_p - 1]``; entry ``L_a - 1`` of axis
            ``a`` is offset 0. Needs ``L_a >= E_a``; offsets beyond ``E_a - 1`` are unused.
        grid_pos: integer grid cells ``[b, n, p]``, ``0 <= g < grid_shape`` per axis (padded
            tokens may hold anything).
        grid_shape: ``(E_1, .., E_p)``.
        query_log_scale, key_log_scale: ``[b, n, h]`` or ``None`` (default): the feature
            map's per-token log-scales (true features ``phi exp(log_scale)``). The query's
            is only used with ``normalize="none"``.
        key_padding_mask: ``[b, n]`` bool, ``True`` = padding (default ``None``).
        causal: only offsets ``g_i - g_j >= 0`` (default ``False``; 1D grids only).
        normalize: ``"masked"`` (default) or ``"none"``.

    Returns:
        ``[b, n, h, e]`` in ``v``'s dtype; padded queries are 0, and so is a query whose
        weights are all zero (0/0 := 0).
    """
    grid_shape = _check_args(
        phi_q,
        phi_k,
        v,
        bias,
        grid_pos,
        grid_shape,
        query_log_scale,
        key_log_scale,
        key_padding_mask,
        causal,
        normalize,
    )
    out_dtype = v.dtype
    b, n, h, r = phi_q.shape
    if n == 0:
        return v.new_zeros(v.shape)
    if out_dtype in HALF:  # FFTs and accumulation in float32
        phi_q, phi_k, v = phi_q.float(), phi_k.float(), v.float()
    dtype = v.dtype
    valid = None if key_padding_mask is None else ~key_padding_mask
    phi_k, key_shift = _stabilise_keys(phi_k, key_log_scale, valid)
    fft_shape = tuple(_fft_size(2 * size - 1) for size in grid_shape)
    fft_dtype = torch.float64 if causal else dtype  # causal prefix sums: see module docstring
    kernel_hat, kernel_shift = _kernel_spectrum(bias.to(fft_dtype), grid_shape, fft_shape, causal)
    kernel_shift = kernel_shift.to(dtype)
    cell = _flat_cells(grid_pos, grid_shape, valid)
    values = v if normalize == "none" else torch.cat([v, v.new_ones(b, n, h, 1)], -1)
    phi_k, values = phi_k.to(fft_dtype), values.to(fft_dtype)
    e1 = values.shape[-1]
    per_feature = b * h * e1 * (2 * n + math.prod(grid_shape) + 3 * math.prod(fft_shape))
    chunk = max(1, FFT_BUDGET // per_feature)
    num = None
    for start in range(0, r, chunk):
        stop = start + chunk
        conv = _convolve(phi_k[..., start:stop], values, kernel_hat, cell, grid_shape, fft_shape)
        part = torch.einsum("bhrxn,bnhr->bnhx", conv.to(dtype), phi_q[..., start:stop])
        num = part if num is None else num + part
    if normalize == "none":
        scale = kernel_shift.expand(b, n, h)
        if key_shift is not None:
            scale = scale + key_shift[:, None]
        if query_log_scale is not None:
            scale = scale + query_log_scale.to(dtype)
        out = num * torch.exp(scale)[..., None]
    else:
        num, den = num[..., :-1], num[..., -1]
        out = num / torch.where(den == 0, torch.ones_like(den), den)[..., None]
    if valid is not None:
        out = out.masked_fill(~valid[..., None, None], 0)
    return out.to(out_dtype)


def toeplitz_reference(
    phi_q: Tensor,
    phi_k: Tensor,
    v: Tensor,
    bias: Tensor,
    grid_pos: Tensor,
    grid_shape: tuple[int, ...],
    *,
    query_log_scale: Tensor | None = None,
    key_log_scale: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    causal: bool = False,
    normalize: str = "masked",
) -> Tensor:
    """O(n^2) counterpart of :func:`toeplitz_attention` (same arguments and result).

    Builds ``C_ij = exp(b[g_i - g_j])`` by indexing the bias with every pairwise offset and
    the full weight matrix ``w_ij = phi(q_i) . phi(k_j) C_ij``. For tests and baselines.
    """
    grid_shape = _check_args(
        phi_q,
        phi_k,
        v,
        bias,
        grid_pos,
        grid_shape,
        query_log_scale,
        key_log_scale,
        key_padding_mask,
        causal,
        normalize,
    )
    b, n, h, _ = phi_q.shape
    valid = torch.ones(b, n, dtype=torch.bool, device=v.device)
    if key_padding_mask is not None:
        valid = ~key_padding_mask
    pos = grid_pos.masked_fill(~valid[..., None], 0)
    offset = pos[:, :, None] - pos[:, None, :]  # [b, i, j, p]
    centre = [(size - 1) // 2 for size in bias.shape[1:]]
    index = tuple(offset[..., a] + centre[a] for a in range(len(centre)))
    toeplitz = torch.exp(bias.to(v.dtype)[(slice(None),) + index])  # [h, b, i, j]
    allowed = valid[:, None, None, :]  # [b, 1, 1, j]
    if causal:
        allowed = allowed & (offset[..., 0] >= 0)[:, None]
    logits = torch.zeros(b, h, n, n, dtype=v.dtype, device=v.device)
    if key_log_scale is not None:
        logits = logits + key_log_scale.to(v.dtype).transpose(1, 2)[:, :, None, :]
    if normalize == "none" and query_log_scale is not None:
        logits = logits + query_log_scale.to(v.dtype).transpose(1, 2)[..., None]
    logits = logits.masked_fill(~allowed, float("-inf"))
    if normalize == "masked":  # a per-query constant: cancels in the ratio
        logits = logits - logits.amax(-1, keepdim=True).clamp_min(-1e30)
    kernel = torch.einsum("bihr,bjhr->bhij", phi_q, phi_k) * torch.exp(logits)
    weights = kernel * toeplitz.transpose(0, 1)
    out = torch.einsum("bhij,bjhe->bihe", weights, v)
    if normalize == "masked":
        den = weights.sum(-1).transpose(1, 2)
        out = out / torch.where(den == 0, torch.ones_like(den), den)[..., None]
    return out.masked_fill(~valid[..., None, None], 0)


def _check_args(
    phi_q,
    phi_k,
    v,
    bias,
    grid_pos,
    grid_shape,
    query_log_scale,
    key_log_scale,
    key_padding_mask,
    causal,
    normalize,
) -> tuple[int, ...]:
    """Validate; every error names its argument. Returns ``grid_shape`` as a tuple."""
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be a bool, got {causal!r}")
    for name, t in (("phi_q", phi_q), ("phi_k", phi_k), ("v", v), ("bias", bias)):
        check_floating(name, t, finite=False)
    if phi_q.dim() != 4:
        raise ValueError(f"phi_q must have shape [b, n, h, r], got {list(phi_q.shape)}")
    if phi_k.shape != phi_q.shape:
        raise ValueError(
            f"phi_k must have phi_q's shape {list(phi_q.shape)}, got {list(phi_k.shape)}"
        )
    if v.dim() != 4 or v.shape[:3] != phi_q.shape[:3]:
        raise ValueError(f"v must have shape {list(phi_q.shape[:3]) + ['e']}, got {list(v.shape)}")
    check_same_device_dtype({"phi_q": phi_q, "phi_k": phi_k, "v": v})
    check_same_device_dtype({"v": v, "bias": bias}, same_dtype=False)
    b, n, h, _ = phi_q.shape
    if isinstance(grid_shape, int) or not all(
        isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in grid_shape
    ):
        raise ValueError(f"grid_shape must be a tuple of positive ints, got {grid_shape!r}")
    grid_shape = tuple(grid_shape)
    p = len(grid_shape)
    if p == 0:
        raise ValueError("grid_shape must have at least one axis")
    if causal and p != 1:
        raise ValueError(f"causal needs a 1D grid (token order = grid order), got {p} axes")
    if bias.dim() != p + 1 or bias.shape[0] != h:
        raise ValueError(
            f"bias must have shape [h={h}, 2 L_1 - 1, ..] with {p} offset axes, "
            f"got {list(bias.shape)}"
        )
    for size, extent in zip(bias.shape[1:], grid_shape, strict=True):
        if size % 2 == 0 or size < 2 * extent - 1:
            raise ValueError(
                f"bias must hold the offsets -(E-1)..E-1 of grid_shape={grid_shape} (odd sizes "
                f">= 2E - 1), got {list(bias.shape)}"
            )
    if (
        not isinstance(grid_pos, Tensor)
        or grid_pos.dtype.is_floating_point
        or grid_pos.is_complex()
    ):
        raise ValueError("grid_pos must be an integer tensor of grid cells")
    if tuple(grid_pos.shape) != (b, n, p):
        raise ValueError(f"grid_pos must have shape [{b}, {n}, {p}], got {list(grid_pos.shape)}")
    check_same_device_dtype({"v": v, "grid_pos": grid_pos}, same_dtype=False)
    for name, t in (("query_log_scale", query_log_scale), ("key_log_scale", key_log_scale)):
        if t is not None:
            check_floating(name, t, finite=False)
            if tuple(t.shape) != (b, n, h):
                raise ValueError(f"{name} must have shape [{b}, {n}, {h}], got {list(t.shape)}")
    if key_padding_mask is not None:
        check_key_padding_mask(key_padding_mask, b, n, v.device)
    cells = grid_pos if key_padding_mask is None else grid_pos[~key_padding_mask]
    limit = torch.tensor(grid_shape, device=grid_pos.device)
    if cells.numel() and bool(((cells < 0) | (cells >= limit)).any()):
        raise ValueError(f"grid_pos must lie in [0, grid_shape={grid_shape}) for valid tokens")
    return grid_shape


def _fft_size(n: int) -> int:
    """Smallest ``2^a 3^b 5^c >= n`` (fast FFT sizes; ``2E - 1`` is often prime)."""
    best = 1 << max(n - 1, 0).bit_length()
    p3 = 1
    while p3 < best:
        p35 = p3
        while p35 < best:
            size = p35
            while size < n:
                size *= 2
            best = min(best, size)
            p35 *= 5
        p3 *= 3
    return best


def _stabilise_keys(phi_k: Tensor, log_scale: Tensor | None, valid: Tensor | None):
    """Zero padded keys; fold ``exp(log_scale - c)`` in. Returns ``(phi_k, c [b, h] or None)``."""
    if valid is not None:
        phi_k = torch.where(valid[..., None, None], phi_k, 0.0)
    if log_scale is None:
        return phi_k, None
    log_scale = log_scale.to(phi_k.dtype)
    if valid is not None:
        log_scale = log_scale.masked_fill(~valid[..., None], float("-inf"))
    top = log_scale.amax(1)
    top = torch.where(torch.isfinite(top), top, 0.0)  # sequences without a valid key
    return phi_k * torch.exp(log_scale - top[:, None])[..., None], top


def _kernel_spectrum(bias: Tensor, grid_shape, fft_shape, causal: bool) -> tuple[Tensor, Tensor]:
    """Spectrum ``[h, *rfft shape]`` of ``exp(b - max b)`` laid out circularly, and ``max b [h]``.

    Offsets ``-(E-1)..E-1`` are cropped from the bias, zero-padded to ``fft_shape`` and rolled
    so that offset ``Delta`` sits at index ``Delta mod M``.
    """
    p = len(grid_shape)
    crop = tuple(
        slice((size - 1) // 2 - (extent - 1), (size - 1) // 2 + extent)
        for size, extent in zip(bias.shape[1:], grid_shape, strict=True)
    )
    logits = bias[(slice(None),) + crop]
    if causal:  # negative offsets (the first E - 1 entries) are invisible
        future = torch.arange(logits.shape[-1], device=bias.device) < grid_shape[0] - 1
        logits = logits.masked_fill(future, float("-inf"))
    shift = logits.detach().flatten(1).amax(-1)  # [h]
    kernel = torch.exp(logits - shift.view((-1,) + (1,) * p))
    pad = []
    for extent, size in zip(reversed(grid_shape), reversed(fft_shape), strict=True):
        pad += [0, size - (2 * extent - 1)]
    kernel = F.pad(kernel, pad)
    kernel = torch.roll(kernel, [-(extent - 1) for extent in grid_shape], list(range(1, p + 1)))
    return torch.fft.rfftn(kernel, dim=list(range(1, p + 1))), shift


def _flat_cells(grid_pos: Tensor, grid_shape, valid: Tensor | None) -> Tensor:
    """Row-major cell index ``[b, n]`` (padded tokens -> cell 0)."""
    cell = torch.zeros(grid_pos.shape[:2], dtype=torch.long, device=grid_pos.device)
    for axis, extent in enumerate(grid_shape):
        cell = cell * extent + grid_pos[..., axis].long()
    return cell if valid is None else cell.masked_fill(~valid, 0)


def _convolve(phi_k, values, kernel_hat, cell, grid_shape, fft_shape) -> Tensor:
    """``(c * U)[g_i]`` for a chunk of features: ``[b, h, r, e', n]``."""
    p = len(grid_shape)
    axes = list(range(-p, 0))
    keys = torch.einsum("bnhr,bnhx->bhrxn", phi_k, values)
    index = cell[:, None, None, None, :].expand(keys.shape)
    grid = keys.new_zeros(keys.shape[:-1] + (math.prod(grid_shape),))
    grid = grid.scatter_add(-1, index, keys).unflatten(-1, grid_shape)
    spectrum = torch.fft.rfftn(grid, s=fft_shape, dim=axes)
    spectrum = spectrum * kernel_hat[None, :, None, None]
    conv = torch.fft.irfftn(spectrum, s=fft_shape, dim=axes)
    conv = conv[(...,) + tuple(slice(0, extent) for extent in grid_shape)]
    return conv.reshape(keys.shape[:-1] + (-1,)).gather(-1, index)

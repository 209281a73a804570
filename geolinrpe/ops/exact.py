r"""Exact O(n^2) attention targets, kept as references for every linear path.

Axes: b batch, i/j query/key tokens, h heads, d head dim, e value dim, r kernel features,
m RPE features.

* :func:`softmax_attention`: biased softmax
  ``out_i = sum_j exp(q_i.k_j * scale + bias_ij) v_j / sum_j exp(...)``.
* :func:`masked_kernel_attention`: ``out_i = sum_j K_ij f_ij v_j / den_i`` with the
  normalisations of :mod:`geolinrpe.ops.linear` (``"masked"``: ``den = sum_j K f``,
  ``"kernel"``: ``den = sum_j K``, ``"none"``: ``den = 1``).
* :func:`feature_attention`: the explicit-feature quadratic form of a featurizer
  (``K = phi_q phi_k^T``, ``f = psi_q psi_k^T``) on the same draws as the linear engine,
  which must match it to rounding error.

All take the dense layout ``[b, n, h, *]`` with ``key_padding_mask [b, n]`` or the packed
layout ``[n, h, *]`` with ``batch [n]`` (treated as one sequence with a block-diagonal
mask), and ``causal``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .modes import Featurizer, prepare_featurizer


def allowed_pairs(n: int, key_padding_mask, batch, causal, device) -> Tensor:
    """Boolean ``[b or 1, 1, i, j]``: may query i attend to key j (padding, graphs, causal)."""
    allowed = torch.ones(1, 1, n, n, dtype=torch.bool, device=device)
    if key_padding_mask is not None:
        allowed = allowed & ~key_padding_mask[:, None, None, :]
    if batch is not None:
        allowed = allowed & (batch[:, None] == batch[None, :])[None, None]
    if causal:
        allowed = allowed & torch.ones(n, n, dtype=torch.bool, device=device).tril()
    return allowed


def _finish(out: Tensor, key_padding_mask, packed: bool) -> Tensor:
    if key_padding_mask is not None:
        out = out.masked_fill(key_padding_mask[..., None, None], 0)
    return out[0] if packed else out


def softmax_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor | None = None,
    *,
    key_padding_mask: Tensor | None = None,
    batch: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
) -> Tensor:
    """Exact biased softmax attention.

    Args:
        q, k: ``[b, n, h, d]`` or packed ``[n, h, d]``; v: ``[b, n, h, e]`` or ``[n, h, e]``.
        bias: ``[b, h, i, j]`` (or broadcastable), ``[h, i, j]`` when packed.
        scale: logit scale (default ``d**-0.5``).

    Returns:
        Same layout as ``v``; padded queries and queries with no allowed key output 0.
    """
    packed = batch is not None
    if packed:
        q, k, v = q[None], k[None], v[None]
        bias = None if bias is None else bias[None]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    if bias is not None:
        logits = logits + bias
    allowed = allowed_pairs(q.shape[1], key_padding_mask, batch, causal, q.device)
    logits = logits.masked_fill(~allowed, float("-inf"))
    weights = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # rows with no key -> 0
    out = torch.einsum("bhij,bjhe->bihe", weights, v)
    return _finish(out, key_padding_mask, packed)


def masked_kernel_attention(
    kernel: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    *,
    key_padding_mask: Tensor | None = None,
    batch: Tensor | None = None,
    causal: bool = False,
    normalize: str = "masked",
) -> Tensor:
    """Exact masked kernel attention from explicit matrices.

    Args:
        kernel: ``K(q_i, k_j)`` as ``[b, h, i, j]`` (``[h, i, j]`` when packed).
        v: ``[b, n, h, e]`` or ``[n, h, e]``.
        mask: RPE values ``f(r_i - r_j)`` shaped like ``kernel``, or ``None`` (= 1).
        normalize: ``"masked"``, ``"kernel"`` or ``"none"``.
    """
    packed = batch is not None
    if packed:
        kernel, v = kernel[None], v[None]
        mask = None if mask is None else mask[None]
    allowed = allowed_pairs(v.shape[1], key_padding_mask, batch, causal, v.device)
    kernel = kernel.masked_fill(~allowed, 0.0)
    weights = kernel if mask is None else kernel * mask
    out = torch.einsum("bhij,bjhe->bihe", weights, v)
    if normalize != "none":
        den = (weights if normalize == "masked" else kernel).sum(-1).transpose(1, 2)
        den = torch.where(den == 0, torch.ones_like(den), den)
        out = out / den[..., None]
    return _finish(out, key_padding_mask, packed)


def feature_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pos: Tensor | None = None,
    *,
    featurizer: Featurizer,
    key_padding_mask: Tensor | None = None,
    batch: Tensor | None = None,
    causal: bool = False,
    normalize: str = "masked",
) -> Tensor:
    """Quadratic form of the linear engine: explicit ``[n, n]`` weights from the same features.

    Same arguments as :func:`geolinrpe.ops.linear.linear_attention`.
    """
    packed = batch is not None
    if packed:
        q, k, v = q[None], k[None], v[None]
        pos = None if pos is None else pos[None]
    prepare_featurizer(featurizer, q, k, pos)
    if key_padding_mask is not None and pos is not None:
        pos = pos.masked_fill(key_padding_mask[..., None], 0)
    fq, fk = featurizer.query(q, pos), featurizer.key(k, pos)
    kernel = torch.einsum("bihr,bjhr->bhij", fq.phi, fk.phi)
    if fk.log_scale is not None:  # true features: phi * exp(log_scale); shift by a constant
        allowed = allowed_pairs(q.shape[1], key_padding_mask, batch, causal, q.device)
        key_scale = fk.log_scale.transpose(1, 2)[:, :, None, :]  # [b, h, 1, j]
        query_scale = fq.log_scale.transpose(1, 2)[..., None]  # [b, h, i, 1]
        total = (key_scale + query_scale).masked_fill(~allowed, float("-inf"))
        shift = 0.0 if normalize == "none" else total.amax(-1, keepdim=True).clamp_min(-1e30)
        kernel = kernel * torch.exp(total - shift)
    mask = None
    if fq.psi is not None:
        mask = torch.einsum("bihm,bjhm->bhij", fq.psi, fk.psi)
    if normalize == "kernel" and mask is None:
        normalize = "masked"
    if packed:
        kernel, v = kernel[0], v[0]
        mask = None if mask is None else mask[0]
    return masked_kernel_attention(
        kernel,
        v,
        mask,
        key_padding_mask=key_padding_mask,
        batch=batch,
        causal=causal,
        normalize=normalize,
    )


def kernel_matrix(featurizer, q: Tensor, k: Tensor, exact: bool) -> Tensor:
    """Kernel ``[b, h, i, j]`` of a featurizer's feature map on ``q, k [b, n, h, d]``.

    ``exact=True``: the kernel the map estimates (``exp(q.k/sqrt(d))`` for FAVOR+);
    otherwise the current random features' estimate, up to a per-row constant (which
    cancels in normalised attention).
    """
    fm, scale = featurizer.feature_map, featurizer.input_scale
    if exact:
        return fm.kernel((q * scale).transpose(1, 2), (k * scale).transpose(1, 2))
    (phi_q, _), (phi_k, key_scale) = (fm(t * scale) for t in (q, k))
    kmat = torch.einsum("bihr,bjhr->bhij", phi_q, phi_k)
    if key_scale is not None:
        ls = key_scale.transpose(1, 2)[:, :, None, :]
        kmat = kmat * torch.exp(ls - ls.amax(-1, keepdim=True))
    return kmat

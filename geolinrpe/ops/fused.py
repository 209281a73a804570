r"""Fused Triton kernels for the O(n) engine (GPU; Triton's interpreter on the CPU for tests).

Axes: N tokens (packed over all graphs), G graphs (or dense rows), H heads, D head dim,
E value dim, R kernel features, M frequencies (``2M`` RPE features), P position dim,
F = R x 2M Kronecker features (``F = R`` without a mask).

Computes exactly what :func:`geolinrpe.ops.linear_attention` (the torch engine, the
reference) computes for the featurizers it supports (:func:`fused_support`), without writing
any ``N x R`` or ``N x M`` feature tensor to global memory:

* kernel features ``phi`` from q (or k): exponential maps (FAVOR+ and FAVOR++ as
  ``exp(x W'^T + b - |x|^2 / 2 - stab) / sqrt(R)``) or ELU+1, ReLU, identity;
* RPE features from pos and the spectrum ``(xi [H, M, P], w_q [H, M], w_k [H, M])``:
  ``psi = [w cos(2 pi xi . r), w sin(2 pi xi . r)]``; mask mode (and product mode) uses
  ``phi (x) psi``, logit mode feeds ``[q s, psi_q]`` to the exponential map.

Bidirectional, two kernels:

* ``_state_kernel``, one program per (work item, head, block of ``F``): a work item is a
  slice of ``STATE_CHUNK`` tokens of one graph, so one long sequence spreads over many
  programs. It accumulates its block of the state ``S = sum_j Phi(k_j) (x) v_j`` and of the
  normaliser sums in registers and adds them into the graph's ``[F, E]`` state
  (``atomic_add``; the state has no ``N`` axis);
* ``_readout_kernel``, one program per (work item of ``READ_CHUNK`` queries, head): for each
  block of queries it computes the features of every ``F`` block, reads that block of the
  state and writes the numerators and denominators (one writer per row, no atomics).

Causal, ``_causal_kernel``: one program per (graph, head, block of ``F``) walks the graph's
blocks of ``BLOCK_N`` tokens in order (the lower-triangular block product, the earlier
blocks' state, then the update) and adds its partial numerators and denominators
(``atomic_add``; the blocks of ``F`` sum to the full contraction). Its parallelism is
graphs x heads x ``F`` blocks only.

Stabilisation (exponential maps): a first pass writes each token's row maximum of the
logits (``[N, H]``); keys use one constant per graph (bidirectional) or the running
maximum at the end of their block (causal; the state is rescaled when it grows), as the
torch engine does; queries use their own maximum. ``normalize="none"`` multiplies both
back at the end.

Backward: :class:`_FusedAttention` recomputes through the torch engine on the same raw
tensors (a :class:`SpectralFeaturizer`) with ``recompute=True`` and differentiates that, so
gradients reach q, k, v, pos and the spectrum (hence the RPE's parameters) exactly as the
torch engine's do, at the torch engine's speed, keeping one chunk's buffers at a time.
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

from .modes import LogitMode, MaskMode, ProductMode, TokenFeatures

try:  # optional: the ``gpu`` extra (also in ``test``, for the interpreter)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only without triton
    triton = None

KINDS = {"exp": 0, "elu": 1, "relu": 2, "identity": 3}
NORMS = {"masked": 0, "kernel": 1, "none": 2}
#: tokens per block, kernel features and RPE features per program (``F`` block = A x B)
BLOCK_N, BLOCK_A, BLOCK_B = 16, 16, 8
#: tokens per program: keys accumulated into one state block, queries read out
STATE_CHUNK, READ_CHUNK = 2048, 256
#: floats of per-graph state held at once (256 MiB); more graphs run in groups
STATE_BUDGET = 2**26


def available() -> bool:
    """Triton is importable."""
    return triton is not None


def interpreting() -> bool:
    """Triton runs its kernels on the CPU (``TRITON_INTERPRET=1``, set before import)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ---------------------------------------------------------------------- raw featurizer
class SpectralFeaturizer:
    """A featurizer from raw tensors: what the kernels compute, in torch (the reference).

    Args:
        kind: ``"exp"``, ``"elu"``, ``"relu"`` or ``"identity"``.
        projection: ``W' [R, D_in]`` (``"exp"`` only; ``D_in = D`` or ``D + 2M`` in logit
            mode).
        bias: ``b [R]`` (``"exp"`` only).
        input_scale: factor on q and k.
        spectrum: ``(xi [H, M, P], w_q [H, M], w_k [H, M])`` or ``None``.
        logit: concatenate ``[q s, psi_q]`` before the map (logit mode).
    """

    def __init__(self, kind, projection, bias, input_scale, spectrum, logit) -> None:
        self.kind, self.projection, self.bias = kind, projection, bias
        self.input_scale, self.spectrum, self.logit = input_scale, spectrum, logit
        self.num_features = projection.shape[0] if kind == "exp" else None
        self.has_mask = spectrum is not None and not logit
        self.num_rpe_features = 2 * spectrum[0].shape[1] if self.has_mask else 0

    def _psi(self, pos: Tensor, weight: Tensor) -> Tensor:
        xi = self.spectrum[0]
        phase = 2 * math.pi * torch.einsum("...p,hmp->...hm", pos, xi.to(pos.dtype))
        weight = weight.to(pos.dtype)
        return torch.cat([torch.cos(phase) * weight, torch.sin(phase) * weight], dim=-1)

    def _features(self, x: Tensor, pos: Tensor | None, query: bool) -> TokenFeatures:
        x = x * self.input_scale
        psi = None
        if self.spectrum is not None:
            psi = self._psi(pos, self.spectrum[1 if query else 2]).to(x.dtype)
            if self.logit:
                x, psi = torch.cat([x, psi], dim=-1), None
        if self.kind == "exp":
            logits = torch.einsum("...d,rd->...r", x, self.projection.to(x.dtype))
            logits = logits + self.bias.to(x.dtype) - 0.5 * x.pow(2).sum(-1, keepdim=True)
            log_scale = logits.detach().amax(-1)
            phi = torch.exp(logits - log_scale[..., None]) / math.sqrt(self.num_features)
            return TokenFeatures(phi, log_scale, psi)
        if self.kind == "elu":
            phi = torch.nn.functional.elu(x) + 1.0
        elif self.kind == "relu":
            phi = torch.relu(x)
        else:
            phi = x
        return TokenFeatures(phi, None, psi)

    def query(self, q: Tensor, pos: Tensor | None) -> TokenFeatures:
        return self._features(q, pos, query=True)

    def key(self, k: Tensor, pos: Tensor | None) -> TokenFeatures:
        return self._features(k, pos, query=False)


def fused_support(featurizer) -> str | None:
    """``None`` when the kernels compute ``featurizer`` exactly, else the reason they do not.

    Supported: :class:`~geolinrpe.ops.modes.MaskMode` (and ``ProductMode``) and
    :class:`~geolinrpe.ops.modes.LogitMode` with FAVOR+, FAVOR++ (GERF), ELU+1, ReLU or
    identity features (exponential maps only in logit mode) and no RPE or a Fourier RPE
    whose features are the generic ``[w cos, w sin]`` of a spectrum (not the periodic or
    radial families, which override them).
    """
    from ..features.elementwise import ELUFeatures, IdentityFeatures, ReLUFeatures
    from ..features.positive_random import PositiveRandomFeatures
    from ..rpe.base import FourierRPE

    if type(featurizer) not in (MaskMode, ProductMode, LogitMode):
        return f"featurizer {type(featurizer).__name__} is not a mask, product or logit mode"
    fm = featurizer.feature_map
    if not isinstance(fm, (PositiveRandomFeatures, ELUFeatures, ReLUFeatures, IdentityFeatures)):
        return f"feature map {type(fm).__name__} has no kernel"
    if isinstance(featurizer, LogitMode) and not isinstance(fm, PositiveRandomFeatures):
        return "logit mode needs exponential features"
    rpe = featurizer.rpe
    if rpe is not None:
        if not isinstance(rpe, FourierRPE):
            return f"RPE {type(rpe).__name__} is not a Fourier RPE"
        generic = (FourierRPE.query_features, FourierRPE.key_features, FourierRPE._cos_sin)
        own = (type(rpe).query_features, type(rpe).key_features, type(rpe)._cos_sin)
        if own != generic:
            return f"RPE {type(rpe).__name__} computes its own features"
    return None


def raw_featurizer(featurizer) -> SpectralFeaturizer:
    """The :class:`SpectralFeaturizer` equal to a supported ``featurizer`` (differentiable in
    the RPE's parameters through its spectrum)."""
    from ..features.elementwise import ELUFeatures, ReLUFeatures
    from ..features.positive_random import GERFFeatures, PositiveRandomFeatures
    from ..rpe.base import _split_scale

    fm = featurizer.feature_map
    projection = bias = None
    if isinstance(fm, PositiveRandomFeatures):
        kind, projection = "exp", fm.projection.float()
        bias = projection.new_zeros(projection.shape[0])
        if isinstance(fm, GERFFeatures):  # B W and A |w|^2 + (d / 4) log(1 - 4A)
            a = fm.A.to(projection)
            bias = a * projection.pow(2).sum(-1) + 0.25 * fm.input_dim * torch.log1p(-4 * a)
            projection = projection * torch.sqrt(1 - 4 * a)
    else:
        kind = "elu" if isinstance(fm, ELUFeatures) else "relu"
        kind = kind if isinstance(fm, (ELUFeatures, ReLUFeatures)) else "identity"
    spectrum = None
    if featurizer.rpe is not None:
        rpe = featurizer.rpe
        xi, weight = featurizer._spectrum() or (
            rpe.exp_spectrum() if featurizer.split == "exp" else rpe.spectrum()
        )
        root = math.sqrt(featurizer.rpe.num_frequencies)
        if featurizer.split == "symmetric":
            t = _split_scale(weight)
            spectrum = (xi, weight / t / root, t / root)
        else:
            spectrum = (xi, weight / root, torch.ones_like(weight) / root)
    logit = isinstance(featurizer, LogitMode)
    return SpectralFeaturizer(kind, projection, bias, featurizer.input_scale, spectrum, logit)


# ---------------------------------------------------------------------- layout
def _layout(q: Tensor, key_padding_mask: Tensor | None, batch: Tensor | None):
    """``(offsets [G + 1], segment [N], valid [N] bool)`` of a dense or packed input."""
    if batch is not None:
        counts = torch.bincount(batch)
        offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
        valid = torch.ones_like(batch, dtype=torch.bool)
        return offsets, batch, valid
    b, n = q.shape[:2]
    offsets = torch.arange(b + 1, device=q.device) * n
    segment = torch.arange(b, device=q.device).repeat_interleave(n)
    valid = (
        torch.ones(b * n, dtype=torch.bool, device=q.device)
        if key_padding_mask is None
        else ~key_padding_mask.reshape(-1)
    )
    return offsets, segment, valid


def _key_stabilizer(ls_k, offsets, segment, valid, causal):
    """Per-token key stabiliser ``[N, H]``: the graph's maximum (bidirectional) or the
    running maximum at the end of the token's block of ``BLOCK_N`` (causal); 0 where no key
    has been valid yet."""
    h = ls_k.shape[1]
    ls_k = ls_k.masked_fill(~valid[:, None], float("-inf"))
    if not causal:
        num_graphs = offsets.numel() - 1
        peak = ls_k.new_full((num_graphs, h), float("-inf"))
        peak = peak.scatter_reduce(0, segment[:, None].expand(-1, h), ls_k, "amax")
        out = peak[segment]
    else:
        lengths = offsets[1:] - offsets[:-1]
        blocks = (lengths + BLOCK_N - 1) // BLOCK_N
        local = torch.arange(segment.numel(), device=ls_k.device) - offsets[segment]
        block = local // BLOCK_N
        width = int(blocks.max()) if blocks.numel() else 0
        table = ls_k.new_full((lengths.numel(), max(width, 1), h), float("-inf"))
        flat = (segment * max(width, 1) + block)[:, None].expand(-1, h)
        table = table.view(-1, h).scatter_reduce(0, flat, ls_k, "amax").view(table.shape)
        table = torch.cummax(table, dim=1).values
        out = table[segment, block]
    return torch.where(torch.isfinite(out), out, 0.0)


# ---------------------------------------------------------------------- kernels
if triton is not None:

    @triton.jit
    def _psi_tile(pos_ptr, xi_ptr, w_ptr, tok, tmask, h, j, M, P: tl.constexpr):
        """RPE features ``[BN, J]`` at feature indices ``j`` (``j < M``: cos, else sin)."""
        freq = tl.where(j < M, j, j - M)
        jmask = j < 2 * M
        phase = tl.zeros((tok.shape[0], j.shape[0]), dtype=tl.float32)
        for p in tl.static_range(P):
            r = tl.load(pos_ptr + tok * P + p, mask=tmask, other=0.0).to(tl.float32)
            x = tl.load(xi_ptr + (h * M + freq) * P + p, mask=jmask, other=0.0).to(tl.float32)
            phase += r[:, None] * x[None, :]
        phase = phase * 6.283185307179586
        w = tl.load(w_ptr + h * M + freq, mask=jmask, other=0.0).to(tl.float32)
        value = tl.where((j < M)[None, :], tl.cos(phase), tl.sin(phase)) * w[None, :]
        return tl.where(tmask[:, None] & jmask[None, :], value, 0.0)

    @triton.jit
    def _exp_logits(
        x_ptr, pos_ptr, xi_ptr, w_ptr, proj_ptr, bias_ptr,
        tok, tmask, h, a, H, D, R, M, scale,
        D_P: tl.constexpr, M2_P: tl.constexpr, P: tl.constexpr, LOGIT: tl.constexpr,
    ):  # fmt: skip
        """Logits ``x W'_a^T + b_a - |x|^2 / 2`` ``[BN, A]`` of the exponential map (0 for
        features ``a >= R``)."""
        amask = a < R
        d = tl.arange(0, D_P)
        x = tl.load(
            x_ptr + (tok[:, None] * H + h) * D + d[None, :],
            mask=tmask[:, None] & (d < D)[None, :], other=0.0,
        ).to(tl.float32) * scale  # fmt: skip
        width = D + 2 * M * LOGIT
        wt = tl.load(
            proj_ptr + a[None, :] * width + d[:, None],
            mask=amask[None, :] & (d < D)[:, None], other=0.0,
        )  # fmt: skip
        logits = tl.dot(x, wt, input_precision="ieee")
        sq = tl.sum(x * x, 1)
        if LOGIT:
            j = tl.arange(0, M2_P)
            psi = _psi_tile(pos_ptr, xi_ptr, w_ptr, tok, tmask, h, j, M, P)
            wp = tl.load(
                proj_ptr + a[None, :] * width + D + j[:, None],
                mask=amask[None, :] & (j < 2 * M)[:, None], other=0.0,
            )  # fmt: skip
            logits += tl.dot(psi, wp, input_precision="ieee")
            sq += tl.sum(psi * psi, 1)
        bias = tl.load(bias_ptr + a, mask=amask, other=0.0)
        return logits + bias[None, :] - 0.5 * sq[:, None]

    @triton.jit
    def _phi_tile(
        x_ptr, pos_ptr, xi_ptr, w_ptr, proj_ptr, bias_ptr, stab_ptr,
        tok, tmask, h, a, H, D, R, M, scale,
        D_P: tl.constexpr, M2_P: tl.constexpr, P: tl.constexpr,
        KIND: tl.constexpr, LOGIT: tl.constexpr,
    ):  # fmt: skip
        """Kernel features ``[BN, A]`` (feature indices ``a``) of the tokens ``tok``."""
        amask = a < R
        if KIND == 0:
            logits = _exp_logits(
                x_ptr, pos_ptr, xi_ptr, w_ptr, proj_ptr, bias_ptr,
                tok, tmask, h, a, H, D, R, M, scale, D_P, M2_P, P, LOGIT,
            )  # fmt: skip
            stab = tl.load(stab_ptr + tok * H + h, mask=tmask, other=0.0)
            phi = tl.exp(logits - stab[:, None]) / tl.sqrt(R.to(tl.float32))
        else:
            x = tl.load(
                x_ptr + (tok[:, None] * H + h) * D + a[None, :],
                mask=tmask[:, None] & amask[None, :], other=0.0,
            ).to(tl.float32) * scale  # fmt: skip
            if KIND == 1:
                phi = tl.where(x > 0, x + 1.0, tl.exp(tl.minimum(x, 0.0)))
            elif KIND == 2:
                phi = tl.maximum(x, 0.0)
            else:
                phi = x
        return tl.where(tmask[:, None] & amask[None, :], phi, 0.0)

    @triton.jit
    def _token_features(
        x_ptr, pos_ptr, xi_ptr, w_ptr, proj_ptr, bias_ptr, stab_ptr,
        tok, tmask, h, a, j, H, D, R, M, scale,
        D_P: tl.constexpr, M2_P: tl.constexpr, P: tl.constexpr, KIND: tl.constexpr,
        LOGIT: tl.constexpr, MASK: tl.constexpr, BF: tl.constexpr,
    ):  # fmt: skip
        """``(phi [BN, A], Phi [BN, BF])``: kernel features and their Kronecker product with
        the RPE features ``j`` (mask mode; ``Phi = phi`` otherwise)."""
        phi = _phi_tile(
            x_ptr, pos_ptr, xi_ptr, w_ptr, proj_ptr, bias_ptr, stab_ptr,
            tok, tmask, h, a, H, D, R, M, scale, D_P, M2_P, P, KIND, LOGIT,
        )  # fmt: skip
        if MASK:
            psi = _psi_tile(pos_ptr, xi_ptr, w_ptr, tok, tmask, h, j, M, P)
            big = tl.reshape(phi[:, :, None] * psi[:, None, :], (tok.shape[0], BF))
        else:
            big = phi
        return phi, big

    @triton.jit
    def _key_tile(
        k_ptr, v_ptr, pos_ptr, xi_ptr, wk_ptr, proj_ptr, bias_ptr, stab_k_ptr,
        tok, kmask, h, a, j, e, H, D, E, R, M, scale,
        D_P: tl.constexpr, M2_P: tl.constexpr, P: tl.constexpr, KIND: tl.constexpr,
        LOGIT: tl.constexpr, MASK: tl.constexpr, BF: tl.constexpr,
    ):  # fmt: skip
        """``(phi_k, Phi_k, v)`` of a block of keys (values in float32, 0 where masked)."""
        phi_k, big_k = _token_features(
            k_ptr, pos_ptr, xi_ptr, wk_ptr, proj_ptr, bias_ptr, stab_k_ptr, tok, kmask,
            h, a, j, H, D, R, M, scale, D_P, M2_P, P, KIND, LOGIT, MASK, BF,
        )  # fmt: skip
        v = tl.load(
            v_ptr + (tok[:, None] * H + h) * E + e[None, :],
            mask=kmask[:, None] & (e < E)[None, :], other=0.0,
        ).to(tl.float32)  # fmt: skip
        return phi_k, big_k, v

    @triton.jit
    def _row_max_kernel(
        x_ptr, pos_ptr, xi_ptr, w_ptr, proj_ptr, bias_ptr, out_ptr,
        N, H, D, R, M, scale,
        BN: tl.constexpr, BA: tl.constexpr, D_P: tl.constexpr, M2_P: tl.constexpr,
        P: tl.constexpr, LOGIT: tl.constexpr,
    ):  # fmt: skip
        """Row maximum of the exponential map's logits per token and head: ``[N, H]``."""
        tok = tl.program_id(0) * BN + tl.arange(0, BN)
        h = tl.program_id(1)
        tmask = tok < N
        best = tl.full((BN,), float("-inf"), dtype=tl.float32)
        for start in range(0, R, BA):
            a = start + tl.arange(0, BA)
            logits = _exp_logits(
                x_ptr, pos_ptr, xi_ptr, w_ptr, proj_ptr, bias_ptr,
                tok, tmask, h, a, H, D, R, M, scale, D_P, M2_P, P, LOGIT,
            )  # fmt: skip
            best = tl.maximum(best, tl.max(tl.where((a < R)[None, :], logits, float("-inf")), 1))
        tl.store(out_ptr + tok * H + h, best, mask=tmask)

    @triton.jit
    def _block_index(f, NUM_B, BA: tl.constexpr, BB: tl.constexpr):
        """Kernel feature indices ``a`` and RPE feature indices ``j`` of ``F`` block ``f``."""
        a = (f // NUM_B) * BA + tl.arange(0, BA)
        j = (f % NUM_B) * BB + tl.arange(0, BB)
        return a, j

    @triton.jit
    def _state_kernel(
        k_ptr, v_ptr, pos_ptr, valid_ptr, work_ptr,
        proj_ptr, bias_ptr, xi_ptr, wk_ptr, stab_k_ptr, state_ptr, total_ptr, kernel_total_ptr,
        H, D, E, R, M, scale, NUM_B, NUM_F, R_P, BASE,
        BN: tl.constexpr, BA: tl.constexpr, BB: tl.constexpr,
        D_P: tl.constexpr, E_P: tl.constexpr, M2_P: tl.constexpr, P: tl.constexpr,
        KIND: tl.constexpr, LOGIT: tl.constexpr, MASK: tl.constexpr, NORM: tl.constexpr,
    ):  # fmt: skip
        """Bidirectional keys: one program per (work item, head, ``F`` block) adds its tokens'
        ``sum_j Phi(k_j) (x) v_j`` (and the normaliser sums) into the graph's state."""
        w, h, f = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        g = tl.load(work_ptr + 3 * w) - BASE  # the graph's slot in this group's state
        begin, end = tl.load(work_ptr + 3 * w + 1), tl.load(work_ptr + 3 * w + 2)
        a, j = _block_index(f, NUM_B, BA, BB)
        if MASK:
            BF: tl.constexpr = BA * BB
        else:
            BF: tl.constexpr = BA
        e = tl.arange(0, E_P)
        rows = tl.arange(0, BN)
        state = tl.zeros((BF, E_P), dtype=tl.float32)
        total = tl.zeros((BF,), dtype=tl.float32)
        kernel_total = tl.zeros((BA,), dtype=tl.float32)
        for start in range(begin, end, BN):
            tok = start + rows
            tmask = tok < end
            kmask = tmask & (tl.load(valid_ptr + tok, mask=tmask, other=0) != 0)
            phi_k, big_k, v = _key_tile(
                k_ptr, v_ptr, pos_ptr, xi_ptr, wk_ptr, proj_ptr, bias_ptr, stab_k_ptr, tok, kmask,
                h, a, j, e, H, D, E, R, M, scale, D_P, M2_P, P, KIND, LOGIT, MASK, BF,
            )  # fmt: skip
            state += tl.dot(tl.trans(big_k), v, input_precision="ieee")
            total += tl.sum(big_k, 0)
            kernel_total += tl.sum(phi_k, 0)
        row = ((g * H + h) * NUM_F + f) * BF + tl.arange(0, BF)
        tl.atomic_add(state_ptr + row[:, None] * E_P + e[None, :], state)
        if NORM == 0:
            tl.atomic_add(total_ptr + row, total)
        if NORM == 1:
            if (f % NUM_B) == 0:
                tl.atomic_add(kernel_total_ptr + (g * H + h) * R_P + a, kernel_total)

    @triton.jit
    def _readout_kernel(
        q_ptr, pos_ptr, valid_ptr, work_ptr,
        proj_ptr, bias_ptr, xi_ptr, wq_ptr, stab_q_ptr, state_ptr, total_ptr, kernel_total_ptr,
        num_ptr, den_ptr,
        H, D, E, R, M, scale, NUM_B, NUM_F, R_P, BASE,
        BN: tl.constexpr, BA: tl.constexpr, BB: tl.constexpr,
        D_P: tl.constexpr, E_P: tl.constexpr, M2_P: tl.constexpr, P: tl.constexpr,
        KIND: tl.constexpr, LOGIT: tl.constexpr, MASK: tl.constexpr, NORM: tl.constexpr,
    ):  # fmt: skip
        """Bidirectional queries: one program per (work item, head) reads every ``F`` block of
        its graph's state for each block of its queries and writes their numerators and
        denominators (no atomics: each query row has one writer)."""
        w, h = tl.program_id(0), tl.program_id(1)
        g = tl.load(work_ptr + 3 * w) - BASE  # the graph's slot in this group's state
        begin, end = tl.load(work_ptr + 3 * w + 1), tl.load(work_ptr + 3 * w + 2)
        if MASK:
            BF: tl.constexpr = BA * BB
        else:
            BF: tl.constexpr = BA
        e = tl.arange(0, E_P)
        rows = tl.arange(0, BN)
        for start in range(begin, end, BN):
            tok = start + rows
            tmask = tok < end
            qmask = tmask & (tl.load(valid_ptr + tok, mask=tmask, other=0) != 0)
            num = tl.zeros((BN, E_P), dtype=tl.float32)
            den = tl.zeros((BN,), dtype=tl.float32)
            for f in range(0, NUM_F):
                a, j = _block_index(f, NUM_B, BA, BB)
                phi_q, big_q = _token_features(
                    q_ptr, pos_ptr, xi_ptr, wq_ptr, proj_ptr, bias_ptr, stab_q_ptr, tok, qmask,
                    h, a, j, H, D, R, M, scale, D_P, M2_P, P, KIND, LOGIT, MASK, BF,
                )  # fmt: skip
                row = ((g * H + h) * NUM_F + f) * BF + tl.arange(0, BF)
                state = tl.load(state_ptr + row[:, None] * E_P + e[None, :])
                num += tl.dot(big_q, state, input_precision="ieee")
                if NORM == 0:
                    den += tl.sum(big_q * tl.load(total_ptr + row)[None, :], 1)
                if NORM == 1:
                    if (f % NUM_B) == 0:
                        kernel_total = tl.load(kernel_total_ptr + (g * H + h) * R_P + a)
                        den += tl.sum(phi_q * kernel_total[None, :], 1)
            out = (tok[:, None] * H + h) * E + e[None, :]
            tl.store(num_ptr + out, num, mask=qmask[:, None] & (e < E)[None, :])
            tl.store(den_ptr + tok * H + h, den, mask=qmask)

    @triton.jit
    def _causal_kernel(
        q_ptr, k_ptr, v_ptr, pos_ptr, valid_ptr, offsets_ptr,
        proj_ptr, bias_ptr, xi_ptr, wq_ptr, wk_ptr, stab_q_ptr, stab_k_ptr,
        num_ptr, den_ptr,
        H, D, E, R, M, scale, NUM_B,
        BN: tl.constexpr, BA: tl.constexpr, BB: tl.constexpr,
        D_P: tl.constexpr, E_P: tl.constexpr, M2_P: tl.constexpr, P: tl.constexpr,
        KIND: tl.constexpr, LOGIT: tl.constexpr, MASK: tl.constexpr, NORM: tl.constexpr,
    ):  # fmt: skip
        """Causal: one program per (graph, head, ``F`` block) walks the graph's blocks in
        order (lower-triangular block product, then the earlier blocks' state, then the
        update) and adds its partial numerators and denominators (``atomic_add``)."""
        g, h, f = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        a, j = _block_index(f, NUM_B, BA, BB)
        first_b = (f % NUM_B) == 0
        begin = tl.load(offsets_ptr + g).to(tl.int32)
        end = tl.load(offsets_ptr + g + 1).to(tl.int32)
        e = tl.arange(0, E_P)
        rows = tl.arange(0, BN)
        if MASK:
            BF: tl.constexpr = BA * BB
        else:
            BF: tl.constexpr = BA
        state = tl.zeros((BF, E_P), dtype=tl.float32)
        total = tl.zeros((BF,), dtype=tl.float32)  # sum of the keys' features (masked norm)
        kernel_total = tl.zeros((BA,), dtype=tl.float32)  # sum of phi_k (kernel norm)
        level = float("-inf")  # current key stabiliser; exp(-inf - x) = 0
        lower = rows[:, None] >= rows[None, :]
        for start in range(begin, end, BN):
            tok = start + rows
            tmask = tok < end
            valid = tl.load(valid_ptr + tok, mask=tmask, other=0) != 0
            kmask = tmask & valid
            if KIND == 0:  # the running maximum at the end of this block
                new = tl.load(stab_k_ptr + start * H + h)
                shrink = tl.exp(level - new)
                state = state * shrink
                total = total * shrink
                kernel_total = kernel_total * shrink
                level = new
            phi_k, big_k, v = _key_tile(
                k_ptr, v_ptr, pos_ptr, xi_ptr, wk_ptr, proj_ptr, bias_ptr, stab_k_ptr, tok, kmask,
                h, a, j, e, H, D, E, R, M, scale, D_P, M2_P, P, KIND, LOGIT, MASK, BF,
            )  # fmt: skip
            phi_q, big_q = _token_features(
                q_ptr, pos_ptr, xi_ptr, wq_ptr, proj_ptr, bias_ptr, stab_q_ptr, tok, kmask,
                h, a, j, H, D, R, M, scale, D_P, M2_P, P, KIND, LOGIT, MASK, BF,
            )  # fmt: skip
            weights = tl.dot(big_q, tl.trans(big_k), input_precision="ieee")
            weights = tl.where(lower, weights, 0.0)
            num = tl.dot(weights, v, input_precision="ieee")
            num += tl.dot(big_q, state, input_precision="ieee")
            out = (tok[:, None] * H + h) * E + e[None, :]
            tl.atomic_add(num_ptr + out, num, mask=kmask[:, None] & (e < E)[None, :])
            if NORM == 0:
                den = tl.sum(weights, 1) + tl.sum(big_q * total[None, :], 1)
                tl.atomic_add(den_ptr + tok * H + h, den, mask=kmask)
            if NORM == 1:
                if first_b:
                    plain = tl.dot(phi_q, tl.trans(phi_k), input_precision="ieee")
                    den = tl.sum(tl.where(lower, plain, 0.0), 1)
                    den += tl.sum(phi_q * kernel_total[None, :], 1)
                    tl.atomic_add(den_ptr + tok * H + h, den, mask=kmask)
            state += tl.dot(tl.trans(big_k), v, input_precision="ieee")
            total += tl.sum(big_k, 0)
            kernel_total += tl.sum(phi_k, 0)


def _pow2(x: int, low: int = 16) -> int:
    return max(low, 1 << max(0, (int(x) - 1).bit_length()))


def _graph_groups(num_graphs: int, per_graph: int) -> list[tuple[int, int]]:
    """Contiguous graph ranges whose states fit in ``STATE_BUDGET`` floats together."""
    step = max(1, STATE_BUDGET // max(per_graph, 1))
    return [(g, min(g + step, num_graphs)) for g in range(0, num_graphs, step)]


def _work(offsets: Tensor, chunk: int, first_graph: int = 0) -> Tensor:
    """Work items ``[W, 3]`` (graph, first token, end) splitting each graph of ``offsets``
    (graph ids from ``first_graph``) into slices of ``chunk`` tokens."""
    lengths = offsets[1:] - offsets[:-1]
    pieces = torch.clamp((lengths + chunk - 1) // chunk, min=1)
    graph = torch.repeat_interleave(torch.arange(lengths.numel(), device=offsets.device), pieces)
    first = torch.cumsum(pieces, 0) - pieces
    begin = (
        offsets[graph] + (torch.arange(graph.numel(), device=offsets.device) - first[graph]) * chunk
    )
    end = torch.minimum(begin + chunk, offsets[graph + 1])
    return torch.stack([graph + first_graph, begin, end], 1).to(torch.int32).contiguous()


def _launch(q, k, v, pos, raw: SpectralFeaturizer, offsets, segment, valid, causal, normalize):
    """Run the kernels on flat ``q, k [N, H, D]``, ``v [N, H, E]``, ``pos [N, P]``."""
    n, h, d = q.shape
    e = v.shape[-1]
    dev = q.device
    f32 = dict(device=dev, dtype=torch.float32)
    kind = KINDS[raw.kind]
    r = raw.num_features if raw.kind == "exp" else d
    logit = raw.logit and raw.spectrum is not None
    mask = raw.has_mask
    if raw.spectrum is not None:
        xi, wq, wk = (t.detach().to(**f32).contiguous() for t in raw.spectrum)
        m, p = xi.shape[1], xi.shape[2]
        pos = pos.detach().to(**f32).contiguous()
    else:
        xi = wq = wk = torch.zeros(1, **f32)
        m, p = 0, 0
        pos = torch.zeros(1, **f32)
    proj = raw.projection.detach().to(**f32).contiguous() if kind == 0 else torch.zeros(1, **f32)
    bias = raw.bias.detach().to(**f32).contiguous() if kind == 0 else torch.zeros(1, **f32)
    q, k, v = (t.detach().contiguous() for t in (q, k, v))
    valid8 = valid.to(torch.int8).contiguous()
    shapes = dict(D_P=_pow2(d), M2_P=_pow2(2 * m), P=p, BN=BLOCK_N, BA=BLOCK_A)
    stab_q = stab_k = torch.zeros(1, **f32)
    if kind == 0:
        ls = []
        for x in (q, k):
            out = torch.empty(n, h, **f32)
            grid = (triton.cdiv(n, BLOCK_N), h)
            _row_max_kernel[grid](
                x, pos, xi, wq if x is q else wk, proj, bias, out, n, h, d, r, m,
                float(raw.input_scale), LOGIT=logit, **shapes,
            )  # fmt: skip
            ls.append(out)
        stab_q = torch.where(valid[:, None], ls[0], 0.0).contiguous()
        stab_k = _key_stabilizer(ls[1], offsets, segment, valid, causal).contiguous()
    num_b = triton.cdiv(2 * m, BLOCK_B) if mask else 1
    num_f = triton.cdiv(r, BLOCK_A) * num_b
    e_p = _pow2(e)
    flags = dict(BB=BLOCK_B, E_P=e_p, KIND=kind, LOGIT=logit, MASK=mask, NORM=NORMS[normalize])
    sizes = (h, d, e, r, m, float(raw.input_scale), num_b)
    if causal:
        num = torch.zeros(n, h, e, **f32)
        den = torch.zeros(n, h, **f32)
        _causal_kernel[(offsets.numel() - 1, h, num_f)](
            q, k, v, pos, valid8, offsets.contiguous(), proj, bias, xi, wq, wk, stab_q, stab_k,
            num, den, *sizes, **flags, **shapes,
        )  # fmt: skip
    else:
        num = torch.zeros(n, h, e, **f32)
        den = torch.zeros(n, h, **f32)
        block = BLOCK_A * (BLOCK_B if mask else 1)
        r_p = triton.cdiv(r, BLOCK_A) * BLOCK_A
        per_graph = h * num_f * block * (e_p + 1) + h * r_p
        for first, last in _graph_groups(offsets.numel() - 1, per_graph):
            state = torch.zeros(last - first, h, num_f, block, e_p, **f32)
            total = torch.zeros(last - first, h, num_f, block, **f32)
            kernel_total = torch.zeros(last - first, h, r_p, **f32)
            group = offsets[first : last + 1]
            work = _work(group, STATE_CHUNK, first)
            _state_kernel[(work.shape[0], h, num_f)](
                k, v, pos, valid8, work, proj, bias, xi, wk, stab_k, state, total, kernel_total,
                *sizes, num_f, r_p, first, **flags, **shapes,
            )  # fmt: skip
            work = _work(group, READ_CHUNK, first)
            _readout_kernel[(work.shape[0], h)](
                q, pos, valid8, work, proj, bias, xi, wq, stab_q, state, total, kernel_total,
                num, den, *sizes, num_f, r_p, first, **flags, **shapes,
            )  # fmt: skip
        num = torch.where(valid[:, None, None], num, 0.0)
        den = torch.where(valid[:, None], den, 0.0)
    if normalize == "none":
        if kind == 0:
            num = num * torch.exp(stab_q + stab_k)[..., None]
        return num
    den = torch.where(den == 0, 1.0, den)
    return num / den[..., None]


class _FusedAttention(torch.autograd.Function):
    """Triton forward; backward by recomputation through the torch engine."""

    @staticmethod
    def forward(ctx, q, k, v, pos, xi, wq, wk, raw, layout, causal, normalize):
        spectrum = None if xi is None else (xi, wq, wk)
        raw = SpectralFeaturizer(
            raw.kind, raw.projection, raw.bias, raw.input_scale, spectrum, raw.logit
        )
        ctx.save_for_backward(q, k, v, pos, xi, wq, wk)
        ctx.raw, ctx.layout, ctx.causal, ctx.normalize = raw, layout, causal, normalize
        offsets, segment, valid, shape, _, _ = layout
        flat = [t.reshape(-1, *t.shape[-2:]) for t in (q, k, v)]
        flat_pos = None if pos is None else pos.reshape(-1, pos.shape[-1])
        out = _launch(*flat, flat_pos, raw, offsets, segment, valid, causal, normalize)
        return out.reshape(shape).to(v.dtype)

    @staticmethod
    def backward(ctx, grad):
        from .linear import linear_attention

        saved = ctx.saved_tensors
        inputs = [None if t is None else t.detach().requires_grad_(t.requires_grad) for t in saved]
        q, k, v, pos, xi, wq, wk = inputs
        raw = ctx.raw
        spectrum = None if xi is None else (xi, wq, wk)
        featurizer = SpectralFeaturizer(
            raw.kind, raw.projection, raw.bias, raw.input_scale, spectrum, raw.logit
        )
        key_padding_mask, batch = ctx.layout[4:]
        with torch.enable_grad():
            out = linear_attention(
                q, k, v, pos, featurizer=featurizer, key_padding_mask=key_padding_mask,
                batch=batch, causal=ctx.causal, normalize=ctx.normalize, engine="torch",
                check_finite=False, recompute=True,
            )  # fmt: skip
            wanted = [t for t in inputs if t is not None and t.requires_grad]
            grads = iter(torch.autograd.grad(out, wanted, grad, allow_unused=True))
        result = [next(grads) if t is not None and t.requires_grad else None for t in inputs]
        return (*result, None, None, None, None)


def fused_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pos: Tensor | None,
    *,
    featurizer,
    key_padding_mask: Tensor | None = None,
    batch: Tensor | None = None,
    causal: bool = False,
    normalize: str = "masked",
) -> Tensor:
    """The fused kernels on a supported featurizer; arguments as
    :func:`~geolinrpe.ops.linear_attention` (validated there)."""
    if triton is None:
        raise RuntimeError("engine='triton' needs triton (pip install geolinrpe[gpu])")
    if not (q.is_cuda or interpreting()):
        raise RuntimeError(
            "engine='triton' runs on CUDA tensors (or on the CPU with TRITON_INTERPRET=1 set "
            "before triton is imported)"
        )
    reason = fused_support(featurizer)
    if reason is not None:
        raise ValueError(f"engine='triton' does not support this configuration: {reason}")
    raw = raw_featurizer(featurizer)
    xi, wq, wk = raw.spectrum if raw.spectrum is not None else (None, None, None)
    layout = (*_layout(q, key_padding_mask, batch), v.shape, key_padding_mask, batch)
    return _FusedAttention.apply(q, k, v, pos, xi, wq, wk, raw, layout, causal, normalize)

r"""O(n) attention with RPE features: the chunked factorised engine.

Axes: b batch, n tokens, h heads, d head dim, e value dim, p position dim,
r kernel features, m RPE features, x = m * e' (flattened RPE x value axes).

Given a featurizer (:mod:`geolinrpe.ops.modes`) that maps query/key slices to kernel
features ``phi`` and optional RPE features ``psi``, the output for query i is

.. math::

    \mathrm{num}_i = \sum_j (\phi_{q,i} \cdot \phi_{k,j}) (\psi_{q,i} \cdot \psi_{k,j}) v_j
        = \phi_{q,i}^\top \Big[\sum_j \phi_{k,j} \otimes \psi_{k,j} \otimes v_j\Big] \psi_{q,i}

so one state ``S [b, h, r, m, e]`` summarises all keys; ``psi`` absent means a factor 1.
Keys are consumed in chunks (``S += phi_k^T (psi_k (x) v)``), queries read the state in
chunks and write into the preallocated output, so peak memory beyond the inputs and the
output is one chunk's buffers (``CHUNK_BUDGET`` elements by default), and the
``n x (r * m)`` Kronecker features are never formed.

Normalisation (``normalize``):

* ``"masked"``: ``out_i = num_i / sum_j K_ij f_ij``: the masked-kernel target of
  ``docs/math.md`` (and, in logit mode, the biased softmax). Safe whenever the weights
  are positive (logit mode; mask mode with a positive RPE estimate). With a signed RPE
  estimate the denominator can approach 0 and the output is unbounded.
* ``"kernel"``: ``out_i = num_i / sum_j K_ij``: the mask modulates the values of an
  ordinary kernel attention. The denominator is positive for positive feature maps, so
  ``|out_i| <= max|f_hat| max|v|``; with ``f = 1`` it is plain linear attention. This is
  the safe choice for signed masks.
* ``"none"``: ``out_i = num_i`` (for signed maps such as the identity).

A zero denominator occurs only when every weight is zero (e.g. a ReLU query with no
positive feature); the output is then 0 (0/0 := 0), never NaN. No other guard is applied.

Stabilisation: exponential feature maps return each token's row maximum as ``log_scale``.
Query scales cancel in the ratio. Key scales are merged exactly with a running
per-(sequence, head) maximum ``c``: keys enter the state as ``phi_k exp(log_scale - c)``
and the state is rescaled by ``exp(c_old - c_new)`` when ``c`` grows (the online-softmax
trick), so features never overflow and keys never underflow relative to their sequence.

Causal attention processes chunks in order: within a chunk the explicit ``C x C`` weights
``(phi_q phi_k^T) * (psi_q psi_k^T)`` with a lower-triangular mask, plus the state of all
earlier chunks (the chunked prefix sum).

Layouts: dense ``[b, n, h, *]`` with ``key_padding_mask [b, n]`` (True = padding; padded
keys' features are zeroed so they leave numerator *and* denominator; padded queries output
0), or packed ``[n, h, *]`` with a sorted PyG ``batch [n]``, which runs per size bucket of
graphs (:class:`~geolinrpe.ops.packing.PaddedBuckets`): the state is a per-graph sum and no
graph sees another.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .checks import check_batch, check_floating, check_key_padding_mask, check_same_device_dtype
from .modes import Featurizer, TokenFeatures, prepare_featurizer
from .packing import PaddedBuckets

NORMALIZATIONS = ("masked", "kernel", "none")
ENGINES = ("auto", "torch", "triton")
HALF = (torch.float16, torch.bfloat16)
#: elements of per-chunk working memory for the default chunk size (32 MiB in float32)
CHUNK_BUDGET = 2**23
CAUSAL_CHUNK = 64


def linear_attention(
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
    chunk_size: int | None = None,
    check_finite: bool = True,
    engine: str = "auto",
    recompute: bool = False,
) -> Tensor:
    """Linear attention with RPE features in O(n) time and memory.

    Args:
        q, k: ``[b, n, h, d]`` (dense) or ``[n, h, d]`` (packed).
        v: ``[b, n, h, e]`` or ``[n, h, e]``.
        pos: ``[b, n, p]`` or ``[n, p]``; required when the featurizer has an RPE.
        featurizer: :class:`~geolinrpe.ops.modes.MaskMode` or ``LogitMode``.
        key_padding_mask: ``[b, n]`` bool, True = padding (dense only).
        batch: ``[n]`` sorted graph ids (packed only).
        causal: token i attends to tokens ``j <= i`` of its own sequence or graph.
        normalize: ``"masked"``, ``"kernel"`` or ``"none"`` (module docstring).
        chunk_size: tokens per chunk (default: from a 32 MiB buffer budget; 64 if causal).
        check_finite: reject NaN/inf in q, k, v, pos.
        engine: ``"auto"`` (default: the fused Triton kernels of :mod:`geolinrpe.ops.fused`
            for CUDA tensors when Triton is installed, they support the featurizer and no
            gradient is being recorded; this chunked torch engine otherwise), ``"torch"`` or
            ``"triton"`` (force; an error names what is missing). The kernels' backward
            recomputes through this engine, so ``"auto"`` keeps training on it. The torch
            engine is the reference the kernels are tested against.
        recompute: keep only each chunk's inputs for the backward pass and rebuild its
            features and buffers there (torch engine, while gradients are recorded): the
            tensors kept for the backward pass shrink from O(n r m e / chunk) per chunk to
            the chunk's inputs (measured 11,446 -> 616 floats per token, about 1.9x the
            time of forward+backward). Default ``False``.

    Returns:
        ``[b, n, h, e]`` or ``[n, h, e]`` in ``v``'s dtype (zeros of that shape when there
        are no tokens: ``b = 0`` or ``n = 0``).
    """
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    packed = batch is not None
    _check_inputs(q, k, v, pos, key_padding_mask, batch, packed, check_finite)
    out_dtype = v.dtype
    if q.shape[:-2].numel() == 0:  # no tokens (b = 0 or n = 0): nothing attends
        return v.new_zeros(v.shape)
    if engine == "triton" or (engine == "auto" and _fused_applies(q, k, v, featurizer)):
        from .fused import fused_attention

        layout = dict(key_padding_mask=key_padding_mask, batch=batch, causal=causal)
        return fused_attention(q, k, v, pos, featurizer=featurizer, normalize=normalize, **layout)
    if out_dtype in HALF:  # accumulate in float32
        q, k, v = q.float(), k.float(), v.float()
        pos = None if pos is None else pos.float()
    if normalize == "kernel" and not featurizer.has_mask:
        normalize = "masked"  # identical without a mask; one code path
    prepare_featurizer(featurizer, q, k, pos)
    with torch.autocast(device_type=v.device.type, enabled=False):
        if not packed:
            out = _dense(
                q, k, v, pos, featurizer, key_padding_mask, causal, normalize, chunk_size, recompute
            )
        else:
            out = v.new_empty(v.shape)
            layout = PaddedBuckets(batch)
            for index, mask in layout.buckets:
                qb, kb, vb, pb = (
                    None if t is None else layout.gather(t, index, mask) for t in (q, k, v, pos)
                )
                dense = _dense(
                    qb, kb, vb, pb, featurizer, mask, causal, normalize, chunk_size, recompute
                )
                layout.scatter(out, dense, index, mask)
    return out.to(out_dtype)


def _fused_applies(q: Tensor, k: Tensor, v: Tensor, featurizer: Featurizer) -> bool:
    """``engine="auto"``: CUDA tensors, Triton installed, a featurizer the kernels support, and
    no gradient to record (the kernels' backward recomputes through this engine, so training
    gains nothing from their forward)."""
    if not q.is_cuda:
        return False
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return False
    from . import fused

    return fused.available() and fused.fused_support(featurizer) is None


def _check_inputs(q, k, v, pos, key_padding_mask, batch, packed, check_finite) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_floating(name, t, finite=check_finite)
    token_dims = 1 if packed else 2
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != token_dims + 2:
            layout = "[n, h, d] (packed, with batch)" if packed else "[b, n, h, d] (dense)"
            raise ValueError(f"{name} must have shape {layout}, got {list(t.shape)}")
    lead = tuple(q.shape[:-1])
    for name, t in (("k", k), ("v", v)):
        if tuple(t.shape[:-1]) != lead:
            raise ValueError(
                f"{name} has leading shape {list(t.shape[:-1])} but q has {list(lead)}"
            )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must share their last dim, got {q.shape[-1]} and {k.shape[-1]}")
    if pos is not None:
        check_floating("pos", pos, finite=check_finite)
        if tuple(pos.shape[:-1]) != lead[:-1] or pos.dim() != token_dims + 1:
            raise ValueError(
                f"pos must have shape {list(lead[:-1]) + ['p']}, got {list(pos.shape)}"
            )
    check_same_device_dtype({"q": q, "k": k, "v": v})
    if pos is not None:
        # under autocast q, k, v are half precision while positions stay in full precision
        autocast = q.dtype in HALF and pos.dtype in (torch.float32, torch.float64)
        check_same_device_dtype({"q": q, "pos": pos}, same_dtype=not autocast)
    if packed:
        if key_padding_mask is not None:
            raise ValueError("pass either batch (packed) or key_padding_mask (dense), not both")
        check_batch(batch, q.shape[0], q.device, allow_empty=True)
    elif key_padding_mask is not None:
        check_key_padding_mask(key_padding_mask, q.shape[0], q.shape[1], q.device)


def _dense(
    q, k, v, pos, featurizer, key_padding_mask, causal, normalize, chunk_size, recompute
) -> Tensor:
    valid = None if key_padding_mask is None else ~key_padding_mask
    if valid is not None and pos is not None:  # featurizers never see padding's positions
        pos = pos.masked_fill(key_padding_mask[..., None], 0)
    if causal:
        chunk_size = chunk_size or CAUSAL_CHUNK
        out = _causal(q, k, v, pos, featurizer, valid, normalize, chunk_size, recompute)
    else:
        out = _bidirectional(q, k, v, pos, featurizer, valid, normalize, chunk_size, recompute)
    if valid is not None:
        out = out.masked_fill(~valid[..., None, None], 0)
    return out


def _slice(t: Tensor | None, start: int, stop: int) -> Tensor | None:
    return None if t is None else t[:, start:stop]


def _values(v: Tensor, normalize: str) -> Tensor:
    """``[v, 1]`` when the denominator rides along in the state (masked normalisation)."""
    if normalize != "masked":
        return v
    return torch.cat([v, v.new_ones(v.shape[:-1] + (1,))], dim=-1)


def _stabilise_keys(f: TokenFeatures, valid: Tensor | None, running: Tensor | None):
    """Zero padded keys and bring ``phi`` to the running per-(b, h) log-scale.

    Returns ``(phi [b, n, h, r], new running max [b, h] or None, state rescale or None)``.
    """
    phi = f.phi
    if valid is not None:
        phi = torch.where(valid[..., None, None], phi, 0.0)
    if f.log_scale is None:
        return phi, None, None
    log_scale = f.log_scale
    if valid is not None:
        log_scale = log_scale.masked_fill(~valid[..., None], float("-inf"))
    chunk_max = log_scale.amax(1)
    new = chunk_max if running is None else torch.maximum(running, chunk_max)
    ref = torch.where(torch.isfinite(new), new, 0.0)  # sequences with no valid key yet
    phi = phi * torch.exp(log_scale - ref[:, None])[..., None]
    rescale = None if running is None else torch.exp(running - ref)
    return phi, new, rescale


def _key_state(phi: Tensor, psi: Tensor | None, values: Tensor) -> Tensor:
    """``sum_n phi (x) psi (x) values`` -> ``[b, h, r, m * e']`` (``[b, h, r, e']`` without psi)."""
    if psi is None:
        return torch.einsum("bnhr,bnhe->bhre", phi, values)
    joint = torch.einsum("bnhm,bnhe->bnhme", psi, values).flatten(-2)
    return torch.einsum("bnhr,bnhx->bhrx", phi, joint)


def _read_state(phi: Tensor, psi: Tensor | None, state: Tensor) -> Tensor:
    """``phi_q^T S psi_q`` -> ``[b, n, h, e']``."""
    out = torch.einsum("bnhr,bhrx->bnhx", phi, state)
    if psi is None:
        return out
    return torch.einsum("bnhm,bnhme->bnhe", psi, out.unflatten(-1, (psi.shape[-1], -1)))


def _finish(num: Tensor, den: Tensor | None, fq: TokenFeatures, running, normalize) -> Tensor:
    if normalize == "none":
        if fq.log_scale is not None:  # undo both stabilisations: no ratio cancels them
            scale = fq.log_scale + running[:, None]
            num = num * torch.exp(scale)[..., None]
        return num
    if normalize == "masked":
        num, den = num[..., :-1], num[..., -1]
    den = torch.where(den == 0, torch.ones_like(den), den)  # all weights zero: 0/0 := 0
    return num / den[..., None]


def _default_chunk(q: Tensor, v: Tensor, featurizer: Featurizer) -> int:
    """Tokens per chunk so that the chunk's buffers fit in ``CHUNK_BUDGET`` elements.

    Per token and head: the ``psi (x) v`` block (``m (e + 1)``) plus about four buffers of
    feature-map inputs and outputs (``d + m + r``: inputs, logits, exponentials, features).
    """
    b, _, h, e = v.shape
    m = max(featurizer.num_rpe_features, 1)
    per_token = b * h * (m * (e + 1) + 4 * (q.shape[-1] + m + featurizer.num_features))
    return max(16, CHUNK_BUDGET // max(per_token, 1))


def _recompute(enabled: bool, function, *args):
    """``function(*args)``; with ``enabled`` (while gradients are recorded, eager mode) its
    intermediates are rebuilt in the backward pass from ``args`` instead of kept
    (:func:`torch.utils.checkpoint.checkpoint`): each chunk keeps its inputs, not its
    features and ``psi (x) v`` blocks."""
    if enabled and torch.is_grad_enabled() and not torch.compiler.is_compiling():
        return checkpoint(function, *args, use_reentrant=False)
    return function(*args)


def _prime(featurizer: Featurizer) -> None:
    """Compute a cached spectrum before the chunks, so that recomputed chunks reuse it."""
    spectrum = getattr(featurizer, "_spectrum", None)
    if spectrum is not None and getattr(featurizer, "cache_spectrum", False):
        spectrum()


def _bidirectional(q, k, v, pos, featurizer, valid, normalize, chunk_size, recompute) -> Tensor:
    n = v.shape[1]
    chunk_size = chunk_size or _default_chunk(q, v, featurizer)
    _prime(featurizer)

    def key_chunk(k_c, v_c, pos_c, valid_c, running):
        fk = featurizer.key(k_c, pos_c)
        phi, running, rescale = _stabilise_keys(fk, valid_c, running)
        update = _key_state(phi, fk.psi, _values(v_c, normalize))
        return update, phi.sum(1), running, rescale

    def query_chunk(q_c, pos_c, state, denom, running):
        fq = featurizer.query(q_c, pos_c)
        num = _read_state(fq.phi, fq.psi, state)
        den = None if denom is None else torch.einsum("bnhr,bhr->bnh", fq.phi, denom)
        return _finish(num, den, fq, running, normalize)

    state = denom = running = None
    for start in range(0, n, chunk_size):
        stop = start + chunk_size
        args = (k[:, start:stop], v[:, start:stop], _slice(pos, start, stop))
        update, key_sum, running, rescale = _recompute(
            recompute, key_chunk, *args, _slice(valid, start, stop), running
        )
        if rescale is not None and state is not None:
            state = state * rescale[..., None, None]
            denom = None if denom is None else denom * rescale[..., None]
        state = update if state is None else state + update
        if normalize == "kernel":
            denom = key_sum if denom is None else denom + key_sum
    out = v.new_empty(v.shape)
    for start in range(0, n, chunk_size):
        stop = start + chunk_size
        chunk = (q[:, start:stop], _slice(pos, start, stop))
        out[:, start:stop] = _recompute(recompute, query_chunk, *chunk, state, denom, running)
    return out


def _causal(q, k, v, pos, featurizer, valid, normalize, chunk_size, recompute) -> Tensor:
    n = v.shape[1]
    lower = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=v.device).tril()
    _prime(featurizer)

    def step(q_c, k_c, v_c, pos_c, valid_c, state, denom, running):
        """One chunk: its output (within-chunk weights plus the earlier chunks' state), then
        the state updated with its keys."""
        fk, fq = featurizer.key(k_c, pos_c), featurizer.query(q_c, pos_c)
        phi_k, running, rescale = _stabilise_keys(fk, valid_c, running)
        if rescale is not None and state is not None:
            state = state * rescale[..., None, None]
            denom = None if denom is None else denom * rescale[..., None]
        values = _values(v_c, normalize)
        size = q_c.shape[1]
        tri = lower[:size, :size]
        kernel = torch.einsum("bihr,bjhr->bhij", fq.phi, phi_k).masked_fill(~tri, 0.0)
        weights = kernel
        if fq.psi is not None:
            weights = kernel * torch.einsum("bihm,bjhm->bhij", fq.psi, fk.psi)
        num = torch.einsum("bhij,bjhe->bihe", weights, values)
        den = kernel.sum(-1).transpose(1, 2) if normalize == "kernel" else None
        if state is not None:
            num = num + _read_state(fq.phi, fq.psi, state)
            if den is not None:
                den = den + torch.einsum("bnhr,bhr->bnh", fq.phi, denom)
        out = _finish(num, den, fq, running, normalize)
        update = _key_state(phi_k, fk.psi, values)
        state = update if state is None else state + update
        if normalize == "kernel":
            denom = phi_k.sum(1) if denom is None else denom + phi_k.sum(1)
        return out, state, denom, running

    state = denom = running = None
    out = v.new_empty(v.shape)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        chunk = (q[:, start:stop], k[:, start:stop], v[:, start:stop], _slice(pos, start, stop))
        out[:, start:stop], state, denom, running = _recompute(
            recompute, step, *chunk, _slice(valid, start, stop), state, denom, running
        )
    return out

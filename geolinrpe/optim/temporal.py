r"""A learned optimizer that attends over each parameter entry's recent history (1D FLT RPE).

Axes: N entries (of all tensors, packed), T history length (lags), f per-entry features,
f_h = f - 1 history features, c channels, k momentum decays.

For every entry the optimizer keeps its last ``T`` feature vectors: the features of
:mod:`geolinrpe.optim.learned` (``g / rms(g)``, ``m_k / rms(m_k)``, the Adam direction, the
centred ``log v_hat``, ``w / rms(w)``; ``rms`` over the tensor at that step) *without* the step
count ``log(1 + t) / 10``, which is the same for every entry and would tell the tokens their
absolute time. The buffer is shifted, not a ring: ``history [T, numel, f_h]`` per tensor, lag
``l`` in row ``l`` (row 0 = this step); each step prepends the new features and drops lag
``T``. Lags ``l >= t`` (not yet seen during the first ``T - 1`` steps) are zeros and masked.

Each entry is one sequence of ``T`` tokens ``(entry, lag)`` at 1D position ``lag``
(dense layout ``x [N, T, c]``, ``key_padding_mask [N, T]``):

.. math::

    h_{il} = E x_{il}, \qquad
    h_{il} \leftarrow h_{il} + \mathrm{Attn}(\mathrm{LN}(h_i))_l, \qquad
    z_i = h_{i0} + \mathrm{MLP}(\mathrm{LN}(h_{i0})) + e\,\tau_t

(``num_layers`` blocks; the last one's MLP runs on the current token ``l = 0`` only), with
``tau_t = log(1 + t) / 10`` embedded by ``e``. Optionally ``spatial_layers`` blocks of
:class:`~geolinrpe.optim.learned.UpdateBlock` then attend over the entries of each tensor
(``z`` as tokens, positions = normalised (row, col), one graph per tensor). The output is

.. math::

    (d_i, s_i) = W_o \mathrm{LN}(z_i) + W_s x_i, \qquad
    w_i \leftarrow w_i - \eta\, d_i \exp(\alpha s_i)

with ``x_i`` the current full features (the step count included), ``W_s`` the linear skip
starting on the Adam feature (``init="adam"``) and the head ``W_o`` starting at **zero**, so
an untrained network is exactly Adam (``beta1 = 0.9``, ``beta2``, ``eps = 1e-8``) with
learning rate ``eta``, up to rounding. (The meta-gradient then reaches ``W_o`` and ``W_s`` first;
once ``W_o`` moves, everything else.) With ``learn_direction=False`` the head ``W_o`` outputs
``s_i`` only and ``d_i = (W_s x_i)_0``: the attention over the history sets each entry's step
size on a linear (at the start Adam's) direction.

The 1D FLT RPE (``rpe="flt-kernel"``, the FourierLearner-Transformer of Choromanski et al.,
https://arxiv.org/abs/2302.01925) biases the attention by the distance in steps between two
tokens: in ``mode="mask"`` the weight of lag ``l'`` for lag ``l`` is
``K(q_l, k_l') f_h(l - l') / sum_l' K(q_l, k_l')`` with the ELU kernel ``K`` and
``f_h(Delta) = a_h exp(-Delta^2 / (2 l_h^2))``, a learnable recency window per head
(lengthscale ``l_h`` in steps, default ``max(T / 4, 1)``; amplitude ``a_h``), computed from
deterministic quadrature Fourier features ``cos / sin(xi Delta)`` of the positions (8 nodes,
exact to 3e-7 for lags up to ``T - 1``; the rule aliases offsets beyond ``8.96 l_h`` steps).
It only ever sees lag differences, so the same history gives the same tokens' output at any
absolute step (the Mnemosyne view, Jain et al. NeurIPS 2023, of an optimizer as attention over
each parameter's optimisation history). ``rpe=None`` is the no-RPE baseline (the same layer
without the positional mask: permutation invariant over the history).

Cost per step: O(N T^2) times the feature width for the attention (the explicit per-entry form:
for T = 8 tokens it is cheaper than the linear engine's state) plus O(N T c^2) for the
embedding, i.e. O(N) for fixed ``T``;
entries go through in chunks of ``chunk_size`` (default 8192), so the activations under
``no_grad`` stay a few MB per chunk. State: ``(k + 1) + T f_h`` floats per entry (60 at the
defaults, against Adam's 2). Measured on the 2-core development CPU (float32, ``no_grad``,
defaults, one ``[100, 1000]`` tensor, the other core busy with other work): one
:class:`~geolinrpe.optim.learned.LearnedOptimizer` step of the 100,000 entries takes 0.6 s with
one torch thread (0.57 s of it the temporal attention block), 0.9 to 2.8 s with two threads
under that load (in that two-thread run ``torch.optim.Adam`` took 0.04 s and the spatial
:class:`~geolinrpe.optim.learned.UpdateNetwork` 0.2 s). A 1M-entry tensor holds 240 MB of state
and needs about 1 GB more during a step (the shifted history copy, the packed tokens,
features and summaries; estimated from these buffer sizes, not measured).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..nn import RPEAttention
from .learned import (
    LearnedUpdateRule,
    UpdateBlock,
    _tensor_features,
    advance_step,
    check_rule,
    entry_positions,
    entry_rpe_options,
    head_output,
    head_outputs,
    num_input_features,
    output_deltas,
    reset_output,
    step_counts,
    update_moments,
)


def _temporal_rpe_options(rpe: str | None, history: int, options: dict | None) -> dict:
    """Defaults for the 1D RPE: ``flt-kernel`` with lengthscale ``T / 4`` steps and an 8-node
    quadrature rule whose range covers lags up to ``T - 1``."""
    user = dict(options or {})
    if rpe != "flt-kernel":
        return user
    out = {"lengthscale": max(history / 4, 1.0), "frequencies": "quadrature", "num_frequencies": 8}
    out.update(user)
    if out["frequencies"] == "quadrature" and "quadrature_range" not in user:
        scale = out["lengthscale"]
        smallest = min(scale) if isinstance(scale, (list, tuple)) else scale
        out["quadrature_range"] = max(3.0, (history - 1) / smallest)
    return out


class TemporalBlock(nn.Module):
    """Pre-norm block over each entry's ``T`` tokens: ``h + attn(ln(h))``, then ``+ mlp(ln(h))``.

    Shapes: ``h [N, T, c]``, ``pos [N, T, 1]`` (or ``None`` without RPE), ``key_padding_mask
    [N, T]`` (True = lag not yet filled, or ``None``) -> ``[N, T, c]``, or ``[N, c]`` (the
    current token, lag 0) with ``current_only``.
    """

    def __init__(
        self, width: int, num_heads: int, rpe: str | None, rpe_options: dict, history: int
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = RPEAttention(
            width,
            num_heads,
            rpe=rpe,
            pos_dim=None if rpe is None else 1,
            mode="mask",
            kernel="elu",
            normalize="kernel",
            quadratic_below=history,  # explicit per-entry form: T tokens
            rpe_options=rpe_options if rpe is not None else None,
        )
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width)
        )

    def forward(
        self,
        h: Tensor,
        pos: Tensor | None,
        key_padding_mask: Tensor | None,
        current_only: bool = False,
    ) -> Tensor:
        pos = pos if self.attn.rpe is not None else None
        h = h + self.attn(self.norm1(h), pos, key_padding_mask=key_padding_mask)
        if current_only:
            h = h[:, 0]
        return h + self.mlp(self.norm2(h))


class TemporalUpdateNetwork(LearnedUpdateRule):
    r"""Per-entry update rule from attention over the entry's last ``T`` features (module docs).

    Args:
        history: ``T``, feature vectors kept per entry (default 8).
        width: channels ``c`` (default 16).
        num_heads: attention heads (default 2).
        num_layers: temporal blocks (default 1).
        rpe: RPE registry name for the 1D lag positions (default ``"flt-kernel"``: Gaussian
            kernel, lengthscale ``T / 4`` steps, 8-node quadrature) or ``None`` (the no-RPE
            baseline).
        rpe_options: options for the temporal RPE (override the defaults above).
        spatial_layers: :class:`~geolinrpe.optim.learned.UpdateBlock` blocks over the entries
            of each tensor after the temporal summary (default 0).
        spatial_rpe: RPE name for their 2D (row, col) positions (default ``"flt-kernel"``,
            lengthscale 0.25) or ``None``.
        spatial_rpe_options: options for the spatial RPE.
        betas: momentum decays ``beta_k`` (must contain 0.9).
        beta2: second-moment decay.
        init: ``"adam"`` (skip on the Adam feature: exactly Adam untrained) or ``"zero"``
            (``d = s = 0``).
        mag_scale: ``alpha`` in ``exp(alpha s)``.
        learn_direction: ``False``: ``W_o`` outputs the log-scale only, so the direction is
            the skip's (Adam's at the start; trainable) and the attention over the history
            sets each entry's step size (default ``True``: both).
        chunk_size: entries per temporal-attention call (bounds the activation memory).

    Shapes (:meth:`forward`): ``tokens [N, T, f_h]`` (lag 0 = this step), ``key_padding_mask
    [N, T]`` or ``None``, ``current [N, f]``, ``pos [N, 2]`` and ``batch [N]`` (only with
    ``spatial_layers``) -> ``[N, 2]`` (direction, log-scale).

    State per tensor (:meth:`tensor_state`): ``momenta [k, *shape]``, ``second [*shape]``,
    ``history [T, numel, f_h]``.
    """

    kind = "temporal"
    state_keys = ("momenta", "second", "history")

    def __init__(
        self,
        history: int = 8,
        width: int = 16,
        num_heads: int = 2,
        num_layers: int = 1,
        rpe: str | None = "flt-kernel",
        rpe_options: dict | None = None,
        spatial_layers: int = 0,
        spatial_rpe: str | None = "flt-kernel",
        spatial_rpe_options: dict | None = None,
        betas: Sequence[float] = (0.5, 0.9, 0.99),
        beta2: float = 0.999,
        init: str = "adam",
        mag_scale: float = 0.1,
        learn_direction: bool = True,
        chunk_size: int = 8192,
    ) -> None:
        super().__init__()
        check_rule(self, init, betas, beta2, mag_scale, learn_direction)
        for name, value, low in (
            ("history", history, 1),
            ("num_layers", num_layers, 1),
            ("spatial_layers", spatial_layers, 0),
            ("chunk_size", chunk_size, 1),
        ):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        options = _temporal_rpe_options(rpe, history, rpe_options)
        spatial_options = entry_rpe_options(spatial_rpe, spatial_rpe_options)
        self.config = dict(
            history=history,
            width=width,
            num_heads=num_heads,
            num_layers=num_layers,
            rpe=rpe,
            rpe_options=options,
            spatial_layers=spatial_layers,
            spatial_rpe=spatial_rpe,
            spatial_rpe_options=spatial_options,
            betas=tuple(betas),
            beta2=beta2,
            init=init,
            mag_scale=mag_scale,
            learn_direction=learn_direction,
            chunk_size=chunk_size,
        )
        self.history = history
        self.rpe = rpe
        self.chunk_size = chunk_size
        in_dim = num_input_features(len(self.betas))
        self.num_history_features = in_dim - 1  # all but the step count
        self.embed = nn.Linear(self.num_history_features, width)
        self.blocks = nn.ModuleList(
            TemporalBlock(width, num_heads, rpe, options, history) for _ in range(num_layers)
        )
        self.step_embed = nn.Linear(1, width, bias=False)
        self.spatial = nn.ModuleList(
            UpdateBlock(width, num_heads, spatial_rpe, spatial_options)
            for _ in range(spatial_layers)
        )
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, head_outputs(self))
        self.skip = nn.Linear(in_dim, 2, bias=False)
        self.register_buffer("lags", torch.arange(history, dtype=torch.float32), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Zero head (the network starts exactly at its skip); skip on the Adam feature or 0."""
        self.embed.reset_parameters()
        for block in [*self.blocks, *self.spatial]:
            block.attn.reset_parameters()
        reset_output(self, head_std=0.0)

    def summarize(
        self, tokens: Tensor, key_padding_mask: Tensor | None, times: Tensor | None = None
    ) -> Tensor:
        """Temporal summary ``[N, c]`` of each entry's tokens ``[N, T, f_h]``, read at lag 0.

        ``times``: the tokens' positions on the step axis, ``[T]`` or ``[N, T]`` (default the
        lags ``0 .. T-1``); the RPE sees only their differences.
        """
        n, t = tokens.shape[:2]
        times = self.lags[:t].to(tokens.dtype) if times is None else times.to(tokens.dtype)
        pos = times.expand(n, t).unsqueeze(-1)
        h = self.embed(tokens)
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            h = block(h, pos, key_padding_mask, current_only=i == last)
        return h

    def forward(
        self,
        tokens: Tensor,
        key_padding_mask: Tensor | None,
        current: Tensor,
        pos: Tensor | None = None,
        batch: Tensor | None = None,
    ) -> Tensor:
        """Direction and log-scale per entry, ``[N, 2]`` (shapes in the class docstring)."""
        n, size = tokens.shape[0], self.chunk_size
        chunks = [
            self.summarize(
                tokens[i : i + size],
                None if key_padding_mask is None else key_padding_mask[i : i + size],
            )
            for i in range(0, n, size)
        ]
        h = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
        h = h + self.step_embed(current[:, -1:])
        for block in self.spatial:
            h = block(h, pos, batch)
        return head_output(self, self.norm(h)) + self.skip(current)

    def tensor_state(self, p: Tensor) -> dict[str, Tensor]:
        """``{"momenta": [k, *shape], "second": [*shape], "history": [T, numel, f_h]}``, zeros."""
        return {
            "momenta": p.new_zeros((len(self.betas), *p.shape)),
            "second": torch.zeros_like(p),
            "history": p.new_zeros((self.history, p.numel(), self.num_history_features)),
        }

    def updates(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        state: dict,
        lrs: Sequence[float],
    ) -> tuple[list[Tensor], dict]:
        """Moments, features, shifted histories and one chunked network call over all tensors."""
        steps = step_counts(state["step"], len(params))
        lags = torch.arange(self.history, device=params[0].device)
        new_m, new_v, new_h, feats, masks, pos, batch = [], [], [], [], [], [], []
        for idx, (w, g, m, v, hist, step) in enumerate(
            zip(
                params,
                grads,
                state["momenta"],
                state["second"],
                state["history"],
                steps,
                strict=True,
            )
        ):
            m, v = update_moments(self, g, m, v)
            x = _tensor_features(w, g, m, v, step, self)  # [numel, f]
            hist = torch.cat([x[None, :, :-1], hist[:-1]])  # [T, numel, f_h], lag 0 first
            new_m.append(m)
            new_v.append(v)
            new_h.append(hist)
            feats.append(x)
            masks.append((lags >= step).expand(w.numel(), -1))  # not yet filled
            if self.spatial:
                pos.append(entry_positions(w.shape, w.dtype, w.device))
                batch.append(torch.full((w.numel(),), idx, dtype=torch.long, device=w.device))
        tokens = (new_h[0] if len(new_h) == 1 else torch.cat(new_h, 1)).transpose(0, 1)
        padded = any(s < self.history for s in steps)
        mask = (masks[0] if len(masks) == 1 else torch.cat(masks)) if padded else None
        out = self(
            tokens,
            mask,
            feats[0] if len(feats) == 1 else torch.cat(feats),
            torch.cat(pos) if self.spatial else None,
            torch.cat(batch) if self.spatial else None,
        )
        new_state = {
            "step": advance_step(state["step"]),
            "momenta": new_m,
            "second": new_v,
            "history": new_h,
        }
        return output_deltas(self, out, params, lrs), new_state

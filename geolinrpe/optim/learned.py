r"""A learned optimizer whose per-entry update comes from a small O(n) RPE transformer.

Axes: n tokens (parameter entries of all tensors, packed), t tensors, f input features,
c channels, k momentum decays.

Every entry of every parameter tensor is a token; the tensors of a model are the "graphs" of
one packed :class:`~geolinrpe.nn.RPEAttention` call (``batch`` = tensor id), so one step costs
O(number of parameters). A token's position is its normalised ``(row, col)`` coordinate in its
tensor, ``pos = (i / max(R - 1, 1), j / max(C - 1, 1)) in [0, 1]^2`` after viewing the tensor
as ``[R, C] = [shape[0], prod(shape[1:])]`` (a vector is ``[R, 1]``, a scalar ``[1, 1]``), so
the RPE sees "same row / nearby column" structure independently of the tensor size.

Per-entry input features (``FEATURES``), each scale-free within its tensor
(``rms(x) = sqrt(mean(x^2))`` over the tensor, ``eps = 1e-8``):

* ``g / rms(g)``; ``m_k / rms(m_k)`` for the momentum decays ``beta_k`` (default 0.5, 0.9,
  0.99), ``m_k <- beta_k m_k + (1 - beta_k) g``;
* ``m_0.9 / sqrt(v_hat)`` (the Adam direction, clipped to ``[-10, 10]``), with the second moment
  ``v <- beta2 v + (1 - beta2) g^2`` and ``v_hat = v / (1 - beta2^t)``;
* ``log(v_hat + eps) - mean_tensor(log(v_hat + eps))``;
* ``w / rms(w)`` (the parameter value);
* ``log(1 + t) / 10`` (the step count ``t``, shared by all entries).

The network outputs a direction ``d`` and a log-scale ``s`` per entry; the update is
(Metz et al. 2022, https://arxiv.org/abs/2203.11860, "Practical tradeoffs"; VeLO,
https://arxiv.org/abs/2211.09760)

.. math::  w \leftarrow w - \eta\, d \exp(\alpha s), \qquad \alpha = 0.1 \text{ (mag\_scale)},

with ``eta`` the group's ``lr`` (``lr_base``). The output head has a linear skip from the input
features whose direction weight starts on the Adam feature (``init="adam"``) so an untrained
network is Adam with learning rate ``eta`` (``init="zero"`` starts at ``d = s = 0``).

The same computation is available as a pure function :func:`learned_step`
``(params, grads, state) -> (new_params, new_state)``, differentiable with respect to the
network parameters (and, through ``grads``, second order when the caller builds the grads with
``create_graph=True``); :class:`LearnedOptimizer` wraps it in the ``torch.optim`` interface.

Every update network derives from :class:`LearnedUpdateRule`: it owns its optimizer state
(:meth:`~LearnedUpdateRule.tensor_state`, :meth:`~LearnedUpdateRule.init_state`) and its step
(:meth:`~LearnedUpdateRule.updates`), so :class:`UpdateNetwork` (attention over a tensor's
entries) and :class:`~geolinrpe.optim.temporal.TemporalUpdateNetwork` (attention over each
entry's gradient history) are interchangeable in :func:`learned_step`, :class:`LearnedOptimizer`,
meta-training and checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from ..nn import RPEAttention

FEATURES = ("grad", "momenta...", "adam", "log_second_moment", "param", "log_step")
_EPS = 1e-8


def num_input_features(num_momenta: int) -> int:
    """Input features per entry for ``num_momenta`` momentum decays (see the module docs)."""
    return num_momenta + 5


def step_counts(step: int | Sequence[int], num_tensors: int) -> list[int]:
    """Step count ``t >= 1`` of each tensor *including* the coming step, from a state's
    ``"step"`` (steps taken so far: one int for all tensors, or one per tensor)."""
    if isinstance(step, int):
        return [step + 1] * num_tensors
    if len(step) != num_tensors:
        raise ValueError(f"state has {len(step)} step counts for {num_tensors} tensors")
    return [int(s) + 1 for s in step]


def advance_step(step: int | Sequence[int]) -> int | list[int]:
    """A state's ``"step"`` after one more step (an int stays an int, a list a list)."""
    return step + 1 if isinstance(step, int) else [int(s) + 1 for s in step]


class LearnedUpdateRule(nn.Module):
    """Base of the update networks: a network owns its optimizer state and its step.

    The functional state of ``t`` tensors is ``{"step": s, key: [t tensors] for key in
    state_keys}``, ``s`` the steps taken so far: an int shared by all tensors (functional use,
    :func:`learned_step`) or a list with one int per tensor (:class:`LearnedOptimizer`, where a
    tensor without a gradient skips a step). Subclasses set ``kind`` (the name checkpoints
    record), ``state_keys`` and ``config`` (the constructor keywords, plain data), and implement
    :meth:`tensor_state` and :meth:`updates`.
    """

    kind: str = ""
    state_keys: tuple[str, ...] = ()
    config: dict
    betas: tuple[float, ...]
    beta2: float
    mag_scale: float

    def tensor_state(self, p: Tensor) -> dict[str, Tensor]:
        """Zero state tensors of one parameter tensor ``p``: ``{key: tensor}``, ``state_keys``."""
        raise NotImplementedError

    def init_state(self, params: Sequence[Tensor]) -> dict:
        """Zero functional state ``{"step": 0, key: [one tensor per param]}``."""
        per_tensor = [self.tensor_state(p) for p in params]
        state: dict = {"step": 0}
        for key in self.state_keys:
            state[key] = [s[key] for s in per_tensor]
        return state

    def updates(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        state: dict,
        lrs: Sequence[float],
    ) -> tuple[list[Tensor], dict]:
        """``(deltas, new_state)``: the caller subtracts ``delta`` from each tensor.

        Pure (nothing is modified in place) and differentiable with respect to the network's
        parameters; ``lrs`` holds ``eta`` per tensor.
        """
        raise NotImplementedError


def check_rule(
    rule: LearnedUpdateRule,
    init: str,
    betas: Sequence[float],
    beta2: float,
    mag_scale: float,
    learn_direction: bool = True,
) -> None:
    """Check the options every update rule shares (``init``, the momentum decays) and set them
    on ``rule``: ``betas``, ``beta2``, ``mag_scale``, ``init``, ``learn_direction``."""
    if not isinstance(learn_direction, bool):
        raise ValueError(f"learn_direction must be a bool, got {learn_direction!r}")
    if init not in ("adam", "zero"):
        raise ValueError(f"init must be 'adam' or 'zero', got {init!r}")
    if 0.9 not in betas:
        raise ValueError("betas must contain 0.9 (the Adam-direction feature uses it)")
    rule.betas = tuple(float(b) for b in betas)
    rule.beta2 = float(beta2)
    rule.mag_scale = float(mag_scale)
    rule.init = init
    rule.learn_direction = learn_direction


def head_outputs(rule: LearnedUpdateRule) -> int:
    """Channels of the rule's head: 2 (direction, log-scale), or 1 (log-scale) without
    ``learn_direction``."""
    return 2 if rule.learn_direction else 1


def head_output(rule: LearnedUpdateRule, h: Tensor) -> Tensor:
    """The head's (direction, log-scale) ``[n, 2]`` from the summary ``h [n, c]``; without
    ``learn_direction`` the direction column is 0, so the direction is the skip's alone."""
    out = rule.head(h)
    return out if rule.learn_direction else nn.functional.pad(out, (1, 0))


def reset_output(rule: LearnedUpdateRule, head_std: float) -> None:
    """The output layers' start: head weights ``N(0, head_std^2)`` (0: exactly zero), head
    bias 0, skip 0 except 1 on the Adam feature with ``init="adam"``."""
    if head_std > 0:
        nn.init.normal_(rule.head.weight, std=head_std)
    else:
        nn.init.zeros_(rule.head.weight)
    nn.init.zeros_(rule.head.bias)
    nn.init.zeros_(rule.skip.weight)
    if rule.init == "adam":
        with torch.no_grad():
            rule.skip.weight[0, len(rule.betas) + 1] = 1.0  # the "adam" feature


def entry_rpe_options(rpe: str | None, options: dict | None) -> dict:
    """Options of the RPE over entries' (row, col) positions: ``flt-kernel`` defaults to a
    lengthscale of 0.25 in normalised coordinates; ``options`` override."""
    merged = {"lengthscale": 0.25} if rpe == "flt-kernel" else {}
    merged.update(options or {})
    return merged


class UpdateBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, width: int, num_heads: int, rpe: str | None, rpe_options: dict) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = RPEAttention(
            width,
            num_heads,
            rpe=rpe,
            pos_dim=None if rpe is None else 2,
            mode="logit" if rpe is not None else "mask",
            kernel="favor+",
            num_features=16,
            rpe_options=rpe_options if rpe is not None else None,
        )
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width)
        )

    def forward(self, x: Tensor, pos: Tensor, batch: Tensor) -> Tensor:
        """``x [n, c]``, ``pos [n, 2]``, ``batch [n]`` -> ``[n, c]``."""
        x = x + self.attn(self.norm1(x), pos if self.attn.rpe is not None else None, batch)
        return x + self.mlp(self.norm2(x))


class UpdateNetwork(LearnedUpdateRule):
    r"""Per-entry update rule: features ``[n, f]`` -> (direction, log-scale) ``[n, 2]``.

    ``out = head(blocks(embed(x))) + skip(x)``: an embedding, ``num_layers`` pre-norm blocks of
    :class:`~geolinrpe.nn.RPEAttention` (positions = normalised (row, col) in the tensor, one
    graph per tensor) plus an MLP, and a linear head; ``skip`` is a linear map of the raw
    features (the "hand-designed" part).

    Args:
        width: channels ``c`` (default 16).
        num_heads: attention heads (default 2).
        num_layers: transformer blocks (default 1).
        rpe: RPE registry name for 2D positions (default ``"flt-kernel"``, Gaussian kernel of
            lengthscale 0.25 in normalised coordinates) or ``None`` (the no-RPE baseline: the
            same network with plain linear attention).
        rpe_options: options for the RPE.
        betas: momentum decays ``beta_k`` (they fix the feature count).
        beta2: second-moment decay.
        init: ``"adam"`` (skip starts on the Adam direction) or ``"zero"``.
        mag_scale: ``alpha`` in ``exp(alpha s)``.
        learn_direction: ``False``: the head outputs the log-scale only, so the direction is
            the linear skip of the features (Adam's at the start; trainable) and the attention
            sets each entry's step size (default ``True``).

    Shapes: ``x [n, f]``, ``pos [n, 2]``, ``batch [n]`` (sorted tensor ids) -> ``[n, 2]``.

    State per tensor (:meth:`tensor_state`): ``momenta [k, *shape]``, ``second [*shape]``.
    """

    kind = "spatial"
    state_keys = ("momenta", "second")

    def __init__(
        self,
        width: int = 16,
        num_heads: int = 2,
        num_layers: int = 1,
        rpe: str | None = "flt-kernel",
        rpe_options: dict | None = None,
        betas: Sequence[float] = (0.5, 0.9, 0.99),
        beta2: float = 0.999,
        init: str = "adam",
        mag_scale: float = 0.1,
        learn_direction: bool = True,
    ) -> None:
        super().__init__()
        check_rule(self, init, betas, beta2, mag_scale, learn_direction)
        options = entry_rpe_options(rpe, rpe_options)
        self.config = dict(
            width=width,
            num_heads=num_heads,
            num_layers=num_layers,
            rpe=rpe,
            rpe_options=options,
            betas=tuple(betas),
            beta2=beta2,
            init=init,
            mag_scale=mag_scale,
            learn_direction=learn_direction,
        )
        self.rpe = rpe
        in_dim = num_input_features(len(self.betas))
        self.embed = nn.Linear(in_dim, width)
        self.blocks = nn.ModuleList(
            UpdateBlock(width, num_heads, rpe, options) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, head_outputs(self))
        self.skip = nn.Linear(in_dim, 2, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Small head (the network starts near its skip); skip on the Adam feature or zero."""
        self.embed.reset_parameters()
        for block in self.blocks:
            block.attn.reset_parameters()
        reset_output(self, head_std=1e-3)

    def forward(self, x: Tensor, pos: Tensor, batch: Tensor) -> Tensor:
        """Direction and log-scale per entry, ``[n, 2]``."""
        h = self.embed(x)
        for block in self.blocks:
            h = block(h, pos, batch)
        return head_output(self, self.norm(h)) + self.skip(x)

    def tensor_state(self, p: Tensor) -> dict[str, Tensor]:
        """``{"momenta": [k, *shape], "second": [*shape]}``, zeros like ``p``."""
        return {"momenta": p.new_zeros((len(self.betas), *p.shape)), "second": torch.zeros_like(p)}

    def updates(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        state: dict,
        lrs: Sequence[float],
    ) -> tuple[list[Tensor], dict]:
        """One packed network call over all tensors (:func:`compute_updates`)."""
        deltas, momenta, second = compute_updates(
            self,
            params,
            grads,
            state["momenta"],
            state["second"],
            step_counts(state["step"], len(params)),
            lrs,
        )
        return deltas, {"step": advance_step(state["step"]), "momenta": momenta, "second": second}


def entry_positions(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Normalised ``(row, col)`` of every entry of a tensor of ``shape``: ``[numel, 2]`` in [0, 1].

    The tensor is viewed as ``[R, C] = [shape[0], prod(shape[1:])]`` (vector ``[R, 1]``, scalar
    ``[1, 1]``); ``pos = (i / max(R - 1, 1), j / max(C - 1, 1))`` in row-major entry order.
    """
    rows = shape[0] if len(shape) >= 1 else 1
    cols = math.prod(shape[1:]) if len(shape) >= 2 else 1
    i = torch.arange(rows, dtype=dtype, device=device) / max(rows - 1, 1)
    j = torch.arange(cols, dtype=dtype, device=device) / max(cols - 1, 1)
    return torch.stack(torch.meshgrid(i, j, indexing="ij"), -1).reshape(-1, 2)


def _rms(x: Tensor) -> Tensor:
    return x.pow(2).mean().add(_EPS * _EPS).sqrt()


def init_state(params: Sequence[Tensor], net: LearnedUpdateRule) -> dict:
    """Zero optimizer state for :func:`learned_step`: ``net.init_state(params)``.

    :class:`UpdateNetwork`: ``{"step": int, "momenta": [k, *shape] per tensor, "second":
    [*shape] per tensor}``; other networks add their own keys (``net.state_keys``).
    """
    return net.init_state(params)


def update_moments(
    net: LearnedUpdateRule, g: Tensor, m: Tensor, v: Tensor
) -> tuple[Tensor, Tensor]:
    """``m_k <- beta_k m_k + (1 - beta_k) g`` (``m [k, *shape]``), ``v <- beta2 v + (1 - beta2)
    g^2``; returns the new ``(m, v)``."""
    betas = torch.tensor(net.betas, dtype=g.dtype, device=g.device)
    b = betas.view(-1, *([1] * g.dim()))  # [k, 1, ...]
    return b * m + (1 - b) * g, net.beta2 * v + (1 - net.beta2) * g * g


def output_deltas(
    net: LearnedUpdateRule, out: Tensor, params: Sequence[Tensor], lrs: Sequence[float]
) -> list[Tensor]:
    """``delta = lr d exp(alpha s)`` per tensor from the packed network output ``out [n, 2]``."""
    direction, log_scale = out.unbind(-1)
    scale = direction * torch.exp(net.mag_scale * log_scale.clamp(max=30.0))
    return [
        lr * chunk.reshape(w.shape)
        for lr, chunk, w in zip(lrs, scale.split([w.numel() for w in params]), params, strict=True)
    ]


def _tensor_features(
    w: Tensor, g: Tensor, m: Tensor, v: Tensor, step: int, net: LearnedUpdateRule
) -> Tensor:
    """Features ``[numel, f]`` of one tensor from its value, grad and updated moments."""
    flat_m = m.reshape(m.shape[0], -1)
    feats = [g.reshape(-1) / _rms(g)]
    feats += [mk / _rms(mk) for mk in flat_m]
    v_hat = v.reshape(-1) / (1 - net.beta2**step)
    m09 = flat_m[net.betas.index(0.9)] / (1 - 0.9**step)
    feats.append((m09 / (v_hat.sqrt() + _EPS)).clamp(-10, 10))
    logv = torch.log(v_hat + _EPS)
    feats.append(logv - logv.mean())
    feats.append(w.reshape(-1) / _rms(w))
    feats.append(torch.full_like(feats[0], math.log1p(step) / 10))
    return torch.stack(feats, -1)


def compute_updates(
    net: UpdateNetwork,
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momenta: Sequence[Tensor],
    second: Sequence[Tensor],
    steps: Sequence[int],
    lrs: Sequence[float],
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    r"""Updated moments and the updates ``delta = lr d exp(alpha s)`` of all tensors in one call.

    Args:
        params, grads: ``t`` tensors and their gradients.
        momenta: ``[k, *shape]`` per tensor; second: ``[*shape]`` per tensor (before this step).
        steps: the step count ``t >= 1`` of each tensor *including* this step.
        lrs: ``eta`` of each tensor.

    Returns: ``(deltas, new_momenta, new_second)``, one entry per tensor (the caller subtracts
    ``delta``). All tensors go through one packed :class:`UpdateNetwork` call.
    """
    new_m, new_v, feats, pos, batch = [], [], [], [], []
    for idx, (w, g, m, v, step) in enumerate(
        zip(params, grads, momenta, second, steps, strict=True)
    ):
        m, v = update_moments(net, g, m, v)
        new_m.append(m)
        new_v.append(v)
        feats.append(_tensor_features(w, g, m, v, step, net))
        pos.append(entry_positions(w.shape, w.dtype, w.device))
        batch.append(torch.full((w.numel(),), idx, dtype=torch.long, device=w.device))
    out = net(torch.cat(feats), torch.cat(pos), torch.cat(batch))  # [n, 2]
    return output_deltas(net, out, params, lrs), new_m, new_v


def learned_step(
    net: LearnedUpdateRule,
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    state: dict,
    lr: float = 1e-3,
) -> tuple[list[Tensor], dict]:
    """Pure functional step ``(params, grads, state) -> (new_params, new_state)``.

    Nothing is modified in place; the outputs are differentiable with respect to ``net``'s
    parameters (and to ``params`` / ``grads``), so unrolled inner training can be
    back-propagated for meta-training. ``state`` comes from :func:`init_state`; any
    :class:`LearnedUpdateRule` (``net.updates``) works.
    """
    deltas, new_state = net.updates(params, grads, state, [lr] * len(params))
    new_params = [w - d for w, d in zip(params, deltas, strict=True)]
    return new_params, new_state


class LearnedOptimizer(torch.optim.Optimizer):
    """``torch.optim.Optimizer`` driven by an update network (any :class:`LearnedUpdateRule`:
    :class:`UpdateNetwork`, :class:`~geolinrpe.optim.temporal.TemporalUpdateNetwork`).

    Args:
        params: parameters or parameter groups (each group may set its own ``lr``).
        net: the update network (its parameters are not optimised here; it runs under
            ``no_grad``).
        lr: ``eta`` (``lr_base``), default 1e-3.

    Per-parameter state: ``step`` (int) and the network's ``net.state_keys``
    (:class:`UpdateNetwork`: ``momenta [k, *shape]``, ``second [*shape]``; the temporal network
    adds ``history [T, numel, f_h]``), stored in ``self.state`` in the parameter's dtype; it
    round-trips through ``state_dict`` / ``load_state_dict`` (the network is not part of it:
    save ``net.state_dict()`` alongside). Parameters whose ``grad`` is ``None`` are skipped
    (untouched, no state). All parameters with gradients, from every group, go through one
    ``net.updates`` call per step.
    """

    def __init__(self, params: Iterable, net: LearnedUpdateRule, lr: float = 1e-3) -> None:
        if not lr >= 0:
            raise ValueError(f"lr must be non-negative, got {lr}")
        super().__init__(params, dict(lr=lr))
        self.net = net

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One update of every parameter that has a gradient; returns the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        keys = self.net.state_keys
        items, lrs = [], []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LearnedOptimizer does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state.update(self.net.tensor_state(p))
                missing = [key for key in keys if key not in state]
                if missing:
                    raise ValueError(
                        f"optimizer state lacks {missing}: was it saved with another network "
                        f"than this {type(self.net).__name__}?"
                    )
                items.append(p)
                lrs.append(group["lr"])
        if not items:
            return loss
        net_dtype = next(self.net.parameters()).dtype
        packed: dict = {"step": [self.state[p]["step"] for p in items]}
        for key in keys:
            packed[key] = [self.state[p][key].to(net_dtype) for p in items]
        deltas, new_state = self.net.updates(
            [p.detach().to(net_dtype) for p in items],
            [p.grad.to(net_dtype) for p in items],
            packed,
            lrs,
        )
        for i, (p, d) in enumerate(zip(items, deltas, strict=True)):
            p.sub_(d.to(p.dtype))
            state = self.state[p]
            state["step"] = new_state["step"][i]
            for key in keys:
                state[key] = new_state[key][i].to(p.dtype)
        return loss

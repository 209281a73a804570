r"""``SequenceTransformer``: a causal language model with a 1D relative positional encoding.

Axes: b batch, n tokens, c channels, v vocabulary.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..nn.block import RPETransformerEncoder, merge_attention_options
from ..ops.checks import eager_checks

__all__ = ["SequenceTransformer"]


class SequenceTransformer(nn.Module):
    r"""Causal (decoder-only) language model with O(n) attention and a 1D RPE.

    Token ``t`` attends to tokens ``s <= t`` of its sequence with an RPE ``f(t - s)`` of the
    token indices (positions ``0..n-1``, causal prefix sums; Choromanski et al., FLT,
    https://arxiv.org/abs/2302.01925; Performer, https://arxiv.org/abs/2009.14794); no
    absolute position embedding:

    .. math::

        h^{(0)}_t = E[w_t], \qquad h^{(L)} = \mathrm{CausalEncoder}(h^{(0)}, t), \qquad
        \mathrm{logits}_t = W_o h^{(L)}_t \quad (W_o = E \text{ when tied})

    ``logits[:, t]`` depends on ``tokens[:, :t + 1]`` only. Sequences are right-padded
    (``key_padding_mask`` True at padding); padded positions give logits 0.

    Args:
        vocab_size: vocabulary ``v``.
        embed_dim: channels (default 128).
        num_heads: attention heads (default 4).
        num_layers: transformer blocks (default 4).
        attention: ``"linear"`` (default) or ``"exact"`` (the O(n^2) causal baseline).
        rpe: 1D RPE registry name (default ``"flt-kernel"``) or ``None`` (no positional
            information but the causal order).
        rpe_options: options of the RPE.
        mode: ``"logit"``, ``"mask"`` or ``None`` (default: the RPE's first mode).
        kernel: kernel feature map (default ``None``: the layer's, ELU in mask mode,
            FAVOR+ otherwise).
        num_features: random kernel features (default 64).
        mlp_ratio: block MLP width ratio (default 4.0).
        dropout: dropout in the blocks and on the embeddings (default 0.0).
        max_len: longest sequence (default ``None``); only used to default
            ``toeplitz-fft``'s ``max_offset`` to ``max_len - 1``.
        tie_embeddings: the output projection is the embedding matrix (default ``True``).
        attention_options: further :class:`~geolinrpe.nn.RPEAttention` options.

    Shapes:
        ``tokens [b, n]`` long (or a dict with ``tokens`` and ``key_padding_mask``),
        ``key_padding_mask [b, n]`` bool (True = padding) -> logits ``[b, n, v]``.
    """

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int = 128,
        num_heads: int = 4,
        num_layers: int = 4,
        attention: str = "linear",
        rpe: str | None = "flt-kernel",
        rpe_options: dict | None = None,
        mode: str | None = None,
        kernel: str | None = None,
        num_features: int = 64,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        max_len: int | None = None,
        tie_embeddings: bool = True,
        attention_options: dict | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < 1:
            raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
        rpe_options = dict(rpe_options or {})
        if rpe == "toeplitz-fft" and "max_offset" not in rpe_options:
            if not isinstance(max_len, int) or max_len < 1:
                raise ValueError("rpe='toeplitz-fft' needs max_len (or rpe_options max_offset)")
            rpe_options["max_offset"] = max_len - 1
        self.vocab_size = vocab_size
        self.max_len = max_len
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.dropout = nn.Dropout(dropout)
        explicit = dict(
            rpe=rpe,
            pos_dim=1,
            mode=mode,
            kernel=kernel,
            num_features=num_features,
            rpe_options=rpe_options,
            causal=True,
        )
        options = merge_attention_options(explicit, attention_options)
        self.encoder = RPETransformerEncoder(
            num_layers, embed_dim, num_heads, mlp_ratio, dropout, attention, **options
        )
        self.head = None if tie_embeddings else nn.Linear(embed_dim, vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Reset every learnable parameter (RPE parameters included)."""
        nn.init.normal_(self.embedding.weight, std=self.embedding.embedding_dim**-0.5)
        self.encoder.reset_parameters()
        if self.head is not None:
            self.head.reset_parameters()

    def redraw(self, generator: torch.Generator | None = None) -> None:
        """Draw new random features in every attention layer."""
        self.encoder.redraw(generator)

    def forward(self, tokens: Tensor | Any, key_padding_mask: Tensor | None = None) -> Tensor:
        """Next-token logits ``[b, n, v]``; see the class docstring."""
        if isinstance(tokens, Mapping):
            if key_padding_mask is None:
                key_padding_mask = tokens.get("key_padding_mask")
            tokens = tokens["tokens"]
        if not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.dtype != torch.long:
            raise ValueError(f"tokens must be a long tensor [b, n], got {_describe(tokens)}")
        if tokens.shape[1] == 0:
            raise ValueError("tokens has no positions")
        valid = tokens if key_padding_mask is None else tokens[~key_padding_mask]
        if (
            eager_checks()  # token values are unknown while compiling or exporting
            and valid.numel()
            and (int(valid.min()) < 0 or int(valid.max()) >= self.vocab_size)
        ):
            raise ValueError(
                f"token ids must be in [0, {self.vocab_size}), got "
                f"[{int(valid.min())}, {int(valid.max())}]"
            )
        if self.max_len is not None and tokens.shape[1] > self.max_len:
            raise ValueError(f"sequence length {tokens.shape[1]} > max_len={self.max_len}")
        if key_padding_mask is not None:
            tokens = tokens.masked_fill(key_padding_mask, 0)
        h = self.dropout(self.embedding(tokens))
        n = tokens.shape[1]
        pos = torch.arange(n, device=h.device, dtype=h.dtype).view(1, n, 1)
        h = self.encoder(h, pos.expand(tokens.shape[0], n, 1), None, key_padding_mask)
        logits = h @ self.embedding.weight.T if self.head is None else self.head(h)
        if key_padding_mask is not None:
            logits = logits.masked_fill(key_padding_mask.unsqueeze(-1), 0.0)
        return logits


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"{value.dtype} {list(value.shape)}"
    return type(value).__name__

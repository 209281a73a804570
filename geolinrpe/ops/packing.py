"""Packed <-> padded layouts.

A packed batch holds the tokens of G graphs in one tensor ``x [n, ...]`` with a sorted
``batch [n]`` vector (PyG's convention); a padded batch holds ``x [G, L, ...]`` with
``key_padding_mask [G, L]`` (``True`` = padding).

:class:`PaddedBuckets` groups the graphs of a packed batch by size into dense buckets so
that padding never more than doubles the memory (graphs sorted by size, a new bucket
whenever padding would exceed ``max_waste`` x the bucket's tokens).
"""

from __future__ import annotations

import torch
from torch import Tensor


def to_padded(x: Tensor, batch: Tensor, num_graphs: int | None = None) -> tuple[Tensor, Tensor]:
    """``x [n, ...]`` -> ``(dense [G, L, ...], key_padding_mask [G, L])``; padding is zero."""
    counts = torch.bincount(batch, minlength=num_graphs or 0)
    num_graphs = counts.numel()
    max_len = int(counts.max()) if num_graphs else 0
    ptr = torch.cumsum(counts, 0) - counts
    local = torch.arange(batch.numel(), device=x.device) - ptr[batch]
    dense = x.new_zeros((num_graphs, max_len) + tuple(x.shape[1:]))
    dense[batch, local] = x
    mask = torch.arange(max_len, device=x.device)[None] >= counts[:, None]
    return dense, mask


def to_packed(dense: Tensor, key_padding_mask: Tensor) -> tuple[Tensor, Tensor]:
    """``dense [G, L, ...]`` and its mask -> ``(x [n, ...], batch [n])``."""
    valid = ~key_padding_mask
    batch = torch.arange(dense.shape[0], device=dense.device)[:, None].expand_as(valid)[valid]
    return dense[valid], batch


class PaddedBuckets:
    """Dense buckets of the graphs in a packed batch.

    Args:
        batch: sorted graph ids ``[n]`` (validated by the caller).
        max_waste: start a new bucket when ``graphs x longest > max_waste x tokens``.

    Attributes:
        buckets: list of ``(index [g, L], key_padding_mask [g, L])``; ``index`` holds the
            packed row of each slot (0 at padding).
    """

    def __init__(self, batch: Tensor, max_waste: float = 2.0) -> None:
        counts = torch.bincount(batch)
        ptr = torch.cumsum(counts, 0) - counts
        order = torch.argsort(counts, descending=True, stable=True)
        sizes = counts[order].tolist()
        self.num_tokens = batch.numel()
        self.buckets: list[tuple[Tensor, Tensor]] = []
        start = 0
        while start < len(sizes):
            longest, tokens, end = sizes[start], 0, start
            while end < len(sizes) and (end + 1 - start) * longest <= max_waste * (
                tokens + sizes[end]
            ):
                tokens += sizes[end]
                end += 1
            graphs = order[start:end]
            slots = torch.arange(longest, device=batch.device)
            mask = slots[None] >= counts[graphs][:, None]
            index = (ptr[graphs][:, None] + slots[None]).masked_fill(mask, 0)
            self.buckets.append((index, mask))
            start = end

    def gather(self, x: Tensor, index: Tensor, mask: Tensor) -> Tensor:
        """Rows of packed ``x [n, ...]`` as a bucket ``[g, L, ...]`` (zero at padding)."""
        dense = x[index]
        return dense.masked_fill(mask.view(mask.shape + (1,) * (x.dim() - 1)), 0)

    def scatter(self, out: Tensor, dense: Tensor, index: Tensor, mask: Tensor) -> None:
        """Write a bucket's valid rows back into packed ``out [n, ...]``."""
        out[index[~mask]] = dense[~mask]

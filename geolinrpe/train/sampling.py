r"""Which items each process reads at each step: reproducible, resumable epoch orders.

* :class:`EpochSampler` (``data.balance: graphs``): epoch ``e`` visits the training split in
  the order of ``torch.randperm`` seeded with ``seed + e``, padded to a multiple of the
  process count; process ``r`` of ``P`` takes every ``P``-th item of each global batch.
* :class:`AtomBalancedBatchSampler` (``data.balance: atoms``): the same global batches,
  each shared between processes by :func:`split_by_atoms` so that their atom counts differ
  by at most the batch's largest graph; :func:`item_sizes` gives the atom counts.

Both skip the batches already done when a run resumes mid-epoch.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

__all__ = ["AtomBalancedBatchSampler", "EpochSampler", "item_sizes", "split_by_atoms"]


class EpochSampler(Sampler[int]):
    """This process's share of an epoch's order, reproducible from ``(seed, epoch)``.

    The order is ``torch.randperm(n)`` seeded with ``seed + epoch`` (``arange`` without
    ``shuffle``), padded by wrapping around to a multiple of ``world_size`` when ``pad``
    (every process then takes the same number of batches), and process ``rank`` takes
    positions ``rank, rank + world_size, ...``: with a per-process batch of ``B / P``, the
    processes' ``k``-th batches together are the ``k``-th batch of size ``B`` of a one-process
    run. ``set_epoch(e, skip)`` starts epoch ``e`` after its first ``skip`` indices of this
    process (resuming mid-epoch).
    """

    def __init__(
        self,
        n: int,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        pad: bool = True,
    ) -> None:
        self.n, self.shuffle, self.seed = n, shuffle, seed
        self.rank, self.world_size, self.pad = rank, world_size, pad
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Iterate over epoch ``epoch``'s order, leaving out its first ``skip`` indices."""
        self.epoch, self.skip = epoch, skip

    def indices(self) -> list[int]:
        """This process's indices of the current epoch, before skipping."""
        return self.order()[self.rank :: self.world_size]

    def order(self) -> list[int]:
        """The current epoch's order of all processes (padded when ``pad``)."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        if self.pad and self.n % self.world_size:
            extra = self.world_size - self.n % self.world_size
            order += (order * math.ceil(extra / max(self.n, 1)))[:extra]
        return order

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.skip :])

    def __len__(self) -> int:
        return max(len(self.indices()) - self.skip, 0)


def split_by_atoms(sizes: Sequence[int], parts: int) -> list[list[int]]:
    """Share items between ``parts`` processes so that their size totals are as equal as
    greedy allows: items in decreasing size (earlier first on a tie) each go to the part
    with the least total so far (then the fewest items, then the lowest rank); every part's
    positions are returned in increasing order.

    Deterministic (the same on every process). Every part gets at least one item, and the
    largest and smallest totals differ by at most ``max(sizes)`` (the item that last made
    the largest part the largest went to the then least-loaded part).

    Args:
        sizes: ``[g]`` non-negative sizes (atoms per graph) with ``g >= parts``.
        parts: the number of parts (processes).

    Returns:
        ``parts`` lists of positions into ``sizes``, together each position once.

    Raises:
        ValueError: fewer items than ``parts``.
    """
    if len(sizes) < parts:
        raise ValueError(f"cannot split {len(sizes)} items into {parts} non-empty parts")
    heap = [(0, 0, r) for r in range(parts)]  # (total, items, rank)
    shares: list[list[int]] = [[] for _ in range(parts)]
    for pos in sorted(range(len(sizes)), key=lambda i: (-int(sizes[i]), i)):
        total, count, r = heapq.heappop(heap)
        shares[r].append(pos)
        heapq.heappush(heap, (total + int(sizes[pos]), count + 1, r))
    return [sorted(share) for share in shares]


class AtomBalancedBatchSampler(Sampler[list[int]]):
    """This process's batches of an epoch with the atoms of every step balanced over the
    processes (``data.balance: atoms``).

    The epoch's order is :class:`EpochSampler`'s (``torch.randperm`` seeded with
    ``seed + epoch``, padded by wrapping around to a multiple of ``world_size``), cut into
    global batches of ``batch_size`` consecutive items, exactly those of a one-process run
    (the last one shorter). Each global batch is shared between the ``world_size``
    processes by :func:`split_by_atoms` (largest graph first to the least-loaded process;
    atom totals within the batch's largest graph of each other, each process at least one
    graph) and process ``rank`` takes its share, in batch order: every process runs
    ``ceil(padded n / batch_size)`` steps per epoch (as with :class:`EpochSampler`), each
    step's atoms are balanced (the processes synchronise at every step), and the numbers
    of graphs differ between processes.

    ``set_epoch(e, skip)`` starts epoch ``e`` after its first ``skip`` batches (resuming
    mid-epoch: ``skip`` = batches already done).

    Args:
        sizes: ``[n]`` atoms (nodes) of every item of the dataset.
        batch_size: the global batch (a multiple of ``world_size``).
        shuffle, seed, rank, world_size: as :class:`EpochSampler`.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < world_size:
            raise ValueError(
                f"config key 'data.batch_size' ({batch_size}) is smaller than the number of "
                f"processes ({world_size})"
            )
        self.sizes = [int(s) for s in sizes]
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.skip = 0, 0
        self._cache: tuple[int, list[list[int]]] | None = None

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Iterate over epoch ``epoch``'s batches, leaving out its first ``skip``."""
        self.epoch, self.skip = epoch, skip

    def global_batches(self) -> list[list[int]]:
        """The current epoch's global batches (item indices), the same on every process."""
        sampler = EpochSampler(len(self.sizes), self.shuffle, self.seed, 0, self.world_size)
        sampler.set_epoch(self.epoch)
        full = sampler.order()
        return [full[i : i + self.batch_size] for i in range(0, len(full), self.batch_size)]

    def batches(self) -> list[list[int]]:
        """This process's batches of the current epoch, before skipping."""
        if self._cache is None or self._cache[0] != self.epoch:
            mine = []
            for batch in self.global_batches():
                share = split_by_atoms([self.sizes[i] for i in batch], self.world_size)
                mine.append([batch[k] for k in share[self.rank]])
            self._cache = (self.epoch, mine)
        return self._cache[1]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches()[self.skip :])

    def __len__(self) -> int:
        return max(len(self.batches()) - self.skip, 0)


def item_sizes(dataset: Dataset) -> list[int]:
    """Atoms (nodes) of every item of ``dataset``, ``[n]``: from the slices of a PyG
    :class:`~torch_geometric.data.InMemoryDataset` (QM9; through ``Subset`` and index
    views) without building the items, otherwise each item's ``num_nodes`` (reads every
    item once)."""
    from torch.utils.data import Subset

    if isinstance(dataset, Subset):
        base = item_sizes(dataset.dataset)
        return [base[int(i)] for i in dataset.indices]
    slices = getattr(dataset, "slices", None)
    if isinstance(slices, dict) and hasattr(dataset, "indices") and callable(dataset.indices):
        for key in ("pos", "z", "x"):
            ptr = slices.get(key)
            if isinstance(ptr, Tensor) and ptr.dim() == 1 and len(ptr) > 1:
                counts = (ptr[1:] - ptr[:-1]).tolist()
                return [int(counts[int(i)]) for i in dataset.indices()]
    return [int(dataset[i].num_nodes) for i in range(len(dataset))]


# ----------------------------------------------------------------------------- schedule

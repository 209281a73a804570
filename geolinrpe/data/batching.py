r"""Collate lists of PyG ``Data`` into the library's two batch layouts.

Axes: b graphs, n tokens (atoms, patches, points), L longest graph.

* packed (:func:`collate_packed`): PyG's ``Batch`` -- node fields concatenated ``[n, ...]``
  with ``batch [n]``; the layout of ``RPEAttention(x, pos, batch=...)``.
* padded (:func:`collate_padded`): a dict of dense ``[b, L, ...]`` node fields, zero at
  padding, with ``key_padding_mask [b, L]`` (``True`` = padding); the layout of
  ``RPEAttention(x, pos, key_padding_mask=...)``. The two hold the same values:
  ``geolinrpe.ops.packing.to_packed(padded[k], padded["key_padding_mask"])`` gives back the
  packed field and ``batch``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader
from torch_geometric.data import Batch, Data

from ..ops.packing import to_padded

__all__ = ["DenseDataLoader", "PaddedCollater", "collate_packed", "collate_padded"]


def collate_packed(data_list: Sequence[Data]) -> Batch:
    r"""``Batch.from_data_list``: node fields ``[n, ...]``, ``batch [n]``, ``ptr [b + 1]``;
    graph fields of shape ``[1, ...]`` concatenated to ``[b, ...]``, strings to lists."""
    if len(data_list) == 0:
        raise ValueError("cannot collate an empty list of graphs")
    return Batch.from_data_list(list(data_list))


def _is_node_field(values: list, counts: list[int]) -> bool:
    """A tensor field whose first dimension is the node count in every graph."""
    return all(
        isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] == c
        for v, c in zip(values, counts, strict=True)
    )


def collate_padded(
    data_list: Sequence[Data],
    keys: Sequence[str] | None = None,
    graph_keys: Sequence[str] | None = None,
) -> dict[str, Any]:
    r"""Pad node fields to dense ``[b, L, ...]`` and stack graph fields.

    Args:
        data_list: graphs (all with the same fields).
        keys: node fields to pad (e.g. ``("x", "pos")``; each must exist). ``None``:
            every tensor field whose first dimension equals the graph's node count in every
            graph (fields named ``*edge*``, ``*face*``, ``*index*`` excluded), minus
            ``graph_keys``. When every graph has the same node count ``c``, a graph field
            of first dimension ``c`` is ambiguous: name it in ``graph_keys``.
        graph_keys: graph fields to stack (``None``: every other tensor field with the same
            shape in every graph).

    Returns:
        A dict with, for each node field, ``[b, L, ...]`` (zero at padding);
        ``key_padding_mask [b, L]`` bool (``True`` = padding); ``num_nodes [b]`` long;
        graph fields concatenated along dim 0 when each is ``[1, ...]`` (PyG's convention:
        ``y [1]`` -> ``[b]``, ``cell [1, 3, 3]`` -> ``[b, 3, 3]``), stacked otherwise; and
        every remaining field (strings, edge lists, tensors of varying shape) as a list of
        ``b`` values, so nothing is dropped.
    """
    data_list = list(data_list)
    if not data_list:
        raise ValueError("cannot collate an empty list of graphs")
    fields = list(data_list[0].keys())
    for g, data in enumerate(data_list[1:], 1):
        if set(data.keys()) != set(fields):
            raise ValueError(
                f"graph {g} has fields {sorted(data.keys())}, graph 0 has {sorted(fields)}"
            )
    counts = [int(data.num_nodes) for data in data_list]
    graph_keys = list(graph_keys or [])
    for key in graph_keys:
        if key not in fields:
            raise KeyError(f"graph key {key!r} is not a field of the graphs ({sorted(fields)})")
    if keys is None:
        keys = [
            k
            for k in fields
            if k not in graph_keys
            and not any(word in k for word in ("edge", "face", "index"))
            and _is_node_field([d[k] for d in data_list], counts)
        ]
    else:
        keys = list(keys)
        for key in keys:
            if key not in fields:
                raise KeyError(f"node key {key!r} is not a field of the graphs ({sorted(fields)})")
            if not _is_node_field([d[key] for d in data_list], counts):
                raise ValueError(f"field {key!r} is not [num_nodes, ...] in every graph")
    batch = torch.repeat_interleave(torch.arange(len(data_list)), torch.tensor(counts))
    out: dict[str, Any] = {}
    mask = None
    for key in keys:
        dense, mask = to_padded(torch.cat([d[key] for d in data_list]), batch, len(data_list))
        out[key] = dense
    if mask is None:  # no node fields: the mask still describes the graphs
        max_len = max(counts)
        mask = torch.arange(max_len)[None] >= torch.tensor(counts)[:, None]
    out["key_padding_mask"] = mask
    out["num_nodes"] = torch.tensor(counts, dtype=torch.long)
    for key in fields:
        if key in keys:
            continue
        values = [d[key] for d in data_list]
        same_shape = all(isinstance(v, Tensor) for v in values) and all(
            v.shape == values[0].shape for v in values
        )
        if key in graph_keys and not same_shape:
            raise ValueError(f"graph field {key!r} has different shapes across graphs")
        if same_shape:
            one_row = values[0].dim() >= 1 and values[0].shape[0] == 1
            out[key] = torch.cat(values) if one_row else torch.stack(values)
        else:
            out[key] = values
    return out


class PaddedCollater:
    r"""A picklable ``collate_fn`` for :class:`torch.utils.data.DataLoader`:
    ``PaddedCollater(keys, graph_keys)(data_list) == collate_padded(data_list, keys, graph_keys)``.
    """

    def __init__(
        self, keys: Sequence[str] | None = None, graph_keys: Sequence[str] | None = None
    ) -> None:
        self.keys = None if keys is None else tuple(keys)
        self.graph_keys = None if graph_keys is None else tuple(graph_keys)

    def __call__(self, data_list: Sequence[Data]) -> dict[str, Any]:
        return collate_padded(data_list, self.keys, self.graph_keys)


class DenseDataLoader(DataLoader):
    r"""A :class:`torch.utils.data.DataLoader` over a dataset of ``Data`` that yields padded
    batches (:func:`collate_padded` dicts). Graphs may differ in size, unlike
    :class:`torch_geometric.loader.DenseDataLoader`, which needs equal sizes.

    Args:
        dataset: a dataset of ``Data``.
        batch_size: graphs per batch.
        shuffle: reshuffle every epoch.
        keys: node fields to pad (see :func:`collate_padded`).
        graph_keys: graph fields to stack.
        **kwargs: other :class:`~torch.utils.data.DataLoader` arguments.
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int = 1,
        shuffle: bool = False,
        keys: Sequence[str] | None = None,
        graph_keys: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> None:
        if "collate_fn" in kwargs:
            raise ValueError("DenseDataLoader sets collate_fn itself")
        collate: Callable = PaddedCollater(keys, graph_keys)
        super().__init__(
            dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=collate, **kwargs
        )

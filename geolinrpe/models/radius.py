r"""Radius and k-nearest-neighbour graphs in pure PyTorch (no ``torch-cluster`` or ``pyg-lib``).

Axes: n nodes (atoms, points), g graphs, e edges, k lattice images, p position dim.

* :func:`radius_graph`: every pair of nodes of the same graph closer than ``r``, in PyG's
  ``edge_index`` convention (``flow="source_to_target"``: ``edge_index = [j, i]``, messages
  flow from neighbour ``j`` to centre ``i``).
* :func:`knn_graph`: the ``k`` nearest nodes of the same graph (cell lists with a growing
  search radius, or all pairs), distance ties to the lower index.
* :func:`radius_graph_pbc`: the same under periodic boundary conditions: one edge per periodic
  image of ``j`` within ``r`` of ``i``, with its lattice shift.
* :class:`RadiusInteractionGraph`: a module returning ``(edge_index, edge_weight)``, what
  ``torch_geometric.nn.models.SchNet`` expects from its ``interaction_graph``.

Both functions are deterministic: edges come sorted by centre ``i``, then neighbour ``j``
(then image), and ``max_num_neighbors`` keeps the *nearest* neighbours of each centre, where
``torch-cluster`` keeps whichever it finds first.

Neighbour cap and ties (the rule of fairchem's ``enforce_max_strictly=False``): with
``max_num_neighbors = k`` a centre keeps every neighbour ``j`` with
``d_ij <= d_k + tie_tolerance``, ``d_k`` its ``k``-th smallest distance (all of them when it
has at most ``k``), so the cap never cuts through a shell of (near-)equidistant atoms and a
centre may keep more than ``k`` neighbours. Default ``tie_tolerance=0.01`` (in the unit of
``pos``; fairchem's degeneracy tolerance in Angstrom). A strict cap that cuts ties by index
(``tie_tolerance=None``, the behaviour of earlier versions) makes the edge set jump when an atom
of a perfect lattice moves by any amount, so the energy is not differentiable there and
autograd forces disagree with finite differences of the energy (0.2-5 eV/A on a Cu(111) slab
with a cutoff of 5 A). With the tolerance the edge set is locally constant around symmetric
structures (displacements below ``tie_tolerance / 2`` keep it), and forces equal finite
differences of the energy wherever no neighbour crosses the cap distance ``d_k +
tie_tolerance``; only ``max_num_neighbors=None`` (no cap) makes the edge set change only at
the cutoff ``r``, where the models' cosine envelopes vanish with their first derivative. Memory is
bounded by ``max_pairs``: centres are processed in chunks whose candidate pairs add up to at
most ``max_pairs`` (or one centre).

Candidates (``method=...`` of :func:`radius_graph` and :func:`radius_graph_pbc`; the edges,
their order and the shifts are the same whichever finds them, the same distances and rules
decide):

* ``"all"``: every pair of each graph: O(sum_g n_g^2) work (times the images in range for
  :func:`radius_graph_pbc`); the reference.
* ``"cells"``: cell lists. The nodes are sorted by the key of their cubic cell of side
  ``r / CELL_SPLIT`` (graph, then cell coordinates, the last axis fastest), so a centre's
  candidates are ``(2 CELL_SPLIT + 1)^(p - 1)`` contiguous ranges of that order, read from a
  table of cell starts and trimmed to the cells that the ball of radius ``r`` can meet from
  the centre's sub-cell (``SUBCELLS`` per axis): O(n) work and O(edges) memory for clouds of
  bounded density, about 2.9 candidates per edge. Pairs are filtered by distance before they
  are sorted by ``(centre, neighbour)``. Periodic: the images of the atoms within ``r`` of
  the graph's bounding box are the data points.
* ``"vesin"``: vesin-torch's compiled neighbour list (optional extra ``fast``), padded
  cutoff, then the same distance, loop, cap and sorting rules.
* ``"auto"`` (default): ``"all"`` for graphs of at most ``CELL_LIST_MIN`` nodes, above it
  ``"vesin"`` when vesin-torch is importable (CPU tensors, ``p <= 3``), else ``"cells"``.
  :func:`knn_graph` has ``"all"`` and ``"cells"`` (a search radius holding about
  ``KNN_FILL (k + 1)`` nodes, doubled for the nodes that find fewer than ``k``).

Measured with ``benchmarks/neighbour_search.py`` (3D uniform clouds at 0.45 points per unit
volume, r = 2: about 14 neighbours per point; float32; 2 CPU cores, 2 torch threads):
``radius_graph`` at 4,096 / 16,384 / 100,000 points 7 / 25 / 257 ms with cells, 6 / 22 /
158 ms with vesin, 0.58 / 12.8 s / - with all pairs; ``knn_graph`` (k = 16) 17 / 97 /
550 ms (all pairs 1.3 / 18.9 s); ``radius_graph_pbc`` (cubic periodic box, cap 32) at 1,000 /
4,096 / 16,384 atoms 4 / 9 / 41 ms with cells, about the same with vesin, 0.79 s / - / - with
all pairs. Every edge set equal to the reference. Results: ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "CELL_LIST_MIN",
    "MAX_PAIRS",
    "RadiusInteractionGraph",
    "knn_graph",
    "radius_graph",
    "radius_graph_pbc",
]

FLOWS = ("source_to_target", "target_to_source")
#: default bound on the candidate pairs held at once (about 100 MB of float32 differences)
MAX_PAIRS = 1 << 22


def _check(pos: Tensor, r: float, batch: Tensor | None, max_num_neighbors, flow: str) -> Tensor:
    """Validate the common arguments; return ``batch`` (zeros when ``None``)."""
    if not isinstance(pos, Tensor) or pos.dim() != 2 or not pos.is_floating_point():
        raise ValueError(f"pos must be a floating tensor [n, p], got {getattr(pos, 'shape', pos)}")
    if not (isinstance(r, (int, float)) and math.isfinite(r) and r > 0):
        raise ValueError(f"r must be a positive finite number, got {r!r}")
    if max_num_neighbors is not None and (
        not isinstance(max_num_neighbors, int)
        or isinstance(max_num_neighbors, bool)
        or max_num_neighbors <= 0
    ):
        raise ValueError(
            f"max_num_neighbors must be a positive int or None, got {max_num_neighbors!r}"
        )
    if flow not in FLOWS:
        raise ValueError(f"flow must be one of {FLOWS}, got {flow!r}")
    if batch is None:
        return torch.zeros(pos.shape[0], dtype=torch.long, device=pos.device)
    if batch.shape != (pos.shape[0],) or batch.dtype != torch.long:
        raise ValueError(
            f"batch must be a long tensor of shape [{pos.shape[0]}], "
            f"got {batch.dtype} {list(batch.shape)}"
        )
    if batch.numel() and (int(batch[0]) < 0 or bool((batch[1:] < batch[:-1]).any())):
        raise ValueError("batch must be sorted and non-negative")
    return batch


def _check_tolerance(tie_tolerance) -> None:
    if tie_tolerance is not None and not (
        isinstance(tie_tolerance, (int, float))
        and not isinstance(tie_tolerance, bool)
        and math.isfinite(tie_tolerance)
        and tie_tolerance >= 0
    ):
        raise ValueError(
            f"tie_tolerance must be a non-negative finite number or None, got {tie_tolerance!r}"
        )


def _nearest(centre: Tensor, dist2: Tensor, k: int | None, tie_tolerance: float | None) -> Tensor:
    """Mask ``[e]`` of the edges kept by the cap: per centre, those with distance ``<= d_k +
    tie_tolerance`` (``d_k`` the ``k``-th smallest; all when fewer than ``k``), or with
    ``tie_tolerance=None`` exactly the ``k`` nearest, distance ties to the earlier edge.
    ``centre [e]`` must be sorted (edges grouped by centre), ``dist2 [e]`` squared distances.
    Only the centres with more than ``k`` edges are sorted."""
    keep = torch.ones_like(centre, dtype=torch.bool)
    if k is None or centre.numel() == 0:
        return keep
    base = int(centre[0])
    count = torch.bincount(centre - base)
    if int(count.max()) <= k:
        return keep
    over = (count > k).repeat_interleave(count).nonzero().squeeze(1)  # of crowded centres
    centre, dist2 = centre[over], dist2[over]
    order = torch.argsort(dist2, stable=True)
    order = order[torch.argsort(centre[order], stable=True)]  # by centre, distance, position
    grouped = centre[order]
    first = torch.searchsorted(grouped, grouped)  # where each edge's centre group starts
    sub = torch.zeros_like(centre, dtype=torch.bool)
    if tie_tolerance is None:
        rank = torch.arange(centre.numel(), device=centre.device) - first
        sub[order[rank < k]] = True
    else:
        dist = dist2[order].sqrt()
        kth = (first + k - 1).clamp(max=centre.numel() - 1)
        has_k = grouped[kth] == grouped  # the group has at least k edges
        bound = torch.where(has_k, dist[kth] + tie_tolerance, torch.full_like(dist, math.inf))
        sub[order[dist <= bound]] = True
    keep[over] = sub
    return keep


def _sort_edges(i: Tensor, key: Tensor, span: int, grouped: bool = True) -> Tensor:
    """Permutation sorting edges by ``(i, key)``, ``0 <= key < span``. With ``i`` sorted
    (``grouped``), blocks of centres whose ``(i - first) * span + key`` fit int32 are sorted
    separately, twice as fast as one int64 sort."""
    if i.numel() == 0:
        return i
    per_block = (2**31 - 1) // span
    if grouped:
        first, last = int(i[0]), int(i[-1])
    else:
        first, last = int(i.min()), int(i.max())
    if per_block < 1 or (not grouped and last - first >= per_block):
        return torch.argsort(i * span + key)
    if last - first < per_block:
        return torch.argsort(((i - first) * span + key).int(), stable=True)
    bounds = torch.arange(first, last + 1, per_block, device=i.device)
    ends = [*torch.searchsorted(i, bounds).tolist(), i.numel()]
    out = []
    for block, (lo, hi) in enumerate(zip(ends[:-1], ends[1:], strict=True)):
        if hi > lo:
            local = (i[lo:hi] - int(bounds[block])) * span + key[lo:hi]
            out.append(torch.argsort(local.int(), stable=True) + lo)
    return torch.cat(out)


def _chunks(cost: Tensor, max_pairs: int) -> list[tuple[int, int]]:
    """Consecutive ranges of centres whose summed ``cost`` is at most ``max_pairs`` (or one
    centre)."""
    ends = torch.cumsum(cost, 0)
    out, start = [], 0
    while start < cost.numel():
        base = int(ends[start - 1]) if start else 0
        end = max(int(torch.searchsorted(ends, base + max_pairs, right=True)), start + 1)
        out.append((start, end))
        start = end
    return out


def _squared_distances(data: Tensor, j: Tensor, query: Tensor, i: Tensor) -> Tensor:
    """``|data_j - query_i|^2`` from coordinate columns ``data [p, m]``, ``query [p, n]``:
    bit for bit ``(data.T[j] - query.T[i]).pow(2).sum(-1)``, with 1D gathers."""
    out = None
    for axis in range(data.shape[0]):
        diff = data[axis].index_select(0, j) - query[axis].index_select(0, i)
        out = diff * diff if out is None else out + diff * diff
    return out


def _take(index: Tensor, *tensors: Tensor) -> list[Tensor]:
    """``[t[index] for t in tensors]`` by ``index_select`` (faster for 1D gathers)."""
    return [t.index_select(0, index) for t in tensors]


def _cell_candidates(
    pos: Tensor,
    batch: Tensor,
    r: float,
    data: Tensor | None = None,
    data_batch: Tensor | None = None,
    split: int = 1,
):
    """Cell lists: for each node of ``pos`` (the centres), the nodes of ``data`` (default:
    ``pos`` itself) of its graph in the cells of side ``r / split`` within ``split`` cells of
    its own along every axis (every pair closer than ``r`` is among them).

    The data nodes are sorted by cell key (graph, then cell coordinates, the last axis
    fastest), so the ``2 split + 1`` cells along the last axis around a centre's are one
    contiguous range of that order: a centre has ``(2 split + 1)^(p - 1)`` ranges, read from
    a table of cell starts (or found by binary search over the sorted keys when the box has
    many more cells than nodes).

    Returns ``(cost [n], pairs, order)`` with ``pairs(start, end, centres=None) -> (i, s,
    dist2)``: the candidate pairs of centres ``start .. end - 1`` (or of the centre indices
    ``centres``), grouped by centre in that order, ``s`` the position of the data node in
    ``order`` (data node ``order[s]``; not sorted within a centre: sort after the distance
    filter, which leaves far fewer) and ``dist2`` their squared distance; or ``None`` when the
    cell keys would overflow int64 (then use all pairs of each graph). O(n) time for bounded
    density (O(n log n) with binary search), memory O(candidates) per chunk."""
    if data is None:
        data, data_batch = pos, batch
    p, device = pos.shape[1], pos.device
    graphs = max(int(batch[-1]), int(data_batch[-1])) + 1
    both, both_batch = torch.cat([pos, data]).double(), torch.cat([batch, data_batch])
    lo = torch.full((graphs, p), math.inf, dtype=torch.float64, device=device)
    lo = lo.scatter_reduce(0, both_batch[:, None].expand(-1, p), both, "amin")
    # the side is widened by a relative 1e-6, so that float rounding of the distances
    # (pos in float32: a relative ~1e-7) can never put a pair closer than r beyond ``split``
    # cells; cell coordinates in float64
    side = r * (1 + 1e-6) / split
    unit = (both - lo[both_batch]) / side  # coordinates in cells
    cell = torch.floor(unit).long() + split  # >= split
    dims = (cell.max(0).values + split + 1).tolist()  # cell + split < dims
    cells = graphs * math.prod(dims)
    if cells >= 2**62:
        return None
    strides = [math.prod(dims[axis + 1 :]) for axis in range(p)]
    key = both_batch * math.prod(dims)
    for axis in range(p):
        key += cell[:, axis] * strides[axis]
    own, other = key[: pos.shape[0]], key[pos.shape[0] :]
    order = torch.argsort(other, stable=True)
    steps = torch.arange(-split, split + 1, device=device)
    if p > 1:
        offsets = torch.cartesian_prod(*[steps] * (p - 1)).reshape(-1, p - 1)
        delta = (offsets * torch.tensor(strides[:-1], device=device)).sum(1)
    else:
        offsets = torch.zeros(1, 0, dtype=torch.long, device=device)
        delta = torch.zeros(1, dtype=torch.long, device=device)
    # Trimmed ranges: each cell is cut into SUBCELLS^p sub-cells; for a centre anywhere in a
    # sub-cell, a column of cells (offsets along the first p - 1 axes) is skipped when the
    # ball of radius split cells (r is split / (1 + 1e-6) of them) cannot meet it, and its
    # range along the last axis is cut to the cells that the ball can meet: a table
    # [sub-cells, columns] of first and one-past-last cell offsets.
    q = SUBCELLS
    corner = torch.cartesian_prod(*[torch.arange(q, device=device)] * p).reshape(-1, p)
    near, far = corner.double() / q, (corner + 1).double() / q  # sub-cell bounds in a cell
    off = offsets.double()[None]  # [1, ranges, p - 1]
    gap = torch.where(
        off > 0,
        off - far[:, None, : p - 1],
        torch.where(off < 0, near[:, None, : p - 1] - off - 1, torch.zeros_like(off)),
    )
    gap2 = gap.clamp_min(0).pow(2).sum(-1)  # [sub-cells, ranges]: least squared distance
    half = (split * split - gap2).clamp_min(0).sqrt()
    below = torch.floor(near[:, p - 1 :] - half).clamp_min(-split).long()
    above = torch.floor(far[:, p - 1 :] + half).clamp_max(split).long()
    above = torch.where(gap2 < split * split, above, below - 1)  # empty ranges
    low_table, high_table = delta + below, delta + above + 1  # [sub-cells, ranges]
    u = unit[: pos.shape[0]]
    sub = ((u - torch.floor(u)) * q).long().clamp(0, q - 1)  # [n, p]
    sub = (sub * torch.tensor([q ** (p - 1 - a) for a in range(p)], device=device)).sum(1)
    low = own[:, None] + low_table.index_select(0, sub)  # [n, ranges]: first cell of each
    high = own[:, None] + high_table.index_select(0, sub)  # one past the last
    if cells <= 8 * both.shape[0] + 4096:  # a table of where each cell starts
        table = torch.zeros(cells + 1, dtype=torch.long, device=device)
        table[1:] = torch.cumsum(torch.bincount(other, minlength=cells), 0)
        first = table.index_select(0, low.reshape(-1)).view(low.shape)
        size = table.index_select(0, high.reshape(-1)).view(high.shape) - first
    else:
        other = other[order]
        first = torch.searchsorted(other, low)
        size = torch.searchsorted(other, high) - first
    cost = size.sum(1)
    columns = data[order].T.contiguous()  # [p, m] in cell order
    query = pos.T.contiguous()

    def pairs(start: int, end: int, centres: Tensor | None = None):
        if centres is None:
            lo_, size_, cost_ = first[start:end], size[start:end], cost[start:end]
            at = query[:, start:end]
        else:
            lo_, size_, cost_ = first[centres], size[centres], cost[centres]
            at = query.index_select(1, centres)
        size_ = size_.reshape(-1)
        total = int(cost_.sum())
        jump = lo_.reshape(-1) - (torch.cumsum(size_, 0) - size_)
        s = torch.arange(total, device=device)
        s += torch.repeat_interleave(jump, size_, output_size=total)
        row = torch.repeat_interleave(cost_, output_size=total)  # centre of each, in chunk
        i = row + start if centres is None else centres.index_select(0, row)
        dist2 = None
        for axis in range(p):
            diff = columns[axis].index_select(0, s) - at[axis].index_select(0, row)
            dist2 = diff * diff if dist2 is None else dist2 + diff * diff
        return i, s, dist2

    return cost, pairs, order


def _all_pairs(pos: Tensor, batch: Tensor):
    """Every pair of nodes of the same graph: ``(cost [n], pairs, None)`` as
    :func:`_cell_candidates` (``s = j``, sorted by centre then neighbour)."""
    counts = torch.bincount(batch)
    ptr = torch.cumsum(counts, 0) - counts
    cost = counts[batch]
    columns = pos.T.contiguous()

    def pairs(first: int, last: int, centres: Tensor | None = None):
        if centres is None:
            centres = torch.arange(first, last, device=batch.device)
        c = cost[centres]
        i = centres.repeat_interleave(c)
        local = torch.arange(i.numel(), device=batch.device) - torch.repeat_interleave(
            torch.cumsum(c, 0) - c, c
        )
        j = ptr[batch[i]] + local
        return i, j, _squared_distances(columns, j, columns, i)

    return cost, pairs, None


#: graphs larger than this use cell lists (or vesin) in ``method="auto"``
CELL_LIST_MIN = 256
METHODS = ("auto", "cells", "all", "vesin")
KNN_METHODS = ("auto", "cells", "all")
#: cells per cutoff ``r`` along each axis in the cell lists
CELL_SPLIT = 2
#: sub-cells per cell along each axis for trimming the candidate ranges
SUBCELLS = 4
#: ``knn_graph``'s first search radius holds about ``KNN_FILL (k + 1)`` nodes on average
KNN_FILL = 2.0

_VESIN: object = None  # the vesin-torch module, False when not importable, None: not checked


def _vesin():
    """The ``vesin_torch`` module (optional extra ``fast``), or ``None`` when not importable."""
    global _VESIN
    if _VESIN is None:
        try:
            import vesin_torch as module
        except ImportError:
            try:
                import vesin.torch as module
            except ImportError:
                module = False
        _VESIN = module
    return _VESIN or None


def _need_vesin():
    module = _vesin()
    if module is None:
        raise ImportError('method="vesin" needs vesin-torch: pip install "geolinrpe[fast]"')
    return module


#: relative widening of the cutoff given to vesin (it works in float64; our distances, in
#: pos's dtype, then decide): a pair we keep can never be one it leaves out
VESIN_PAD = 1e-5


def _vesin_pairs(pos: Tensor, batch: Tensor, r: float) -> tuple[Tensor, Tensor]:
    """Candidate pairs ``(i, j)``, ``i != j``, of each graph within ``r (1 + VESIN_PAD)``
    from vesin's (non-periodic) neighbour list; in no particular order."""
    module = _need_vesin()
    search = module.NeighborList(cutoff=r * (1 + VESIN_PAD), full_list=True)
    counts = torch.bincount(batch).tolist()
    box = torch.zeros(3, 3, dtype=torch.float64, device=pos.device)
    out_i, out_j, offset = [], [], 0
    for n in counts:
        if n > 1:
            points = pos[offset : offset + n].detach().double()
            if points.shape[1] < 3:  # vesin is 3D: pad with zeros
                points = torch.nn.functional.pad(points, (0, 3 - points.shape[1]))
            i, j = search.compute(points, box, False, quantities="ij")
            out_i.append(i.long() + offset)
            out_j.append(j.long() + offset)
        offset += n
    if not out_i:
        empty = batch.new_zeros(0)
        return empty, empty
    return torch.cat(out_i), torch.cat(out_j)


def radius_graph(
    pos: Tensor,
    r: float,
    batch: Tensor | None = None,
    loop: bool = False,
    max_num_neighbors: int | None = 32,
    flow: str = "source_to_target",
    max_pairs: int = MAX_PAIRS,
    tie_tolerance: float | None = 0.01,
    method: str = "auto",
) -> Tensor:
    r"""Edges between the nodes of each graph at distance ``|pos_i - pos_j| < r``.

    A drop-in for ``torch_geometric.nn.radius_graph`` (which needs ``torch-cluster``).

    Args:
        pos: node positions ``[n, p]``.
        r: cutoff radius (strict: a pair at exactly ``r`` is left out).
        batch: sorted graph ids ``[n]`` (default ``None``: one graph).
        loop: include self-loops ``(i, i)`` (default ``False``).
        max_num_neighbors: cap ``k`` on the neighbours per centre, the nearest ones
            (``None``: all; default 32, as in PyG); neighbours within ``tie_tolerance`` of
            the ``k``-th distance are all kept (see the module docstring), so a centre can
            keep more than ``k``.
        flow: ``"source_to_target"`` (default): ``edge_index = [j, i]`` (row = neighbour,
            col = centre); ``"target_to_source"``: ``[i, j]``.
        max_pairs: candidate pairs evaluated at once (memory bound; default ``2**22``;
            not for ``method="vesin"``, which finds all pairs at once).
        tie_tolerance: distance beyond the ``k``-th within which neighbours are kept too
            (default 0.01, in the unit of ``pos``); ``None``: a strict cap of exactly ``k``
            with ties to the lower index (not differentiable at symmetric structures).
        method: candidate pairs from ``"cells"`` (cell lists of side ``r / CELL_SPLIT``:
            O(n) for clouds of bounded density), ``"all"`` (every pair of each graph:
            O(sum n_g^2)), ``"vesin"`` (vesin-torch's neighbour list, per graph; needs the
            optional extra ``fast``; for ``p <= 3``, cells above) or ``"auto"`` (default:
            for a batch with a graph of more than ``CELL_LIST_MIN`` nodes vesin when
            importable, else cells; all pairs below). The edges are the same: only the
            candidates differ.

    Returns:
        ``edge_index [2, e]`` long, sorted by centre, then neighbour.
    """
    batch = _check(pos, r, batch, max_num_neighbors, flow)
    _check_tolerance(tie_tolerance)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    n = pos.shape[0]
    large = n > 0 and int(torch.bincount(batch).max()) > CELL_LIST_MIN
    if method == "auto":  # vesin on the CPU only (its GPU support is not checked here)
        fast = _vesin() is not None and pos.device.type == "cpu" and pos.shape[1] <= 3
        method = ("vesin" if fast else "cells") if large else "all"
    if pos.shape[1] > 3 and method == "vesin":
        method = "cells"
    centres, neighbours = [], []
    with torch.no_grad():
        if method == "vesin":
            i, j = _vesin_pairs(pos, batch, r)
            if loop:
                self_ = torch.arange(n, device=pos.device)
                i, j = torch.cat([i, self_]), torch.cat([j, self_])
            columns = pos.T.contiguous()
            chunks, order = [(i, j, _squared_distances(columns, j, columns, i))], None
        else:
            candidates = None
            if method == "cells" and n:
                candidates = _cell_candidates(pos, batch, r, split=CELL_SPLIT)
            if candidates is None:
                candidates = _all_pairs(pos, batch)
            cost, pairs, order = candidates
            chunks = (pairs(start, end) for start, end in _chunks(cost, max_pairs))
        ordered = order is None and method != "vesin"
        for i, j, dist2 in chunks:
            i, j, dist2 = _take((dist2 < r * r).nonzero().squeeze(1), i, j, dist2)
            if order is not None:
                j = order.index_select(0, j)
            if not loop:
                i, j, dist2 = _take((i != j).nonzero().squeeze(1), i, j, dist2)
            if not ordered:  # by centre, then neighbour
                grouped = method != "vesin"  # vesin's pairs come in no particular order
                i, j, dist2 = _take(_sort_edges(i, j, n, grouped), i, j, dist2)
            keep = _nearest(i, dist2, max_num_neighbors, tie_tolerance)
            if not bool(keep.all()):
                i, j = _take(keep.nonzero().squeeze(1), i, j)
            centres.append(i)
            neighbours.append(j)
    empty = batch.new_zeros(0)
    i = torch.cat(centres) if centres else empty
    j = torch.cat(neighbours) if neighbours else empty
    return torch.stack([j, i] if flow == "source_to_target" else [i, j])


def knn_graph(
    pos: Tensor,
    k: int,
    batch: Tensor | None = None,
    loop: bool = False,
    flow: str = "source_to_target",
    method: str = "auto",
) -> Tensor:
    r"""Edges from each node to its ``k`` nearest nodes of the same graph.

    A drop-in for ``torch_geometric.nn.knn_graph`` (which needs ``torch-cluster``); distance
    ties go to the lower index, so the result is deterministic. A node of a graph with at most
    ``k`` other nodes gets all of them.

    Args:
        pos: node positions ``[n, p]``.
        k: neighbours per node (positive int).
        batch: sorted graph ids ``[n]`` (default ``None``: one graph).
        loop: count the node itself as a neighbour (distance 0).
        flow: ``"source_to_target"`` (default): ``edge_index = [j, i]``; or ``[i, j]``.
        method: ``"all"`` (every pair of each graph), ``"cells"`` (cell lists: a search
            radius holding about ``2 (k + 1)`` nodes at the batch's mean density, doubled for
            the nodes with fewer than ``k`` nodes inside it, until all have them; exact,
            because every node within the radius is a candidate), or ``"auto"`` (cells above
            ``CELL_LIST_MIN`` nodes).

    Returns:
        ``edge_index [2, e]`` long, sorted by centre, then neighbour.
    """
    if not isinstance(k, int) or isinstance(k, bool) or k <= 0:
        raise ValueError(f"k must be a positive int, got {k!r}")
    batch = _check(pos, 1.0, batch, None, flow)
    if method not in KNN_METHODS:
        raise ValueError(f"method must be one of {KNN_METHODS}, got {method!r}")
    empty = batch.new_zeros(0)
    if batch.numel() == 0:
        return torch.stack([empty, empty])
    counts = torch.bincount(batch)
    wanted = torch.clamp(counts[batch] - (0 if loop else 1), max=k)  # per centre
    large = int(counts.max()) > CELL_LIST_MIN
    centres, neighbours = [], []
    n, rounds = batch.numel(), 1
    with torch.no_grad():
        if method == "all" or (method == "auto" and not large):
            every = _all_pairs(pos, batch)
            todo = [(every, math.inf, torch.arange(batch.numel(), device=pos.device))]
        else:
            extent = (pos.max(0).values - pos.min(0).values).clamp_min(1e-12)
            volume = float(extent.prod()) / max(batch.numel(), 1)
            ball = math.pi ** (pos.shape[1] / 2) / math.gamma(pos.shape[1] / 2 + 1)
            # about KNN_FILL (k + 1) nodes inside; the nodes that find fewer search again
            radius = (KNN_FILL * (k + 1) * volume / ball) ** (1 / pos.shape[1])
            todo = [(None, radius, torch.arange(batch.numel(), device=pos.device))]
        while todo:
            candidates, radius, nodes = todo.pop()
            if candidates is None:  # cell lists of the current radius (all pairs on overflow)
                candidates = _cell_candidates(pos, batch, radius, split=CELL_SPLIT)
                if candidates is None:
                    candidates, radius = _all_pairs(pos, batch), math.inf
            cost, pairs, order = candidates
            short = []
            for start, end in _chunks(cost[nodes], MAX_PAIRS):
                chunk = nodes[start:end]
                i, j, dist2 = pairs(0, 0, chunk)
                if math.isfinite(radius):
                    i, j, dist2 = _take((dist2 < radius * radius).nonzero().squeeze(1), i, j, dist2)
                if order is not None:
                    j = order.index_select(0, j)
                if not loop:
                    i, j, dist2 = _take((i != j).nonzero().squeeze(1), i, j, dist2)
                found = torch.bincount(i, minlength=n)[chunk]
                enough = found >= wanted[chunk]
                short.append(chunk[~enough])  # the others' candidates are final
                i, j = _knn_rows(chunk, found, enough, i, j, dist2, wanted[chunk], k)
                centres.append(i)
                neighbours.append(j)
            short = torch.cat(short) if short else empty
            if short.numel():
                todo.append((None, 2 * radius, short))
                rounds += 1
    i, j = torch.cat(centres), torch.cat(neighbours)
    if rounds > 1:  # each centre's edges are one sorted block: put the blocks in order
        count = torch.bincount(i, minlength=n)
        begin = torch.ones_like(i, dtype=torch.bool)
        begin[1:] = i[1:] != i[:-1]
        begin = begin.nonzero().squeeze(1)
        where = torch.zeros(n, dtype=torch.long, device=i.device)
        where[i[begin]] = begin  # where each centre's block is
        move = where - (torch.cumsum(count, 0) - count)
        perm = torch.arange(i.numel(), device=i.device)
        perm += torch.repeat_interleave(move, count, output_size=i.numel())
        i, j = _take(perm, i, j)
    return torch.stack([j, i] if flow == "source_to_target" else [i, j])


def _knn_rows(
    chunk: Tensor,
    found: Tensor,
    enough: Tensor,
    i: Tensor,
    j: Tensor,
    dist2: Tensor,
    wanted: Tensor,
    k: int,
) -> tuple[Tensor, Tensor]:
    """The ``wanted`` nearest of the edges ``(i, j, dist2)`` of each centre of ``chunk`` with
    ``enough`` of them (distance ties to the lower ``j``), sorted by centre, then neighbour.
    The edges are grouped by centre in the order of ``chunk``, ``found`` per centre. Rows of
    a padded ``[centres, max found]`` matrix sorted at once (or, when the padding would
    cost more than the edges, the sorts of :func:`_nearest`)."""
    rows, width = chunk.numel(), int(found.max()) if found.numel() else 0
    if rows * width > 4 * i.numel() + 4096:
        sel = enough.repeat_interleave(found).nonzero().squeeze(1)
        i, j, dist2 = _take(sel, i, j, dist2)
        span = int(j.max()) + 1 if j.numel() else 1
        i, j, dist2 = _take(_sort_edges(i, j, span), i, j, dist2)
        return _take(_nearest(i, dist2, k, None).nonzero().squeeze(1), i, j)
    row = torch.repeat_interleave(torch.arange(rows, device=i.device), found)
    col = torch.arange(i.numel(), device=i.device) - torch.repeat_interleave(
        torch.cumsum(found, 0) - found, found
    )
    big = torch.iinfo(torch.long).max
    neighbour = torch.full((rows, width), big, dtype=torch.long, device=i.device)
    neighbour[row, col] = j
    dist = torch.full((rows, width), math.inf, dtype=dist2.dtype, device=i.device)
    dist[row, col] = dist2
    kk = min(k, width)
    if kk == 0:
        return i[:0], j[:0]
    wanted = torch.where(enough, wanted, 0).clamp(max=kk)
    near, index = dist.topk(kk, dim=1, largest=False)  # ascending
    kth = near.gather(1, (wanted - 1).clamp(min=0)[:, None])
    tied = ((dist <= kth).sum(1) > wanted) & (wanted > 0)  # a tie across the wanted-th
    chosen = neighbour.gather(1, index)
    if bool(tied.any()):  # those rows: by j, then stably by distance
        rows_t = tied.nonzero().squeeze(1)
        sub, perm = neighbour[rows_t].sort(dim=1)
        perm = dist[rows_t].gather(1, perm).sort(dim=1, stable=True).indices
        chosen[rows_t] = sub.gather(1, perm)[:, :kk]
    valid = torch.arange(kk, device=i.device) < wanted[:, None]
    chosen = chosen.masked_fill(~valid, big).sort(dim=1).values
    valid = chosen != big
    return chunk[:, None].expand_as(chosen)[valid], chosen[valid]


def _pbc_per_graph(pbc, num_graphs: int, device) -> Tensor:
    if pbc is None:
        return torch.ones(num_graphs, 3, dtype=torch.bool, device=device)
    pbc = torch.as_tensor(pbc, dtype=torch.bool, device=device)
    if pbc.shape == (3,):
        pbc = pbc.expand(num_graphs, 3)
    if pbc.shape != (num_graphs, 3):
        raise ValueError(f"pbc must be [3] or [{num_graphs}, 3], got {list(pbc.shape)}")
    return pbc


def _pbc_all(p, shift, zero, r, loop, k, tie_tolerance, max_pairs):
    """Every ``(i, j, image)`` of one graph (the reference): local ``(i, j, image index)``
    sorted by centre, neighbour, image, after the cutoff, loop and cap rules."""
    n, images = p.shape[0], shift.shape[0]
    out = []
    rows = max(1, max_pairs // (n * images))
    for start in range(0, n, rows):
        centre = p[start : start + rows]  # [c, 3]
        diff = p[None, :, None] + shift[None, None] - centre[:, None, None]
        dist2 = diff.pow(2).sum(-1)  # [c, n(j), k]
        keep = dist2 < r * r
        if not loop:
            idx = torch.arange(centre.shape[0], device=p.device)
            keep[idx, start + idx, zero] = False
        i, j, image = keep.nonzero(as_tuple=True)  # sorted by (i, j, k)
        near = _nearest(i, dist2[i, j, image], k, tie_tolerance)
        out.append((start + i[near], j[near], image[near]))
    return out


def _pbc_finish(i, j, image, dist2, n, images, zero, r, loop, k, tie_tolerance, grouped=True):
    """Cutoff, loop rule, sorting by (i, j, image) and cap of candidate edges of one graph
    (``grouped``: ``i`` is sorted)."""
    i, j, image, dist2 = _take((dist2 < r * r).nonzero().squeeze(1), i, j, image, dist2)
    if not loop:
        keep = ((i != j) | (image != zero)).nonzero().squeeze(1)
        i, j, image, dist2 = _take(keep, i, j, image, dist2)
    sort = _sort_edges(i, j * images + image, n * images, grouped)
    i, j, image, dist2 = _take(sort, i, j, image, dist2)
    keep = _nearest(i, dist2, k, tie_tolerance).nonzero().squeeze(1)
    return _take(keep, i, j, image)


def _pbc_cells(p, shift, zero, r, loop, k, tie_tolerance, max_pairs):
    """As :func:`_pbc_all` from cell lists: the periodic images of the atoms that lie in the
    centres' bounding box grown by ``r`` are the data points of :func:`_cell_candidates`."""
    n, images = p.shape[0], shift.shape[0]
    scale = float(p.abs().max()) + float(shift.abs().max())
    margin = r * (1 + 1e-3) + 64 * torch.finfo(p.dtype).eps * scale  # rounding to spare
    p_min, p_max = p.amin(0), p.amax(0)
    lo, hi = p_min - margin, p_max + margin
    meets = ((p_max + shift >= lo) & (p_min + shift <= hi)).all(1).nonzero().squeeze(1)
    found_points, found_image, found_j = [], [], []
    step = max(1, max_pairs // n)  # images at once
    for start in range(0, meets.numel(), step):
        some = meets[start : start + step]
        points = p[None] + shift[some][:, None]  # [k', n, 3]: p_j + s_k as in _pbc_all
        image, j = ((points >= lo) & (points <= hi)).all(-1).nonzero(as_tuple=True)
        found_points.append(points[image, j])
        found_image.append(some[image])
        found_j.append(j)
    points, image, j = torch.cat(found_points), torch.cat(found_image), torch.cat(found_j)
    zeros = torch.zeros(n, dtype=torch.long, device=p.device)
    candidates = _cell_candidates(
        p, zeros, r, points, zeros.new_zeros(points.shape[0]), split=CELL_SPLIT
    )
    if candidates is None:
        return _pbc_all(p, shift, zero, r, loop, k, tie_tolerance, max_pairs)
    cost, pairs, order = candidates
    out = []
    for start, end in _chunks(cost, max_pairs):
        i, s, dist2 = pairs(start, end)
        i, s, dist2 = _take((dist2 < r * r).nonzero().squeeze(1), i, s, dist2)
        s = order.index_select(0, s)
        edges = (i, j.index_select(0, s), image.index_select(0, s), dist2)
        out.append(_pbc_finish(*edges, n, images, zero, r, loop, k, tie_tolerance))
    return out


def _pbc_vesin(p, cell, pbc, reach, shift, zero, r, loop, k, tie_tolerance):
    """As :func:`_pbc_all` from vesin's periodic neighbour list (a cutoff padded for
    rounding; our distances in ``p``'s dtype decide)."""
    module = _need_vesin()
    n, images = p.shape[0], shift.shape[0]
    scale = float(p.abs().max()) + float(shift.abs().max())
    cutoff = r * (1 + VESIN_PAD) + 64 * torch.finfo(p.dtype).eps * scale
    search = module.NeighborList(cutoff=cutoff, full_list=True)
    i, j, lattice = search.compute(p.double(), cell.double(), pbc, quantities="ijS")
    i, j, lattice = i.long(), j.long(), lattice.long()
    span = torch.tensor(reach, device=p.device)
    inside = ((lattice.abs() <= span) & (pbc | (lattice == 0))).all(1).nonzero().squeeze(1)
    i, j, lattice = _take(inside, i, j, lattice)
    width = 2 * span + 1
    image = ((lattice[:, 0] + span[0]) * width[1] + lattice[:, 1] + span[1]) * width[2]
    image += lattice[:, 2] + span[2]
    if loop:  # vesin leaves out each atom's zero image of itself
        own = torch.arange(n, device=p.device)
        i, j = torch.cat([i, own]), torch.cat([j, own])
        image = torch.cat([image, torch.full_like(own, zero)])
    dist2 = p.index_select(0, j) + shift.index_select(0, image) - p.index_select(0, i)
    dist2 = dist2.pow(2).sum(-1)
    edges = (i, j, image, dist2, n, images, zero, r, loop, k, tie_tolerance)
    return [_pbc_finish(*edges, grouped=False)]  # vesin's pairs come in no order


def radius_graph_pbc(
    pos: Tensor,
    cell: Tensor,
    r: float,
    batch: Tensor | None = None,
    pbc: Tensor | Sequence[bool] | None = None,
    loop: bool = False,
    max_num_neighbors: int | None = 32,
    flow: str = "source_to_target",
    max_pairs: int = MAX_PAIRS,
    tie_tolerance: float | None = 0.01,
    method: str = "auto",
) -> tuple[Tensor, Tensor]:
    r"""Periodic radius graph: edges ``(j + image, i)`` with ``|pos_j + s - pos_i| < r``.

    For graph ``g`` with lattice ``L_g`` (rows are the lattice vectors ``a_1..a_3``), every
    periodic image ``s = n L_g`` (integer ``n``, zero along non-periodic axes) of every atom
    ``j`` within ``r`` of ``i`` gives one edge, so small cells give several edges per pair
    (and, with ``loop=False``, only the ``n = 0`` image of ``i`` itself is left out). Atoms
    need not be wrapped into the cell: the image range covers their fractional spread.

    Args:
        pos: Cartesian positions ``[n, 3]``.
        cell: lattices ``[g, 3, 3]``, one per graph (rows are lattice vectors).
        r: cutoff radius (strict).
        batch: sorted graph ids ``[n]`` (default ``None``: one graph).
        pbc: periodic axes, ``[3]`` or ``[g, 3]`` bool (default ``None``: all periodic;
            OC20 slabs use ``(True, True, False)``).
        loop, max_num_neighbors, flow, max_pairs, tie_tolerance: as in
            :func:`radius_graph` (the cap counts periodic images as neighbours; with
            ``tie_tolerance=None`` ties go to the lower ``(j, image)``).
        method: per graph, the candidates ``(i, j, image)`` from ``"all"`` (every atom pair
            times every image in range: O(n^2 images), the reference), ``"cells"`` (cell
            lists over the images of the atoms within ``r`` of the graph's bounding box:
            O(n) for large cells), ``"vesin"`` (vesin-torch's periodic neighbour list, the
            optional extra ``fast``) or ``"auto"`` (default: vesin when importable, else
            cells, for graphs of more than ``CELL_LIST_MIN`` atoms; all pairs below). The
            edges, their order and shifts are the same.

    Returns:
        ``(edge_index [2, e], shift [e, 3])``: edges sorted by centre, neighbour, image; the
        edge vector from centre to neighbour is ``pos[j] + shift - pos[i]`` (``shift`` is
        differentiable in ``cell``).
    """
    batch = _check(pos, r, batch, max_num_neighbors, flow)
    _check_tolerance(tie_tolerance)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if pos.shape[1] != 3:
        raise ValueError(f"pos must be [n, 3] for periodic graphs, got {list(pos.shape)}")
    if cell.dim() != 3 or cell.shape[1:] != (3, 3):
        raise ValueError(f"cell must be [g, 3, 3], got {list(cell.shape)}")
    num_graphs = cell.shape[0]
    if batch.numel() and int(batch[-1]) >= num_graphs:
        raise ValueError(f"batch has graph id {int(batch[-1])} but cell has {num_graphs} cells")
    if method == "vesin":
        _need_vesin()
    counts = torch.bincount(batch, minlength=num_graphs)
    pbc = _pbc_per_graph(pbc, num_graphs, pos.device)
    ptr = (torch.cumsum(counts, 0) - counts).tolist()
    centres, neighbours, shifts = [], [], []
    rules = (r, loop, max_num_neighbors, tie_tolerance)
    with torch.no_grad():
        inverse = torch.linalg.inv(cell.detach().double())  # [g, 3, 3]
        for g, n in enumerate(counts.tolist()):
            if n == 0:
                continue
            p = pos[ptr[g] : ptr[g] + n].detach()
            frac = p.double() @ inverse[g]  # [n, 3] fractional coordinates
            spread = frac.amax(0) - frac.amin(0)
            recip = inverse[g].norm(dim=0)  # |b_a|: 1 / distance between lattice planes
            reach = torch.ceil(r * recip + spread).long()
            reach = torch.where(pbc[g], reach, torch.zeros_like(reach)).tolist()
            axes = [torch.arange(-m, m + 1, device=pos.device) for m in reach]
            images = torch.cartesian_prod(*axes).reshape(-1, 3)  # [k, 3]
            zero = int(((images == 0).all(-1)).nonzero()[0])
            shift = images.to(p.dtype) @ cell[g].detach().to(p.dtype)  # [k, 3]
            use = method
            if use == "auto":
                fast = _vesin() is not None and pos.device.type == "cpu"
                use = "all" if n <= CELL_LIST_MIN else "vesin" if fast else "cells"
            if use == "all":
                found = _pbc_all(p, shift, zero, *rules, max_pairs)
            elif use == "cells":
                found = _pbc_cells(p, shift, zero, *rules, max_pairs)
            else:
                found = _pbc_vesin(p, cell[g].detach(), pbc[g], reach, shift, zero, *rules)
            for i, j, image in found:
                centres.append(ptr[g] + i)
                neighbours.append(ptr[g] + j)
                shifts.append((images[image], g))
    empty = batch.new_zeros(0)
    i = torch.cat(centres) if centres else empty
    j = torch.cat(neighbours) if neighbours else empty
    if shifts:
        shift = torch.cat([img.to(cell.dtype) @ cell[g] for img, g in shifts])  # grad to cell
    else:
        shift = pos.new_zeros(0, 3)
    edge_index = torch.stack([j, i] if flow == "source_to_target" else [i, j])
    return edge_index, shift


class RadiusInteractionGraph(nn.Module):
    r"""``(edge_index, edge_weight)`` of :func:`radius_graph`, the ``interaction_graph`` that
    ``torch_geometric.nn.models.SchNet`` calls as ``interaction_graph(pos, batch)``.

    Periodic systems: set :attr:`cell` ``[g, 3, 3]`` (and :attr:`pbc` ``[g, 3]``) before
    the call (:class:`~geolinrpe.models.SchNetBaseline` does, per forward); the graph is then
    :func:`radius_graph_pbc`'s and ``edge_weight`` the length of the edge vector to the image.

    Args:
        cutoff: radius ``r`` (default 10.0).
        max_num_neighbors: nearest neighbours kept per atom (default 32; ties with the
            32nd within ``tie_tolerance`` are kept too, see :func:`radius_graph`).
        tie_tolerance: see :func:`radius_graph` (default 0.01).
        method: neighbour search, as :func:`radius_graph` (default ``"auto"``).

    Shapes:
        ``pos [n, 3]``, ``batch [n]`` -> ``edge_index [2, e]``, ``edge_weight [e]``
        (``|pos_j + shift - pos_i|``, differentiable in ``pos``).
    """

    cell: Tensor | None = None
    pbc: Tensor | None = None

    def __init__(
        self,
        cutoff: float = 10.0,
        max_num_neighbors: int | None = 32,
        tie_tolerance: float | None = 0.01,
        method: str = "auto",
    ) -> None:
        super().__init__()
        _check_tolerance(tie_tolerance)
        self.cutoff = cutoff
        self.max_num_neighbors = max_num_neighbors
        self.tie_tolerance = tie_tolerance
        self.method = method

    def forward(self, pos: Tensor, batch: Tensor | None = None) -> tuple[Tensor, Tensor]:
        options = dict(
            max_num_neighbors=self.max_num_neighbors,
            tie_tolerance=self.tie_tolerance,
            method=self.method,
        )
        if self.cell is None:
            edge_index = radius_graph(pos, self.cutoff, batch, **options)
            j, i = edge_index
            return edge_index, (pos[j] - pos[i]).norm(dim=-1)
        edge_index, shift = radius_graph_pbc(
            pos, self.cell.to(pos.dtype), self.cutoff, batch, self.pbc, **options
        )
        j, i = edge_index
        return edge_index, (pos[j] + shift - pos[i]).norm(dim=-1)

    def extra_repr(self) -> str:
        return (
            f"cutoff={self.cutoff}, max_num_neighbors={self.max_num_neighbors}, "
            f"tie_tolerance={self.tie_tolerance}, method={self.method!r}"
        )

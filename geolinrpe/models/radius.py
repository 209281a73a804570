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

Candidates (``radius_graph(method=...)``): every pair of each graph (``"all"``: O(sum_g n_g^2)
work; what :func:`radius_graph_pbc` does, times the images), or cell lists (``"cells"``, the
default for graphs above ``CELL_LIST_MIN`` nodes): the nodes are sorted into cubic cells of
side ``r`` per graph, and a centre's candidates are the nodes of the ``3^p`` cells around its
own, found by binary search over the sorted cell keys: O(n log n) work and O(edges) memory for
clouds of bounded density. Both give the same edges (the same distances and rules decide).
Measured on 2 CPU cores, 3D uniform clouds, r = 2 (about 15 neighbours per point): 4,096
points 0.032 s against 0.98 s for all pairs, 16,384 points 0.17 s against 15.6 s;
``knn_graph`` with k = 16: 0.096 s against 4.2 s, and 0.42 s against 69.7 s.
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
    ``centre [e]`` must be sorted (edges grouped by centre), ``dist2 [e]`` squared distances."""
    if k is None or centre.numel() == 0:
        return torch.ones_like(centre, dtype=torch.bool)
    order = torch.argsort(dist2, stable=True)
    order = order[torch.argsort(centre[order], stable=True)]  # by centre, distance, position
    grouped = centre[order]
    first = torch.searchsorted(grouped, grouped)  # where each edge's centre group starts
    keep = torch.zeros_like(centre, dtype=torch.bool)
    if tie_tolerance is None:
        rank = torch.arange(centre.numel(), device=centre.device) - first
        keep[order[rank < k]] = True
        return keep
    dist = dist2[order].sqrt()
    kth = (first + k - 1).clamp(max=centre.numel() - 1)
    has_k = grouped[kth] == grouped  # the group has at least k edges
    bound = torch.where(has_k, dist[kth] + tie_tolerance, torch.full_like(dist, math.inf))
    keep[order[dist <= bound]] = True
    return keep


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


def _cell_candidates(pos: Tensor, batch: Tensor, r: float):
    """Cell lists: for each node, the nodes of its graph in the ``3^p`` cells of side ``r``
    around its own (every pair closer than ``r`` is among them).

    Returns ``(cost [n], pairs)`` with ``pairs(start, end, centres=None) -> (i, j)``: the
    candidate pairs of centres ``start .. end - 1`` (or of the node indices ``centres``),
    sorted by centre then neighbour; or ``None`` when the cell
    keys would overflow int64 (then use all pairs of each graph). O(n log n) time, memory
    O(candidates) per chunk."""
    n, p = pos.shape
    graphs = int(batch[-1]) + 1
    lo = torch.full((graphs, p), math.inf, dtype=pos.dtype, device=pos.device)
    lo = lo.scatter_reduce(0, batch[:, None].expand(-1, p), pos, "amin")
    cell = torch.floor((pos - lo[batch]) / r).long() + 1  # >= 1: the cell below exists
    dims = (cell.max(0).values + 2).tolist()
    if graphs * math.prod(dims) >= 2**62:
        return None

    def key(c: Tensor) -> Tensor:
        out = batch.clone()
        for axis in range(p):
            out = out * dims[axis] + c[:, axis]
        return out

    own = key(cell)
    order = torch.argsort(own, stable=True)
    cells, sizes = torch.unique_consecutive(own[order], return_counts=True)
    starts = torch.cumsum(sizes, 0) - sizes
    offsets = torch.cartesian_prod(*[torch.tensor([-1, 0, 1], device=pos.device)] * p)
    offsets = offsets.reshape(-1, p)
    found_start, found_size = [], []
    for offset in offsets:
        wanted = key(cell + offset)
        index = torch.searchsorted(cells, wanted).clamp(max=cells.numel() - 1)
        hit = cells[index] == wanted
        found_start.append(starts[index])
        found_size.append(torch.where(hit, sizes[index], 0))
    start_o, size_o = torch.stack(found_start, 1), torch.stack(found_size, 1)  # [n, 3^p]

    def pairs(first: int, last: int, centres: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if centres is None:
            centres = torch.arange(first, last, device=pos.device)
        size = size_o[centres].reshape(-1)
        i = centres.repeat_interleave(offsets.shape[0]).repeat_interleave(size)
        local = torch.arange(i.numel(), device=pos.device) - torch.repeat_interleave(
            torch.cumsum(size, 0) - size, size
        )
        j = order[start_o[centres].reshape(-1).repeat_interleave(size) + local]
        sort = torch.argsort(i * n + j)
        return i[sort], j[sort]

    return size_o.sum(1), pairs


def _all_pairs(batch: Tensor):
    """Every pair of nodes of the same graph: ``(cost [n], pairs)`` as :func:`_cell_candidates`."""
    counts = torch.bincount(batch)
    ptr = torch.cumsum(counts, 0) - counts
    cost = counts[batch]

    def pairs(first: int, last: int, centres: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if centres is None:
            centres = torch.arange(first, last, device=batch.device)
        c = cost[centres]
        i = centres.repeat_interleave(c)
        local = torch.arange(i.numel(), device=batch.device) - torch.repeat_interleave(
            torch.cumsum(c, 0) - c, c
        )
        return i, ptr[batch[i]] + local

    return cost, pairs


#: graphs larger than this use cell lists in ``radius_graph(method="auto")``
CELL_LIST_MIN = 256
METHODS = ("auto", "cells", "all")


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
        max_pairs: candidate pairs evaluated at once (memory bound; default ``2**22``).
        tie_tolerance: distance beyond the ``k``-th within which neighbours are kept too
            (default 0.01, in the unit of ``pos``); ``None``: a strict cap of exactly ``k``
            with ties to the lower index (not differentiable at symmetric structures).
        method: candidate pairs from ``"cells"`` (cell lists of side ``r``: O(n) for
            clouds of bounded density), ``"all"`` (every pair of each graph: O(sum n_g^2))
            or ``"auto"`` (default: cells when a graph has more than ``CELL_LIST_MIN``
            nodes). The edges are the same: only the candidates differ.

    Returns:
        ``edge_index [2, e]`` long, sorted by centre, then neighbour.
    """
    batch = _check(pos, r, batch, max_num_neighbors, flow)
    _check_tolerance(tie_tolerance)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    centres, neighbours = [], []
    with torch.no_grad():
        candidates = None
        large = batch.numel() and int(torch.bincount(batch).max()) > CELL_LIST_MIN
        if method == "cells" or (method == "auto" and large):
            candidates = _cell_candidates(pos, batch, r) if batch.numel() else None
        cost, pairs = _all_pairs(batch) if candidates is None else candidates
        for start, end in _chunks(cost, max_pairs):
            i, j = pairs(start, end)
            dist2 = (pos[j] - pos[i]).pow(2).sum(-1)
            keep = dist2 < r * r
            if not loop:
                keep &= i != j
            i, j, dist2 = i[keep], j[keep], dist2[keep]
            keep = _nearest(i, dist2, max_num_neighbors, tie_tolerance)
            centres.append(i[keep])
            neighbours.append(j[keep])
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
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    empty = batch.new_zeros(0)
    if batch.numel() == 0:
        return torch.stack([empty, empty])
    counts = torch.bincount(batch)
    wanted = torch.clamp(counts[batch] - (0 if loop else 1), max=k)  # per centre
    large = int(counts.max()) > CELL_LIST_MIN
    centres, neighbours = [], []
    with torch.no_grad():
        if method == "all" or (method == "auto" and not large):
            todo = [(_all_pairs(batch), math.inf, torch.arange(batch.numel(), device=pos.device))]
        else:
            extent = (pos.max(0).values - pos.min(0).values).clamp_min(1e-12)
            volume = float(extent.prod()) / max(batch.numel(), 1)
            ball = math.pi ** (pos.shape[1] / 2) / math.gamma(pos.shape[1] / 2 + 1)
            radius = (2 * (k + 1) * volume / ball) ** (1 / pos.shape[1])  # ~2 (k + 1) inside
            todo = [(None, radius, torch.arange(batch.numel(), device=pos.device))]
        while todo:
            candidates, radius, nodes = todo.pop()
            if candidates is None:  # cell lists of the current radius (all pairs on overflow)
                candidates = _cell_candidates(pos, batch, radius)
                if candidates is None:
                    candidates, radius = _all_pairs(batch), math.inf
            cost, pairs = candidates
            short = []
            done = torch.zeros(batch.numel(), dtype=torch.bool, device=pos.device)
            for start, end in _chunks(cost[nodes], MAX_PAIRS):
                i, j = pairs(0, 0, nodes[start:end])
                dist2 = (pos[j] - pos[i]).pow(2).sum(-1)
                keep = dist2 < radius * radius if math.isfinite(radius) else dist2 >= 0
                if not loop:
                    keep &= i != j
                i, j, dist2 = i[keep], j[keep], dist2[keep]
                found = torch.bincount(i, minlength=batch.numel())[nodes[start:end]]
                enough = found >= wanted[nodes[start:end]]
                short.append(nodes[start:end][~enough])
                done[nodes[start:end][enough]] = True  # their candidates are final
                sel = done[i]
                i, j, dist2 = i[sel], j[sel], dist2[sel]
                chosen = _nearest(i, dist2, k, None)
                centres.append(i[chosen])
                neighbours.append(j[chosen])
            short = torch.cat(short) if short else empty
            if short.numel():
                todo.append((None, 2 * radius, short))
    i, j = torch.cat(centres), torch.cat(neighbours)
    sort = torch.argsort(i * batch.numel() + j)
    i, j = i[sort], j[sort]
    return torch.stack([j, i] if flow == "source_to_target" else [i, j])


def _pbc_per_graph(pbc, num_graphs: int, device) -> Tensor:
    if pbc is None:
        return torch.ones(num_graphs, 3, dtype=torch.bool, device=device)
    pbc = torch.as_tensor(pbc, dtype=torch.bool, device=device)
    if pbc.shape == (3,):
        pbc = pbc.expand(num_graphs, 3)
    if pbc.shape != (num_graphs, 3):
        raise ValueError(f"pbc must be [3] or [{num_graphs}, 3], got {list(pbc.shape)}")
    return pbc


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

    Returns:
        ``(edge_index [2, e], shift [e, 3])``: edges sorted by centre, neighbour, image; the
        edge vector from centre to neighbour is ``pos[j] + shift - pos[i]`` (``shift`` is
        differentiable in ``cell``).
    """
    batch = _check(pos, r, batch, max_num_neighbors, flow)
    _check_tolerance(tie_tolerance)
    if pos.shape[1] != 3:
        raise ValueError(f"pos must be [n, 3] for periodic graphs, got {list(pos.shape)}")
    if cell.dim() != 3 or cell.shape[1:] != (3, 3):
        raise ValueError(f"cell must be [g, 3, 3], got {list(cell.shape)}")
    num_graphs = cell.shape[0]
    if batch.numel() and int(batch[-1]) >= num_graphs:
        raise ValueError(f"batch has graph id {int(batch[-1])} but cell has {num_graphs} cells")
    counts = torch.bincount(batch, minlength=num_graphs)
    pbc = _pbc_per_graph(pbc, num_graphs, pos.device)
    ptr = (torch.cumsum(counts, 0) - counts).tolist()
    centres, neighbours, shifts = [], [], []
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
            rows = max(1, max_pairs // (n * images.shape[0]))
            for start in range(0, n, rows):
                centre = p[start : start + rows]  # [c, 3]
                diff = p[None, :, None] + shift[None, None] - centre[:, None, None]
                dist2 = diff.pow(2).sum(-1)  # [c, n(j), k]
                keep = dist2 < r * r
                if not loop:
                    idx = torch.arange(centre.shape[0], device=pos.device)
                    keep[idx, start + idx, zero] = False
                i, j, k = keep.nonzero(as_tuple=True)  # sorted by (i, j, k)
                near = _nearest(i, dist2[i, j, k], max_num_neighbors, tie_tolerance)
                centres.append(ptr[g] + start + i[near])
                neighbours.append(ptr[g] + j[near])
                shifts.append((images[k[near]], g))
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

    Args:
        cutoff: radius ``r`` (default 10.0).
        max_num_neighbors: nearest neighbours kept per atom (default 32; ties with the
            32nd within ``tie_tolerance`` are kept too, see :func:`radius_graph`).
        tie_tolerance: see :func:`radius_graph` (default 0.01).

    Shapes:
        ``pos [n, 3]``, ``batch [n]`` -> ``edge_index [2, e]``, ``edge_weight [e]``
        (``|pos_j - pos_i|``, differentiable in ``pos``).
    """

    def __init__(
        self,
        cutoff: float = 10.0,
        max_num_neighbors: int | None = 32,
        tie_tolerance: float | None = 0.01,
    ) -> None:
        super().__init__()
        _check_tolerance(tie_tolerance)
        self.cutoff = cutoff
        self.max_num_neighbors = max_num_neighbors
        self.tie_tolerance = tie_tolerance

    def forward(self, pos: Tensor, batch: Tensor | None = None) -> tuple[Tensor, Tensor]:
        edge_index = radius_graph(
            pos,
            self.cutoff,
            batch,
            max_num_neighbors=self.max_num_neighbors,
            tie_tolerance=self.tie_tolerance,
        )
        j, i = edge_index
        return edge_index, (pos[j] - pos[i]).norm(dim=-1)

    def extra_repr(self) -> str:
        return (
            f"cutoff={self.cutoff}, max_num_neighbors={self.max_num_neighbors}, "
            f"tie_tolerance={self.tie_tolerance}"
        )

"""Pure-torch radius graphs against brute force (plain and periodic)."""

import itertools

import pytest
import torch

from geolinrpe.models.radius import (
    RadiusInteractionGraph,
    knn_graph,
    radius_graph,
    radius_graph_pbc,
)

D64 = torch.float64


def cloud(sizes, scale=1.5):
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    return scale * torch.randn(sum(sizes), 3, dtype=D64), batch


def brute_force(pos, batch, r, loop, k=None, tol=0.01):
    """Sorted (i, j) pairs: same graph, distance < r, the k nearest per i and every other one
    within ``tol`` of the k-th distance (the default ``tie_tolerance``)."""
    dist = torch.cdist(pos, pos)
    edges = []
    for i in range(len(pos)):
        near = sorted(
            (float(dist[i, j]), j)
            for j in range(len(pos))
            if batch[i] == batch[j] and dist[i, j] < r and (loop or i != j)
        )
        if k is not None and len(near) > k:
            near = [(d, j) for d, j in near if d <= near[k - 1][0] + tol]
        edges += sorted((i, j) for _, j in near)
    return edges


@pytest.mark.parametrize("loop", [False, True])
@pytest.mark.parametrize("k", [None, 3])
def test_radius_graph_matches_brute_force_and_is_sorted(loop, k):
    pos, batch = cloud([7, 1, 12, 5])
    edge_index = radius_graph(pos, 2.0, batch, loop=loop, max_num_neighbors=k)
    j, i = edge_index.tolist()
    assert list(zip(i, j, strict=True)) == brute_force(pos, batch, 2.0, loop, k)
    # chunking over centres changes nothing (one centre per chunk here)
    chunked = radius_graph(pos, 2.0, batch, loop=loop, max_num_neighbors=k, max_pairs=5)
    assert torch.equal(chunked, edge_index)
    flipped = radius_graph(pos, 2.0, batch, loop, k, flow="target_to_source")
    assert torch.equal(flipped, edge_index.flip(0))


def test_radius_graph_keeps_nearest_neighbours():
    pos = torch.tensor([[0.0, 0, 0], [3, 0, 0], [1, 0, 0], [2, 0, 0], [-0.5, 0, 0]], dtype=D64)
    j, i = radius_graph(pos, 10.0, max_num_neighbors=2)
    assert [jj for ii, jj in zip(i.tolist(), j.tolist(), strict=True) if ii == 0] == [2, 4]
    # strict cutoff: the pairs at distance exactly 1 (0-2, 2-3, 1-3) are left out
    assert radius_graph(pos, 1.0, max_num_neighbors=None).tolist() == [[4, 0], [0, 4]]


def test_radius_graph_edge_cases_and_errors():
    pos = torch.zeros(1, 3)
    assert radius_graph(pos, 1.0).shape == (2, 0)
    assert radius_graph(pos, 1.0, loop=True).tolist() == [[0], [0]]
    with pytest.raises(ValueError, match="sorted"):
        radius_graph(torch.randn(3, 3), 1.0, torch.tensor([1, 0, 0]))
    with pytest.raises(ValueError, match="r must"):
        radius_graph(torch.randn(3, 3), 0.0)
    with pytest.raises(ValueError, match="max_num_neighbors"):
        radius_graph(torch.randn(3, 3), 1.0, max_num_neighbors=0)


def test_interaction_graph_distances_differentiable():
    pos, batch = cloud([4, 6])
    pos.requires_grad_(True)
    edge_index, weight = RadiusInteractionGraph(2.5, 32)(pos, batch)
    j, i = edge_index
    torch.testing.assert_close(weight, (pos[j] - pos[i]).norm(dim=-1))
    weight.sum().backward()
    assert torch.isfinite(pos.grad).all() and pos.grad.abs().sum() > 0


def pbc_brute_force(pos, cell, r, pbc, reach=3):
    axes = [range(-reach, reach + 1) if p else [0] for p in pbc]
    out = []
    for i, j in itertools.product(range(len(pos)), repeat=2):
        for n in itertools.product(*axes):
            shift = torch.tensor(n, dtype=D64) @ cell
            if (i != j or any(n)) and (pos[j] + shift - pos[i]).norm() < r:
                out.append((i, j, n))
    return sorted(out)


@pytest.mark.parametrize("pbc", [(True, True, True), (True, True, False)])
def test_radius_graph_pbc_matches_image_enumeration(pbc):
    cell = torch.tensor([[2.5, 0.0, 0.0], [0.7, 2.2, 0.0], [0.3, -0.4, 2.8]], dtype=D64)
    frac = torch.rand(6, 3, dtype=D64)
    frac[0] += torch.tensor([1.0, -1.0, 0.0])  # an unwrapped atom
    pos = frac @ cell
    edge_index, shift = radius_graph_pbc(pos, cell[None], 3.0, pbc=pbc, max_num_neighbors=None)
    images = torch.linalg.solve(cell.T, shift.T).T.round().long()
    j, i = edge_index.tolist()
    got = [(a, b, tuple(n)) for a, b, n in zip(i, j, images.tolist(), strict=True)]
    assert got == pbc_brute_force(pos, cell, 3.0, pbc)
    assert len(got) > 6 * 5  # images contribute


def test_radius_graph_pbc_batches_and_gradients():
    pos, batch = cloud([3, 4], scale=1.0)
    cell = torch.stack([3.0 * torch.eye(3), 4.0 * torch.eye(3)]).to(D64).requires_grad_(True)
    edge_index, shift = radius_graph_pbc(pos, cell, 2.5, batch, max_num_neighbors=None)
    j, i = edge_index
    assert (batch[i] == batch[j]).all()
    one, _ = radius_graph_pbc(pos[:3], cell[:1], 2.5, max_num_neighbors=None)
    assert torch.equal(edge_index[:, batch[i] == 0], one)
    chunked, _ = radius_graph_pbc(pos, cell, 2.5, batch, max_num_neighbors=None, max_pairs=7)
    assert torch.equal(chunked, edge_index)
    (pos[j] + shift - pos[i]).norm(dim=-1).sum().backward()
    assert torch.isfinite(cell.grad).all() and cell.grad.abs().sum() > 0
    limited, _ = radius_graph_pbc(pos, cell, 2.5, batch, max_num_neighbors=2)
    assert torch.bincount(limited[1]).max() <= 2
    with pytest.raises(ValueError, match="cell"):
        radius_graph_pbc(pos, cell[:1], 2.5, batch)


# ------------------------------------------------------------------ cell lists (issue 12)
@pytest.mark.parametrize("pos_dim", [1, 2, 3])
@pytest.mark.parametrize("cap", [None, 6])
@pytest.mark.parametrize("loop", [False, True])
def test_cell_lists_give_the_edges_of_all_pairs(pos_dim, cap, loop):
    g = torch.Generator().manual_seed(pos_dim)
    n = 400
    pos = (torch.rand(n, pos_dim, generator=g, dtype=torch.float64) - 0.5) * 20
    pos[:40] = pos[40:80]  # duplicated points: zero distances and exact ties
    grid = torch.arange(30, dtype=torch.float64)[:, None].expand(-1, pos_dim) * 1.5
    pos[80:110] = grid  # points exactly on cell boundaries and at exactly r apart
    batch = torch.sort(torch.randint(0, 4, (n,), generator=g) * 2).values  # empty graph ids
    for max_pairs in (1 << 22, 97):  # one chunk, and many small ones
        options = dict(loop=loop, max_num_neighbors=cap, max_pairs=max_pairs)
        cells = radius_graph(pos, 1.5, batch, method="cells", **options)
        every = radius_graph(pos, 1.5, batch, method="all", **options)
        assert torch.equal(cells, every)
    assert cells.shape[1] > 100  # a real test: many edges


def test_cell_lists_edge_cases_and_auto():
    one = torch.zeros(1, 3)
    assert radius_graph(one, 1.0, method="cells").shape == (2, 0)
    same = torch.zeros(50, 3)  # every point in one cell
    torch.testing.assert_close(
        radius_graph(same, 1.0, method="cells", max_num_neighbors=None),
        radius_graph(same, 1.0, method="all", max_num_neighbors=None),
    )
    far = torch.tensor([[0.0, 0.0, 0.0], [1e18, 0.0, 0.0], [0.5, 0.0, 0.0]])
    # keys would overflow int64: falls back to all pairs, same edges
    assert torch.equal(radius_graph(far, 1.0, method="cells"), radius_graph(far, 1.0))
    big = torch.rand(600, 3) * 10  # above CELL_LIST_MIN: auto takes cell lists
    assert torch.equal(radius_graph(big, 1.2), radius_graph(big, 1.2, method="all"))
    with pytest.raises(ValueError, match="method"):
        radius_graph(big, 1.0, method="kd-tree")


@pytest.mark.parametrize("pos_dim", [1, 2, 3])
@pytest.mark.parametrize("k", [1, 7])
@pytest.mark.parametrize("loop", [False, True])
def test_knn_graph_by_cell_lists_equals_all_pairs(pos_dim, k, loop):
    g = torch.Generator().manual_seed(10 + pos_dim)
    n = 420
    pos = (torch.rand(n, pos_dim, generator=g, dtype=torch.float64) - 0.5) * 10
    pos[:20] = pos[20:40]  # duplicates: distance ties go to the lower index
    pos[40:60] = pos[40:41] + 1e3  # a far cluster: its nodes need a larger search radius
    batch = torch.sort(torch.randint(0, 3, (n,), generator=g) * 2).values
    batch[-3:] = 7  # a 3-node graph: fewer than k others
    cells = knn_graph(pos, k, batch, loop=loop, method="cells")
    every = knn_graph(pos, k, batch, loop=loop, method="all")
    assert torch.equal(cells, every)
    # against a dense reference: k smallest distances per node within its graph
    j, i = every
    dist = torch.cdist(pos, pos)
    dist = dist.masked_fill(batch[:, None] != batch[None, :], float("inf"))
    if not loop:
        dist.fill_diagonal_(float("inf"))
    for centre in (0, 25, 50, 200, n - 1):
        row = dist[centre]
        want = min(k, int(torch.isfinite(row).sum()))
        got = j[i == centre]
        assert got.numel() == want
        assert float(row[got].max()) <= float(row.sort().values[want - 1]) + 1e-12


def test_knn_graph_layout_and_errors():
    pos = torch.rand(30, 3)
    edges = knn_graph(pos, 4, flow="target_to_source")
    assert edges.shape == (2, 120) and bool((edges[0][1:] >= edges[0][:-1]).all())
    assert knn_graph(pos[:0], 4).shape == (2, 0)
    big = torch.rand(700, 3)  # above CELL_LIST_MIN: auto takes cell lists
    assert torch.equal(knn_graph(big, 5), knn_graph(big, 5, method="all"))
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="k must be"):
            knn_graph(pos, bad)
    with pytest.raises(ValueError, match="method"):
        knn_graph(pos, 3, method="ball-tree")


def test_knn_graph_cell_lists_on_clustered_points():
    """A dense cluster in a sparse cloud: wide padded rows fall back to sorting, and several
    search radii are needed; still the edges of all pairs."""
    g = torch.Generator().manual_seed(5)
    pos = torch.cat([torch.rand(300, 3, generator=g) * 40, torch.rand(200, 3, generator=g)])
    pos = pos.to(D64)
    pos[300:320] = pos[320:340]  # exact distance ties inside the cluster
    for k in (3, 16):
        for loop in (False, True):
            cells = knn_graph(pos, k, loop=loop, method="cells")
            assert torch.equal(cells, knn_graph(pos, k, loop=loop, method="all"))


# ------------------------------------------------------------ periodic cell lists (issue 12)
def pbc_case(name):
    """``(pos, cell, batch, pbc, r)`` of the periodic test systems."""
    g = torch.Generator().manual_seed(len(name))
    if name == "triclinic_small":  # r larger than the cell: many images, an unwrapped atom
        cell = torch.tensor([[2.5, 0.0, 0.0], [0.7, 2.2, 0.0], [0.3, -0.4, 2.8]], dtype=D64)
        frac = torch.rand(6, 3, generator=g, dtype=D64)
        frac[0] += torch.tensor([1.0, -1.0, 0.0], dtype=D64)
        return frac @ cell, cell[None], None, (True, True, True), 5.0
    if name == "cubic_large":  # wrapped atoms at ~0.45 per unit volume, 15 neighbours
        n = 500
        side = (n / 0.45) ** (1 / 3)
        pos = torch.rand(n, 3, generator=g, dtype=D64) * side
        pos[:10] = pos[10:20] + torch.tensor([side, 0.0, 0.0], dtype=D64)  # images coincide
        return pos, side * torch.eye(3, dtype=D64)[None], None, (True, True, True), 2.0
    if name == "slab":
        cell = torch.tensor([[9.0, 0.0, 0.0], [4.5, 7.8, 0.0], [0.0, 0.0, 30.0]], dtype=D64)
        frac = torch.rand(400, 3, generator=g, dtype=D64) * torch.tensor([1.0, 1.0, 0.3])
        return frac @ cell, cell[None], None, (True, True, False), 3.0
    # several graphs in one batch: a small cell, a large one and a slab
    sizes = [5, 300, 280]
    cells = torch.stack(
        [
            torch.tensor([[3.0, 0.0, 0.0], [0.0, 3.2, 0.0], [0.5, 0.0, 2.9]]),
            9.0 * torch.eye(3),
            torch.tensor([[8.0, 0.0, 0.0], [0.0, 8.0, 0.0], [0.0, 0.0, 20.0]]),
        ]
    ).to(D64)
    batch = torch.repeat_interleave(torch.arange(3), torch.tensor(sizes))
    frac = torch.rand(sum(sizes), 3, generator=g, dtype=D64)
    pos = torch.einsum("na,nab->nb", frac, cells[batch])
    pbc = torch.tensor([[True, True, True], [True, True, True], [True, True, False]])
    return pos, cells, batch, pbc, 3.5


PBC_CASES = ["triclinic_small", "cubic_large", "slab", "batch"]


def _pbc_options():
    return [
        dict(loop=False, max_num_neighbors=None),
        dict(loop=True, max_num_neighbors=12),
        dict(loop=False, max_num_neighbors=12, tie_tolerance=None),
    ]


_REFERENCE = {}


def pbc_reference(name, index):
    """All-pairs edges of ``pbc_case(name)`` with ``_pbc_options()[index]`` (computed once)."""
    if (name, index) not in _REFERENCE:
        pos, cell, batch, pbc, r = pbc_case(name)
        options = _pbc_options()[index]
        _REFERENCE[name, index] = radius_graph_pbc(
            pos, cell, r, batch, pbc, method="all", **options
        )
    return _REFERENCE[name, index]


def _same_pbc(got, ref):
    assert torch.equal(got[0], ref[0])
    assert torch.equal(got[1], ref[1])


@pytest.mark.parametrize("name", PBC_CASES)
def test_radius_graph_pbc_cell_lists_equal_all_pairs(name):
    pos, cell, batch, pbc, r = pbc_case(name)
    for index, options in enumerate(_pbc_options()):
        ref = pbc_reference(name, index)
        assert ref[0].shape[1] > 10 * pos.shape[0] // 2  # a real test: many edges
        _same_pbc(radius_graph_pbc(pos, cell, r, batch, pbc, method="cells", **options), ref)
        chunked = radius_graph_pbc(
            pos, cell, r, batch, pbc, method="cells", max_pairs=5000, **options
        )
        _same_pbc(chunked, ref)


def test_radius_graph_pbc_cells_shift_gradient_and_auto():
    pos, cell, batch, pbc, r = pbc_case("batch")
    cell = cell.clone().requires_grad_(True)
    edge_index, shift = radius_graph_pbc(pos, cell, r, batch, pbc, method="cells")
    j, i = edge_index
    (pos[j] + shift - pos[i]).norm(dim=-1).sum().backward()
    assert torch.isfinite(cell.grad).all() and cell.grad.abs().sum() > 0
    auto = radius_graph_pbc(pos, cell.detach(), r, batch, pbc, max_num_neighbors=None)
    _same_pbc(auto, pbc_reference("batch", 0))  # cells (or vesin) above CELL_LIST_MIN
    with pytest.raises(ValueError, match="method"):
        radius_graph_pbc(pos, cell, r, batch, pbc, method="kd-tree")


def test_radius_graph_pbc_cells_float32():
    pos, cell, _, pbc, r = pbc_case("cubic_large")
    pos, cell = pos.float(), cell.float()
    ref = radius_graph_pbc(pos, cell, r, pbc=pbc, method="all")
    _same_pbc(radius_graph_pbc(pos, cell, r, pbc=pbc, method="cells"), ref)


def test_vesin_missing_raises(monkeypatch):
    import geolinrpe.models.radius as radius

    monkeypatch.setattr(radius, "_VESIN", False)
    pos = torch.rand(300, 3)
    with pytest.raises(ImportError, match="vesin"):
        radius_graph(pos, 1.0, method="vesin")
    with pytest.raises(ImportError, match="vesin"):
        radius_graph_pbc(pos, torch.eye(3)[None] * 5, 1.0, method="vesin")
    # auto falls back to cell lists
    assert torch.equal(radius_graph(pos, 1.0), radius_graph(pos, 1.0, method="all"))


@pytest.mark.parametrize("name", PBC_CASES)
def test_vesin_equals_reference(name):
    pytest.importorskip("vesin_torch")
    pos, cell, batch, pbc, r = pbc_case(name)
    for index, options in enumerate(_pbc_options()):
        ref = pbc_reference(name, index)
        _same_pbc(radius_graph_pbc(pos, cell, r, batch, pbc, method="vesin", **options), ref)
    # non-periodic: the same points as a cloud (several graphs when batched), float32 too
    for dtype in (D64, torch.float32):
        x = pos.to(dtype)
        for options in _pbc_options():
            ref = radius_graph(x, r, batch, method="all", **options)
            assert torch.equal(radius_graph(x, r, batch, method="vesin", **options), ref)


def test_sort_edges_in_int32_blocks():
    from geolinrpe.models.radius import _sort_edges

    g = torch.Generator().manual_seed(0)
    for n in (10, 100_000, 300_000):  # one block, several, and one centre per block
        i = torch.sort(torch.randint(0, n, (50_000,), generator=g)).values
        j = torch.randint(0, n, (50_000,), generator=g)
        assert torch.equal(_sort_edges(i, j, n), torch.argsort(i * n + j, stable=True))
    big = 2**40  # no int32 block fits: one int64 sort
    assert torch.equal(_sort_edges(i, j, big), torch.argsort(i * big + j))

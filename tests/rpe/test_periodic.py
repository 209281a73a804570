"""The periodic (lattice image sum) FLT RPE for crystals and slabs."""

import math
from itertools import pairwise

import pytest
import torch

from geolinrpe import RPEAttention
from geolinrpe.rpe.periodic import PeriodicRPE, half_space_indices
from geolinrpe.testing import assert_padding_consistent, assert_translation_invariant

D64 = torch.float64
CRYSTAL = torch.tensor([[3.0, 0.2, 0.1], [0.4, 2.8, 0.0], [0.3, -0.2, 3.2]], dtype=D64)
OTHER = torch.tensor([[4.0, 0.0, 0.0], [1.0, 3.5, 0.0], [0.5, 0.5, 3.0]], dtype=D64)
# slab: a_3 spans the vacuum and is tilted (its in-plane part must not enter the lattice)
SLAB = torch.tensor([[3.0, 0.0, 0.0], [1.0, 2.8, 0.0], [0.7, -0.5, 12.0]], dtype=D64)
SLAB2 = torch.tensor([[2.5, 0.3, 0.0], [-0.4, 3.1, 0.2], [0.0, 0.3, 10.0]], dtype=D64)


def rpe_for(pbc=(True, True, True), max_index=3, lengthscales=(0.5, 0.8), **kw):
    rpe = PeriodicRPE(3, 2, max_index=max_index, pbc=pbc, amplitude=1.3, **kw).double()
    with torch.no_grad():
        rpe.log_lengthscale.copy_(torch.tensor(lengthscales).log())
    return rpe


def atoms(cell, n, generator=None):
    """Random atoms inside the cell (fractional coordinates uniform in [0, 1))."""
    return torch.rand(n, 3, dtype=D64, generator=generator) @ cell


def packed(cells, sizes, embed_dim=16):
    gen = torch.Generator().manual_seed(7)
    pos = torch.cat([atoms(c, n, gen) for c, n in zip(cells, sizes, strict=True)])
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    return torch.randn(sum(sizes), embed_dim, dtype=D64), pos, batch, torch.stack(list(cells))


def series_error(rpe, cell, n=7):
    """Max |pairwise closed form - explicit image sum| over the pairs of n random atoms."""
    pos = atoms(cell, n)
    enc = rpe.encode_positions(pos, cell=cell[None])
    got = rpe.pairwise(enc[None], exact=True)[0]
    want = rpe.image_sum(pos[:, None] - pos[None], cell, num_images=4).permute(2, 0, 1)
    return (got - want).abs().max().item()


def test_half_space_indices():
    index, mult = half_space_indices(3, 3)
    assert index.shape == (172, 3) and index[0].abs().sum() == 0 and mult[0] == 1
    full = torch.cat([index, -index[1:]])  # with the mirrored half: every n once
    assert torch.unique(full, dim=0).shape[0] == 7**3
    assert (mult[1:] == 2).all()
    assert half_space_indices(0, 2)[0].shape == (1, 2)
    assert half_space_indices(2, 1)[0].flatten().tolist() == [0, 1, 2]


def test_crystal_features_equal_the_image_sum_as_max_index_grows():
    """Max error against sum_R f0(Delta + R) (|R_i| <= 4 cells; l = 0.5 and 0.8, cell ~3):
    1.2 / 0.35 / 0.027 / 7.4e-4 / 8.5e-6 / 4.0e-8 at K = 0..5."""
    errors = [series_error(rpe_for(max_index=k), CRYSTAL) for k in range(6)]
    assert all(a > 5 * b for a, b in pairwise(errors[1:])), errors
    assert errors[3] < 2e-3 and errors[5] < 1e-7, errors
    # the features give the series exactly (deterministic), in both splits
    rpe = rpe_for(max_index=2)
    assert rpe.num_features == 2 * 63
    enc = rpe.encode_positions(atoms(CRYSTAL, 9), cell=CRYSTAL[None])
    want = rpe.pairwise(enc[None])[0]
    torch.testing.assert_close(want, rpe.pairwise(enc[None], exact=True)[0], atol=0, rtol=0)
    for split in ("query", "symmetric"):
        got = torch.einsum(
            "ihm,jhm->hij", rpe.query_features(enc, split), rpe.key_features(enc, split)
        )
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("pbc", [(True, True, False), (False, True, False)])
def test_slab_and_wire_closed_form_equals_the_image_sum_as_max_index_grows(pbc):
    """Max error against the in-plane (in-line) image sum, l = 0.5 and 0.8, tilted vacuum
    vector: slab 1.06 / 0.23 / 0.015 / 3.1e-4 / 2.2e-6, wire (periodic along a_2 only)
    0.75 / 0.12 / 7.4e-3 / 1.5e-4 / 9.5e-7 at K = 0..4."""
    errors = [series_error(rpe_for(pbc, max_index=k), SLAB) for k in range(5)]
    assert all(a > 4 * b for a, b in pairwise(errors)), errors
    assert errors[4] < 1e-5, errors


def test_slab_features_kronecker_count_in_plane_exactness_and_unbiased_normal_factor():
    rpe = rpe_for((True, True, False), max_index=2, num_perp_frequencies=3)
    assert rpe.num_frequencies == 13 and rpe.num_features == 4 * 13 * 3
    pos = atoms(SLAB, 8)
    enc = rpe.encode_positions(pos, cell=SLAB[None])
    assert enc.shape == (8, 3 + 4 + 1)
    # features == the estimate (series x normal RFF), both splits
    want = rpe.pairwise(enc[None])[0]
    for split in ("query", "symmetric"):
        got = torch.einsum(
            "ihm,jhm->hij", rpe.query_features(enc, split), rpe.key_features(enc, split)
        )
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    # atoms in one plane parallel to the surface: the normal factor is exactly 1
    flat = pos.clone()
    flat[:, 2] = 4.0
    flat_enc = rpe.encode_positions(flat, cell=SLAB[None])
    torch.testing.assert_close(
        rpe.pairwise(flat_enc[None])[0], rpe.pairwise(flat_enc[None], exact=True)[0]
    )
    # the normal factor is unbiased: the mean over draws -> closed form (4 standard errors)
    draws = []
    for seed in range(300):
        rpe.redraw(torch.Generator().manual_seed(seed))
        draws.append(rpe.pairwise(enc[None])[0].detach())
    draws = torch.stack(draws)
    exact = rpe.pairwise(enc[None], exact=True)[0].detach()
    stderr = draws.std(0) / math.sqrt(len(draws)) + 1e-12
    assert ((draws.mean(0) - exact).abs() <= 4 * stderr).float().mean() > 0.99


def lattice_moves(pos, batch, cells, pbc=(True, True, True)):
    """Move atom 2 of graph 0 and atom 10 of graph 1 by (periodic) lattice vectors."""
    moved = pos.clone()
    for atom, n in ((2, [1.0, -2.0, 1.0]), (10, [0.0, 1.0, 3.0])):
        n = torch.tensor(n, dtype=D64) * torch.tensor(pbc, dtype=D64)
        moved[atom] += n @ cells[batch[atom]]
    return moved


@pytest.mark.parametrize("pbc", [(True, True, True), (True, True, False)])
def test_moving_an_atom_by_a_lattice_vector_changes_nothing(pbc):
    """Packed batch of two graphs with different cells. Exact (measured ~1e-16) in mask mode
    (centred or not) and in logit mode without centring, the layer's default for periodic
    RPEs; logit mode with centring forced on is off by ~0.1-0.3 (the centroid moves by R / n,
    a non-lattice translation)."""
    cells = (CRYSTAL, OTHER) if all(pbc) else (SLAB, SLAB2)
    x, pos, batch, cell = packed(cells, [6, 9])
    moved = lattice_moves(pos, batch, cell, pbc)
    for mode, centre in (("mask", True), ("mask", False), ("logit", None)):
        rpe = rpe_for(pbc, max_index=2)
        attn = RPEAttention(16, 2, rpe=rpe, mode=mode, center_positions=centre).double()
        torch.testing.assert_close(
            attn(x, moved, batch, cell=cell), attn(x, pos, batch, cell=cell), atol=1e-9, rtol=0
        )
    rpe = rpe_for(pbc, max_index=2)
    centred = RPEAttention(16, 2, rpe=rpe, mode="logit", center_positions=True).double()
    change = (centred(x, moved, batch, cell=cell) - centred(x, pos, batch, cell=cell)).abs().max()
    assert change > 1e-3


@pytest.mark.parametrize("pbc", [(True, True, True), (True, True, False)])
@pytest.mark.parametrize("mode", ["logit", "mask"])
def test_forward_equals_explicit_reference_packed_and_padded(pbc, mode):
    cells = (CRYSTAL, OTHER, CRYSTAL) if all(pbc) else (SLAB, SLAB2, SLAB)
    x, pos, batch, cell = packed(cells, [8, 1, 5])
    attn = RPEAttention(
        16, 2, rpe=rpe_for(pbc, max_index=2), mode=mode, chunk_size=3, num_features=24
    ).double()
    torch.testing.assert_close(
        attn(x, pos, batch, cell=cell),
        attn.reference(x, pos, batch, kernel="features", cell=cell),
        atol=1e-10,
        rtol=1e-10,
    )
    if mode == "mask" and all(pbc):  # deterministic series: the "exact" f is the same
        torch.testing.assert_close(
            attn(x, pos, batch, cell=cell),
            attn.reference(x, pos, batch, kernel="features", rpe="exact", cell=cell),
            atol=1e-10,
            rtol=1e-10,
        )

    def layer(x, pos, batch=None, key_padding_mask=None):
        return attn(x, pos, batch, key_padding_mask, cell=cell)

    assert_padding_consistent(layer, x, pos, batch, atol=1e-10, rtol=1e-10)


def test_translation_invariance():
    x, pos, batch, cell = packed((CRYSTAL, OTHER), [6, 9])
    shift = torch.tensor([1e3, -2e3, 5e2], dtype=D64)
    mask = RPEAttention(16, 2, rpe=rpe_for(max_index=2), mode="mask", center_positions=False)
    assert_translation_invariant(
        mask.double(), x, pos, shift=shift, batch=batch, cell=cell, atol=1e-9, rtol=1e-9
    )
    # logit mode is exactly translation invariant only with centring, which periodic layers
    # leave off by default (see the lattice-move test)
    rpe = rpe_for(max_index=2)
    logit = RPEAttention(16, 2, rpe=rpe, mode="logit", center_positions=True).double()
    assert_translation_invariant(logit, x, pos, batch=batch, cell=cell, atol=1e-10, rtol=1e-10)


def test_gradients_reach_parameters_positions_and_cell():
    rpe = rpe_for((True, True, False), max_index=1, num_perp_frequencies=2)
    attn = RPEAttention(8, 2, rpe=rpe, mode="mask", num_features=4).double()
    x = torch.randn(5, 8, dtype=D64)
    pos = (torch.rand(5, 3, dtype=D64) @ SLAB).requires_grad_(True)
    cell = torch.stack([SLAB, SLAB2]).requires_grad_(True)
    batch = torch.tensor([0, 0, 0, 1, 1])
    assert torch.autograd.gradcheck(
        lambda p, c: attn(x, p, batch, cell=c), (pos, cell), fast_mode=True
    )
    attn(x, pos, batch, cell=cell).pow(2).sum().backward()
    assert rpe.amplitude.grad.abs().min() > 0 and rpe.log_lengthscale.grad.abs().min() > 0


def test_missing_singular_or_misshapen_cell_raises_value_error():
    attn = RPEAttention(16, 2, rpe=rpe_for(max_index=1), mode="mask").double()
    x, pos, batch, cell = packed((CRYSTAL, OTHER), [4, 3])
    singular = cell.clone()
    singular[1, 2] = singular[1, 0] + singular[1, 1]
    cases = [
        (None, "is periodic: pass cell"),
        (singular, "singular"),
        (cell[:1], "one cell per graph"),
        (cell[:, :2], "cell must have shape"),
    ]
    for bad, match in cases:
        with pytest.raises(ValueError, match=match):
            attn(x, pos, batch, cell=bad)
    with pytest.raises(ValueError, match="needs cell"):
        attn.rpe.encode_positions(pos, batch=batch)
    with pytest.raises(ValueError, match="13 entries"):
        attn.rpe.closed_form(torch.randn(5, 3, dtype=D64))  # plain Cartesian differences


def test_bad_options_raise_value_error_naming_the_option():
    cases = [
        (dict(pos_dim=2), "pos_dim must be 3"),
        (dict(max_index=-1), "max_index"),
        (dict(max_index=1.5), "max_index"),
        (dict(pbc=(False, False, False)), "pbc"),
        (dict(pbc=(True, True)), "pbc"),
        (dict(pbc=(1, 1, 0)), "pbc"),
        (dict(pbc="xy"), "pbc"),
        (dict(num_perp_frequencies=0), "num_perp_frequencies"),
        (dict(lengthscale=-1.0), "lengthscale"),
    ]
    for options, match in cases:
        with pytest.raises(ValueError, match=match):
            PeriodicRPE(**{"pos_dim": 3, "num_heads": 2, **options})


@pytest.mark.parametrize("pbc", [(True, True, True), (True, True, False)])
def test_float32_and_bfloat16_autocast_with_far_atoms(pbc):
    """Wrapped fractional coordinates keep phases accurate 1e3 cells away; the cell maps run
    in full precision under autocast."""
    attn = RPEAttention(16, 2, rpe=rpe_for(pbc, max_index=2), mode="mask").double()
    x, pos, batch, cell = packed((SLAB, SLAB2), [10, 7])
    far = pos + 1e3 * cell[batch].sum(1) * torch.tensor(pbc, dtype=D64)  # a lattice vector
    want = attn(x, pos, batch, cell=cell)
    attn.float()
    got = attn(x.float(), far.float(), batch, cell=cell.float())
    torch.testing.assert_close(got.double(), want, atol=1e-3, rtol=1e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = attn(x.float(), pos.float(), batch, cell=cell.float())
    assert low.dtype == torch.bfloat16 and ((low.double() - want).norm() / want.norm()) < 0.05


# ---------------------------------------------------------------- Coulomb spectrum


def coulomb_rpe(max_index, lengthscales=(1.0, 1.6), amplitude=1.7, **kw):
    rpe = PeriodicRPE(3, 2, max_index=max_index, spectrum="coulomb", amplitude=amplitude, **kw)
    rpe = rpe.double()
    with torch.no_grad():  # set in float64 (the constructor's values were float32)
        rpe.amplitude.fill_(amplitude)
        rpe.log_lengthscale.copy_(torch.tensor(lengthscales, dtype=D64).log())
    return rpe


def salt(cell, n, seed):
    gen = torch.Generator().manual_seed(seed)
    charges = torch.tensor([1.0, -1.0], dtype=D64).repeat(n // 2) * torch.linspace(
        0.5, 1.5, n, dtype=D64
    )
    return atoms(2.5 * cell, n, gen), charges - charges.mean()


def test_coulomb_series_is_the_reciprocal_space_ewald_energy():
    """1/2 q^T F q (off-diagonal and diagonal of the truncated series) equals A times the
    reciprocal-space Ewald energy at alpha = 1 / (sqrt(2) l), the same k set."""
    from geolinrpe.physics.ewald import _reciprocal

    cell = 2.5 * CRYSTAL
    pos, q = salt(CRYSTAL, 10, 0)
    rpe = coulomb_rpe(max_index=12, complete_diagonal=False)
    values = rpe.pairwise(rpe.encode_positions(pos, cell=cell[None])[None], exact=True)[0]
    for head, ls in enumerate((1.0, 1.6)):
        want = 1.7 * _reciprocal(pos, q, cell, 1 / (math.sqrt(2) * ls), 25.0, 4096)
        assert float(0.5 * q @ values[head].detach() @ q) == pytest.approx(float(want), rel=1e-10)


def test_completed_diagonal_is_the_converged_series_at_zero():
    """f(0) - f_hat(0) shrinks with max_index to 0, and the completed diagonal equals the
    converged series: at K = 3 the same energy as K = 14 up to the off-diagonal terms."""
    cell = 2.5 * CRYSTAL
    pos, q = salt(CRYSTAL, 8, 1)
    corrections = []
    for K in (2, 4, 14):
        rpe = coulomb_rpe(max_index=K)
        enc = rpe.encode_positions(pos, cell=cell[None])
        corrections.append(rpe.diagonal_correction(enc)[0].abs().max().item())
        diag = torch.diagonal(rpe.pairwise(enc[None], exact=True)[0], dim1=-2, dim2=-1)
        plain = coulomb_rpe(max_index=14, complete_diagonal=False)
        plain_enc = plain.encode_positions(pos, cell=cell[None])
        converged = torch.diagonal(plain.pairwise(plain_enc[None], exact=True)[0], dim1=-2, dim2=-1)
        torch.testing.assert_close(diag, converged, rtol=1e-10, atol=1e-10)
    assert corrections[0] > corrections[1] > 1e3 * corrections[2]
    assert corrections[2] < 1e-10


def test_gaussian_completed_diagonal_equals_the_image_sum():
    rpe = rpe_for(max_index=1, complete_diagonal=True)
    pos = atoms(CRYSTAL, 4)
    enc = rpe.encode_positions(pos, cell=CRYSTAL[None])
    diag = torch.diagonal(rpe.pairwise(enc[None], exact=True)[0], dim1=-2, dim2=-1)
    want = rpe.image_sum(torch.zeros(3, dtype=D64), CRYSTAL, num_images=6)
    torch.testing.assert_close(diag, want[:, None].expand_as(diag), rtol=1e-12, atol=1e-12)


def test_coulomb_energy_of_a_crystal_from_the_series_plus_real_space_is_ewald():
    """Real-space erfc sum + (1/2) q^T F q (completed diagonal) - self term = the Ewald energy,
    whatever max_index (the diagonal is exact, the off-diagonal converged at K = 12)."""
    from geolinrpe.physics import ewald
    from geolinrpe.physics.ewald import _real_space

    cell = 2.5 * CRYSTAL
    pos, q = salt(CRYSTAL, 10, 2)
    ls = 1.0
    alpha = 1 / (math.sqrt(2) * ls)
    rpe = coulomb_rpe(max_index=12, lengthscales=(ls, ls), amplitude=1.0)
    values = rpe.pairwise(rpe.encode_positions(pos, cell=cell[None])[None], exact=True)[0, 0]
    real = _real_space(pos, q, cell, alpha, 40.0)
    got = real + 0.5 * q @ values.detach() @ q - alpha / math.sqrt(math.pi) * q.pow(2).sum()
    assert float(got) == pytest.approx(float(ewald(pos, q, cell, coulomb_constant=1.0)), rel=1e-9)


@pytest.mark.parametrize("layout", ["packed", "dense"])
def test_layer_with_completed_diagonal_equals_its_references(layout):
    """Engine == explicit features reference == dense reference with the exact kernel (ELU
    is deterministic), with the completed diagonal, in float64; gradients reach A and l."""
    rpe = coulomb_rpe(max_index=2)
    attn = RPEAttention(16, 2, rpe=rpe, mode="mask", normalize="none").double()
    x, pos, batch, cell = packed((2.5 * CRYSTAL, 2.5 * OTHER), [6, 5])
    if layout == "dense":
        from geolinrpe.ops.packing import to_padded

        (xd, mask), posd = to_padded(x, batch), to_padded(pos, batch)[0]
        args, kwargs = (xd, posd), dict(key_padding_mask=mask, cell=cell)
    else:
        args, kwargs = (x, pos, batch), dict(cell=cell)
    out = attn(*args, **kwargs)
    for kernel, which in (("features", "features"), ("exact", "features"), ("exact", "exact")):
        ref = attn.reference(*args, kernel=kernel, rpe=which, **kwargs)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    attn.quadratic_below = 0  # the chunked engine, not the explicit small-n form
    torch.testing.assert_close(attn(*args, **kwargs), out, rtol=1e-10, atol=1e-10)
    attn(*args, **kwargs).pow(2).sum().backward()
    assert rpe.amplitude.grad.abs().min() > 0 and rpe.log_lengthscale.grad.abs().min() > 0


def test_completed_diagonal_layer_is_translation_and_lattice_shift_invariant():
    attn = RPEAttention(16, 2, rpe=coulomb_rpe(max_index=2), mode="mask", normalize="none")
    attn = attn.double()
    x, pos, batch, cell = packed((2.5 * CRYSTAL, 2.5 * OTHER), [6, 5])
    out = attn(x, pos, batch, cell=cell)
    shifted = pos + torch.tensor([0.3, -1.1, 2.0], dtype=D64)
    shifted[2] += cell[0, 1] - cell[0, 2]
    torch.testing.assert_close(attn(x, shifted, batch, cell=cell), out, rtol=1e-9, atol=1e-9)


def test_coulomb_options_are_checked():
    with pytest.raises(ValueError, match="spectrum must be one of"):
        PeriodicRPE(3, 2, spectrum="yukawa")
    with pytest.raises(ValueError, match="every direction periodic"):
        PeriodicRPE(3, 2, spectrum="coulomb", pbc=(True, True, False))
    with pytest.raises(ValueError, match="every direction periodic"):
        PeriodicRPE(3, 2, complete_diagonal=True, pbc=(True, True, False))
    with pytest.raises(ValueError, match="needs mode='mask' and normalize='none'"):
        RPEAttention(16, 2, rpe=coulomb_rpe(max_index=1), mode="mask")
    with pytest.raises(ValueError, match="needs mode='mask' and normalize='none'"):
        RPEAttention(16, 2, rpe=coulomb_rpe(max_index=1), mode="logit")
    with pytest.raises(ValueError, match="Gaussian's image sum"):
        coulomb_rpe(max_index=1).image_sum(torch.zeros(3, dtype=D64), CRYSTAL)
    plain = coulomb_rpe(max_index=1, complete_diagonal=False)
    RPEAttention(16, 2, rpe=plain, mode="logit")  # allowed without the completion

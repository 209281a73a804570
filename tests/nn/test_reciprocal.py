"""ReciprocalEnergy: the learned reciprocal-space energy equals its dense reference and Ewald."""

from __future__ import annotations

import math

import pytest
import torch

from geolinrpe.nn.reciprocal import ReciprocalEnergy
from geolinrpe.ops.packing import to_padded
from geolinrpe.physics import ewald
from geolinrpe.physics.ewald import _real_space

D64 = torch.float64
CELLS = torch.tensor(
    [
        [[7.0, 0.3, 0.0], [0.5, 6.0, 0.2], [0.0, 0.4, 8.0]],
        [[6.5, 0.0, 0.0], [1.0, 6.2, 0.0], [0.3, 0.2, 7.1]],
    ],
    dtype=D64,
)


def graphs(sizes=(7, 4), embed_dim=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    pos = torch.cat(
        [torch.rand(n, 3, generator=gen, dtype=D64) @ CELLS[g] for g, n in enumerate(sizes)]
    )
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    return torch.randn(sum(sizes), embed_dim, generator=gen, dtype=D64), pos, batch


def module(max_index=2, **kw):
    torch.manual_seed(0)
    return ReciprocalEnergy(6, num_channels=3, max_index=max_index, **kw).double()


def test_packed_and_padded_equal_the_dense_reference_with_gradients():
    energy = module()
    x, pos, batch = graphs()
    x.requires_grad_(True)
    pos.requires_grad_(True)  # forces
    got = energy(x, pos, CELLS, batch)
    want = energy.reference(x, pos, CELLS, batch)
    assert got.shape == (2,)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    (xd, mask), posd = to_padded(x, batch), to_padded(pos, batch)[0]
    torch.testing.assert_close(energy(xd, posd, CELLS, key_padding_mask=mask), got)
    inputs = [x, pos, *energy.parameters()]
    grads = torch.autograd.grad(got.sum(), inputs)
    ref_grads = torch.autograd.grad(energy.reference(x, pos, CELLS, batch).sum(), inputs)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_with_unit_charges_it_is_the_reciprocal_part_of_ewald():
    """Charges set through the weights (x one-hot), A = 1, one width: energy = Ewald - real-space
    erfc sum + alpha / sqrt(pi) sum q^2 (Gaussian units), to 1e-9 with max_index 10."""
    ls = 1.2
    energy = ReciprocalEnergy(2, num_channels=1, max_index=10, lengthscale=ls, amplitude=1.0)
    energy = energy.double()
    gen = torch.Generator().manual_seed(3)
    cell = CELLS[0]
    pos = torch.rand(8, 3, generator=gen, dtype=D64) @ cell
    q = torch.tensor([1.0, -1.0] * 4, dtype=D64)
    x = torch.stack([q.clamp_min(0), (-q).clamp_min(0)], -1)  # one-hot Na / Cl
    with torch.no_grad():  # the width in float64 (the constructor's was float32)
        energy.rpe.log_lengthscale.copy_(torch.tensor([ls], dtype=D64).log())
        energy.charges.weight.copy_(torch.tensor([[1.0, -1.0]], dtype=D64))
    alpha = 1 / (math.sqrt(2) * ls)
    want = (
        ewald(pos, q, cell, coulomb_constant=1.0)
        - _real_space(pos, q, cell, alpha, 30.0)
        + alpha / math.sqrt(math.pi) * q.pow(2).sum()
    )
    got = energy(x, pos, cell[None])
    assert float(got) == pytest.approx(float(want), rel=1e-9)


def test_invariant_to_translation_lattice_shifts_and_permutation():
    energy = module()
    x, pos, batch = graphs()
    ref = energy(x, pos, CELLS, batch)
    moved = pos + torch.tensor([0.4, -2.0, 1.1], dtype=D64)
    moved[1] += CELLS[0, 0] - CELLS[0, 2]
    moved[9] += 2 * CELLS[1, 1]
    torch.testing.assert_close(energy(x, moved, CELLS, batch), ref, rtol=1e-9, atol=1e-9)
    perm = torch.cat([torch.randperm(7), 7 + torch.randperm(4)])
    torch.testing.assert_close(
        energy(x[perm], pos[perm], CELLS, batch), ref, rtol=1e-10, atol=1e-10
    )


def test_energy_is_non_negative_for_positive_amplitudes():
    energy = module()
    for seed in range(3):
        x, pos, batch = graphs(seed=seed)
        assert bool((energy(x, pos, CELLS, batch) >= -1e-9).all())


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="num_channels"):
        ReciprocalEnergy(4, num_channels=0)
    with pytest.raises(ValueError, match="lengthscale"):
        ReciprocalEnergy(4, lengthscale=(1.0, -1.0))
    with pytest.raises(ValueError, match="every direction periodic"):
        ReciprocalEnergy(4, rpe_options={"pbc": (True, True, False)})


def test_latent_charges_are_neutral_per_graph():
    """A charge offset shared by a graph's atoms changes nothing (the k = 0 term is left out)."""
    energy = module()
    x, pos, batch = graphs()
    ref = energy(x, pos, CELLS, batch)
    shifted = x.clone()
    shifted[:, 0] += 5.0  # every atom's charge moves by 5 W[:, 0]
    assert float(energy.charges.weight[:, 0].abs().min()) > 0
    torch.testing.assert_close(energy(shifted, pos, CELLS, batch), ref, rtol=1e-10, atol=1e-10)

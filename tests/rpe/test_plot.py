"""rpe.plot: PNGs of f for every Fourier family (1D, 2D, 3D, periodic), labelled figures,
direction and redraw spreads, the module left untouched, and bad arguments rejected."""

import math

import pytest
import torch

from geolinrpe.rpe import build, plot
from geolinrpe.rpe.plot import profile_data, profile_figure, unit_directions

PNG = b"\x89PNG\r\n\x1a\n"
FAST = dict(resolution=11, directions=8)
SLAB = torch.diag(torch.tensor([4.0, 5.0, 20.0]))

FAMILIES = [
    ("flt-kernel", 1, {}),
    ("flt-kernel", 2, {"kernel": "laplace"}),
    ("flt-kernel", 3, {}),
    ("flt-gm", 2, {"init_weight": 1.0, "num_components": 3, "num_frequencies": 8}),
    ("flt-mlp", 3, {"quadrature_nodes": 12, "num_frequencies": 8}),
    ("flt-local", 1, {}),
    ("flt-radial", 3, {"num_frequencies": 8}),
]


def _state(module):
    """Everything plot must not change: state (buffers included), mode, requires_grad."""
    tensors = {k: v.clone() for k, v in module.state_dict(keep_vars=False).items()}
    tensors.update({f"buffer:{k}": v.clone() for k, v in module.named_buffers()})
    modes = [m.training for m in module.modules()]
    grads = [p.requires_grad for p in module.parameters()]
    return tensors, modes, grads


def _assert_same_state(before, after):
    assert before[1:] == after[1:]
    assert before[0].keys() == after[0].keys()
    for key, value in before[0].items():
        assert torch.equal(value, after[0][key]), key


@pytest.mark.parametrize(("name", "pos_dim", "options"), FAMILIES)
def test_plot_writes_png_for_every_family(tmp_path, name, pos_dim, options):
    rpe = build(name, pos_dim=pos_dim, num_heads=2, **options)
    out = plot(rpe, tmp_path / "sub" / f"{name}{pos_dim}.png", unit="u", title="layer 1", **FAST)
    data = out.read_bytes()
    assert data[:8] == PNG and len(data) > 2000


def test_periodic_needs_a_cell_and_plots_with_one(tmp_path):
    rpe = build("flt-periodic", pos_dim=3, num_heads=2, max_index=3, pbc=(True, True, False))
    with pytest.raises(ValueError, match="cell"):
        plot(rpe, tmp_path / "x.png", **FAST)
    out = plot(rpe, tmp_path / "p.png", cell=SLAB, unit="Å", draws=2, **FAST)
    assert out.read_bytes()[:8] == PNG
    data = profile_data(rpe, cell=SLAB, **FAST)
    assert not data.isotropic and data.closed_form_mean is not None  # a lattice
    # the series with K = 3 matches the real-space image sum (cell 4 x 5, l = 1)
    image_sum = rpe.image_sum(torch.zeros(3), SLAB, num_images=3)
    torch.testing.assert_close(data.closed_form[0], image_sum, rtol=1e-4, atol=1e-4)


def test_map_kind_for_2d(tmp_path):
    rpe = build("flt-gm", pos_dim=2, num_heads=3, init_weight=1.0, num_components=2)
    out = plot(rpe, tmp_path / "m.png", kind="map", resolution=9, unit="patches")
    assert out.read_bytes()[:8] == PNG
    fig = profile_figure(rpe, kind="map", resolution=9, unit="patches", title="layer 0")
    visible = [ax for ax in fig.axes if ax.get_visible() and ax.get_label() != "<colorbar>"]
    titles = [ax.get_title() for ax in visible]
    assert "head 2: closed form" in titles and "head 2: current draw" in titles
    assert any(ax.get_xlabel() == "Δ₁ (patches)" for ax in visible)
    assert any(ax.get_ylabel() == "Δ₂ (patches)" for ax in visible)
    assert fig.get_suptitle().startswith("layer 0: GaussianMixtureRPE (flt-gm)")


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(("name", "pos_dim", "options"), FAMILIES)
def test_plot_leaves_the_module_unchanged(tmp_path, name, pos_dim, options, training):
    rpe = build(name, pos_dim=pos_dim, num_heads=2, **options).train(training)
    before, rng = _state(rpe), torch.get_rng_state()
    plot(rpe, tmp_path / "f.png", draws=3, **FAST)
    if pos_dim == 2:
        plot(rpe, tmp_path / "m.png", kind="map", resolution=5)
    _assert_same_state(before, _state(rpe))
    assert torch.equal(rng, torch.get_rng_state())  # seeded generators only


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_labels_title_and_one_legend(dtype):
    rpe = build("flt-radial", pos_dim=3, num_heads=5, num_frequencies=8).to(dtype)
    fig = profile_figure(rpe, unit="Å", title="layer 2", draws=2, **FAST)
    title = fig.get_suptitle()
    assert title.startswith("layer 2: ") and "RadialRPE (flt-radial)" in title
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == [f"head {h}" for h in range(5)]
    assert len(fig.axes) == 8  # 2 rows of 4 columns, 3 hidden
    xlabels = {ax.get_xlabel() for ax in axes} - {""}
    assert xlabels == {"|Δ| (Å)"}
    assert {ax.get_ylabel() for ax in axes} == {"f(Δ)", ""}
    assert axes[0].get_ylabel() == "f(Δ)" and axes[4].get_ylabel() == "f(Δ)"
    assert len(fig.legends) == 1 and all(ax.get_legend() is None for ax in axes)
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels[0] == "closed form (radial)"
    assert "current draw: min–max over 8 directions" in labels
    assert "redraws (2): min–max over draws and directions" in labels
    data = profile_data(rpe, **FAST)
    assert data.closed_form.dtype == dtype and data.estimate_mean.dtype == dtype


def test_no_unit_no_title():
    rpe = build("flt-kernel", pos_dim=1, num_heads=1)
    fig = profile_figure(rpe, **FAST)
    assert fig.axes[0].get_xlabel() == "Δ"
    assert fig.get_suptitle().startswith("ShiftInvariantKernelRPE (flt-kernel), 1D positions")


def test_spread_band_is_zero_width_in_1d_and_not_in_3d():
    local = build("flt-local", pos_dim=1, num_heads=2)
    data = profile_data(local, **FAST)
    assert data.directions == 1
    assert torch.equal(data.estimate_min, data.estimate_max)
    assert torch.equal(data.estimate_mean, data.estimate_min)
    assert data.radius[0] == -5.0 and data.radius[-1] == 5.0
    assert not profile_figure(local, **FAST).axes[0].collections  # no band drawn
    radial = build("flt-radial", pos_dim=3, num_heads=2, num_frequencies=8)
    data = profile_data(radial, **FAST)
    assert data.radius[0] == 0.0 and data.directions == 8
    assert data.isotropic and data.closed_form_mean is None
    width = data.estimate_max - data.estimate_min
    assert torch.all(width >= 0) and width[-1].min() > 0
    assert torch.equal(width[0], torch.zeros(2))  # Delta = 0 in every direction
    assert torch.all(data.estimate_min <= data.estimate_mean + 1e-6)
    assert torch.all(data.estimate_mean <= data.estimate_max + 1e-6)


def test_closed_form_profile_and_isotropy():
    kernel = build("flt-kernel", pos_dim=3, num_heads=2, lengthscale=[1.0, 2.0]).double()
    data = profile_data(kernel, extent=4.0, **FAST)
    expected = torch.exp(-(data.radius[:, None] ** 2) / (2 * torch.tensor([1.0, 2.0]) ** 2))
    torch.testing.assert_close(data.closed_form, expected.double())
    assert data.isotropic
    gm = build("flt-gm", pos_dim=2, num_heads=2, init_weight=1.0, num_components=3)
    data = profile_data(gm, **FAST)
    assert not data.isotropic
    assert data.closed_form_mean.shape == (data.closed_form_radius.shape[0], 2)
    torch.testing.assert_close(data.closed_form_mean[0], data.closed_form[0])  # Delta = 0


def test_draws_spread_random_frequencies_only():
    rpe = build("flt-kernel", pos_dim=2, num_heads=2, num_frequencies=4)
    before = _state(rpe)
    data = profile_data(rpe, draws=4, **FAST)
    _assert_same_state(before, _state(rpe))
    assert data.redraws == 4
    assert torch.all(data.redraw_min <= data.redraw_max)
    assert (data.redraw_max - data.redraw_min)[-1].min() > 0
    again = profile_data(rpe, draws=4, **FAST)  # seeded: reproducible
    assert torch.equal(data.redraw_min, again.redraw_min)
    assert profile_data(rpe, **FAST).redraw_min is None
    crystal = build("flt-periodic", pos_dim=3, num_heads=1, max_index=1)  # deterministic
    data = profile_data(crystal, draws=3, cell=torch.eye(3) * 3, **FAST)
    assert data.redraws == 0 and data.redraw_min is None


@pytest.mark.parametrize(("pos_dim", "count"), [(2, 12), (3, 64), (4, 16)])
def test_unit_directions_are_deterministic_and_well_spread(pos_dim, count):
    dirs = unit_directions(pos_dim, count)
    assert dirs.shape == (count, pos_dim)
    torch.testing.assert_close(dirs.norm(dim=-1), torch.ones(count, dtype=torch.float64))
    assert torch.equal(dirs, unit_directions(pos_dim, count))
    gap = torch.cdist(dirs, dirs) + 10 * torch.eye(count)
    if pos_dim == 2:
        torch.testing.assert_close(gap.min(), torch.tensor(2 * math.sin(math.pi / count)).double())
    if pos_dim == 3:  # Fibonacci sphere: nearest neighbours about sqrt(4 pi / count) apart
        assert gap.min() > 0.6 * math.sqrt(4 * math.pi / count)
        assert dirs.mean(0).norm() < 0.05
    for p in (2, 3):
        torch.testing.assert_close(unit_directions(p, 1)[0], torch.eye(p, dtype=torch.float64)[0])


def test_plot_rejects_bad_arguments(tmp_path):
    path = tmp_path / "x.png"
    kernel1 = build("flt-kernel", pos_dim=1, num_heads=1)
    kernel3 = build("flt-kernel", pos_dim=3, num_heads=1)
    with pytest.raises(ValueError, match="FourierRPE"):
        plot(torch.nn.Linear(2, 2), path)
    with pytest.raises(ValueError, match="FourierRPE"):
        plot(build("toeplitz-fft", pos_dim=1, num_heads=1, max_offset=4), path)
    for extent in (0, -1.0, float("nan"), float("inf"), "far"):
        with pytest.raises(ValueError, match="extent"):
            plot(kernel1, path, extent=extent)
    for resolution in (1, 2.5, True):
        with pytest.raises(ValueError, match="resolution"):
            plot(kernel1, path, resolution=resolution)
    with pytest.raises(ValueError, match="directions"):
        plot(kernel3, path, directions=0)
    with pytest.raises(ValueError, match="draws"):
        plot(kernel3, path, draws=-1)
    with pytest.raises(ValueError, match="kind"):
        plot(kernel3, path, kind="heat")
    with pytest.raises(ValueError, match="2D"):
        plot(kernel3, path, kind="map")
    with pytest.raises(ValueError, match="draws"):
        plot(build("flt-kernel", pos_dim=2, num_heads=1), path, kind="map", draws=2)
    with pytest.raises(ValueError, match="unit"):
        plot(kernel1, path, unit=3)
    with pytest.raises(ValueError, match="title"):
        plot(kernel1, path, title=2)
    with pytest.raises(ValueError, match="periodic"):
        plot(kernel3, path, cell=torch.eye(3))
    crystal = build("flt-periodic", pos_dim=3, num_heads=1, max_index=1)
    with pytest.raises(ValueError, match="cell"):
        plot(crystal, path, cell=torch.eye(2), **FAST)
    with pytest.raises(ValueError, match="independent"):
        plot(crystal, path, cell=torch.zeros(3, 3), **FAST)
    assert not path.exists()

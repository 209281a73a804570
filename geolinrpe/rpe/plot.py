r"""Plot a learned Fourier RPE ``f(Delta)`` to PNG, one panel per head.

:func:`plot` saves the figure that :func:`profile_figure` draws from the numbers of
:func:`profile_data`. Every panel compares the exact ``f`` (``closed_form``) with the
Monte-Carlo estimate that the model actually uses with its current frequencies
(``estimate``):

* 1D positions: both over ``Delta in [-extent, extent]``.
* ``p >= 2`` (``kind="profile"``): radial profiles over ``|Delta| in [0, extent]``. The estimate
  is evaluated along ``directions`` deterministic, well-spread unit directions (equally
  spaced angles in 2D, a Fibonacci sphere in 3D) at every radius and drawn as its mean over
  directions with a shaded min-max band: a fixed draw of frequencies is isotropic only in
  expectation, and the band is how far one direction can be from another. The closed form is
  drawn along the first axis (for an isotropic ``f`` that is the radial profile); when ``f``
  itself depends on the direction (checked numerically: Gaussian-mixture and MLP spectra,
  lattices), its mean over the same directions is drawn too (dashed), which is what the
  estimate's mean should follow.
* 2D positions, ``kind="map"``: heat maps of the closed form and the estimate side by side
  per head, on one colour scale per head.
* ``draws > 0``: the spread of the estimate over that many fresh frequency draws (of a copy of
  the module, seeded generators), min-max over draws and directions, for families with random
  frequencies.

The module passed in is never changed (no redraw, no device or mode change): evaluation runs
under ``no_grad`` on CPU (a copy when the module lives elsewhere), in the module's floating
dtype (at least float32).

Lattice-periodic RPEs (``"flt-periodic"``) take pair data built from a cell: pass ``cell``
(``[3, 3]``, rows are lattice vectors) and ``Delta`` is Cartesian, as for the others.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from .base import FourierRPE

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

#: plot kinds accepted by :func:`plot`
KINDS = ("profile", "map")
#: most closed-form evaluations spent on the directional mean of an anisotropic ``f``
#: (quadrature closed forms, ``"flt-mlp"`` in 3D, cost about a millisecond per point)
CLOSED_FORM_MEAN_POINTS = 2048
#: relative spread over directions below which the closed form counts as isotropic
_ISOTROPY_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-9}


@dataclass(frozen=True)
class Profiles:
    """Numbers behind a ``kind="profile"`` figure (float tensors on CPU, ``h`` heads).

    Attributes:
        radius: ``[r]`` abscissa: ``Delta`` over ``[-extent, extent]`` in 1D, ``|Delta|`` over
            ``[0, extent]`` otherwise.
        closed_form: ``[r, h]`` exact ``f`` along the first axis ``(|Delta|, 0, ...)``.
        estimate_mean: ``[r, h]`` current draw's estimate, mean over the directions.
        estimate_min: ``[r, h]`` its minimum over the directions.
        estimate_max: ``[r, h]`` its maximum (equal to the minimum in 1D).
        directions: number of directions (1 in 1D).
        isotropic: the closed form is the same along every probed direction.
        closed_form_radius: ``[r']`` coarser radii of ``closed_form_mean`` (anisotropic ``f``
            only, else ``None``).
        closed_form_mean: ``[r', h]`` exact ``f``, mean over the directions (or ``None``).
        redraws: number of fresh draws behind ``redraw_min``/``redraw_max`` (0: none asked
            for, or the frequencies are deterministic).
        redraw_min: ``[r, h]`` minimum of the estimate over the redraws and directions.
        redraw_max: ``[r, h]`` maximum.
    """

    radius: Tensor
    closed_form: Tensor
    estimate_mean: Tensor
    estimate_min: Tensor
    estimate_max: Tensor
    directions: int
    isotropic: bool
    closed_form_radius: Tensor | None = None
    closed_form_mean: Tensor | None = None
    redraws: int = 0
    redraw_min: Tensor | None = None
    redraw_max: Tensor | None = None


# ------------------------------------------------------------------------------ helpers
def unit_directions(pos_dim: int, count: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """``count`` deterministic, well-spread unit vectors ``[count, pos_dim]``.

    1D: ``+1``. 2D: angles ``2 pi k / count``. 3D: a Fibonacci sphere (golden-angle spiral,
    equal-area bands in ``z``). ``p > 3``: normalised Gaussian vectors from a fixed seed. The
    first direction is the first axis for ``p <= 3`` and ``count = 1``.
    """
    if pos_dim == 1:
        return torch.ones(1, 1, dtype=dtype)
    k = torch.arange(count, dtype=torch.float64)
    if pos_dim == 2:
        angle = 2 * math.pi * k / count
        out = torch.stack([angle.cos(), angle.sin()], -1)
    elif pos_dim == 3:
        z = 1 - (2 * k + 1) / count
        rho = (1 - z**2).clamp_min(0).sqrt()
        phi = math.pi * (3 - math.sqrt(5)) * k
        out = torch.stack([rho * phi.cos(), rho * phi.sin(), z], -1)
    else:
        generator = torch.Generator().manual_seed(0)
        out = torch.randn(count, pos_dim, generator=generator, dtype=torch.float64)
        out = out / out.norm(dim=-1, keepdim=True)
    return out.to(dtype)


def _axis_label(symbol: str, unit: str | None) -> str:
    return f"{symbol} ({unit})" if unit else symbol


def _check(
    module: nn.Module,
    extent: float,
    resolution: int,
    directions: int,
    draws: int,
    kind: str,
    unit: str | None,
    title: str | None,
    cell,
) -> float:
    if not isinstance(module, FourierRPE):
        raise ValueError(
            f"plot needs an RPE with a closed-form f (a FourierRPE), got {type(module).__name__}"
        )
    try:
        extent = float(extent)
    except (TypeError, ValueError):
        raise ValueError(f"extent must be a positive number, got {extent!r}") from None
    if not (math.isfinite(extent) and extent > 0):
        raise ValueError(f"extent must be a positive number, got {extent!r}")
    for name, value, low in (("resolution", resolution, 2), ("directions", directions, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if not isinstance(draws, int) or isinstance(draws, bool) or draws < 0:
        raise ValueError(f"draws must be an int >= 0, got {draws!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "map":
        if module.pos_dim != 2:
            raise ValueError(f"kind='map' needs 2D positions, got pos_dim={module.pos_dim}")
        if draws:
            raise ValueError("draws applies to kind='profile' only")
    for name, value in (("unit", unit), ("title", title)):
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{name} must be a str or None, got {value!r}")
    if module.periodic and cell is None:
        raise ValueError(
            f"{type(module).__name__} is lattice-periodic: its f(Delta) depends on the cell; "
            "pass cell=[3, 3] (rows are lattice vectors)"
        )
    if not module.periodic and cell is not None:
        raise ValueError(f"cell applies to periodic RPEs only, not {type(module).__name__}")
    return extent


def _on_cpu(module: FourierRPE) -> FourierRPE:
    """``module`` itself when it lives on CPU, else a CPU copy (the caller's stays put)."""
    tensors = [*module.parameters(), *module.buffers()]
    if all(t.device.type == "cpu" for t in tensors):
        return module
    return copy.deepcopy(module).cpu()


def _dtype(module: nn.Module) -> torch.dtype:
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.is_floating_point():
            return torch.promote_types(tensor.dtype, torch.float32)
    return torch.float32


class _Evaluator:
    """``closed_form`` and ``estimate`` of Cartesian ``delta [..., p]`` -> ``[..., h]``."""

    def __init__(self, module: FourierRPE, dtype: torch.dtype, cell) -> None:
        self.module, self.dtype = module, dtype
        self.cell = None
        if cell is not None:
            cell = torch.as_tensor(cell, dtype=dtype).cpu()
            if tuple(cell.shape) != (3, 3) or not bool(torch.isfinite(cell).all()):
                raise ValueError(f"cell must be a finite [3, 3] tensor, got {list(cell.shape)}")
            if abs(float(torch.linalg.det(cell.double()))) < 1e-12:
                raise ValueError("cell must have linearly independent rows")
            self.cell = cell[None]

    def _data(self, delta: Tensor, module: FourierRPE) -> Tensor:
        if self.cell is None:
            return delta
        flat = delta.reshape(-1, 3)
        data = module.encode_positions(flat, cell=self.cell)  # pair data of (delta, 0)
        return data.reshape(*delta.shape[:-1], data.shape[-1])

    def closed_form(self, delta: Tensor) -> Tensor:
        return self.module.closed_form(self._data(delta, self.module)).to(self.dtype)

    def estimate(self, delta: Tensor, module: FourierRPE | None = None) -> Tensor:
        module = self.module if module is None else module
        return module.estimate(self._data(delta, module)).to(self.dtype)


def _random_frequencies(module: FourierRPE) -> bool:
    """Whether ``redraw`` changes anything (two seeded redraws of a copy differ)."""
    twin = copy.deepcopy(module)
    twin.redraw(torch.Generator().manual_seed(1))
    first = [b.clone() for b in twin.buffers()]
    twin.redraw(torch.Generator().manual_seed(2))
    return any(not torch.equal(a, b) for a, b in zip(first, twin.buffers(), strict=True))


# ------------------------------------------------------------------------------ numbers
@torch.no_grad()
def profile_data(
    module: FourierRPE,
    extent: float = 5.0,
    resolution: int = 201,
    *,
    directions: int = 64,
    draws: int = 0,
    cell: Tensor | None = None,
) -> Profiles:
    """The curves of a ``kind="profile"`` figure (see the module docstring); arguments as for
    :func:`plot`. Never changes ``module``."""
    extent = _check(module, extent, resolution, directions, draws, "profile", None, None, cell)
    module = _on_cpu(module)
    dtype = _dtype(module)
    evaluate = _Evaluator(module, dtype, cell)
    p = module.pos_dim
    if p == 1:
        radius = torch.linspace(-extent, extent, resolution, dtype=dtype)
        dirs = unit_directions(1, 1, dtype)
    else:
        radius = torch.linspace(0.0, extent, resolution, dtype=dtype)
        dirs = unit_directions(p, directions, dtype)
    axis = torch.zeros(p, dtype=dtype)
    axis[0] = 1
    on_axis = radius[:, None] * axis
    if p > 1:  # probe the isotropy of f at 4 radii x 8 directions, in the same call
        probe_radius = torch.linspace(extent / 4, extent, 4, dtype=dtype)
        probe_points = (probe_radius[:, None, None] * unit_directions(p, 8, dtype)).flatten(0, 1)
        on_axis = torch.cat([on_axis, probe_points])
    closed = evaluate.closed_form(on_axis)  # a quadrature closed form costs ~0.5 s a call
    closed, probe = closed[:resolution], closed[resolution:]  # probe [4 * 8, h]
    points = radius[:, None, None] * dirs  # [r, d, p]
    estimate = evaluate.estimate(points)  # [r, d, h]
    isotropic, closed_radius, closed_mean = True, None, None
    if p > 1:
        probe = probe.unflatten(0, (4, 8))
        spread = (probe.amax(1) - probe.amin(1)).max()
        scale = probe.abs().max().clamp_min(torch.finfo(dtype).tiny)
        isotropic = bool(spread <= _ISOTROPY_TOLERANCE.get(dtype, 1e-4) * scale)
        if not isotropic:
            count = max(2, min(resolution, CLOSED_FORM_MEAN_POINTS // dirs.shape[0]))
            closed_radius = torch.linspace(0.0, extent, count, dtype=dtype)
            closed_mean = evaluate.closed_form(closed_radius[:, None, None] * dirs).mean(1)
    redraws, redraw_min, redraw_max = 0, None, None
    if draws and _random_frequencies(module):
        twin = copy.deepcopy(module)
        low = high = None
        for seed in range(draws):
            twin.redraw(torch.Generator().manual_seed(seed))
            values = evaluate.estimate(points, twin)  # [r, d, h]
            lo, hi = values.amin(1), values.amax(1)
            low = lo if low is None else torch.minimum(low, lo)
            high = hi if high is None else torch.maximum(high, hi)
        redraws, redraw_min, redraw_max = draws, low, high
    return Profiles(
        radius=radius,
        closed_form=closed,
        estimate_mean=estimate.mean(1),
        estimate_min=estimate.amin(1),
        estimate_max=estimate.amax(1),
        directions=dirs.shape[0],
        isotropic=isotropic,
        closed_form_radius=closed_radius,
        closed_form_mean=closed_mean,
        redraws=redraws,
        redraw_min=redraw_min,
        redraw_max=redraw_max,
    )


# ------------------------------------------------------------------------------ figures
def _figure_title(module: FourierRPE, title: str | None) -> str:
    from . import REGISTRY  # the package imports this module first

    names = [name for name, cls in REGISTRY.items() if cls is type(module)]
    family = type(module).__name__ + (f" ({names[0]})" if names else "")
    what = f"{family}, {module.pos_dim}D positions, {module.num_frequencies} frequencies/head"
    return f"{title}: {what}" if title else what


def _grid(count: int, columns: int) -> tuple[int, int]:
    ncols = min(columns, count)
    return math.ceil(count / ncols), ncols


#: legend entries in this order (by the start of their label)
_LEGEND_ORDER = ("closed form", "closed form: mean", "current draw", "current draw: min", "redraws")


def _legend_rank(label: str) -> int:
    return max(i for i, start in enumerate(_LEGEND_ORDER) if label.startswith(start))


def _profile_figure(module: FourierRPE, data: Profiles, unit: str | None, title: str | None):
    from matplotlib.figure import Figure

    heads = module.num_heads
    nrows, ncols = _grid(heads, 4)
    fig = Figure(figsize=(max(6.4, 3.6 * ncols), 2.8 * nrows + 1.4), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True)
    x = data.radius.double().numpy()
    one_d = module.pos_dim == 1
    n_dirs = data.directions
    for h in range(nrows * ncols):
        ax = axes[h // ncols][h % ncols]
        if h >= heads:
            ax.set_visible(False)
            continue
        ax.axhline(0.0, color="0.75", linewidth=0.8, zorder=0)
        if data.redraws:
            ax.fill_between(
                x,
                data.redraw_min[:, h].double().numpy(),
                data.redraw_max[:, h].double().numpy(),
                color="C2",
                alpha=0.18,
                linewidth=0,
                label=f"redraws ({data.redraws}): min–max"
                + ("" if one_d else " over draws and directions"),
            )
        if not one_d:
            ax.fill_between(
                x,
                data.estimate_min[:, h].double().numpy(),
                data.estimate_max[:, h].double().numpy(),
                color="C1",
                alpha=0.3,
                linewidth=0,
                label=f"current draw: min–max over {n_dirs} directions",
            )
        if one_d or data.isotropic:
            label = "closed form" if one_d else "closed form (radial)"
        else:
            label = "closed form along Δ₁ axis"
        ax.plot(x, data.closed_form[:, h].double().numpy(), color="C0", lw=1.8, label=label)
        if data.closed_form_mean is not None:
            ax.plot(
                data.closed_form_radius.double().numpy(),
                data.closed_form_mean[:, h].double().numpy(),
                color="C0",
                lw=1.4,
                linestyle="--",
                label=f"closed form: mean over {n_dirs} directions",
            )
        ax.plot(
            x,
            data.estimate_mean[:, h].double().numpy(),
            color="C1",
            lw=1.4,
            linestyle=":" if one_d else "-.",
            label="current draw (estimate)"
            if one_d
            else f"current draw: mean over {n_dirs} directions",
        )
        ax.set_xlim(x[0], x[-1])
        ax.set_title(f"head {h}")
        ax.grid(alpha=0.25)
        if h % ncols == 0:
            ax.set_ylabel("f(Δ)")
        if h + ncols >= heads:  # nothing below this panel
            ax.set_xlabel(_axis_label("Δ" if one_d else "|Δ|", unit))
            ax.xaxis.set_tick_params(labelbottom=True)
    handles, labels = axes[0][0].get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda i: _legend_rank(labels[i]))
    handles, labels = [handles[i] for i in order], [labels[i] for i in order]
    fig.legend(handles, labels, loc="outside lower center", ncols=2, fontsize="small")
    fig.suptitle(_figure_title(module, title))
    return fig


def _map_figure(
    module: FourierRPE,
    evaluate: _Evaluator,
    dtype: torch.dtype,
    extent: float,
    resolution: int,
    unit: str | None,
    title: str | None,
):
    from matplotlib.figure import Figure

    axis = torch.linspace(-extent, extent, resolution, dtype=dtype)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1)
    exact = evaluate.closed_form(grid).double().numpy()
    estimate = evaluate.estimate(grid).double().numpy()
    heads = module.num_heads
    nrows, pairs = _grid(heads, 2)
    fig = Figure(figsize=(6.6 * pairs, 3.0 * nrows + 0.8), layout="constrained")
    axes = fig.subplots(nrows, 2 * pairs, squeeze=False)
    box = (-extent, extent, -extent, extent)
    for h in range(nrows * pairs):
        row, col = h // pairs, 2 * (h % pairs)
        pair = [axes[row][col], axes[row][col + 1]]
        if h >= heads:
            for ax in pair:
                ax.set_visible(False)
            continue
        values = [exact[..., h].T, estimate[..., h].T]
        low = min(v.min() for v in values)
        high = max(v.max() for v in values)
        if low < 0:  # signed: diverging colours centred at 0
            bound = max(abs(low), abs(high), 1e-12)
            style = dict(cmap="RdBu_r", vmin=-bound, vmax=bound)
        else:
            style = dict(cmap="viridis", vmin=low, vmax=max(high, low + 1e-12))
        for ax, value, what in zip(pair, values, ("closed form", "current draw"), strict=True):
            image = ax.imshow(value, origin="lower", extent=box, **style)
            ax.set_title(f"head {h}: {what}")
            ax.set_xlabel(_axis_label("Δ₁", unit))
            if col == 0 and what == "closed form":
                ax.set_ylabel(_axis_label("Δ₂", unit))
        fig.colorbar(image, ax=pair, shrink=0.85, label="f(Δ)")
    fig.suptitle(_figure_title(module, title))
    return fig


@torch.no_grad()
def profile_figure(
    module: FourierRPE,
    extent: float = 5.0,
    resolution: int = 201,
    *,
    unit: str | None = None,
    title: str | None = None,
    directions: int = 64,
    draws: int = 0,
    kind: str = "profile",
    cell: Tensor | None = None,
) -> Figure:
    """The figure :func:`plot` saves (a :class:`matplotlib.figure.Figure`, not registered
    with ``pyplot``); arguments as for :func:`plot`."""
    extent = _check(module, extent, resolution, directions, draws, kind, unit, title, cell)
    if kind == "map":
        cpu = _on_cpu(module)
        dtype = _dtype(cpu)
        evaluate = _Evaluator(cpu, dtype, cell)
        return _map_figure(cpu, evaluate, dtype, extent, resolution, unit, title)
    data = profile_data(module, extent, resolution, directions=directions, draws=draws, cell=cell)
    return _profile_figure(module, data, unit, title)


def plot(
    module: FourierRPE,
    path: str | Path,
    extent: float = 5.0,
    resolution: int = 201,
    *,
    unit: str | None = None,
    title: str | None = None,
    directions: int = 64,
    draws: int = 0,
    kind: str = "profile",
    cell: Tensor | None = None,
    dpi: int = 110,
) -> Path:
    """Save ``f`` of every head of a Fourier RPE as a PNG at ``path``; returns the path.

    One panel per head (up to 4 columns), closed form and the current draw's estimate in
    each, one legend; see the module docstring for what is drawn.

    Args:
        module: a :class:`~geolinrpe.rpe.FourierRPE` (its ``closed_form`` and ``estimate``);
            not changed.
        path: output file (``.png``); parent folders are created.
        extent: ``Delta`` over ``[-extent, extent]`` in 1D and in maps (each coordinate),
            ``|Delta|`` over ``[0, extent]`` in radial profiles, in position units.
        resolution: points per axis (``>= 2``).
        unit: position unit for the axis labels, e.g. ``"Å"`` (molecules), ``"tokens"``
            (sequences), ``"patches"`` (image grids): ``"|Δ| (Å)"``.
        title: prefix of the figure title (e.g. ``"layer 2"``); the title also names the RPE
            class, its registry name, ``p`` and ``m``.
        directions: ``p >= 2``: unit directions at which the estimate is evaluated at every
            radius (mean and min-max band).
        draws: if ``> 0`` and the frequencies are random, also the spread over that many
            fresh draws (of a copy; seeds ``0 .. draws - 1``).
        kind: ``"profile"`` (default) or ``"map"`` (2D: heat maps of the closed form and
            the estimate side by side per head).
        cell: ``[3, 3]`` lattice (rows are lattice vectors), required for lattice-periodic
            RPEs (``"flt-periodic"``) and rejected for the others.
        dpi: resolution of the PNG.

    Raises:
        ValueError: ``module`` is not a FourierRPE, or an argument is out of range.
    """
    fig = profile_figure(
        module,
        extent,
        resolution,
        unit=unit,
        title=title,
        directions=directions,
        draws=draws,
        kind=kind,
        cell=cell,
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path

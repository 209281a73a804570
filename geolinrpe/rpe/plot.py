"""Plot a learned RPE ``f(Delta)`` to PNG: 1D curve, 2D heat map, 3D radial profile.

Works for any RPE with a scalar ``f`` (``pairwise``/``closed_form``): the Fourier families
plot their closed form and the current draw's Monte-Carlo estimate.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .base import RPE, FourierRPE


@torch.no_grad()
def plot(module: RPE, path: str | Path, extent: float = 5.0, resolution: int = 201) -> Path:
    """Save ``f`` of every head of ``module`` as a PNG at ``path``; returns the path.

    Args:
        module: a :class:`~geolinrpe.rpe.FourierRPE` (its ``closed_form`` and ``estimate``).
        path: output file (``.png``); parent folders are created.
        extent: plot ``|Delta|`` (or each coordinate) over ``[-extent, extent]``
            (radial profiles over ``[0, extent]``), in position units.
        resolution: points per axis.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not isinstance(module, FourierRPE):
        raise ValueError(
            f"plot needs an RPE with a closed-form f (a FourierRPE), got {type(module).__name__}"
        )
    if not extent > 0 or resolution < 2:
        raise ValueError(f"extent must be > 0 and resolution >= 2, got {extent}, {resolution}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dtype = next((p.dtype for p in module.parameters()), torch.float32)
    heads, p = module.num_heads, module.pos_dim
    if p == 2:
        axis = torch.linspace(-extent, extent, resolution, dtype=dtype)
        grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1)
        values = module.closed_form(grid).cpu().numpy()
        fig, axes = plt.subplots(1, heads, figsize=(3 * heads, 3), squeeze=False)
        for h, ax in enumerate(axes[0]):
            im = ax.imshow(
                values[..., h].T, origin="lower", extent=(-extent, extent, -extent, extent)
            )
            ax.set_title(f"head {h}")
            ax.set_xlabel("Δ₁")
            ax.set_ylabel("Δ₂")
            fig.colorbar(im, ax=ax, shrink=0.8)
    else:
        start = -extent if p == 1 else 0.0
        radius = torch.linspace(start, extent, resolution, dtype=dtype)
        delta = torch.zeros(resolution, p, dtype=dtype)
        delta[:, 0] = radius  # 3D: a profile along one axis (radial for isotropic f)
        exact, estimate = module.closed_form(delta).numpy(), module.estimate(delta).numpy()
        fig, ax = plt.subplots(figsize=(6, 4))
        for h in range(heads):
            (line,) = ax.plot(radius.numpy(), exact[:, h], label=f"head {h}")
            ax.plot(radius.numpy(), estimate[:, h], linestyle=":", color=line.get_color())
        ax.set_xlabel("Δ" if p == 1 else "|Δ|")
        ax.set_ylabel("f(Δ)")
        ax.set_title(f"{type(module).__name__}: closed form (solid), current draw (dotted)")
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

"""Relative positional encodings ``f(r_i - r_j)`` for linear attention.

``build(name, pos_dim=..., num_heads=..., **options)`` makes one by registry name;
``names()`` lists them; ``plot(module, path)`` saves a learned ``f`` as PNG.

=====================  ==========================================================  ==============
name                   family                                                      modes
=====================  ==========================================================  ==============
``flt-kernel``         FLT: Gaussian / Laplace / Matern / Cauchy kernel spectra    logit, mask
``flt-gm``             FLT: learned Gaussian-mixture spectrum (or Google's code)   logit, mask
``flt-mlp``            FLT: learned spectral density (MLP) against a proposal      logit, mask
``flt-local``          FLT: 1D local window (smoothed box, sinc spectrum)          logit, mask
``flt-radial``         FLT: 3D radial spectrum, optional exact canonical frame     logit, mask
``flt-periodic``       FLT: lattice-periodic (crystals, slabs), needs ``cell``     logit, mask
``spe-sine``           SPE (Liutkus et al. 2021), sinusoidal kernels               mask
``spe-conv``           SPE, convolutional (1D/2D integer grids)                    mask
``lrpe-unitary``       LRPE (Qin et al. 2023), unitary exp(i theta s), 2d outputs  logit, mask
``lrpe-orthogonal``    LRPE, RoPE rotation after a P (Householder by default)      logit, mask
``lrpe-permutation``   LRPE, permutation powers after a P (1D integer positions)   logit, mask
``rope``               RoPE, 1D and axial 2D/3D                                    logit, mask
``string``             STRING (Cayley form)                                        logit, mask
``toeplitz-fft``       Toeplitz RPE by FFT (Luo et al. 2021), 1D/2D integer grids  mask
=====================  ==========================================================  ==============
"""

from __future__ import annotations

import difflib
import inspect

from .base import RPE, FourierRPE
from .kernel import ShiftInvariantKernelRPE
from .local import LocalRPE
from .lrpe import OrthogonalLRPE, PermutationLRPE, UnitaryLRPE
from .mixture import GaussianMixtureRPE
from .periodic import PeriodicRPE
from .plot import plot
from .radial import RadialRPE
from .rotary import STRING, RoPE
from .spe import ConvSPE, SineSPE
from .spectral_mlp import SpectralMLPRPE
from .toeplitz import ToeplitzRPE

REGISTRY: dict[str, type[RPE]] = {
    "flt-kernel": ShiftInvariantKernelRPE,
    "flt-gm": GaussianMixtureRPE,
    "flt-mlp": SpectralMLPRPE,
    "flt-local": LocalRPE,
    "flt-radial": RadialRPE,
    "flt-periodic": PeriodicRPE,
    "spe-sine": SineSPE,
    "spe-conv": ConvSPE,
    "lrpe-unitary": UnitaryLRPE,
    "lrpe-orthogonal": OrthogonalLRPE,
    "lrpe-permutation": PermutationLRPE,
    "rope": RoPE,
    "string": STRING,
    "toeplitz-fft": ToeplitzRPE,
}


def names() -> list[str]:
    """Registry names accepted by :func:`build` and ``RPEAttention(rpe=...)``."""
    return sorted(REGISTRY)


def option_names(name: str) -> list[str]:
    """Keyword options of the RPE registered as ``name`` besides ``pos_dim`` and
    ``num_heads`` (the parameters of its constructor), sorted."""
    if name not in REGISTRY:
        raise ValueError(f"unknown rpe {name!r}; choose one of {names()}")
    params = inspect.signature(REGISTRY[name].__init__).parameters
    return sorted(k for k in params if k not in ("self", "pos_dim", "num_heads"))


def unknown_option(name: str, key: str) -> str | None:
    """Why ``key`` is not an option of the RPE ``name`` (the RPE, its options and the
    closest one, e.g. ``did you mean 'num_frequencies'?``), or ``None`` when it is one."""
    valid = option_names(name)
    if key in valid:
        return None
    close = difflib.get_close_matches(str(key), valid, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return (
        f"{REGISTRY[name].__name__} (rpe {name!r}) has no option {key!r}{hint} "
        f"(its options: {', '.join(valid) or 'none'})"
    )


def build(name: str, *, pos_dim: int, num_heads: int, **options) -> RPE:
    """Build the RPE registered as ``name``; ValueError names an unknown name or option
    (with the RPE's options and the closest match)."""
    if name not in REGISTRY:
        raise ValueError(f"unknown rpe {name!r}; choose one of {names()}")
    for key in options:
        problem = unknown_option(name, key)
        if problem is not None:
            raise ValueError(f"bad option for rpe {name!r}: {problem}")
    try:
        return REGISTRY[name](pos_dim=pos_dim, num_heads=num_heads, **options)
    except TypeError as err:  # unknown or missing keyword
        raise ValueError(f"bad option for rpe {name!r}: {err}") from err


__all__ = [
    "REGISTRY",
    "RPE",
    "STRING",
    "ConvSPE",
    "FourierRPE",
    "GaussianMixtureRPE",
    "LocalRPE",
    "OrthogonalLRPE",
    "PeriodicRPE",
    "PermutationLRPE",
    "RadialRPE",
    "RoPE",
    "ShiftInvariantKernelRPE",
    "SineSPE",
    "SpectralMLPRPE",
    "ToeplitzRPE",
    "UnitaryLRPE",
    "build",
    "names",
    "option_names",
    "plot",
    "unknown_option",
]

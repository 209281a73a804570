"""Complete models: molecules, point clouds, image patches, sequences, and baselines.

``build_model(name, **kwargs)`` makes one by registry name (what the trainer and CLI use);
``model_names()`` lists the names.

===============  =======================================  ===================================
name             model                                    output
===============  =======================================  ===================================
``molecule``     :class:`MoleculeTransformer`             ``{"y": [g, t]}`` (+ energy, forces)
``point-cloud``  :class:`PointCloudTransformer`           ``[g, classes]`` or ``[n, classes]``
``patch``        :class:`PatchTransformer`                ``[g, classes]``
``sequence``     :class:`SequenceTransformer`             ``[b, n, vocab]``
``schnet``       :class:`SchNetBaseline`                  ``{"y": [g, t]}`` (+ energy, forces)
===============  =======================================  ===================================

Every transformer takes ``attention="linear"`` (O(n) :class:`~geolinrpe.nn.RPEAttention`)
or ``"exact"`` (the O(n^2) :class:`~geolinrpe.nn.ExactRPEAttention` with the same
parameters), and ``rpe=None`` for linear attention without RPE: the baselines run in the
same code path.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from .molecule import MoleculeTransformer, SphericalHarmonicsEmbedding
from .patch import PatchTransformer
from .point_cloud import PointCloudTransformer
from .radius import RadiusInteractionGraph, knn_graph, radius_graph, radius_graph_pbc
from .schnet import SchNetBaseline
from .sequence import SequenceTransformer

MODELS: dict[str, type[nn.Module]] = {
    "molecule": MoleculeTransformer,
    "point-cloud": PointCloudTransformer,
    "patch": PatchTransformer,
    "sequence": SequenceTransformer,
    "schnet": SchNetBaseline,
}


def model_names() -> list[str]:
    """Names accepted by :func:`build_model`."""
    return sorted(MODELS)


def model_options(name: str) -> dict[str, Any]:
    """Constructor options of model ``name`` and their defaults (``inspect.Parameter.empty``
    for required ones)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {model_names()}")
    params = inspect.signature(MODELS[name].__init__).parameters
    return {k: p.default for k, p in params.items() if k != "self"}


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the model registered as ``name`` with constructor options ``kwargs``.

    ``ValueError`` names an unknown model, unknown or missing options, and bad values
    (the constructors validate theirs; attention and RPE options are checked by
    :class:`~geolinrpe.nn.RPEAttention` and :func:`geolinrpe.rpe.build`).
    """
    options = model_options(name)
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        raise ValueError(
            f"unknown options {unknown} for model {name!r}; it takes {sorted(options)}"
        )
    missing = sorted(
        k for k, v in options.items() if v is inspect.Parameter.empty and k not in kwargs
    )
    if missing:
        raise ValueError(f"model {name!r} needs {missing}")
    try:
        return MODELS[name](**kwargs)
    except TypeError as err:  # a factory or RPE receiving a bad keyword
        raise ValueError(f"bad option for model {name!r}: {err}") from err


__all__ = [
    "MODELS",
    "MoleculeTransformer",
    "PatchTransformer",
    "PointCloudTransformer",
    "RadiusInteractionGraph",
    "SchNetBaseline",
    "SequenceTransformer",
    "SphericalHarmonicsEmbedding",
    "build_model",
    "model_names",
    "model_options",
    "knn_graph",
    "radius_graph",
    "radius_graph_pbc",
]

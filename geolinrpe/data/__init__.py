"""Data: molecules (SMILES, ASE files), QM9, OC20, image patch grids, point clouds, batching.

Every loader reads local files or data that a package ships (no downloads), reports what
it could not read by input, and yields PyG ``Data`` objects that batch both packed
(:func:`collate_packed`) and dense padded with a mask (:func:`collate_padded`).

Names are imported on first use (``import geolinrpe.data`` itself loads nothing heavy), so
each loader needs only its own extra: ``pip install "geolinrpe[data]"`` (PyG, ASE, OC20,
point clouds, scenes, images) or ``"geolinrpe[qm9]"`` (QM9, SMILES).
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "DenseDataLoader": "batching",
    "PaddedCollater": "batching",
    "collate_packed": "batching",
    "collate_padded": "batching",
    "ImagePatches": "images",
    "image_to_patches": "images",
    "load_digits_patches": "images",
    "patches_to_image": "images",
    "ConversionFailure": "molecules",
    "ConversionReport": "molecules",
    "from_ase": "molecules",
    "from_smiles": "molecules",
    "OC20": "oc20",
    "OC20FormatError": "oc20",
    "UnsafePickleError": "oc20",
    "make_synthetic": "oc20",
    "SHAPES": "point_clouds",
    "Center": "point_clouds",
    "NormalizeScale": "point_clouds",
    "RandomJitter": "point_clouds",
    "RandomRotate": "point_clouds",
    "SyntheticShapes": "point_clouds",
    "random_rotation": "point_clouds",
    "read_point_cloud": "point_clouds",
    "ContextScenes": "scenes",
    "make_molten_salt": "molten_salt",
    "molten_salt_structures": "molten_salt",
    "write_molten_salt": "molten_salt",
    "QM9": "qm9",
    "TARGETS": "qm9",
    "atom_refs": "qm9",
    "conventional_split": "qm9",
    "target_index": "qm9",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = _WHERE[name]
    try:
        value = getattr(importlib.import_module(f".{module}", __name__), name)
    except ModuleNotFoundError as err:  # an extra that is not installed
        extra = "qm9" if module in ("qm9", "molecules") else "data"
        raise ModuleNotFoundError(
            f"geolinrpe.data.{name} needs {err.name!r}: pip install 'geolinrpe[{extra}]' "
            "(or 'geolinrpe[all]')",
            name=err.name,
        ) from err
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))

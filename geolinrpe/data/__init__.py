"""Data: molecules (SMILES, ASE files), image patch grids, point clouds, and batching.

Every loader reads local files or data that a package ships (no downloads), reports what
it could not read by input, and yields PyG ``Data`` objects that batch both packed
(:func:`collate_packed`) and dense padded with a mask (:func:`collate_padded`).
"""

from .batching import DenseDataLoader, PaddedCollater, collate_packed, collate_padded
from .images import ImagePatches, image_to_patches, load_digits_patches, patches_to_image
from .molecules import ConversionFailure, ConversionReport, from_ase, from_smiles
from .oc20 import OC20, OC20FormatError, UnsafePickleError, make_synthetic
from .point_clouds import (
    SHAPES,
    Center,
    NormalizeScale,
    RandomJitter,
    RandomRotate,
    SyntheticShapes,
    random_rotation,
    read_point_cloud,
)
from .qm9 import QM9, TARGETS, atom_refs, conventional_split, target_index

__all__ = [
    "QM9",
    "SHAPES",
    "TARGETS",
    "Center",
    "ConversionFailure",
    "ConversionReport",
    "DenseDataLoader",
    "ImagePatches",
    "NormalizeScale",
    "OC20",
    "OC20FormatError",
    "PaddedCollater",
    "RandomJitter",
    "RandomRotate",
    "SyntheticShapes",
    "UnsafePickleError",
    "atom_refs",
    "collate_packed",
    "collate_padded",
    "conventional_split",
    "from_ase",
    "from_smiles",
    "image_to_patches",
    "load_digits_patches",
    "make_synthetic",
    "patches_to_image",
    "random_rotation",
    "read_point_cloud",
    "target_index",
]

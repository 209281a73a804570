"""Reference physics: Ewald sums for point charges in periodic cells."""

from .ewald import (
    COULOMB_CONSTANT,
    EwaldParameters,
    coulomb_direct,
    ewald,
    ewald_parameters,
    reciprocal_vectors,
)

__all__ = [
    "COULOMB_CONSTANT",
    "EwaldParameters",
    "coulomb_direct",
    "ewald",
    "ewald_parameters",
    "reciprocal_vectors",
]

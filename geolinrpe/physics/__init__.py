"""Reference physics: Ewald sums for point charges in periodic cells."""

from .ewald import *  # noqa: F403 (the public names of ewald.py)
from .ewald import __all__  # noqa: F401

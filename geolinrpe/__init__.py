"""geolinrpe: linear-complexity attention with relative positional encodings over coordinates."""

from . import features, nn, ops, rpe
from .nn import RPEAttention

__version__ = "0.1.0"

__all__ = ["RPEAttention", "__version__", "features", "nn", "ops", "rpe"]

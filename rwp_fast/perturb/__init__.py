"""The weight-perturbation search of the fast path: flat weight buffers and the in-place search."""

from .flat import FlatWeights
from .search import WeightPerturbation

__all__ = ["FlatWeights", "WeightPerturbation"]

"""Fast weight perturbation: the flat weight buffer and the in-place RWP/AWP search over it."""

from .flat import FlatWeights
from .search import FastSearchInfo, WeightPerturbation

__all__ = ["FlatWeights", "FastSearchInfo", "WeightPerturbation"]

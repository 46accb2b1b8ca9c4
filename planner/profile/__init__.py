"""The profile stage: every planned matrix x every grid configuration, decomposed, measured and cached."""

from .fisher import compute_fisher, get_fisher
from .grid import GridPoint, make_grid
from .run import ProfileStats, run_profile
from .settings import ProfileSettings

__all__ = ["GridPoint", "ProfileStats", "compute_fisher", "get_fisher", "make_grid", "run_profile", "ProfileSettings"]

"""DynaMO for OpenRLHF."""
from dynamo_openrlhf._core import __version__

__all__ = ["__version__"]

"""DynaMO for OpenRLHF.

The sequence-level core (rollout allocation and Bayesian pass-rate pools) is the compiled
module ``dynamo_openrlhf._core``; importing this package needs only NumPy (no torch, ray or
openrlhf import happens here).
"""
from dynamo_openrlhf._core import (
    ESTIMATORS,
    FORMAT_VERSION,
    RULES,
    PassRatePool,
    __version__,
    allocate_rollouts,
)

__all__ = [
    "ESTIMATORS",
    "FORMAT_VERSION",
    "RULES",
    "PassRatePool",
    "__version__",
    "allocate_rollouts",
]

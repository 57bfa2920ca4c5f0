"""DynaMO for OpenRLHF.

The sequence-level core (rollout allocation and Bayesian pass-rate pools) is the compiled
module ``dynamo_openrlhf._core``; importing this package needs only NumPy (no torch, ray or
openrlhf import happens here).
"""
try:
    from dynamo_openrlhf._core import (
        ESTIMATORS,
        FORMAT_VERSION,
        PROBLEM_SUBJECTS,
        RULES,
        PassRatePool,
        __version__,
        allocate_rollouts,
        allocation_problems,
    )
except ModuleNotFoundError as _missing:
    # A copy of the package without the compiled extension shadows the installed one (e.g. a Ray job's
    # --working-dir upload of the checkout): say why and what to do instead of a bare ModuleNotFoundError.
    if _missing.name != "dynamo_openrlhf._core":
        raise
    import os as _os

    from dynamo_openrlhf.install_check import installed_package_dirs, shadowed_package_message

    _message = shadowed_package_message(_os.path.dirname(_os.path.abspath(__file__)), installed_package_dirs())
    if _message is None:
        raise
    raise ImportError(_message, name="dynamo_openrlhf._core") from None

__all__ = [
    "ESTIMATORS",
    "FORMAT_VERSION",
    "PROBLEM_SUBJECTS",
    "RULES",
    "PassRatePool",
    "__version__",
    "allocate_rollouts",
    "allocation_problems",
]

"""The run's DynaMO configs, built once per process and handed to the Ray actors with OpenRLHF's ``args``.

The launcher (``train.py``) builds the three configs from the parsed flags once, while it checks them, and stores
the result as ``args.dynamo.run_config``; OpenRLHF pickles ``args`` into every actor it creates, so the actors
(trainer, policy actor, async generator and trainer) read the launcher's objects instead of re-deriving them from
the flags. Code given ``args`` the launcher did not prepare (a user's own script, the unit tests' small namespaces)
gets the part it asks for built from the flags, as before.

Parts: :class:`~dynamo_openrlhf.allocation.AllocationConfig` (None: ``--dynamo.allocation.rule off``),
:class:`~dynamo_openrlhf.modulation.ModulationConfig`, :class:`~dynamo_openrlhf.advantages.PromptBalancing`
(None: OpenRLHF's token-mean loss).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple

if TYPE_CHECKING:  # the parts' modules import torch; this module stays cheap to import
    from dynamo_openrlhf.advantages import PromptBalancing
    from dynamo_openrlhf.allocation import AllocationConfig
    from dynamo_openrlhf.modulation import ModulationConfig

__all__ = ["DynamoRunConfig", "build_run_config", "allocation_config", "modulation_config", "balancing_config"]

# args.dynamo.<ATTR>: where the launcher leaves the built config
ATTR = "run_config"


@dataclass(frozen=True)
class DynamoRunConfig:
    """The run's DynaMO configs (see the module docstring)."""
    allocation: Optional["AllocationConfig"]
    modulation: "ModulationConfig"
    balancing: Optional["PromptBalancing"]


def _build_allocation(args):
    from dynamo_openrlhf.allocation import AllocationConfig

    return AllocationConfig.from_args(args)


def _build_modulation(args):
    from dynamo_openrlhf.modulation import ModulationConfig

    return ModulationConfig.from_args(args)


def _build_balancing(args):
    from dynamo_openrlhf.advantages import prompt_balancing

    return prompt_balancing(args)


_BUILDERS = {"allocation": _build_allocation, "modulation": _build_modulation, "balancing": _build_balancing}


def build_run_config(args) -> Tuple[Dict[str, Any], Dict[str, str]]:
    """Builds each part once from OpenRLHF's nested ``args``. Returns ``(parts, problems)``: ``parts`` maps each
    part that built (``"allocation"``, ``"modulation"``, ``"balancing"``) to its config, ``problems`` each part
    whose flags are invalid to the ValueError message; ``DynamoRunConfig(**parts)`` when ``problems`` is empty."""
    parts, problems = {}, {}
    for name, build in _BUILDERS.items():
        try:
            parts[name] = build(args)
        except ValueError as e:
            problems[name] = str(e)
    return parts, problems


def _part(args, name: str):
    built = getattr(getattr(args, "dynamo", None), ATTR, None)
    if built is not None:
        return getattr(built, name)
    return _BUILDERS[name](args)


def allocation_config(args) -> Optional["AllocationConfig"]:
    """The run's allocation config: the launcher's (``args.dynamo.run_config``), else built from the flags."""
    return _part(args, "allocation")


def modulation_config(args) -> "ModulationConfig":
    """The run's modulation config: the launcher's (``args.dynamo.run_config``), else built from the flags."""
    return _part(args, "modulation")


def balancing_config(args) -> Optional["PromptBalancing"]:
    """The run's prompt balancing (None: token-mean loss): the launcher's, else built from the flags."""
    return _part(args, "balancing")

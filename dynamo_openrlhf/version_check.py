"""Fail fast when the installed OpenRLHF is not the one this package extends.

``dynamo_openrlhf`` reuses OpenRLHF's own CLI and trainer and extends a handful of its classes
and functions; those are listed in ``EXTENDED_SYMBOLS`` (add to it when extending more).
``check_openrlhf()`` raises ``OpenRLHFVersionError`` naming the expected version and the first
missing symbol.
"""

from __future__ import annotations

import importlib
from typing import Callable, Optional, Sequence, Tuple

__all__ = ["EXPECTED_OPENRLHF", "EXTENDED_SYMBOLS", "OpenRLHFVersionError", "installed_openrlhf_version",
           "check_openrlhf"]

EXPECTED_OPENRLHF = "0.11.2"

# (module, dotted attribute) pairs this package reuses, subclasses or patches.
EXTENDED_SYMBOLS: Tuple[Tuple[str, str], ...] = (
    ("openrlhf.cli.train_ppo_ray", "train"),
    ("openrlhf.utils.config", "hierarchize"),
    ("openrlhf.utils", "get_strategy"),
    ("openrlhf.trainer.ray", "create_vllm_engines"),
    ("openrlhf.trainer.ray.vllm_engine", "create_vllm_engines"),
    ("openrlhf.trainer.ray.vllm_engine", "RolloutRayActor"),
    ("openrlhf.trainer.ray.vllm_engine", "_load_agent_executor"),
    ("openrlhf.trainer.ray.ppo_actor", "PolicyModelActor"),
    ("openrlhf.trainer.ray.ppo_actor", "ActorPPOTrainer"),
    ("openrlhf.trainer.ray.ppo_actor", "ActorPPOTrainer._init_vllm_sync_group"),
    ("openrlhf.trainer.ray.ppo_actor", "ActorPPOTrainer.broadcast_to_vllm"),
    ("openrlhf.trainer.ppo_trainer", "PPOTrainer"),
    ("openrlhf.trainer.ppo_trainer", "BasePPOTrainer.save_logs_and_checkpoints"),
    ("openrlhf.trainer.ppo_trainer", "PPOTrainer.evaluate"),
    ("openrlhf.trainer.ppo_trainer", "PPOTrainer.fit"),
    ("openrlhf.trainer.ppo_trainer", "BasePPOTrainer.init_checkpoint_states"),
    ("openrlhf.trainer.ppo_utils.replay_buffer", "NaiveReplayBuffer"),
    ("openrlhf.trainer.ppo_utils.samples_generator", "SamplesGenerator"),
    ("openrlhf.trainer.ppo_utils.samples_generator", "SamplesGenerator.generate_samples"),
    ("openrlhf.trainer.ppo_utils.samples_generator", "_collect_prompt_batch"),
    ("openrlhf.trainer.ray.vllm_engine", "batch_vllm_engine_call"),
    ("openrlhf.trainer.ppo_utils.experience_maker", "RemoteExperienceMaker"),
    ("openrlhf.trainer.ppo_utils.experience_maker", "RemoteExperienceMaker.compute_advantages_and_returns"),
    ("openrlhf.trainer.ppo_utils.length_penalty", "apply_length_penalties"),
    ("openrlhf.trainer.ppo_trainer", "BasePPOTrainer.train_step"),
    ("openrlhf.trainer.ray.ppo_actor", "ActorPPOTrainer.training_step"),
    ("openrlhf.trainer.ray.ppo_actor", "PolicyModelActor.init_model_from_pretrained"),
    ("openrlhf.utils.agent", "SingleTurnAgentExecutor"),
    ("openrlhf.utils.deepspeed.deepspeed", "DeepspeedStrategy.moving_average"),
    ("openrlhf.utils.deepspeed.deepspeed", "init_device_mesh"),
    ("openrlhf.utils.deepspeed.deepspeed", "get_train_ds_config"),
    ("openrlhf.models.loss", "PolicyLoss"),
)


class OpenRLHFVersionError(RuntimeError):
    pass


def installed_openrlhf_version() -> Optional[str]:
    """The installed distribution's version, or None when OpenRLHF is not installed."""
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover
        return None
    try:
        return version("openrlhf")
    except PackageNotFoundError:
        return None


def _resolve(module: str, attr: str):
    obj = importlib.import_module(module)
    for i, part in enumerate(attr.split(".")):
        if i:  # methods of @ray.remote classes live on the wrapped class
            obj = getattr(obj, "__ray_actor_class__", obj)
        obj = getattr(obj, part)
    return obj


def check_openrlhf(symbols: Sequence[Tuple[str, str]] = EXTENDED_SYMBOLS,
                   version_getter: Callable[[], Optional[str]] = None) -> str:
    """Raise ``OpenRLHFVersionError`` unless OpenRLHF ``EXPECTED_OPENRLHF`` with every symbol in
    ``symbols`` is importable. Returns the installed version."""
    got = (version_getter or installed_openrlhf_version)()
    if got is None:
        raise OpenRLHFVersionError(
            f"OpenRLHF is not installed: dynamo_openrlhf extends openrlhf=={EXPECTED_OPENRLHF} "
            f"(pip install --no-deps openrlhf=={EXPECTED_OPENRLHF}; see scripts/install.sh)"
        )
    if got != EXPECTED_OPENRLHF:
        raise OpenRLHFVersionError(
            f"dynamo_openrlhf extends openrlhf=={EXPECTED_OPENRLHF}, but openrlhf=={got} is installed "
            f"(pip install --no-deps openrlhf=={EXPECTED_OPENRLHF})"
        )
    for module, attr in symbols:
        try:
            _resolve(module, attr)
        except Exception as e:  # ImportError, AttributeError, or an import-time failure
            raise OpenRLHFVersionError(
                f"openrlhf=={got} lacks {module}.{attr}, which dynamo_openrlhf extends "
                f"(expected openrlhf=={EXPECTED_OPENRLHF}): {type(e).__name__}: {e}"
            ) from e
    return got

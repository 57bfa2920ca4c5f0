"""dynamo_openrlhf/run_config.py: the run's DynaMO configs are built once (by the launcher, while it checks the
flags) and travel with OpenRLHF's ``args`` to the actors, which read them instead of re-deriving them."""
import copy
import pickle

import pytest

from dynamo_openrlhf.advantages import PromptBalancing, prompt_balancing
from dynamo_openrlhf.allocation import AllocationConfig
from dynamo_openrlhf.modulation import ModulationConfig
from dynamo_openrlhf.run_config import (ATTR, DynamoRunConfig, allocation_config, balancing_config,
                                        build_run_config, modulation_config)

from _trainer_args import trainer_args as _args


def test_each_part_is_built_from_its_flags():
    args = _args()
    parts, problems = build_run_config(args)
    assert problems == {} and sorted(parts) == ["allocation", "balancing", "modulation"]
    assert parts["allocation"] == AllocationConfig.from_args(args)
    assert parts["modulation"] == ModulationConfig.from_args(args) and parts["modulation"].name == "decay6"
    assert isinstance(parts["balancing"], PromptBalancing) and parts["balancing"] == prompt_balancing(args)
    off, problems = build_run_config(_args(**{"dynamo.allocation.rule": "off", "dynamo.modulation.preset": "off",
                                              "dynamo.loss.prompt_weighting": "tokens"}))
    assert problems == {} and off["allocation"] is None and off["balancing"] is None
    assert off["modulation"].is_identity


def test_a_part_with_bad_flags_is_named_and_the_others_still_build():
    parts, problems = build_run_config(_args(**{"dynamo.modulation.mu_max": 0.5}))
    assert list(problems) == ["modulation"] and "mu_max" in problems["modulation"]
    assert sorted(parts) == ["allocation", "balancing"]
    with pytest.raises(ValueError, match="mu_max"):
        ModulationConfig.from_args(_args(**{"dynamo.modulation.mu_max": 0.5}))  # the same message
    _, problems = build_run_config(_args(**{"dynamo.allocation.hi": 3}))
    assert list(problems) == ["allocation"] and "budget 4 is infeasible" in problems["allocation"]


def test_the_launcher_checks_and_builds_in_one_pass():
    from dynamo_openrlhf import cpu_backend
    from dynamo_openrlhf.train import _checked_run_config

    cpu_backend.install_import_stand_ins()  # the launcher has done this before it checks

    args = _args()
    problems, config = _checked_run_config(args)
    assert problems == [] and isinstance(config, DynamoRunConfig)
    assert config == DynamoRunConfig(**build_run_config(args)[0])
    problems, config = _checked_run_config(_args(**{"actor.policy_loss_type": "gspo"}))
    assert config is None and len(problems) == 1 and "needs the token-level ratio" in problems[0]


def test_actors_read_the_launchers_configs_and_build_them_only_without():
    args = _args()
    # a launcher-built config whose parts differ from what the flags give: the accessors must return these objects
    built = DynamoRunConfig(allocation=None, modulation=ModulationConfig.preset("off"), balancing=None)
    setattr(args.dynamo, ATTR, built)
    shipped = pickle.loads(pickle.dumps(args))  # what a Ray actor receives
    assert getattr(shipped.dynamo, ATTR) == built
    assert allocation_config(shipped) is None and balancing_config(shipped) is None
    assert modulation_config(shipped).is_identity
    assert modulation_config(args) is built.modulation
    # args the launcher did not prepare (a user's script, a test's namespace): built from the flags
    bare = copy.deepcopy(args)
    delattr(bare.dynamo, ATTR)
    assert allocation_config(bare) == AllocationConfig.from_args(bare) and allocation_config(bare) is not None
    assert modulation_config(bare).name == "decay6" and balancing_config(bare) == prompt_balancing(bare)

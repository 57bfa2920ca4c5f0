"""OpenRLHF's nested ``args`` as the launcher hands them to DynaMO's checks and actors, for tests that need no
parser: the tiny task's sizes (8 prompts x 4 rollouts, train batch 32) and DynaMO's defaults."""
from types import SimpleNamespace as NS


def with_overrides(args, **over):
    """``args`` with ``{"dotted.path": value}`` set in place (e.g. ``**{"dynamo.allocation.rule": "off"}``)."""
    for path, value in over.items():
        obj = args
        *parents, leaf = path.split(".")
        for p in parents:
            obj = getattr(obj, p)
        setattr(obj, leaf, value)
    return args


def trainer_args(**over):
    """A fresh namespace (see the module docstring), with ``over`` applied by :func:`with_overrides`."""
    a = NS(
        rollout=NS(n_samples_per_prompt=4, batch_size=8, vllm_generate_batch_size=None, max_new_tokens=12),
        algo=NS(dynamic_filtering_enable=False, advantage=NS(estimator="group_norm")),
        train=NS(async_enable=False, batch_size=32, dynamic_batch_enable=False),
        actor=NS(policy_loss_type="ppo", loss_agg_mode="token-mean"),
        dynamo=NS(eval_pass_k=None, loss=NS(prompt_weighting="auto", token_normalizer=None),
                  allocation=NS(rule="neyman", lo=None, hi=None, oversample=1.0, skip_factor=None, exploration=None,
                                exploration_rollouts=None, mastery=None, mastery_threshold=None, priority_floor=None,
                                min_rollouts=None),
                  pool=NS(prior=(1.0, 1.0), forget=0.999, fit_prior_every=10, success_threshold=0.5, load=None,
                          calibrated=True),
                  modulation=NS(preset="decay6", mu_max=None, lambda_min=None, gamma=None, tau=None)),
    )
    return with_overrides(a, **over)

"""DynamoPPOTrainer's own methods, on a bare instance (no Ray cluster, no models): the success rule of
in-training evaluation."""

from types import SimpleNamespace as NS

import pytest
import torch

from dynamo_openrlhf import cpu_backend

cpu_backend.install_import_stand_ins()

from openrlhf.trainer.ppo_utils.experience import Experience  # noqa: E402

from dynamo_openrlhf.ppo_trainer import DynamoPPOTrainer  # noqa: E402

Trainer = DynamoPPOTrainer.__ray_actor_class__


def _bare_trainer(samples, prompts, threshold=0.5):
    t = Trainer.__new__(Trainer)
    t.samples_generator = NS(generate_eval_samples=lambda **kw: samples, last_eval_samples=samples)
    t.eval_dataloader = [(["ds"] * len(prompts), prompts, ["l"] * len(prompts), [None] * len(prompts))]
    t.wandb_logger = t.tensorboard_logger = None
    t.args = NS(dynamo=NS(eval_pass_k="1,2", pool=NS(success_threshold=threshold)))
    t.history, t._evaluated_steps, t._metrics_path = [], set(), None
    return t


def _sample(prompt, reward, score):
    return Experience(prompts=[prompt], rewards=torch.tensor([reward]),
                      scores=None if score is None else torch.tensor([score]),
                      response_length=torch.tensor([3]), truncated=torch.tensor([False]))


@pytest.mark.parametrize("with_scores", [True, False])
def test_eval_pass_at_k_counts_successes_like_the_pool(with_scores):
    """pass@k counts a sample as solved by the pool's rule: its score (reward when there is no score) >
    --dynamo.pool.success_threshold. A reward function that adds a format bonus to a wrong answer
    (reward 0.6, score 0) does not solve the prompt (issue 15 item 6; it used to count the reward)."""
    prompts = ["p0", "p1"]
    rewards = [0.6, 0.6, 1.0, 0.6]  # 2 samples per prompt, prompt-major (OpenRLHF's eval order)
    scores = [0.0, 0.0, 1.0, 0.0]
    samples = [_sample(prompts[i // 2], r, s if with_scores else None) for i, (r, s) in enumerate(zip(rewards,
                                                                                                    scores))]
    logs = _bare_trainer(samples, prompts).evaluate(5, n_samples_per_prompt=2, temperature=1.0)
    if with_scores:  # p0 never solved, p1 once in 2
        assert (logs["eval_pass@1"], logs["eval_pass@2"]) == (0.25, 0.5)
        assert (logs["eval_frac_unsolved"], logs["eval_frac_between"]) == (0.5, 0.5)
    else:  # a reward model's rewards: the reward is the value
        assert (logs["eval_pass@1"], logs["eval_pass@2"]) == (1.0, 1.0)

"""``dynamo/generated_rollouts`` / ``dynamo/generated_tokens``: every training sample the engines return is
counted, including the groups OpenRLHF 0.11.2's ``--algo.dynamic_filtering_enable`` discards and re-samples;
evaluation samples are not. Fake engines (``.remote`` returns the value), ``ray.get``/``ray.wait`` patched."""

from types import SimpleNamespace

import pytest

from dynamo_openrlhf import cpu_backend

cpu_backend.install_import_stand_ins()

import ray  # noqa: E402

from dynamo_openrlhf.ppo_trainer import DynamoPPOTrainer  # noqa: E402
from dynamo_openrlhf.samples_generator import DynamoSamplesGenerator  # noqa: E402

N = 4  # rollouts per prompt
GEN_KW = dict(temperature=1.0, max_new_tokens=16, max_len=64)


class _Ref:
    def __init__(self, value):
        self.value = value


class _Remote:
    def __init__(self, fn):
        self.remote = fn


class Engine:
    """Sample k of a prompt has k + 1 response tokens and reward by its label: 'all' 1, 'none' 0, 'mixed' k % 2."""

    def __init__(self):
        self.prompts = []
        self.generate_responses = _Remote(self._generate)
        self.get_num_unfinished_requests = _Remote(lambda: 0)

    def _generate(self, **kw):
        self.prompts.append(kw["prompt"])
        out = []
        for k in range(kw["num_samples"]):
            r = {"all": 1.0, "none": 0.0, "mixed": float(k % 2)}[kw["label"]]
            toks = [7, 8] + [50 + j for j in range(k + 1)]
            out.append(dict(observation_tokens=toks, action_ranges=[(2, 2 + k + 1)], rollout_log_probs=None,
                            prompt=kw["prompt"], label=kw["label"], reward=r, scores=r))
        return _Ref(out)


@pytest.fixture
def passthrough_ray(monkeypatch):
    unwrap = lambda x: x.value if isinstance(x, _Ref) else x  # noqa: E731
    monkeypatch.setattr(ray, "get", lambda x, *a, **k: [unwrap(v) for v in x] if isinstance(x, list) else unwrap(x))
    # completion order: the last submitted first
    monkeypatch.setattr(ray, "wait", lambda refs, num_returns=1, timeout=None: (list(refs)[-num_returns:],
                                                                                 list(refs)[:-num_returns]))


def _generator(labels, dynamic_filtering, **kw):
    args = SimpleNamespace(
        algo=SimpleNamespace(advantage=SimpleNamespace(is_correction_level="off"),
                             dynamic_filtering_enable=dynamic_filtering, dynamic_filtering_range=(0.0, 1.0)),
        rollout=SimpleNamespace(n_samples_per_prompt=N, batch_size=2),
        vllm=SimpleNamespace(enable_sleep=False))
    # OpenRLHF's prompt loader yields one prompt per item
    loader = [(None, [f"p{i}"], [lab], [None]) for i, lab in enumerate(labels)]
    engine = Engine()
    gen = DynamoSamplesGenerator(SimpleNamespace(args=args), loader, None, "TOK", [engine], **kw)
    return gen, engine


PER_GROUP_TOKENS = sum(range(1, N + 1))  # 1 + 2 + 3 + 4 response tokens


def test_dynamic_filtering_counts_the_discarded_groups(passthrough_ray):
    # p0, p1 dispatched; p1 (all right) is discarded and replaced by p2 (all wrong), discarded, replaced by p3
    gen, engine = _generator(["mixed", "all", "none", "mixed", "mixed"], dynamic_filtering=True)
    samples, _, consumed, exhausted = gen.generate_samples(**GEN_KW)
    assert engine.prompts == ["p0", "p1", "p2", "p3"] and consumed == 4 and not exhausted
    assert sorted({s.prompts[0] for s in samples}) == ["p0", "p3"] and len(samples) == 2 * N
    assert gen.generated_rollouts == 4 * N and gen.generated_tokens == 4 * PER_GROUP_TOKENS

    trainer = object.__new__(DynamoPPOTrainer.__ray_actor_class__)
    trainer.samples_generator = gen
    assert trainer._generated_since_last_step() == {"dynamo/generated_rollouts": 16.0,
                                                    "dynamo/generated_tokens": 40.0}
    # evaluation samples are not training rollouts
    gen.eval_dataloader = [(None, ["q0"], ["mixed"], [None])]
    assert len(gen.generate_eval_samples(n_samples_per_prompt=3, **GEN_KW)) == 3
    assert (gen.generated_rollouts, gen.generated_tokens) == (16, 40)
    # the next step counts only its own: p4 (kept), then the loader is exhausted
    samples, _, consumed, exhausted = gen.generate_samples(**GEN_KW)
    assert len(samples) == N and consumed == 1 and exhausted
    assert trainer._generated_since_last_step() == {"dynamo/generated_rollouts": 4.0,
                                                    "dynamo/generated_tokens": 10.0}
    assert trainer._generated_since_last_step() == {"dynamo/generated_rollouts": 0.0,
                                                    "dynamo/generated_tokens": 0.0}


def test_without_filtering_and_with_an_allocator_every_sample_is_trained_and_counted(passthrough_ray):
    gen, _ = _generator(["all", "none"], dynamic_filtering=False)
    samples, _, _, _ = gen.generate_samples(**GEN_KW)
    assert len(samples) == 2 * N and gen.generated_rollouts == 2 * N
    assert gen.generated_tokens == 2 * PER_GROUP_TOKENS

    # the allocator's counts (3 and 0 = skipped) are what is generated
    gen, engine = _generator(["mixed", "all"], dynamic_filtering=False, rollout_allocator=lambda ids: [3, 0])
    samples, _, consumed, _ = gen.generate_samples(**GEN_KW)
    assert engine.prompts == ["p0"] and consumed == 2
    assert len(samples) == 3 and gen.generated_rollouts == 3 and gen.generated_tokens == 1 + 2 + 3

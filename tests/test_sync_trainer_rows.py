"""The sync trainer's step rows and notes, on a bare DynamoPPOTrainer (no Ray cluster, no models; OpenRLHF's
train_step stubbed): ``dynamo/pool_staleness`` is logged as 0 on every row (the async trainer logs its lag there,
docs/async.md), and a batch the policy actor did not train in full is named in a printed line, as the async
trainer does (issue #25 §1)."""

from types import SimpleNamespace as NS

import pytest

from dynamo_openrlhf import cpu_backend

cpu_backend.install_import_stand_ins()

from openrlhf.trainer.ppo_trainer import BasePPOTrainer  # noqa: E402

from dynamo_openrlhf.ppo_actor import TRAINED_SAMPLES_KEY, UNTRAINED_SAMPLES_KEY  # noqa: E402
from dynamo_openrlhf.ppo_trainer import POOL_STALENESS_KEY, DynamoPPOTrainer  # noqa: E402

Trainer = DynamoPPOTrainer.__ray_actor_class__


def _bare_trainer():
    t = Trainer.__new__(Trainer)
    t.allocator, t.balancing, t.experience_maker = None, None, NS()
    t.samples_generator = NS(generated_rollouts=0, generated_tokens=0, nonfinite_dropped=0, prompts_truncated=0)
    t.args = NS(train=NS(micro_batch_size=16))
    return t


@pytest.mark.parametrize("samples,trained,note", [
    (32, 32.0, None),
    (8, 0.0, "[dynamo] step 3: the batch's 8 samples are fewer than one micro-batch (--train.micro_batch_size 16 "
             "per rank): OpenRLHF's actor trained on none of them (no loss or modulation statistics this step)"),
    (20, 16.0, "[dynamo] step 3: OpenRLHF's actor trained 16 of the batch's 20 samples (each rank drops its "
               "remainder of --train.micro_batch_size 16)"),
])
def test_sync_step_logs_zero_staleness_and_names_an_untrained_batch(monkeypatch, capsys, samples, trained, note):
    monkeypatch.setattr(BasePPOTrainer, "train_step", lambda self, batch, step: (
        {TRAINED_SAMPLES_KEY: trained, UNTRAINED_SAMPLES_KEY: samples - trained}, step + 1))
    t = _bare_trainer()
    status, step = t.train_step(["sample"] * samples, 2)
    assert POOL_STALENESS_KEY == "dynamo/pool_staleness"
    assert step == 3 and status[POOL_STALENESS_KEY] == 0.0
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[dynamo] step")]
    assert printed == ([] if note is None else [note])


def test_sync_step_without_the_actor_s_count_prints_nothing(monkeypatch, capsys):
    """A policy actor that reports no trained-sample count (OpenRLHF's own): staleness still 0, no note."""
    monkeypatch.setattr(BasePPOTrainer, "train_step", lambda self, batch, step: ({"policy_loss": 0.1}, step + 1))
    status, _ = _bare_trainer().train_step(["sample"] * 4, 0)
    assert status[POOL_STALENESS_KEY] == 0.0
    assert "[dynamo] step" not in capsys.readouterr().out

"""The modulation's token entropy without an autograd graph (dynamo_openrlhf/entropy.py) against
OpenRLHF 0.11.2's own ``compute_entropy`` path through its ``Actor.forward`` (padded and packed
layouts, ring attention over a 2-rank gloo group), the trainer hook, and the step's max/min
statistics (``DynamoActorPPOTrainer.ppo_train``, ``reduce_extremes``)."""

import math
import os
import socket
from types import SimpleNamespace

import pytest
import torch

from dynamo_openrlhf import cpu_backend

cpu_backend.install_import_stand_ins()

from openrlhf.models.actor import Actor  # noqa: E402
from openrlhf.models.utils import compute_entropy  # noqa: E402
from openrlhf.trainer.ray import ppo_actor as openrlhf_ppo_actor  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from dynamo_openrlhf.entropy import chunk_tokens_for, response_entropy, token_entropy  # noqa: E402
from dynamo_openrlhf.ppo_actor import EXTREME_STATS, DynamoActorPPOTrainer, reduce_extremes  # noqa: E402

V, B, S, A = 300, 3, 12, 5
CHUNK = 4 * V * 2  # two tokens per chunk: many chunks, a ragged last one


def _f32_close(got, want, logits=None):
    """Equal to float32 rounding: within 8 ulps of the largest term of logsumexp(z) − Σ softmax(z)·z
    (the entropy, or the largest |logit|: the two terms cancel when the entropy is small)."""
    assert got.dtype == want.dtype == torch.float32 and got.shape == want.shape
    scale = max(want.abs().max().item(), 0.0 if logits is None else logits.abs().max().item())
    tol = 8 * torch.finfo(torch.float32).eps * scale
    assert (got - want).abs().max().item() <= tol


def _actor(packing, seed=0, temperature=0.7):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, initializer_range=0.5)  # logits with a spread of entropies
    actor = Actor(LlamaForCausalLM(cfg), temperature=temperature)
    actor.packing_samples = packing  # Actor(nn.Module) does not set it
    return actor


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, V, (B, S), generator=g)
    att = torch.ones(B, S, dtype=torch.long)
    att[0, :3] = 0  # left padding
    att[1, :1] = 0
    att[2, -2:] = 0  # right padding inside the response window
    return seq, att, att[:, -A:].bool()


@pytest.mark.parametrize("packing", [False, True])
def test_response_entropy_is_openrlhfs_compute_entropy(packing):
    actor = _actor(packing)
    seq, att, am = _inputs()
    _, out = actor(seq, am, attention_mask=att, return_output=True, return_entropy=True)
    want = out.entropy[:, -A:]  # OpenRLHF: compute_entropy (autograd on), unpadded/padded, sliced
    assert want.requires_grad
    logits = out["logits"]
    assert logits.shape == ((1, int(att.sum()), V) if packing else (B, S, V))
    for chunk_bytes in (CHUNK, 4 * V, 2**30):  # 2 tokens, 1 token, everything in one chunk
        got = response_entropy(logits, A, attention_mask=att, packed=packing, chunk_bytes=chunk_bytes)
        assert not got.requires_grad and got.grad_fn is None  # no graph
        assert torch.equal(got, want.detach())  # OpenRLHF's compiled kernel on each chunk: bit for bit
    if packing:  # padding positions inside the window are zeros, as OpenRLHF's pad_input leaves them
        # (row 2's last two tokens are padding; the window's last column is the logits at S-2)
        assert got[2, -1].item() == want[2, -1].item() == 0.0 and got[2, -2].item() > 0


def test_token_entropy_is_chunk_independent_and_computes_nothing_twice():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 9, 151, generator=g) * 4
    ref = compute_entropy(logits)
    one = token_entropy(logits, chunk_bytes=4 * 151)
    assert torch.equal(one, ref)
    for chunk_bytes in (4 * 151 * 2, 4 * 151 * 4, 2**30):
        assert torch.equal(token_entropy(logits, chunk_bytes=chunk_bytes), one)
    assert chunk_tokens_for(151_936) == 32 * 2**20 // (4 * 151_936) == 55 and chunk_tokens_for(10**9) == 1


def test_bad_inputs_are_clear_errors():
    logits = torch.randn(2, 6, 7)
    with pytest.raises(ValueError, match=r"response_len must be in \[1, seqlen - 1\] = \[1, 5\], got 6"):
        response_entropy(logits, 6)
    with pytest.raises(ValueError, match="logits must be \\(batch, tokens, vocab\\)"):
        response_entropy(logits[0], 2)
    with pytest.raises(ValueError, match="attention_mask is needed"):
        response_entropy(logits[:1], 2, packed=True)
    with pytest.raises(ValueError, match="3 packed logits for 4 attended tokens"):
        response_entropy(logits[:1, :3], 2, attention_mask=torch.ones(1, 4), packed=True)
    with pytest.raises(ValueError, match="need vocab >= 1"):
        chunk_tokens_for(0)


# ------------------------------------------------------------------------------------- ring attention


def _ring_worker(rank, world, port, logits_full, att, response_len, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        group = torch.distributed.new_group(list(range(world)))
        # this rank's slice of the packed tokens, padded to a multiple of the ring size, as
        # openrlhf/models/ring_attn_utils.py get_tensor_in_current_ring_attn_rank slices them
        n = logits_full.shape[1]
        pad = (world - n % world) % world
        padded = torch.nn.functional.pad(logits_full, (0, 0, 0, pad))
        local_len = (n + pad) // world
        local = padded[:, rank * local_len : (rank + 1) * local_len].contiguous()
        got = response_entropy(local, response_len, attention_mask=att, packed=True, ring_attn_group=group,
                               chunk_bytes=4 * logits_full.shape[-1] * 2)
        queue.put((rank, got))
    finally:
        torch.distributed.destroy_process_group()


def test_ring_attention_layout_gathers_over_the_ring_group():
    """Two ranks of a gloo ring group each hold half of the packed logits (11 attended tokens → one
    pad token); both get the whole (batch, A) entropy, equal to OpenRLHF's on the unsliced logits."""
    import torch.multiprocessing as mp
    from openrlhf.models.ring_attn_utils import gather_and_pad_tensor

    att = torch.tensor([[0, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    n = int(att.sum())
    assert n == 11
    logits = torch.randn(1, n, 13, generator=torch.Generator().manual_seed(5)) * 3
    indices = torch.nonzero(att.flatten()).flatten()
    want = gather_and_pad_tensor(compute_entropy(logits), None, 0, indices, 3, 6)[:, :-1][:, -3:]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_ring_worker, args=(r, 2, port, logits, att, 3, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=600) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for r in (0, 1):
        _f32_close(results[r], want, logits)


# ------------------------------------------------------------------------------------- trainer hook


def _trainer(actor, entropy_coef):
    t = object.__new__(DynamoActorPPOTrainer)
    t.args = SimpleNamespace(
        actor=SimpleNamespace(eps_clip_low_high=(0.2, 0.28), dual_clip=10.0, loss_agg_mode="token-mean",
                              policy_loss_type="ppo", entropy_coef=entropy_coef),
        algo=SimpleNamespace(advantage=SimpleNamespace(is_correction_level="off", is_correction_mode="mask",
                                                       is_correction_gating="ratio",
                                                       is_correction_threshold=(0.5, 5.0))),
        dynamo=SimpleNamespace(modulation=SimpleNamespace(preset="decay6", mu_max=None, lambda_min=None, gamma=None,
                                                          tau=None)),
    )
    t.actor = actor
    t._init_dynamo()
    return t


def _training_loss(packing, entropy_coef):
    """The training step's forward (as OpenRLHF's training_step calls it) and the DynaMO loss; returns
    the loss, the gradients of the actor's parameters and what was logged."""
    actor = _actor(packing, seed=1)
    t = _trainer(actor, entropy_coef)
    seq, att, am = _inputs(seed=2)
    g = torch.Generator().manual_seed(4)
    adv = torch.randn(B, A, generator=g)
    t._info, t._extremes = {}, {}
    lp, out = actor(seq, am, attention_mask=att, return_output=True, ring_attn_group=None, packed_seq_lens=None,
                    return_entropy=entropy_coef is not None)
    assert (getattr(out, "entropy", None) is not None) == (entropy_coef is not None)
    old = (lp.detach() + 0.05 * torch.randn(B, A, generator=g)) * am
    loss = t.actor_loss_fn(lp, old, adv, action_mask=am)[0]
    loss.backward()
    grads = [p.grad.clone() for p in actor.parameters()]
    return loss.detach(), grads, t._info, t._extremes, t._entropy


@pytest.mark.parametrize("packing", [False, True])
def test_hook_entropy_gives_the_loss_and_gradients_of_openrlhfs_entropy(packing):
    """New path (no --actor.entropy_coef: our no-graph entropy) vs the old one (coef 0: OpenRLHF's
    output.entropy, detached): the same entropy, modulated loss and statistics bit for bit, and gradients."""
    new_loss, new_grads, new_info, new_ext, new_ent = _training_loss(packing, None)
    old_loss, old_grads, old_info, old_ext, old_ent = _training_loss(packing, 0.0)
    assert torch.equal(new_ent, old_ent) and torch.equal(new_loss, old_loss)
    # separate backward passes: equal up to the float32 accumulation order of CPU backward kernels
    assert all((a - b).abs().max() <= 1e-6 * b.abs().max() for a, b in zip(new_grads, old_grads))
    assert set(new_info) == set(old_info) and "dynamo/token_entropy" in new_info
    assert all(torch.equal(new_info[k], old_info[k]) for k in new_info)
    assert set(new_ext) == set(EXTREME_STATS) and new_ext == old_ext
    # the logged mean token entropy is the mean over valid response tokens
    am = _inputs(seed=2)[2]
    assert new_info["dynamo/token_entropy"].item() == pytest.approx(new_ent[am].double().mean().item(), rel=1e-6)


def test_hook_ignores_forwards_outside_the_training_step():
    actor = _actor(False)
    t = _trainer(actor, None)
    seq, att, am = _inputs()
    t._info = None  # e.g. the experience maker's log-prob forward
    actor(seq, am, attention_mask=att, return_output=True)
    assert t._entropy is None


# ------------------------------------------------------------------------------- max / min over the step


def test_reduce_extremes_is_a_max_and_a_min_over_ranks():
    rank0 = {"beta_comp_max": 1.1, "beta_comp_min": 1.0, "beta_stab_max": 0.9, "beta_stab_min": 0.7}
    rank1 = {"beta_comp_max": 1.15, "beta_comp_min": 1.02, "beta_stab_max": 0.95, "beta_stab_min": 0.65}
    assert reduce_extremes(rank0) == {"dynamo/" + k: v for k, v in rank0.items()}
    other = torch.tensor(
        [rank1[k] if k.endswith("_max") else -rank1[k] for k in EXTREME_STATS], dtype=torch.float64)
    got = reduce_extremes(rank0, lambda t: torch.maximum(t, other))  # a 2-rank MAX all-reduce
    assert got == {"dynamo/beta_comp_max": 1.15, "dynamo/beta_comp_min": 1.0, "dynamo/beta_stab_max": 0.95,
                   "dynamo/beta_stab_min": 0.65}
    assert reduce_extremes({}) == {}  # nothing seen: nothing logged (no ±inf)
    seen = []
    assert reduce_extremes({}, lambda t: seen.append(t.clone()) or t) == {}
    assert seen[0].tolist() == [-math.inf] * 4  # a rank that saw nothing still joins the collective


def test_ppo_train_logs_the_max_and_min_over_micro_batches(monkeypatch):
    """OpenRLHF's ppo_train averages 0-d info entries over micro-batches; ours adds the true max/min
    of the step's micro-batches (three of them here, the parent's loop stubbed)."""
    actor = _actor(False)
    t = _trainer(actor, None)
    am = _inputs()[2]
    per_batch = []

    def fake_parent_ppo_train(self, kl_ctl):
        for seed in range(3):
            g = torch.Generator().manual_seed(seed)
            self._info = {}
            lp = -torch.rand(B, A, generator=g)
            ent = torch.rand(B, A, generator=g) * (seed + 1)
            self._entropy = ent
            self.actor_loss_fn(lp, lp + 0.2 * torch.randn(B, A, generator=g), torch.randn(B, A, generator=g),
                               action_mask=am)
            per_batch.append({k: float(v) for k, v in self.dynamo_loss.last_modulation_stats.items()})
        self._info = None
        return {"policy_loss": 0.5}

    monkeypatch.setattr(openrlhf_ppo_actor.ActorPPOTrainer, "ppo_train", fake_parent_ppo_train)
    status = t.ppo_train(0.0)
    assert status["policy_loss"] == 0.5
    for k in EXTREME_STATS:
        pick = max if k.endswith("_max") else min
        assert status["dynamo/" + k] == pick(b[k] for b in per_batch)
    vals = [b["beta_stab_min"] for b in per_batch]  # the micro-batches differ: a mean would not be the min
    assert status["dynamo/beta_stab_min"] < sum(vals) / 3
    assert t._extremes is None

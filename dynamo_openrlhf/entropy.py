"""The token entropy the modulation needs, without an autograd graph and in bounded memory.

The modulation uses each response token's entropy only as a constant (its factors are detached), so
it does not need OpenRLHF's ``compute_entropy`` (``openrlhf/models/utils.py``), which the actor runs
with autograd on over every token of the sequence when ``--actor.entropy_coef`` is set: a softmax
over the full vocabulary whose float32 (tokens, vocab) graph lives until the step's backward.

:func:`response_entropy` computes the same quantity, ``logsumexp(z) − Σ softmax(z)·z`` per token
(OpenRLHF's ``compute_entropy`` itself, applied to one chunk at a time), under ``torch.no_grad``, from the (temperature-scaled, float32)
logits the actor forward has already produced, only at the positions the loss reads (the last
``response_len`` next-token predictions), a chunk of tokens at a time, so the extra memory is a few
(chunk, vocab) temporaries (``chunk_bytes`` each, 32 MiB by default) and the (batch, response_len)
result. Layouts of OpenRLHF 0.11.2's ``Actor.forward`` (``openrlhf/models/actor.py``):

* padded samples: logits (batch, seqlen, vocab); OpenRLHF's ``entropy[:, :-1][:, -A:]`` is the
  entropy of ``logits[:, seqlen−1−A : seqlen−1]``; padding positions inside that window get the
  entropy of their (meaningless) logits, as in OpenRLHF; the action mask excludes them.
* packed samples (``packing_samples``, no ring attention): logits (1, valid tokens, vocab) in the
  order of the attention mask's non-zero entries (flash-attn's ``unpad_input``); only the packed
  tokens that land in the response window are computed, then put at their padded positions
  (zeros elsewhere, as OpenRLHF's ``pad_input`` does).
* packed samples with ring attention: each rank holds a slice of the packed sequence; the entropy of
  every local token is computed (chunked, no graph) and gathered with OpenRLHF's own
  ``gather_and_pad_tensor`` over the ring group (a collective: every rank of the ring runs the same
  training forward, so every rank reaches it), then sliced like the padded layout.

The result equals ``compute_entropy`` on the same logits (bit for bit in tests/test_entropy.py; the
compiled kernel may in principle split a reduction differently for another chunk length, i.e. float32
rounding). OpenRLHF's import stand-ins must be installed first on machines without CUDA
(``dynamo_openrlhf.cpu_backend.install_import_stand_ins()``), as for every OpenRLHF import.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["DEFAULT_CHUNK_BYTES", "chunk_tokens_for", "entropy_rows", "response_entropy", "token_entropy"]

#: Size of one (chunk, vocab) float32 temporary; a few of them are alive at once.
DEFAULT_CHUNK_BYTES = 32 * 2**20


def chunk_tokens_for(vocab: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Tokens per chunk so that one (chunk, vocab) float32 temporary takes at most ``chunk_bytes``
    (at least one token)."""
    if int(vocab) < 1 or int(chunk_bytes) < 1:
        raise ValueError(f"need vocab >= 1 and chunk_bytes >= 1, got vocab={vocab}, chunk_bytes={chunk_bytes}")
    return max(1, int(chunk_bytes) // (4 * int(vocab)))


def entropy_rows(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of each row of (n, vocab) float32 logits: OpenRLHF's own ``compute_entropy``
    (``openrlhf/models/utils.py``, ``@torch.compile``: ``logsumexp(z) − Σ softmax(z)·z``), called on
    one chunk. Callers run it under ``torch.no_grad`` and pass a chunk; the compiled kernel is the
    one OpenRLHF uses, so the values are OpenRLHF's (bit for bit in the tests), and it is faster per
    token than the eager formula (one fused pass over a cache-sized chunk)."""
    from openrlhf.models.utils import compute_entropy

    return compute_entropy(logits)


@torch.no_grad()
def token_entropy(logits: torch.Tensor, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> torch.Tensor:
    """Entropy of every position of (..., vocab) logits, chunked over positions, no graph: shape
    ``logits.shape[:-1]``, float32. Each chunk is a contiguous slice of one row when the logits are
    contiguous in their last two dims, so no copy of the logits is made."""
    if logits.dim() < 2:
        raise ValueError(f"logits must be (..., vocab), got shape {tuple(logits.shape)}")
    vocab = logits.shape[-1]
    rows = logits.reshape(-1, logits.shape[-2], vocab) if logits.dim() > 2 else logits.unsqueeze(0)
    out = torch.empty(rows.shape[:2], dtype=torch.float32, device=logits.device)
    step = chunk_tokens_for(vocab, chunk_bytes)
    for b in range(rows.shape[0]):
        for s in range(0, rows.shape[1], step):
            out[b, s : s + step] = entropy_rows(rows[b, s : s + step])
    return out.reshape(logits.shape[:-1])


def _ring_pad_len(total: int, group) -> int:
    # as openrlhf/models/ring_attn_utils.py get_tensor_in_current_ring_attn_rank
    size = torch.distributed.get_world_size(group=group)
    return (size - total % size) % size


@torch.no_grad()
def response_entropy(
    logits: torch.Tensor,
    response_len: int,
    attention_mask: Optional[torch.Tensor] = None,
    packed: bool = False,
    ring_attn_group=None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> torch.Tensor:
    """(batch, response_len) float32 token entropy at the positions of OpenRLHF's
    ``output.entropy[:, -response_len:]`` (see the module docstring for the layouts).

    ``logits``: the actor forward's ``output["logits"]`` (float32, temperature already applied);
    ``attention_mask`` (batch, seqlen): needed for the packed layouts (its shape gives batch and
    seqlen there); ``packed``: the actor's ``packing_samples``; ``ring_attn_group``: the strategy's
    ring attention group (packed layout only, as in OpenRLHF)."""
    A = int(response_len)
    if logits.dim() != 3:
        raise ValueError(f"logits must be (batch, tokens, vocab), got shape {tuple(logits.shape)}")
    if not packed:
        seqlen = logits.shape[1]
        if not 1 <= A <= seqlen - 1:
            raise ValueError(f"response_len must be in [1, seqlen - 1] = [1, {seqlen - 1}], got {A}")
        return token_entropy(logits[:, seqlen - 1 - A : seqlen - 1], chunk_bytes)
    if attention_mask is None or attention_mask.dim() != 2:
        raise ValueError("packed samples: the (batch, seqlen) attention_mask is needed to place the entropy")
    if logits.shape[0] != 1:
        raise ValueError(f"packed samples: logits must be (1, packed tokens, vocab), got {tuple(logits.shape)}")
    batch, seqlen = attention_mask.shape
    if not 1 <= A <= seqlen - 1:
        raise ValueError(f"response_len must be in [1, seqlen - 1] = [1, {seqlen - 1}], got {A}")
    indices = torch.nonzero(attention_mask.flatten(), as_tuple=False).flatten()  # flash-attn's unpad_input
    if ring_attn_group is not None:
        from openrlhf.models.ring_attn_utils import gather_and_pad_tensor

        local = token_entropy(logits, chunk_bytes)  # (1, local tokens)
        pad = _ring_pad_len(indices.numel(), ring_attn_group)
        full = gather_and_pad_tensor(local, ring_attn_group, pad, indices, batch, seqlen)
        return full[:, :-1][:, -A:].float()
    if logits.shape[1] != indices.numel():
        raise ValueError(f"packed samples: {logits.shape[1]} packed logits for {indices.numel()} attended tokens")
    col = indices % seqlen
    start = seqlen - 1 - A
    sel = torch.nonzero((col >= start) & (col < seqlen - 1), as_tuple=False).flatten()
    out = torch.zeros(batch * A, dtype=torch.float32, device=logits.device)
    step = chunk_tokens_for(logits.shape[-1], chunk_bytes)
    packed_logits = logits[0]
    for s in range(0, sel.numel(), step):
        j = sel[s : s + step]
        p = indices[j]
        out[(p // seqlen) * A + (p % seqlen - start)] = entropy_rows(packed_logits.index_select(0, j))
    return out.reshape(batch, A)

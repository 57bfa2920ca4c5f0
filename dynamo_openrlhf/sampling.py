"""Sampling several responses per prompt with Hugging Face ``generate``, shared by the evaluation CLI
(:mod:`dynamo_openrlhf.evaluate`), the tiny task's pass-rate measurement (:mod:`dynamo_openrlhf.tiny`) and
the gradient-variance benchmark. It imports nothing of the package (torch on first call).
"""

from __future__ import annotations

from typing import List, Sequence

__all__ = ["sample_batch"]


def sample_batch(model, tokenizer, encoded: Sequence[Sequence[int]], n: int, temperature: float, top_p: float,
                 max_new_tokens: int, device="cpu") -> List[str]:
    """``n`` responses per encoded prompt from one left-padded ``generate`` call.

    Returns ``len(encoded) * n`` texts, prompt-major. Temperature 0 is greedy (one response, repeated).
    """
    import torch

    width = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(encoded):
        ids[i, width - len(e):] = torch.tensor(e, dtype=torch.long)
        mask[i, width - len(e):] = 1
    sample = temperature > 0
    with torch.no_grad():
        gen = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=sample,
            temperature=temperature if sample else None, top_p=top_p if sample else None,
            top_k=0 if sample else None, max_new_tokens=max_new_tokens,
            num_return_sequences=n if sample else 1, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    texts = tokenizer.batch_decode(gen[:, width:].cpu(), skip_special_tokens=True)
    if not sample:  # HF refuses several return sequences without sampling
        texts = [t for t in texts for _ in range(n)]
    return texts

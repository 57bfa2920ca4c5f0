"""Stable prompt ids: a signed 64-bit integer per (prompt, label).

Why a content hash and not a dataset index: the pass-rate pool (DynaMO's per-prompt Beta posteriors) must
find a prompt's history again after the dataset is reshuffled (every epoch), filtered, truncated
(``--data.max_samples``) or extended with new prompts, and a pool saved by one run must be usable by
another run over the same prompts. A dataset index changes under all of these; a hash of the prompt text
and its label does not. The label is part of the key, so the same question with a different reference
answer is a different prompt.

The encoding is length-prefixed (8-byte little-endian byte length, then the UTF-8 bytes, for the prompt
and then the label), so ``("ab", "c")`` and ``("a", "bc")`` get different ids. The digest is
``hashlib.blake2b(digest_size=8)`` read as a little-endian signed int64 (fits numpy ``int64`` and torch
``long``). Independent of the Python hash seed, platform and process. Needs only numpy (no torch).

Identical (prompt, label) pairs share one id by design: they are the same prompt for the pool.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

__all__ = ["prompt_id", "prompt_ids"]


def _encode(prompt: str, label: str) -> bytes:
    out = bytearray()
    for part in (prompt, label):
        data = part.encode("utf-8")
        out += len(data).to_bytes(8, "little")
        out += data
    return bytes(out)


def prompt_id(prompt: str, label: str) -> int:
    """The stable signed 64-bit id of ``(prompt, label)``; both must be ``str``."""
    if not isinstance(prompt, str) or not isinstance(label, str):
        raise ValueError(
            f"prompt_id needs str prompt and label, got {type(prompt).__name__} and {type(label).__name__}"
        )
    digest = hashlib.blake2b(_encode(prompt, label), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def prompt_ids(prompts: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    """Ids of aligned ``prompts[i], labels[i]`` as a 1-D ``int64`` array."""
    prompts, labels = list(prompts), list(labels)
    if len(prompts) != len(labels):
        raise ValueError(f"prompt_ids: {len(prompts)} prompts but {len(labels)} labels; they must be aligned")
    for i, (p, l) in enumerate(zip(prompts, labels)):
        if not isinstance(p, str) or not isinstance(l, str):
            raise ValueError(
                f"prompt_ids: item {i} has prompt of type {type(p).__name__} and label of type "
                f"{type(l).__name__}; both must be str"
            )
    return np.fromiter((prompt_id(p, l) for p, l in zip(prompts, labels)), dtype=np.int64, count=len(prompts))

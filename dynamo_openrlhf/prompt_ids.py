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

Labels need not be strings: OpenRLHF hands the dataset's label to the reward function as it is (GSM8K-style
integer answers, None, lists of acceptable answers, dicts). A ``str`` label is encoded as above (so ids of string
labels never change); any other label is encoded by its canonical JSON text (``json.dumps`` with sorted keys,
compact separators, non-ASCII kept; tuples as lists, numpy scalars and arrays as their Python values) with the top
bit of its length prefix set, so that the integer 7 and the string "7" are different labels. A label that JSON
cannot represent is a ``ValueError`` naming its type. The prompt must be a ``str``.

Identical (prompt, label) pairs share one id by design: they are the same prompt for the pool.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Sequence

import numpy as np

__all__ = ["prompt_id", "prompt_ids"]


_JSON_TAG = 1 << 63  # set in the length prefix of a label encoded as JSON (never set for a str: lengths < 2**63)


def _json_default(value: Any):
    if hasattr(value, "tolist") and callable(value.tolist):  # numpy scalars and arrays
        return value.tolist()
    raise TypeError(type(value).__name__)


def _label_bytes(label: Any) -> tuple:
    """(length-prefix flag, UTF-8 bytes) of a label: a str as itself, anything else as canonical JSON."""
    if isinstance(label, str):
        return 0, label.encode("utf-8")
    try:
        text = json.dumps(label, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_json_default)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"prompt_id: a label must be a str or a JSON value (number, bool, None, list, dict), got "
                         f"{type(label).__name__} ({exc})") from None
    return _JSON_TAG, text.encode("utf-8")


def _encode(prompt: str, label: Any) -> bytes:
    out = bytearray()
    for flag, data in ((0, prompt.encode("utf-8")), _label_bytes(label)):
        out += (len(data) | flag).to_bytes(8, "little")
        out += data
    return bytes(out)


def prompt_id(prompt: str, label: Any) -> int:
    """The stable signed 64-bit id of ``(prompt, label)``: ``prompt`` a ``str``, ``label`` a ``str`` or any JSON
    value (see the module docstring)."""
    if not isinstance(prompt, str):
        raise ValueError(f"prompt_id needs a str prompt, got {type(prompt).__name__}")
    digest = hashlib.blake2b(_encode(prompt, label), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def prompt_ids(prompts: Sequence[str], labels: Sequence[Any]) -> np.ndarray:
    """Ids of aligned ``prompts[i], labels[i]`` as a 1-D ``int64`` array."""
    prompts, labels = list(prompts), list(labels)
    if len(prompts) != len(labels):
        raise ValueError(f"prompt_ids: {len(prompts)} prompts but {len(labels)} labels; they must be aligned")
    out = np.empty(len(prompts), dtype=np.int64)
    for i, (p, l) in enumerate(zip(prompts, labels)):
        try:
            out[i] = prompt_id(p, l)
        except ValueError as exc:
            raise ValueError(f"prompt_ids: item {i}: {exc}") from None
    return out

"""Import stand-ins: make ``import openrlhf...`` work where flash-attn or vLLM do not import.

Only when the real package does not import (``install_import_stand_ins``; idempotent):

* ``flash_attn`` — OpenRLHF imports its padding helpers at module import; pure-torch versions.
* ``vllm`` — OpenRLHF imports ``SamplingParams``, ``TokensPrompt``, ``random_uuid`` at module
  import. A real vllm that imports is always kept.

Importing this module imports neither torch nor openrlhf (the flash-attn stand-in imports torch when it
is installed).
"""

from __future__ import annotations

import importlib
import importlib.machinery
import sys
import types
import uuid

# Names of the modules this backend put into sys.modules (empty when the real packages are used).
_INSTALLED: list[str] = []


def stand_ins_installed() -> tuple[str, ...]:
    """Top-level package names currently served by a stand-in (e.g. ``("flash_attn", "vllm")``)."""
    return tuple(_INSTALLED)


def real_package_works(name: str) -> bool:
    if name in sys.modules and getattr(sys.modules[name], "__dynamo_cpu_stand_in__", False):
        return False
    try:
        importlib.import_module(name)
        return True
    except Exception:  # ImportError, or a CUDA-only package failing on import
        sys.modules.pop(name, None)
        return False


def _module(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    # A spec without a loader: importlib.util.find_spec (used by transformers' availability checks)
    # needs one; no distribution metadata exists, so transformers still reports the package missing.
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
    mod.__dict__.update(attrs)
    mod.__dynamo_cpu_stand_in__ = True
    sys.modules[name] = mod
    return mod


def _install_flash_attn() -> None:
    import torch
    from einops import rearrange

    def index_first_axis(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, *x.shape[1:])[indices] if x.dim() > 1 else x[indices]

    def unpad_input(hidden_states: torch.Tensor, attention_mask: torch.Tensor, unused_mask=None):
        """(batch, seqlen, ...) → (total_valid, ...), indices, cu_seqlens, max_seqlen, seqused."""
        mask = attention_mask if unused_mask is None else (attention_mask + unused_mask)
        seqlens = mask.sum(dim=-1, dtype=torch.int32)
        indices = torch.nonzero(mask.flatten(), as_tuple=False).flatten()
        cu_seqlens = torch.nn.functional.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
        flat = rearrange(hidden_states, "b s ... -> (b s) ...")
        return flat[indices], indices, cu_seqlens, int(seqlens.max().item()) if seqlens.numel() else 0, seqlens

    def pad_input(hidden_states: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
        out = hidden_states.new_zeros((batch * seqlen, *hidden_states.shape[1:]))
        out[indices] = hidden_states
        return rearrange(out, "(b s) ... -> b s ...", b=batch)

    def all_gather(input_: torch.Tensor, process_group) -> torch.Tensor:
        import torch.distributed as dist

        world = dist.get_world_size(process_group)
        parts = [torch.empty_like(input_) for _ in range(world)]
        dist.all_gather(parts, input_.contiguous(), group=process_group)
        return torch.cat(parts, dim=0)

    root = _module("flash_attn", __version__="2.8.3")
    root.__path__ = []  # a package, so submodule imports resolve through sys.modules
    root.bert_padding = _module(
        "flash_attn.bert_padding",
        index_first_axis=index_first_axis,
        pad_input=pad_input,
        unpad_input=unpad_input,
        rearrange=rearrange,
    )
    utils = _module("flash_attn.utils")
    utils.__path__ = []
    utils.distributed = _module("flash_attn.utils.distributed", all_gather=all_gather)
    root.utils = utils
    # flash_attn.ops is deliberately absent: OpenRLHF falls back to torch's cross-entropy without it.


def _install_vllm() -> None:
    class SamplingParams:
        """The subset of vllm.SamplingParams OpenRLHF builds; stored as plain attributes."""

        def __init__(self, n: int = 1, **kwargs):
            self.n = n
            for k, v in kwargs.items():
                setattr(self, k, v)

        def clone(self) -> "SamplingParams":
            new = SamplingParams.__new__(SamplingParams)
            new.__dict__.update(self.__dict__)
            return new

        def __repr__(self) -> str:
            return f"SamplingParams({self.__dict__})"

    class TokensPrompt(dict):
        """vllm.inputs.TokensPrompt is a TypedDict: ``{"prompt_token_ids": [...]}``."""

    def random_uuid() -> str:
        return uuid.uuid4().hex

    root = _module("vllm", __version__="0.29.0", SamplingParams=SamplingParams)
    root.__path__ = []
    root.inputs = _module("vllm.inputs", TokensPrompt=TokensPrompt)
    root.utils = _module("vllm.utils", random_uuid=random_uuid)


def install_import_stand_ins() -> tuple[str, ...]:
    """Make ``import openrlhf...`` work without CUDA; return the names that got a stand-in.

    Idempotent. A real ``flash_attn`` / ``vllm`` that imports is always kept.
    """
    for name, installer in (("flash_attn", _install_flash_attn), ("vllm", _install_vllm)):
        if name in _INSTALLED or real_package_works(name):
            continue
        installer()
        _INSTALLED.append(name)
    return stand_ins_installed()

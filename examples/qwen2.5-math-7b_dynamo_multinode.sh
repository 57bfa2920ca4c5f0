#!/usr/bin/env bash
# DynaMO (arXiv 2602.19208) on Qwen/Qwen2.5-Math-7B: the paper's training setup on SEVERAL nodes
# (default 4 nodes x 8 GPUs), submitted to an existing Ray cluster.
#
# What it runs: `ray job submit ... -- python -m dynamo_openrlhf.train` with the same flags as
# examples/qwen2.5-math-7b_dynamo.sh (lr 1e-6, no KL, temperature 1.0, clip 0.2/0.2 with dual-clip 10,
# 512 prompts x 16 rollouts per step, ~2000 steps, math-verify reward, decay6 modulation; RECIPE=variance
# [default]: RLOO + prompt-balanced loss + exact variance-minimising allocation 8..24; RECIPE=paper: GRPO
# advantages + token-mean + proportional rule), only
# spread over NNODES x GPUS_PER_NODE GPUs: DeepSpeed ZeRO-3 over all of them and NNODES x GPUS_PER_NODE /
# VLLM_TP vLLM engines (tensor parallel VLLM_TP), colocated (hybrid engine).
# GRPO baseline on the same cluster: RECIPE=paper and this script with `--dynamo.allocation.rule off
# --dynamo.modulation.preset off` appended (then the run is OpenRLHF's GRPO exactly).
#
# GPU needs: NNODES (4) nodes x GPUS_PER_NODE (8) GPUs, 80 GB class (A100-80GB / H100), fast interconnect
#   (InfiniBand/RoCE) between nodes for ZeRO-3's all-gathers and the NCCL weight sync to vLLM.
# Memory (estimate, not measured): generation --vllm.gpu_memory_utilization 0.6 per GPU; training ~25-45 GB
#   per GPU (122 GB of weights and Adam/master states / 32 ranks = 4 GB, plus activations); host RAM
#   >= 64 GB per node. Disk: ~107 GB per DeepSpeed checkpoint, 3 kept.
# Time (rough estimate, not measured): ~2.5-3.5 min per step on 4 x 8 H100, i.e. ~4-5 days for 2000 steps
#   (the long responses at the end of a step's generation do not get faster with more engines).
#
# Starting the Ray cluster (once, before this script):
#   on the head node (node 0):        ray start --head --node-ip-address "$HEAD_IP" --port 6379 \
#                                         --dashboard-host 0.0.0.0 --num-gpus 8
#   on every other node (1..NNODES-1): ray start --address "$HEAD_IP:6379" --num-gpus 8
#   check:                             ray status    # 32 GPUs, NNODES nodes
#   stop (each node, after the run):   ray stop
# Every node needs the same Python environment at the same path (dynamo_openrlhf installed with OpenRLHF
# 0.11.2's GPU pins: `bash scripts/install.sh && pip install flash-attn==2.8.3 vllm==0.29.0`; the reward
# module is passed to the vLLM engines as that path), and a shared file system for DATA (read by the
# trainer, which Ray may place on any node), the model cache (or MODEL as a shared local path) and
# OUTPUT_ROOT (every rank writes its ZeRO-3 checkpoint shard). Set NCCL_SOCKET_IFNAME / NCCL_IB_HCA for your
# network in RUNTIME_ENV_JSON if NCCL picks the wrong interface.
# Data: JSONL, one prompt a line: {"prompt": "...", "answer": "..."} (keys: INPUT_KEY / LABEL_KEY); the
#   prompt goes through the model's chat template and should ask for the final answer in \boxed{}.
#
# Usage (from the head node, or any machine that reaches its dashboard port 8265):
#   RAY_ADDRESS=http://$HEAD_IP:8265 DATA=/shared/math_train.jsonl OUTPUT_ROOT=/shared/runs \
#       bash examples/qwen2.5-math-7b_dynamo_multinode.sh [flags...]
# Extra flags are appended and win (argparse: last one counts), e.g. `--train.seed 1`.
# Environment (defaults in brackets): RAY_ADDRESS [required], NNODES [4], GPUS_PER_NODE [8], VLLM_TP [2],
#   MODEL [Qwen/Qwen2.5-Math-7B], DATA [/data/math_train.jsonl], INPUT_KEY [prompt], LABEL_KEY [answer],
#   EVAL_DATA [none: no in-training eval], OUTPUT_ROOT [/data/runs], RUN_NAME [qwen2.5-math-7b_dynamo_4nodes],
#   STEPS [2000], NUM_EPISODES [STEPS x 512 / lines of DATA when DATA is a local file here, else 1], POOL_LOAD
#   [none], WANDB_API_KEY [none: TensorBoard only], RUNTIME_ENV_JSON [TOKENIZERS_PARALLELISM=false, NCCL_DEBUG=WARN].
# The command itself is built by examples/paper_setup.sh (shared by the Qwen scripts).
set -euo pipefail

: "${RAY_ADDRESS:?set RAY_ADDRESS to the dashboard of the Ray head node, e.g. http://10.0.0.1:8265 (see the header)}"
export RAY_ADDRESS
export MODEL=${MODEL:-Qwen/Qwen2.5-Math-7B}
export NNODES=${NNODES:-4} GPUS_PER_NODE=${GPUS_PER_NODE:-8} VLLM_TP=${VLLM_TP:-2}
export RUN_NAME=${RUN_NAME:-qwen2.5-math-7b_dynamo_${NNODES}nodes}
export ROLLOUT_MICRO_BATCH=4 TRAIN_MICRO_BATCH=2
exec bash "$(dirname "${BASH_SOURCE[0]}")/paper_setup.sh" "$@"

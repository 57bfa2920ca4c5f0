#!/usr/bin/env bash
# DynaMO (arXiv 2602.19208) on Qwen/Qwen2.5-Math-7B: the paper's training setup, ONE node.
#
# What it runs: `ray job submit ... -- python -m dynamo_openrlhf.train` (OpenRLHF 0.11.2's train_ppo_ray
# plus the --dynamo.* flags) with the paper's setup: lr 1e-6, no KL and no reference model, temperature 1.0,
# PPO clip 0.2/0.2 with dual-clip 10, 512 prompts x 16 rollouts per step (8192 samples), ~2000 steps,
# math-verify reward (dynamo_openrlhf.reward), decay6 token-level modulation, and DynaMO's default recipe
# (RECIPE=variance: RLOO advantages, prompt-balanced loss, exact minimiser of sum v_i/(n_i - 1), 8..24
# rollouts per prompt; see examples/paper_setup.sh). RECIPE=paper runs the paper's own recipe (GRPO advantages,
# token-mean loss, proportional rule). The GRPO baseline: examples/qwen2.5-math-7b_grpo_baseline.sh; on several
# nodes: examples/qwen2.5-math-7b_dynamo_multinode.sh.
#
# GPU needs: 1 node x 8 GPUs, 80 GB class (A100-80GB / H100). Hybrid engine: the actor (8 DeepSpeed ZeRO-3
#   ranks) and 4 vLLM engines (tensor parallel 2) share all 8 GPUs and sleep in turn.
# Memory (estimate, not measured): generation uses --vllm.gpu_memory_utilization 0.6 of each GPU (7.6B bf16
#   weights = 15 GB per engine, 7.5 GB per GPU, the rest KV cache); training ~40-60 GB per GPU (bf16 weights +
#   fp32 Adam/master states = ~16 B/param = 122 GB, /8 = 15 GB with ZeRO-3, plus activations with gradient
#   checkpointing and the 152k-vocab logits of a packed micro-batch; add --ds.adam_offload if short).
#   Host RAM >= 256 GB (sleep mode parks the DeepSpeed states, ~122 GB, in CPU memory during generation).
#   Disk: ~107 GB per DeepSpeed checkpoint (weights + optimizer), 3 kept.
# Time (rough estimate, not measured): ~8-10 min per step on 8 x H100 (8192 responses of ~0.5-1.5k tokens,
#   then 4 optimizer steps of 2048 samples), i.e. ~12-14 days for 2000 steps: use the multi-node script.
#
# Before running: a Ray cluster on this node (`ray start --head --num-gpus 8`), and on it dynamo_openrlhf
#   installed with OpenRLHF 0.11.2's GPU pins (`bash scripts/install.sh && pip install flash-attn==2.8.3
#   vllm==0.29.0`). The job's driver runs on the Ray head node: DATA and OUTPUT_ROOT are paths there.
# Data: JSONL, one prompt a line: {"prompt": "...", "answer": "..."} (keys: INPUT_KEY / LABEL_KEY); the
#   prompt goes through the model's chat template and should ask for the final answer in \boxed{}.
#
# Usage:
#   DATA=/data/math_train.jsonl OUTPUT_ROOT=/data/runs bash examples/qwen2.5-math-7b_dynamo.sh [flags...]
# Extra flags are appended and win (argparse: last one counts), e.g. `--train.seed 1`.
# Environment (defaults in brackets): RAY_ADDRESS [http://127.0.0.1:8265], MODEL [Qwen/Qwen2.5-Math-7B],
#   DATA [/data/math_train.jsonl], INPUT_KEY [prompt], LABEL_KEY [answer], EVAL_DATA [none: no in-training
#   eval], OUTPUT_ROOT [/data/runs], RUN_NAME [qwen2.5-math-7b_dynamo], STEPS [2000], NUM_EPISODES
#   [STEPS x 512 / lines of DATA when DATA is a local file, else 1], POOL_LOAD [none], WANDB_API_KEY [none:
#   TensorBoard only], RUNTIME_ENV_JSON [TOKENIZERS_PARALLELISM=false, NCCL_DEBUG=WARN].
# The command itself is built by examples/paper_setup.sh (shared by the Qwen scripts).
set -euo pipefail

export MODEL=${MODEL:-Qwen/Qwen2.5-Math-7B}
export RUN_NAME=${RUN_NAME:-qwen2.5-math-7b_dynamo}
export NNODES=1 GPUS_PER_NODE=8 VLLM_TP=2          # 4 engines x TP 2 on the node's 8 GPUs
export ROLLOUT_MICRO_BATCH=4 TRAIN_MICRO_BATCH=2
exec bash "$(dirname "${BASH_SOURCE[0]}")/paper_setup.sh" "$@"

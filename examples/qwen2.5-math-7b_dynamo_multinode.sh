#!/usr/bin/env bash
# DynaMO (arXiv 2602.19208) on Qwen/Qwen2.5-Math-7B: the paper's training setup on SEVERAL nodes
# (default 4 nodes x 8 GPUs), submitted to an existing Ray cluster.
#
# What it runs: `ray job submit ... -- python -m dynamo_openrlhf.train` with the same flags as
# examples/qwen2.5-math-7b_dynamo.sh (lr 1e-6, GRPO advantages, no KL, token-mean loss, temperature 1.0,
# clip 0.2/0.2 with dual-clip 10, 512 prompts x 16 rollouts per step, ~2000 steps, math-verify reward;
# DynaMO: Neyman allocation 8..24 rollouts per prompt from the pass-rate pool, decay6 modulation), only
# spread over NNODES x GPUS_PER_NODE GPUs: DeepSpeed ZeRO-3 over all of them and NNODES x GPUS_PER_NODE /
# VLLM_TP vLLM engines (tensor parallel VLLM_TP), colocated (hybrid engine).
# GRPO baseline on the same cluster: this script with `--dynamo.allocation.rule off --dynamo.modulation.preset off`
# appended (then the run is OpenRLHF's GRPO exactly).
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
set -euo pipefail

: "${RAY_ADDRESS:?set RAY_ADDRESS to the dashboard of the Ray head node, e.g. http://10.0.0.1:8265 (see the header)}"
NNODES=${NNODES:-4}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
VLLM_TP=${VLLM_TP:-2}
VLLM_ENGINES=$(( NNODES * GPUS_PER_NODE / VLLM_TP ))
MODEL=${MODEL:-Qwen/Qwen2.5-Math-7B}
DATA=${DATA:-/data/math_train.jsonl}
INPUT_KEY=${INPUT_KEY:-prompt}
LABEL_KEY=${LABEL_KEY:-answer}
EVAL_DATA=${EVAL_DATA:-}
OUTPUT_ROOT=${OUTPUT_ROOT:-/data/runs}
RUN_NAME=${RUN_NAME:-qwen2.5-math-7b_dynamo_${NNODES}nodes}
OUT="$OUTPUT_ROOT/$RUN_NAME"
POOL_LOAD=${POOL_LOAD:-}
DEFAULT_RUNTIME_ENV='{"env_vars": {"TOKENIZERS_PARALLELISM": "false", "NCCL_DEBUG": "WARN"}}'
RUNTIME_ENV_JSON=${RUNTIME_ENV_JSON:-$DEFAULT_RUNTIME_ENV}

PROMPTS_PER_STEP=512
STEPS=${STEPS:-2000}
# OpenRLHF has no step limit: the run lasts NUM_EPISODES passes over the data (STEPS x 512 prompts in all).
if [[ -z "${NUM_EPISODES:-}" ]]; then
    NUM_EPISODES=1
    if [[ -f "$DATA" ]]; then
        N_PROMPTS=$(grep -c . "$DATA" || true)
        if (( N_PROMPTS > 0 )); then
            NUM_EPISODES=$(( (STEPS * PROMPTS_PER_STEP + N_PROMPTS - 1) / N_PROMPTS ))
        fi
    fi
fi

MODEL_ARGS=(
    --actor.model_name_or_path "$MODEL"
    --data.prompt_dataset "$DATA"
    --data.input_key "$INPUT_KEY"
    --data.label_key "$LABEL_KEY"
    --data.apply_chat_template
    --reward.remote_url dynamo_openrlhf.reward      # built-in math-verify reward, scored against each prompt's label
)

ROLLOUT_ARGS=(
    --rollout.batch_size "$PROMPTS_PER_STEP"        # 512 prompts per step
    --rollout.n_samples_per_prompt 16               # x 16 rollouts = 8192 samples (DynaMO keeps the sum, varies n_i)
    --rollout.temperature 1.0
    --rollout.top_p 1.0
    --data.max_len 4096                             # Qwen2.5-Math's context (prompt + response)
    --rollout.max_new_tokens 3072
    --rollout.micro_batch_size 4                    # samples per forward when scoring log-probs (packed)
    --train.num_episodes "$NUM_EPISODES"
)

ALGO_ARGS=(
    --algo.advantage.estimator group_norm           # GRPO advantages
    --algo.kl.init_coef 0                           # no KL: no reference model is created
    --actor.policy_loss_type ppo
    --actor.loss_agg_mode token-mean
    --actor.eps_clip_low_high 0.2 0.2               # the paper's clip; the reference code uses 0.28 high (--dynamo.clip_higher 0.28)
    --actor.dual_clip 10
    --actor.entropy_coef 0                          # token entropy computed and logged, no entropy loss
    --actor.adam.lr 1e-6
    --actor.lr_scheduler constant
    --actor.lr_warmup_ratio 0
    --train.batch_size 2048                         # 4 optimizer steps per rollout step (not stated by the paper)
    --train.micro_batch_size 2
    --train.max_epochs 1
)

ENGINE_ARGS=(
    --actor.num_nodes "$NNODES"                     # DeepSpeed ZeRO-3 over NNODES x GPUS_PER_NODE ranks
    --actor.num_gpus_per_node "$GPUS_PER_NODE"
    --vllm.num_engines "$VLLM_ENGINES"              # every GPU (4 nodes: 16 engines x TP 2 = 32 GPUs)
    --vllm.tensor_parallel_size "$VLLM_TP"
    --train.colocate_all                            # hybrid engine: actor and vLLM share every GPU
    --vllm.enable_sleep
    --ds.enable_sleep
    --vllm.gpu_memory_utilization 0.6
    --ds.zero_stage 3
    --ds.param_dtype bf16
    --ds.attn_implementation flash_attention_2
    --ds.packing_samples
    --actor.gradient_checkpointing_enable
)

OUTPUT_ARGS=(
    --ckpt.path "$OUT/ckpt"
    --ckpt.output_dir "$OUT/final"
    --ckpt.save_steps 50
    --ckpt.max_num 3
    --ckpt.load_enable                              # resume from $OUT/ckpt when a checkpoint is there
    --logger.logging_steps 1
    --logger.tensorboard_dir "$OUT/tensorboard"
)
if [[ -n "${WANDB_API_KEY:-}" ]]; then
    OUTPUT_ARGS+=(--logger.wandb.key "$WANDB_API_KEY" --logger.wandb.run_name "$RUN_NAME")
fi
if [[ -n "$EVAL_DATA" ]]; then
    # OpenRLHF's own evaluation during training (the paper's pass@k: python -m dynamo_openrlhf.evaluate)
    OUTPUT_ARGS+=(--eval.dataset "$EVAL_DATA" --eval.steps 100 --eval.n_samples_per_prompt 4 --eval.temperature 0.6
                  --dynamo.eval_at_start --dynamo.eval_at_end)
fi

DYNAMO_ARGS=(
    --dynamo.backend gpu                            # GPU code path even if the submitting head node has no CUDA
    --dynamo.run_dir "$OUT"                         # metrics.jsonl and pass_rate_pool.bin
    --dynamo.reward_timeout 5                       # seconds per sample for math-verify (0 reward on timeout)
    # sequence level: rollout allocation
    --dynamo.allocation.rule neyman                 # exact variance-minimising integer allocation
    --dynamo.allocation.lo 8                        # fewest rollouts per prompt (n/2)
    --dynamo.allocation.hi 24                       # most rollouts per prompt (3n/2)
    --dynamo.allocation.oversample 1                # no candidate over-sampling; to let prompts be skipped:
                                                    #   --dynamo.allocation.oversample 2 --dynamo.allocation.lo 0 --dynamo.allocation.hi 64
    # Left to their rule-dependent defaults so that overriding the rule picks that rule's own defaults:
    #   --dynamo.allocation.skip_factor (4 when lo is 0 with neyman, else off),
    #   --[no-]dynamo.allocation.exploration / --dynamo.allocation.exploration_rollouts (off for neyman; 4),
    #   --[no-]dynamo.allocation.mastery / --dynamo.allocation.mastery_threshold / --dynamo.allocation.priority_floor
    #   (off for neyman; 0.85, 0.01).
    # sequence level: Beta pass-rate pool
    --dynamo.pool.prior 1 1                         # Beta(1, 1) before any evidence (refitted, see below)
    --dynamo.pool.forget 0.999                      # per-step evidence decay (half-life ~690 steps)
    --dynamo.pool.fit_prior_every 10                # empirical-Bayes prior refit every 10 steps
    --dynamo.pool.success_threshold 0.5             # a rollout with reward > 0.5 counts as a success
    # token level: advantage modulation
    --dynamo.modulation.preset decay6               # mu_max 1.2, lambda_min 0.6, gamma 50, tau 0.99
    # --dynamo.modulation.{mu_max,lambda_min,gamma,tau} override single preset values (left to the preset, so
    # that --dynamo.modulation.preset decay5/off on the command line means exactly that preset).
    # --dynamo.clip_higher 0.28: the reference code's silent clip-higher; not the paper's setup, so not given.
)
if [[ -n "$POOL_LOAD" ]]; then
    DYNAMO_ARGS+=(--dynamo.pool.load "$POOL_LOAD")  # warm-start the pass-rate pool (e.g. a previous run's pass_rate_pool.bin)
fi

ray job submit --address="$RAY_ADDRESS" --runtime-env-json="$RUNTIME_ENV_JSON" \
    -- python -m dynamo_openrlhf.train \
    "${MODEL_ARGS[@]}" "${ROLLOUT_ARGS[@]}" "${ALGO_ARGS[@]}" "${ENGINE_ARGS[@]}" "${OUTPUT_ARGS[@]}" \
    "${DYNAMO_ARGS[@]}" "$@"

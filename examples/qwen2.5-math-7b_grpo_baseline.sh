#!/usr/bin/env bash
# GRPO baseline for examples/qwen2.5-math-7b_dynamo.sh: Qwen/Qwen2.5-Math-7B, the paper's setup, ONE node.
#
# What it runs: the same `ray job submit ... -- python -m dynamo_openrlhf.train` command as the DynaMO
# script, with DynaMO switched off (--dynamo.allocation.rule off --dynamo.modulation.preset off): then the run
# is OpenRLHF 0.11.2's GRPO exactly (its sampler with 16 rollouts for every prompt, its advantages, its
# PolicyLoss). Setup: lr 1e-6, GRPO advantages (group_norm), no KL and no reference model, token-mean loss,
# temperature 1.0, PPO clip 0.2/0.2 with dual-clip 10, 512 prompts x 16 rollouts per step, ~2000 steps,
# math-verify reward (dynamo_openrlhf.reward). Every non-DynaMO flag equals the DynaMO script's
# (tests/test_examples.py checks it), so the two runs differ only in DynaMO.
# Several nodes: examples/qwen2.5-math-7b_dynamo_multinode.sh with the two flags above appended.
#
# GPU needs: 1 node x 8 GPUs, 80 GB class (A100-80GB / H100). Hybrid engine: the actor (8 DeepSpeed ZeRO-3
#   ranks) and 4 vLLM engines (tensor parallel 2) share all 8 GPUs and sleep in turn.
# Memory (estimate, not measured): generation uses --vllm.gpu_memory_utilization 0.6 of each GPU; training
#   ~40-60 GB per GPU (~16 B/param = 122 GB of weights and Adam/master states, /8 with ZeRO-3, plus
#   activations; add --ds.adam_offload if short). Host RAM >= 256 GB (sleep mode parks the DeepSpeed states
#   in CPU memory during generation). Disk: ~107 GB per DeepSpeed checkpoint, 3 kept.
# Time (rough estimate, not measured): ~8-10 min per step on 8 x H100, i.e. ~12-14 days for 2000 steps.
#
# Before running: a Ray cluster on this node (`ray start --head --num-gpus 8`), and on it dynamo_openrlhf
#   installed with OpenRLHF 0.11.2's GPU pins (`bash scripts/install.sh && pip install flash-attn==2.8.3
#   vllm==0.29.0`). The job's driver runs on the Ray head node: DATA and OUTPUT_ROOT are paths there.
# Data: JSONL, one prompt a line: {"prompt": "...", "answer": "..."} (keys: INPUT_KEY / LABEL_KEY); the
#   prompt goes through the model's chat template and should ask for the final answer in \boxed{}.
#
# Usage:
#   DATA=/data/math_train.jsonl OUTPUT_ROOT=/data/runs bash examples/qwen2.5-math-7b_grpo_baseline.sh [flags...]
# Extra flags are appended and win (argparse: last one counts), e.g. `--train.seed 1`.
# Environment (defaults in brackets): RAY_ADDRESS [http://127.0.0.1:8265], MODEL [Qwen/Qwen2.5-Math-7B],
#   DATA [/data/math_train.jsonl], INPUT_KEY [prompt], LABEL_KEY [answer], EVAL_DATA [none: no in-training
#   eval], OUTPUT_ROOT [/data/runs], RUN_NAME [qwen2.5-math-7b_grpo], STEPS [2000], NUM_EPISODES
#   [STEPS x 512 / lines of DATA when DATA is a local file, else 1], WANDB_API_KEY [none: TensorBoard only],
#   RUNTIME_ENV_JSON [TOKENIZERS_PARALLELISM=false, NCCL_DEBUG=WARN].
set -euo pipefail

RAY_ADDRESS=${RAY_ADDRESS:-http://127.0.0.1:8265}
MODEL=${MODEL:-Qwen/Qwen2.5-Math-7B}
DATA=${DATA:-/data/math_train.jsonl}
INPUT_KEY=${INPUT_KEY:-prompt}
LABEL_KEY=${LABEL_KEY:-answer}
EVAL_DATA=${EVAL_DATA:-}
OUTPUT_ROOT=${OUTPUT_ROOT:-/data/runs}
RUN_NAME=${RUN_NAME:-qwen2.5-math-7b_grpo}
OUT="$OUTPUT_ROOT/$RUN_NAME"
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
    --actor.num_nodes 1
    --actor.num_gpus_per_node 8
    --vllm.num_engines 4
    --vllm.tensor_parallel_size 2                   # 4 engines x TP 2 = the 8 GPUs
    --train.colocate_all                            # hybrid engine: actor and vLLM share the 8 GPUs
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
    --dynamo.run_dir "$OUT"                         # metrics.jsonl (same per-step log as the DynaMO run)
    --dynamo.reward_timeout 5                       # seconds per sample for math-verify (0 reward on timeout)
    --dynamo.allocation.rule off                    # OpenRLHF's own sampler: 16 rollouts for every prompt, no pool
    --dynamo.modulation.preset off                  # OpenRLHF's PolicyLoss exactly
)

ray job submit --address="$RAY_ADDRESS" --runtime-env-json="$RUNTIME_ENV_JSON" \
    -- python -m dynamo_openrlhf.train \
    "${MODEL_ARGS[@]}" "${ROLLOUT_ARGS[@]}" "${ALGO_ARGS[@]}" "${ENGINE_ARGS[@]}" "${OUTPUT_ARGS[@]}" \
    "${DYNAMO_ARGS[@]}" "$@"

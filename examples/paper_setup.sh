#!/usr/bin/env bash
# The paper's DynaMO training setup as one `ray job submit ... -- python -m dynamo_openrlhf.train` command,
# parameterised by model and cluster shape. Not run directly: the qwen2.5-math-*.sh scripts set the
# environment below (and state their GPU needs) and exec this file; the GRPO baselines exec those with
# `--dynamo.allocation.rule off --dynamo.modulation.preset off` appended.
#
# Setup: lr 1e-6, no KL and no reference model, temperature 1.0, PPO clip 0.2/0.2 with dual-clip 10, 512 prompts x
# 16 rollouts per step (8192 samples), ~2000 steps, math-verify reward (dynamo_openrlhf.reward); DeepSpeed ZeRO-3
# and vLLM engines colocated on every GPU (hybrid engine, sleep mode); decay6 token-level modulation. The DynaMO
# recipe (RECIPE):
#   variance [default] - the combination for which the allocation minimises the variance of the update as
#     trained (docs/variance.md): RLOO advantages, the prompt-balanced loss (every prompt of the step weighs the
#     same; token sums over one constant L per step), and the exact integer minimiser of
#     sum v_i/(n_i - 1) from the Beta pass-rate pool (8..24 rollouts per prompt).
#     Step size: L defaults to the running mean response length of the earlier steps
#     (--dynamo.loss.token_normalizer auto), so the balanced gradient has token-mean's scale (docs/step_size.md).
#   paper - the paper's runs: GRPO advantages (group_norm), OpenRLHF's token-mean loss and the reference code's
#     proportional rule (n ∝ v, with its exploration budget and mastery rule), 8..24 rollouts per prompt.
# The GRPO baselines run RECIPE=paper with DynaMO off, i.e. OpenRLHF's GRPO exactly.
#
# Environment (defaults in brackets): MODEL [required], RUN_NAME [required], RAY_ADDRESS
#   [http://127.0.0.1:8265], NNODES [1], GPUS_PER_NODE [8], VLLM_TP [1] (engines = NNODES x GPUS_PER_NODE /
#   VLLM_TP), ROLLOUT_MICRO_BATCH [8], TRAIN_MICRO_BATCH [4], DATA [/data/math_train.jsonl], INPUT_KEY [prompt],
#   LABEL_KEY [answer], EVAL_DATA [none: no in-training eval], OUTPUT_ROOT [/data/runs], STEPS [2000],
#   NUM_EPISODES [STEPS x 512 / lines of DATA when DATA is a local file, else 1], POOL_LOAD [none], RECIPE [variance],
#   WANDB_API_KEY [none: TensorBoard only], RUNTIME_ENV_JSON [TOKENIZERS_PARALLELISM=false, NCCL_DEBUG=WARN].
# Extra arguments are appended to the train command and win (argparse: the last one counts).
set -euo pipefail

: "${MODEL:?set MODEL (the qwen2.5-math-*.sh scripts do)}"
: "${RUN_NAME:?set RUN_NAME (the qwen2.5-math-*.sh scripts do)}"
RAY_ADDRESS=${RAY_ADDRESS:-http://127.0.0.1:8265}
NNODES=${NNODES:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
VLLM_TP=${VLLM_TP:-1}
VLLM_ENGINES=$(( NNODES * GPUS_PER_NODE / VLLM_TP ))
ROLLOUT_MICRO_BATCH=${ROLLOUT_MICRO_BATCH:-8}
TRAIN_MICRO_BATCH=${TRAIN_MICRO_BATCH:-4}
DATA=${DATA:-/data/math_train.jsonl}
INPUT_KEY=${INPUT_KEY:-prompt}
LABEL_KEY=${LABEL_KEY:-answer}
EVAL_DATA=${EVAL_DATA:-}
OUTPUT_ROOT=${OUTPUT_ROOT:-/data/runs}
OUT="$OUTPUT_ROOT/$RUN_NAME"
POOL_LOAD=${POOL_LOAD:-}
RECIPE=${RECIPE:-variance}
case "$RECIPE" in
    variance)
        ESTIMATOR=rloo                  # RLOO: unbiased, per-prompt variance p(1-p)/(n-1)
        WEIGHTING=balanced              # every prompt of the step weighs the same, whatever its n_i
        RULE=neyman ;;                  # exact minimiser of sum v_i/(n_i - 1)
    paper)
        ESTIMATOR=group_norm            # GRPO advantages, as in the paper's runs
        WEIGHTING=tokens                # OpenRLHF's token-mean loss
        RULE=proportional ;;            # the reference code's n ∝ v (exploration + mastery on)
    *) echo "paper_setup.sh: RECIPE must be 'variance' or 'paper', got '$RECIPE'" >&2; exit 2 ;;
esac
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
    --rollout.micro_batch_size "$ROLLOUT_MICRO_BATCH"  # samples per forward when scoring log-probs (packed)
    --train.num_episodes "$NUM_EPISODES"
)

ALGO_ARGS=(
    --algo.advantage.estimator "$ESTIMATOR"         # rloo (RECIPE=variance) or group_norm = GRPO (RECIPE=paper)
    --algo.kl.init_coef 0                           # no KL: no reference model is created
    --actor.policy_loss_type ppo
    --actor.loss_agg_mode token-mean
    --actor.eps_clip_low_high 0.2 0.2               # the paper's clip; the reference code uses 0.28 high (--dynamo.clip_higher 0.28)
    --actor.dual_clip 10
    --actor.adam.lr 1e-6
    --actor.lr_scheduler constant
    --actor.lr_warmup_ratio 0
    --train.batch_size 2048                         # 4 optimizer steps per rollout step (not stated by the paper)
    --train.micro_batch_size "$TRAIN_MICRO_BATCH"
    --train.max_epochs 1
)

ENGINE_ARGS=(
    --actor.num_nodes "$NNODES"                     # DeepSpeed ZeRO-3 over NNODES x GPUS_PER_NODE ranks
    --actor.num_gpus_per_node "$GPUS_PER_NODE"
    --vllm.num_engines "$VLLM_ENGINES"              # engines x VLLM_TP = every GPU
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
    --dynamo.allocation.rule "$RULE"                # neyman: exact minimiser of the estimator's variance; proportional: the reference's n ∝ v
    --dynamo.allocation.lo 8                        # fewest rollouts per prompt (n/2)
    --dynamo.allocation.hi 24                       # most rollouts per prompt (3n/2)
    --dynamo.allocation.oversample 1                # no candidate over-sampling; to let prompts be skipped (rloo):
                                                    #   --dynamo.allocation.oversample 2 --dynamo.allocation.lo 0
                                                    #   --dynamo.allocation.min_rollouts 2 --dynamo.allocation.hi 64
    # Left to their rule-dependent defaults so that overriding the rule picks that rule's own defaults:
    #   --dynamo.allocation.skip_factor (off with an advantage estimator model; refused with rloo/group_norm),
    #   --[no-]dynamo.allocation.exploration / --dynamo.allocation.exploration_rollouts (off for neyman; 4),
    #   --[no-]dynamo.allocation.mastery / --dynamo.allocation.mastery_threshold / --dynamo.allocation.priority_floor
    #   (off for neyman; 0.85, 0.01).
    # sequence level: Beta pass-rate pool
    --dynamo.pool.prior 1 1                         # Beta(1, 1) before any evidence (refitted, see below)
    --dynamo.pool.forget 0.999                      # per-step evidence decay (half-life ~690 steps)
    --dynamo.pool.fit_prior_every 10                # empirical-Bayes prior refit every 10 steps
    --dynamo.pool.success_threshold 0.5             # a rollout with reward > 0.5 counts as a success
    --dynamo.loss.prompt_weighting "$WEIGHTING"     # balanced (RECIPE=variance) or tokens = OpenRLHF's token-mean
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

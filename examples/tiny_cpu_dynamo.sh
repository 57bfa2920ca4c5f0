#!/usr/bin/env bash
# The tiny CPU run with DynaMO on, every DynaMO setting spelled out: no GPU needed (1-3 minutes on 2 cores).
#
# What it runs: `python -m dynamo_openrlhf.train --dynamo.preset tiny-cpu` (OpenRLHF 0.11.2's own Ray trainer
# on CPU: a locally built tiny Llama + character tokenizer, a generated addition problem set (carry), a short
# supervised warm start cached in ~/.cache/dynamo_openrlhf, RLOO with 16 prompts x 8 rollouts per step for 24
# steps, math-verify reward) with DynaMO's Neyman allocation (6..10 rollouts per prompt, n = 8) from the Beta
# pass-rate pool and the decay6 token-level modulation. These are also the defaults of the plain preset
# (examples/tiny_cpu.sh); the same run with DynaMO off: examples/tiny_cpu_rloo.sh.
# Needs: CPU only (one DeepSpeed actor and one transformers rollout engine; fake Ray GPUs), ~4 GB RAM.
# Outputs: runs/tiny-cpu-dynamo (metrics.jsonl, pass_rate_pool.bin, checkpoints, final model, TensorBoard).
#
#   bash examples/tiny_cpu_dynamo.sh                          # 24 steps, eval before and after
#   bash examples/tiny_cpu_dynamo.sh --train.num_episodes 2   # shorter: 16 steps (128 prompts x 2 episodes)
#   bash examples/tiny_cpu_dynamo.sh --ckpt.load_enable       # resume (the pool comes back from the checkpoint)
set -euo pipefail

DYNAMO_ARGS=(
    --dynamo.run_dir runs/tiny-cpu-dynamo
    # sequence level: rollout allocation (budget per step = 16 prompts x 8 rollouts = 128)
    --dynamo.allocation.rule neyman                 # exact variance-minimising integer allocation
    --dynamo.allocation.lo 6                        # fewest rollouts per prompt (n - n/4; RLOO needs >= 2)
    --dynamo.allocation.hi 10                       # most rollouts per prompt (n + n/4; wider bounds measured worse
                                                    #   than uniform: docs/noise_model.md)
    --dynamo.allocation.oversample 1                # skipping variant: --dynamo.allocation.oversample 2 --dynamo.allocation.lo 0 --dynamo.allocation.hi 16
    # left to their rule-dependent defaults: --dynamo.allocation.skip_factor (4 when lo is 0), exploration and
    # mastery options (off for neyman)
    # sequence level: Beta pass-rate pool
    --dynamo.pool.prior 1 1
    --dynamo.pool.forget 0.999
    --dynamo.pool.fit_prior_every 10
    --dynamo.pool.success_threshold 0.5
    # token level: advantage modulation (mu_max 1.2, lambda_min 0.6, gamma 50, tau 0.99; single values can be
    # overridden with --dynamo.modulation.{mu_max,lambda_min,gamma,tau})
    --dynamo.modulation.preset decay6
    # clip stays OpenRLHF's 0.2/0.2; the reference code's clip-higher would be --dynamo.clip_higher 0.28
)

exec python -m dynamo_openrlhf.train --dynamo.preset tiny-cpu "${DYNAMO_ARGS[@]}" "$@"

#!/usr/bin/env bash
# The tiny CPU run with DynaMO off: OpenRLHF 0.11.2's RLOO exactly (the preset's estimator; not GRPO, whose
# group_norm advantages are one flag away, see below), no GPU needed (a few minutes on 2 cores).
#
# What it runs: `python -m dynamo_openrlhf.train --dynamo.preset tiny-cpu` (a locally built tiny Llama +
# character tokenizer, a generated addition problem set (carry), a short supervised warm start cached in
# ~/.cache/dynamo_openrlhf, 16 prompts x 8 rollouts per step for 24 steps, RLOO advantages, math-verify reward)
# with --dynamo.allocation.rule off (OpenRLHF's own sampler, 8 rollouts for every prompt, no pass-rate pool;
# the loss weighs tokens as OpenRLHF does) and --dynamo.modulation.preset off (OpenRLHF's PolicyLoss). Compare
# with examples/tiny_cpu_dynamo.sh: the same command except for the --dynamo.* flags. For GRPO (group_norm
# advantages) append --algo.advantage.estimator group_norm (to both scripts, for a like-for-like comparison).
# Needs: CPU only (one DeepSpeed actor and one transformers rollout engine; fake Ray GPUs), ~4 GB RAM.
# Outputs: runs/tiny-cpu-rloo (metrics.jsonl, checkpoints, final model, TensorBoard).
#
#   bash examples/tiny_cpu_rloo.sh
#   bash examples/tiny_cpu_rloo.sh --train.num_episodes 2   # shorter: 16 steps (128 prompts x 2 episodes)
set -euo pipefail

DYNAMO_ARGS=(
    --dynamo.run_dir runs/tiny-cpu-rloo
    --dynamo.allocation.rule off                    # OpenRLHF's sampler: n rollouts for every prompt, token-weighted loss
    --dynamo.modulation.preset off                  # OpenRLHF's PolicyLoss exactly
)

exec python -m dynamo_openrlhf.train --dynamo.preset tiny-cpu "${DYNAMO_ARGS[@]}" "$@"

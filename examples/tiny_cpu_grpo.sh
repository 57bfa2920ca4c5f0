#!/usr/bin/env bash
# The tiny CPU run with DynaMO off: OpenRLHF 0.11.2's GRPO exactly, no GPU needed (about a minute on 2 cores).
#
# What it runs: `python -m dynamo_openrlhf.train --dynamo.preset tiny-cpu` (a locally built tiny Llama +
# character tokenizer, a generated arithmetic problem set, a short supervised warm start cached in
# ~/.cache/dynamo_openrlhf, 32 prompts x 4 rollouts per step for 24 steps, math-verify reward) with
# --dynamo.allocation.rule off (OpenRLHF's own sampler, 4 rollouts for every prompt, no pass-rate pool) and
# --dynamo.modulation.preset off (OpenRLHF's PolicyLoss). Compare with examples/tiny_cpu_dynamo.sh: the same
# command except for the --dynamo.* flags.
# Needs: CPU only (one DeepSpeed actor and one transformers rollout engine; fake Ray GPUs), ~4 GB RAM.
# Outputs: runs/tiny-cpu-grpo (metrics.jsonl, checkpoints, final model, TensorBoard).
#
#   bash examples/tiny_cpu_grpo.sh
#   bash examples/tiny_cpu_grpo.sh --data.max_samples 128   # shorter: 12 steps (128 prompts x 3 episodes)
set -euo pipefail

DYNAMO_ARGS=(
    --dynamo.run_dir runs/tiny-cpu-grpo
    --dynamo.allocation.rule off                    # OpenRLHF's sampler: n rollouts for every prompt
    --dynamo.modulation.preset off                  # OpenRLHF's PolicyLoss exactly
)

exec python -m dynamo_openrlhf.train --dynamo.preset tiny-cpu "${DYNAMO_ARGS[@]}" "$@"

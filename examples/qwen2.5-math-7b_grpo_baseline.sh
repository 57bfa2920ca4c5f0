#!/usr/bin/env bash
# GRPO baseline for examples/qwen2.5-math-7b_dynamo.sh (Qwen/Qwen2.5-Math-7B, the paper's setup, ONE node).
#
# What it runs: that script's `ray job submit ... -- python -m dynamo_openrlhf.train` command with the paper's
# recipe (RECIPE=paper: GRPO advantages, token-mean loss) and DynaMO switched off (--dynamo.allocation.rule off --dynamo.modulation.preset off, appended, so they win):
# then the run is OpenRLHF 0.11.2's GRPO exactly (its sampler with 16 rollouts for every prompt, its
# advantages, its PolicyLoss) and every other flag is the DynaMO run's, so the two runs differ only in DynaMO.
# The other --dynamo.allocation/pool flags of that script have no effect with rule off.
#
# GPU needs: the same as the DynaMO script: 1 node x 8 GPUs, 80 GB class (A100-80GB / H100); memory and time: see its header.
#
# Usage:
#   DATA=/data/math_train.jsonl OUTPUT_ROOT=/data/runs bash examples/qwen2.5-math-7b_grpo_baseline.sh [flags...]
# Environment: as examples/qwen2.5-math-7b_dynamo.sh; RUN_NAME defaults to qwen2.5-math-7b_grpo.
set -euo pipefail

export RECIPE=paper  # the paper's advantages (group_norm) and loss (token-mean); DynaMO off below

export RUN_NAME=${RUN_NAME:-qwen2.5-math-7b_grpo}
exec bash "$(dirname "${BASH_SOURCE[0]}")/qwen2.5-math-7b_dynamo.sh" \
    --dynamo.allocation.rule off \
    --dynamo.modulation.preset off \
    "$@"

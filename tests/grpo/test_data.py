"""Prompts: conversational data through the chat template and the engine, and prompts the engine cannot take
refused before it starts."""

from __future__ import annotations

import json

import pytest
import torch

from rollout_sleep.grpo.data import (check_prompts, completions_for_rewards, is_conversational, load_prompts,
                                     prepare_prompts, prompt_token_ids, synthetic_arithmetic)
from rollout_sleep.grpo.rewards import resolve_rewards, score_rewards


DATA = "examples/gsm8k/data.jsonl"
REWARDS = "examples/gsm8k/rewards.py"


def test_conversational_data_through_the_engine(in_root, engine, reward_ckpt):
    """The example's conversations get the chat template, the engine generates from them, and the user's
    TRL-style rewards and a reward model score the completions in the conversational format."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(engine.model_path)
    ds = prepare_prompts(load_prompts(DATA), tok)
    assert is_conversational(ds) and ds.column_names == ["prompt", "answer"]
    ids = prompt_token_ids(tok, ds["prompt"][:2])
    assert tok.decode(ids[0]) == f"<|im_start|>user\n{ds[0]['prompt'][0]['content']}<|im_end|>\n<|im_start|>assistant\n"
    plain = prepare_prompts(synthetic_arithmetic(2), tok, system_prompt="Answer with a number.")
    assert tok.decode(prompt_token_ids(tok, plain["prompt"])[0]) == (
        "<|im_start|>system\nAnswer with a number.<|im_end|>\n<|im_start|>user\n6+6=<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert prompt_token_ids(tok, ["6+6="]) == [tok("6+6=").input_ids]  # plain text: no template
    tok.chat_template = None
    with pytest.raises(ValueError, match="has no chat template"):
        prepare_prompts(ds, tok)

    comps = engine.generate(ids, n=2, max_tokens=8, temperature=1.0)
    rows = [ds[c.prompt_index] for c in comps]
    conv = completions_for_rewards([c.text for c in comps], conversational=True)
    rewards = resolve_rewards([f"{REWARDS}:gsm8k_correct", f"{REWARDS}:gsm8k_format", reward_ckpt], [1.0, 0.2, 0.5],
                              columns=ds.column_names)
    table = score_rewards(rewards, [r["prompt"] for r in rows], conv, rows)
    assert table.shape == (4, 3) and not torch.isnan(table).any()
    # the completions carry no "#### n" line from a random model: both function rewards are 0; fix one to check
    fixed = completions_for_rewards([f"so #### {r['answer'].split('#### ')[1]}" for r in rows], conversational=True)
    assert score_rewards(rewards[:2], [r["prompt"] for r in rows], fixed, rows).tolist() == [[1.0, 1.0]] * 4
    assert table[:, 2].tolist() == pytest.approx(rewards[2].fn([r["prompt"] for r in rows], conv), abs=1e-5)


def test_prompts_the_engine_cannot_take_are_refused_before_it_starts(ckpts, tmp_path, monkeypatch):
    """Checked on the whole dataset before vLLM starts (the old code failed at step 1, after the engine's
    start, or — messages without a role — silently tokenized the dicts as text)."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpts["tied0"])
    cases = {
        "the dataset has no rows": Dataset.from_dict({"prompt": []}),
        "row 0 is a int (5), not text": Dataset.from_list([{"prompt": 5}]),
        "row 1 is a NoneType (None), not text": Dataset.from_list([{"prompt": "1+1="}, {"prompt": None}]),
        "row 0 has a message without a text 'role' and 'content'": Dataset.from_list(
            [{"prompt": [{"content": "1+1="}]}]),
        "row 0 is empty": Dataset.from_list([{"prompt": ""}]),
        "1 prompt(s) have >= engine.max_model_len (64) tokens": Dataset.from_list(
            [{"prompt": "1+1="}, {"prompt": "1+1= " * 40}]),
    }
    for message, ds in cases.items():
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            check_prompts(ds, tok, max_model_len=64, max_tokens=8)
    for fine in ("1+1=", [{"role": "user", "content": "2+2="}]):
        check_prompts(Dataset.from_list([{"prompt": fine}]), tok, max_model_len=64, max_tokens=8)
    strict = AutoTokenizer.from_pretrained(ckpts["tied0"])  # a template that refuses system messages
    strict.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system "
                            "role') }}{% endif %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(ValueError, match="the prompts cannot be tokenized: TemplateError: no system role"):
        check_prompts(Dataset.from_list([{"prompt": [{"role": "system", "content": "Be brief."}]}]), strict,
                      max_model_len=64, max_tokens=8)
    monkeypatch.setenv("HOME", str(tmp_path))  # data.dataset: ~/... as load_config's check reads it
    (tmp_path / "d.jsonl").write_text(json.dumps({"prompt": "1+1="}) + "\n")
    assert len(load_prompts("~/d.jsonl")) == 1

"""Prompts: conversational data through the chat template and the engine, and prompts the engine cannot take
refused before it starts."""

from __future__ import annotations

import json

import pytest
import torch

from rollout_sleep.grpo.data import (as_conversation, check_prompts, completions_for_rewards, is_conversational,
                                     load_prompts, prepare_prompts, prompt_problems, prompt_token_ids,
                                     synthetic_arithmetic)
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
        "row 0 is an int (5), not text": Dataset.from_list([{"prompt": 5}]),
        "row 1 is null (missing)": Dataset.from_list([{"prompt": "1+1="}, {"prompt": None}]),
        "row 0 has a message without a text 'role' and 'content'": Dataset.from_list(
            [{"prompt": [{"content": "1+1="}]}]),
        "row 0 is empty": Dataset.from_list([{"prompt": ""}]),
        "row 1 is only whitespace ('   ')": Dataset.from_list([{"prompt": "1+1="}, {"prompt": "   "}]),
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
    with pytest.raises(ValueError, match=r"row 0 of the dataset .* cannot be tokenized by the model.s chat template \(model.path\): TemplateError: no system role"):
        check_prompts(Dataset.from_list([{"prompt": [{"role": "system", "content": "Be brief."}]}]), strict,
                      max_model_len=64, max_tokens=8)
    monkeypatch.setenv("HOME", str(tmp_path))  # data.dataset: ~/... as load_config's check reads it
    (tmp_path / "d.jsonl").write_text(json.dumps({"prompt": "1+1="}) + "\n")
    assert len(load_prompts("~/d.jsonl")) == 1


TEXT = ["0+0=", "1+1=", "2+2=", "3+3="]
CHAT = [[{"role": "user", "content": t}] for t in TEXT]
WHERE = "data.dataset '/data/d.jsonl' (prompt column 'prompt', data.prompt_column)"


@pytest.mark.parametrize("first", ["text", "conversation"])
def test_a_mix_of_text_and_conversations_is_refused_naming_rows_of_each(tmp_path, first):
    """The format was taken from row 0: a text row among conversations went through the chat template one
    character per message (a garbage prompt, silently); a conversation among text rows failed in the tokenizer at
    the step that drew it, after vLLM's start. Every row is looked at now, the file named with rows of each kind."""
    from transformers import AutoTokenizer

    rows = (TEXT[:3] + CHAT[3:]) if first == "text" else (CHAT[:3] + TEXT[3:])
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "answer": "0"}) + "\n" for p in rows))
    ds = load_prompts(str(path))
    (problem,) = prompt_problems(ds, WHERE)
    text, chats = ("rows 0, 1, 2", "row 3") if first == "text" else ("row 3", "rows 0, 1, 2")
    counts = (3, 1) if first == "text" else (1, 3)
    assert problem.startswith(f"{WHERE} mixes two prompt formats: {counts[0]} text prompt(s) (e.g. {text}) and "
                              f"{counts[1]} list(s) of messages (e.g. {chats}; rows counted from 0). Use one format "
                              f"in every row"), problem
    assert 'write each text prompt as [{"role": "user", "content": <text>}]' in problem
    tok = AutoTokenizer.from_pretrained(_tokenizer_dir(tmp_path))
    with pytest.raises(ValueError, match="mixes two prompt formats"):
        check_prompts(ds, tok, max_model_len=64, max_tokens=8, where=WHERE)
    # the per-step path: never a text prompt through the chat template, whichever format comes first
    with pytest.raises(ValueError, match="prompt_token_ids got text and lists of messages together"):
        prompt_token_ids(tok, [ds[i]["prompt"] for i in (3, 0)])
    # text rows become one user message each, row by row (not the characters of the text)
    assert as_conversation(ds)["prompt"] == CHAT


def test_prompt_problems_name_the_dataset_the_rows_and_the_fix():
    from datasets import Dataset

    def problems(prompts):
        return prompt_problems(Dataset.from_list([{"prompt": p} for p in prompts]), WHERE)

    assert problems(TEXT) == [] and problems(CHAT) == []
    (numbers,) = problems([0, 1, 2, 3])  # a CSV column of numbers is read as numbers
    assert numbers.startswith(f"{WHERE}: 4 of 4 prompt(s) cannot be used (rows counted from 0), e.g. row 0 is an "
                              f"int (0), not text or a non-empty list of messages; row 1 is an int (1)"), numbers
    assert "Fix or drop those rows" in numbers and "point data.prompt_column at the column that holds the prompts" \
        in numbers
    (role,) = problems([[{"role": "usr", "content": "1+1="}], CHAT[1]])
    assert "row 0 has a message with role 'usr', not one of system, user, assistant, tool" in role
    (blank,) = problems(["1+1=", "   ", None])
    assert "2 of 3 prompt(s) cannot be used" in blank and "row 1 is only whitespace" in blank and \
        "row 2 is null (missing)" in blank


def _tokenizer_dir(tmp_path):
    """The tiny checkpoints' byte-level tokenizer with its chat template, saved (no model needed)."""
    from rollout_sleep.weights.checkpoints import build_tokenizer

    folder = tmp_path / "tok"
    build_tokenizer().save_pretrained(folder)
    return str(folder)


def test_the_recipe_refuses_a_mixed_dataset_before_anything_is_written(tmp_path, monkeypatch):
    """The recipe's data check (before the output folder is claimed and vLLM starts) names the file."""
    from helpers import ROOT, EngineReached, load_recipe, stop_at_engine

    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in TEXT * 2 + CHAT[:1]))
    recipe = load_recipe()
    stop_at_engine(monkeypatch, recipe)
    cfg = recipe.load_config(str(ROOT / "configs" / "tiny-cpu.yaml"),
                             [f"output_dir={tmp_path / 'run'}", f"data.dataset={path}", "rewards=[digits_format]",
                              "wandb.mode=disabled", "train.memory_plan=off"])
    with pytest.raises(recipe.ConfigError) as err:
        try:
            recipe.GRPORecipe(cfg).setup()
        except EngineReached:
            pytest.fail("the mixed dataset reached the engine's start")
    assert str(err.value).startswith(f"data.dataset {str(path)!r} (prompt column 'prompt', data.prompt_column) mixes "
                                     f"two prompt formats: 8 text prompt(s) (e.g. rows 0, 1, 2, ...) and 1 list(s) "
                                     f"of messages (e.g. row 8;"), str(err.value)
    assert not (tmp_path / "run").exists()


def test_prompts_without_a_visible_character_are_refused():
    """A conversation whose user message is only whitespace was accepted while the same text prompt was refused,
    and a text prompt of a zero-width space passed. Text, and every user message, must hold a visible character
    (whitespace and format characters do not count); a blank system message beside a question is harmless."""
    from datasets import Dataset

    def problems(prompts):
        return prompt_problems(Dataset.from_list([{"prompt": p} for p in prompts]), WHERE)

    (zwsp,) = problems(["1+1=", "\u200b"])
    assert "row 1 has no visible character ('\\u200b'" in zwsp, zwsp
    (chat,) = problems([CHAT[0], [{"role": "user", "content": "   "}]])
    assert "row 1 has a user message (message 0) whose content is only whitespace ('   ')" in chat, chat
    (none,) = problems([CHAT[0], [{"role": "system", "content": " \u2060"}, {"role": "assistant", "content": ""}]])
    assert "row 1 has no message with visible content" in none, none
    assert problems([[{"role": "system", "content": ""}, {"role": "user", "content": "2+2="}]]) == []
    assert problems(["x\u200b", " 1+1= "]) == []

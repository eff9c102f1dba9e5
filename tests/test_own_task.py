"""Bring your own task: user reward functions (TRL's signature) by import path, a reward model, conversational
data with the chat template, and the shipped GSM8K example run by the recipe and by TRL's GRPOTrainer."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rollout_sleep.checkpoints import make_reward_checkpoint
from rollout_sleep.data import (completions_for_rewards, is_conversational, load_prompts, prepare_prompts,
                                prompt_token_ids, synthetic_arithmetic)
from rollout_sleep.grpo import group_advantages
from rollout_sleep.reward_model import RewardModel
from rollout_sleep.rewards import RewardError, combine, resolve_rewards, score_rewards

ROOT = Path(__file__).resolve().parents[1]
DATA = "examples/gsm8k/data.jsonl"
REWARDS = "examples/gsm8k/rewards.py"
CONFIG = ROOT / "configs" / "example-gsm8k.yaml"


@pytest.fixture(scope="module")
def reward_ckpt(tmp_path_factory):
    return make_reward_checkpoint(tmp_path_factory.mktemp("rm") / "rm", "tiny", seed=0, dtype="float32")


@pytest.fixture()
def in_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # import paths and the example's data are relative to the working directory


def test_reward_specs_resolve_or_fail_with_a_clear_error(in_root, tmp_path, ckpts):
    cols = ["prompt", "answer"]
    got = resolve_rewards([f"{REWARDS}:gsm8k_correct", "digits_format", f"{REWARDS}:gsm8k_format"], [1.0, 0.5, 0.2],
                          columns=cols)
    assert [(r.name, r.weight, r.batched) for r in got] == [("gsm8k_correct", 1.0, True), ("digits_format", 0.5, False),
                                                            ("gsm8k_format", 0.2, True)]
    assert got[0].required_columns == ("answer",)
    (tmp_path / "my_task_rewards.py").write_text(
        "def strict(prompts, completions, answer):\n    return [0.0] * len(completions)\n"
        "def odd(text):\n    return 1.0\n"
        "CONSTANT = 3\n"
        "async def later(prompts, completions, **kw):\n    return [1.0] * len(completions)\n"
        "def broken(prompts, completions, **kw):\n    raise RuntimeError('boom')\n")
    os.chdir(tmp_path)  # a dotted module next to the run imports as with `python -m`
    assert resolve_rewards(["my_task_rewards:strict"], columns=cols)[0].name == "strict"
    cases = {
        "my_task_rewards:nope": "has no 'nope'; its callables: ['broken', 'later', 'odd', 'strict']",
        "my_task_rewards:CONSTANT": "is a int, not a function",
        "my_task_rewards:odd": "signature odd(text)",
        "my_task_rewards:later": "is async",
        "no_such_module:f": "cannot import module 'no_such_module'",
        "missing/file.py:f": "file 'missing/file.py' not found",
        "digit_format": "unknown reward 'digit_format'",
        ckpts["tied0"]: "a reward model is a sequence-classification checkpoint",
    }
    for spec, message in cases.items():
        with pytest.raises(RewardError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            resolve_rewards([spec])
    with pytest.raises(RewardError, match=r"needs dataset column\(s\) \['answer'\]"):
        resolve_rewards(["my_task_rewards:strict"], columns=["prompt", "solution", "answer_"])
    with pytest.raises(RewardError, match=r"does not accept dataset column\(s\) \['level'\].*add `\*\*kwargs`"):
        resolve_rewards(["my_task_rewards:strict"], columns=["prompt", "answer", "level"])
    with pytest.raises(RewardError, match="reward_weights has 1 entries but rewards has 2"):
        resolve_rewards(["digits_format", "arithmetic_exact"], [1.0])


def test_scoring_follows_trl(in_root):
    """TRL's call (every column by name, completion_ids, trainer_state), None as TRL handles it, and errors
    that name the reward and the example."""
    seen = {}

    def spy(prompts, completions, completion_ids, trainer_state, answer, level, **kwargs):
        seen.update(prompts=prompts, completions=completions, ids=completion_ids, step=trainer_state.global_step,
                    answer=answer, level=level, extra=sorted(kwargs))
        return [None if lv == "skip" else 1.0 for lv in level]

    def picky(prompts, completions, **kwargs):
        return [None if c[0]["content"] == "x" else 0.5 for c in completions]

    import rollout_sleep.rewards as rw

    rows = [{"prompt": [{"role": "user", "content": f"q{i}"}], "answer": str(i), "level": lv}
            for i, lv in enumerate(["a", "skip", "skip", "b"])]
    completions = completions_for_rewards(["1", "x", "2", "3"], conversational=True)
    rewards = [rw._describe("spy", spy, 1.0), rw._describe("picky", picky, 2.0)]
    from transformers import TrainerState

    table = score_rewards(rewards, [r["prompt"] for r in rows], completions, rows, completion_ids=[[1], [2], [3], [4]],
                          trainer_state=TrainerState(global_step=7))
    assert seen["answer"] == ["0", "1", "2", "3"] and seen["level"] == ["a", "skip", "skip", "b"]
    assert seen["ids"] == [[1], [2], [3], [4]] and seen["step"] == 7 and seen["completions"] == completions
    assert seen["extra"] == ["log_extra", "log_metric"]
    assert torch.isnan(table[1]).all() and math.isnan(table[2, 0]) and table[2, 1] == 0.5
    total = combine(table, [1.0, 2.0])
    assert total[0] == 2.0 and math.isnan(total[1]) and total[2] == 1.0 and total[3] == 2.0
    adv = group_advantages(total, group_size=4)  # the unscorable completion: no advantage, not in the baseline
    assert adv[1] == 0 and adv[2] < 0 < adv[0] and adv[0] == adv[3]

    def lengths(completions):  # no **kwargs: given only what it names
        return [len(c[0]["content"]) for c in completions]

    assert score_rewards([rw._describe("lengths", lengths, 1.0)], [r["prompt"] for r in rows], completions,
                         rows)[:, 0].tolist() == [1.0] * 4

    def fails_on_one(prompts, completions, answer, **kwargs):
        return [1.0 / (int(a) - 2) for a in answer]

    for fn, message in [
        (fails_on_one, r"reward 'fails_on_one' raised ZeroDivisionError: .* on completion 2: "
                       r"prompt=\[\{'role': 'user', 'content': 'q2'\}\], completion='2', "
                       r"columns=\{'answer': '2', 'level': 'skip'\}"),
        (lambda prompts, completions, **kw: [1.0], r"returned 1 rewards for 4 completions"),
        (lambda prompts, completions, **kw: ["1"] * 4, r"returned '1' \(a str\) for completion 0"),
    ]:
        with pytest.raises(RewardError, match=message):
            score_rewards([rw._describe(fn.__name__, fn, 1.0)], [r["prompt"] for r in rows], completions, rows)
    with pytest.raises(RewardError, match=r"reward 'arithmetic_exact' raised KeyError: 'answer' on completion 0"):
        score_rewards(resolve_rewards(["arithmetic_exact"]), ["1+1="], ["2"], [{"prompt": "1+1="}])


def test_reward_model_scores_batches_like_one_at_a_time(reward_ckpt, ckpts):
    rm = RewardModel(reward_ckpt, batch_size=3)
    prompts = ["1+1=", "What is two plus two, written out in full?", "7*6=", "a", "9-3=", "xyz"]
    completions = ["2", " four", "42", "bcdefghijk", "6", ""]
    batched = rm(prompts, completions)
    with torch.inference_mode():
        alone = [rm.model(**rm.tokenizer(p + c, return_tensors="pt", add_special_tokens=False)).logits[0, 0].item()
                 for p, c in zip(prompts, completions)]
    assert max(abs(a - b) for a, b in zip(batched, alone)) < 1e-4  # right padding never changes a score
    assert len(set(round(v, 3) for v in batched)) == len(batched)  # a random head still tells inputs apart
    conv_prompts = [[{"role": "user", "content": p}] for p in prompts[:2]]
    conv = completions_for_rewards(completions[:2], conversational=True)
    texts = rm.texts(conv_prompts, conv)
    assert texts[0] == "<|im_start|>user\n1+1=<|im_end|>\n<|im_start|>assistant\n2<|im_end|>\n"  # chat template
    assert rm(conv_prompts, conv) != batched[:2]
    unloaded = RewardModel(reward_ckpt, load=False)
    assert unloaded.model is None
    with pytest.raises(RuntimeError, match="not loaded"):
        unloaded(prompts, completions)


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


def load_recipe():
    spec = importlib.util.spec_from_file_location("grpo_recipe", ROOT / "recipes" / "grpo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bad_rewards_fail_before_the_engine_starts(in_root, tmp_path, monkeypatch):
    recipe = load_recipe()

    def no_engine(*args, **kwargs):
        raise AssertionError("the engine was built before the rewards were checked")

    monkeypatch.setattr(recipe, "build_engine", no_engine)
    questions = tmp_path / "questions.jsonl"
    questions.write_text('{"prompt": [{"role": "user", "content": "2+2?"}], "solution": "4"}\n')
    for overrides, message in [
        ([f"data.dataset={questions}"], r"needs dataset column\(s\) \['answer'\]"),
        ([f"rewards=[{REWARDS}:gsm8k_corect, digits_format]"], "has no 'gsm8k_corect'"),
        (["reward_weights=[1.0]"], "reward_weights has 1 entries but rewards has 2"),
    ]:
        with pytest.raises(recipe.ConfigError, match=message):  # from the config itself, or at the latest setup
            recipe.GRPORecipe(recipe.load_config(str(CONFIG), [f"output_dir={tmp_path / 'run'}", *overrides])).setup()


def run_json(cmd: list[str], tag: str) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"})
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith(tag)]
    assert proc.returncode == 0 and line, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(line[-1][len(tag):])


@pytest.mark.slow  # ~2 min alone on 2 cores (TRL's trainer + vLLM in a subprocess); the recipe run below is in CI
def test_same_files_run_in_trl_as_in_the_recipe(in_root, tmp_path, ckpts, reward_ckpt):
    """The example's JSONL and reward module, unchanged, with a reward model beside them: TRL's GRPOTrainer
    trains on them, and our scoring reproduces TRL's rewards and advantages on TRL's own batch."""
    trl = run_json([sys.executable, str(ROOT / "tests" / "trl_own_task_worker.py"), ckpts["tied0"],
                    str(tmp_path / "trl"), DATA, REWARDS, reward_ckpt], "RESULT ")
    assert trl["ok"], trl["error"]
    batch = trl["batch"]
    by_prompt = {json.dumps(r["prompt"]): r for r in load_prompts(DATA)}
    rows = [by_prompt[json.dumps(p)] for p in batch["prompt"]]
    assert batch["completion"][0][0]["role"] == "assistant"  # TRL's conversational completions, as ours
    rewards = resolve_rewards([f"{REWARDS}:gsm8k_correct", f"{REWARDS}:gsm8k_format", reward_ckpt], [1.0, 0.2, 0.5],
                              columns=["prompt", "answer"])
    table = score_rewards(rewards, batch["prompt"], batch["completion"], rows)
    for j, r in enumerate(rewards):
        assert table[:, j].tolist() == pytest.approx(batch["rewards"][r.name], abs=1e-4), r.name
    adv = group_advantages(combine(table, [r.weight for r in rewards]), group_size=4)
    assert adv.tolist() == pytest.approx(batch["advantages"], abs=1e-3)


def test_example_runs_end_to_end_with_a_reward_model(in_root, tmp_path, reward_ckpt):
    """The example config (the same files TRL trained on above), plus the reward model, through the recipe."""
    out = tmp_path / "recipe"
    proc = subprocess.run([sys.executable, str(ROOT / "recipes" / "grpo.py"), "--config", str(CONFIG),
                           f"output_dir={out}", "train.steps=2", "reward_weights=[1.0, 0.2, 0.5]",
                           f"rewards=[{REWARDS}:gsm8k_correct, {REWARDS}:gsm8k_format, {reward_ckpt}]"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["rewards/gsm8k_correct/mean"] == 0.0 and r["rewards/rm/std"] > 0 and r["unscorable"] == 0
        assert r["reward_mean"] == pytest.approx(0.2 * r["rewards/gsm8k_format/mean"] + 0.5 * r["rewards/rm/mean"]
                                                 + r["rewards/gsm8k_correct/mean"], abs=1e-5)
        assert r["sampling_logp_diff"] < 1e-3 and r["reward_s"] > 0

"""Rewards as users write them: built-ins by name, functions by import path (TRL's signature or ours), reward
models, each resolved or refused with a clear error, and scored as TRL scores them."""

from __future__ import annotations

import json
import math
import os
import textwrap
from pathlib import Path

import pytest
import torch

from rollout_sleep.grpo.data import completions_for_rewards
from rollout_sleep.grpo.errors import RewardError
from rollout_sleep.grpo.loss import group_advantages
from rollout_sleep.grpo.reward_model import RewardModel
from rollout_sleep.grpo.rewards import combine, resolve_rewards, score, score_rewards
from rollout_sleep.run.config import validate_rewards


REWARDS = "examples/gsm8k/rewards.py"


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

    import rollout_sleep.grpo.rewards as rw

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
                       r"prompt=\[\{'role': 'user', 'content': 'q2'\}\], completion='2' \(the data is conversational.*\), "
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


def test_rewards_sum_by_name():
    assert score(["arithmetic_exact", "digits_format"], ["7", "x"], [{"answer": "7"}, {"answer": "1"}]) == [2.0, 0.0]


def test_rewards_as_users_write_them(tmp_path, monkeypatch):
    """What TRL accepts is accepted (a numpy array, 0-d tensors and numpy scalars); a file reward imports the
    modules beside it (as ``python file.py`` would); a per-example reward that needs a third argument is
    refused up front, not at step 1; a reward named twice keeps two metrics. (The old code refused the first
    two, accepted the third until the first step, and logged one metric for both of the last.)"""
    import numpy as np
    import torch

    from rollout_sleep.grpo.rewards import reward_metrics, resolve_rewards, score_rewards

    task = tmp_path / "task"
    task.mkdir()
    # a module beside the reward file (not named "helpers": the tests' own helpers module holds that name)
    (task / "rw_helpers.py").write_text("def target():\n    return 'b'\n")
    (task / "rw.py").write_text(textwrap.dedent("""
        import numpy as np
        import torch
        from rw_helpers import target

        def as_array(prompts, completions, **kwargs):
            return np.array([float(c == target()) for c in completions])

        def as_scalars(completion, example):
            return torch.tensor(0.5) if completion == "a" else np.float32(0.25)

        def needs_more(completion, example, scale):
            return scale
    """))
    monkeypatch.chdir(tmp_path)
    rewards = resolve_rewards(["task/rw.py:as_array", "task/rw.py:as_scalars"])
    table = score_rewards(rewards, ["p"] * 2, ["a", "b"], [{"prompt": "p"}] * 2)
    assert table.tolist() == [[0.0, 0.5], [1.0, 0.25]]
    assert validate_rewards(["task/rw.py:needs_more"])[0].startswith(
        "reward 'needs_more' has signature needs_more(completion, example, scale)")
    twice = resolve_rewards(["digits_format", "digits_format"], [1.0, -1.0])
    metrics = reward_metrics(twice, torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    assert metrics["rewards/digits_format/mean"] == 1.0 and metrics["rewards/digits_format_2/mean"] == 0.0


def test_a_reward_model_with_two_labels_is_refused_before_the_engine(tmp_path):
    """The old code only warned ("the reward is label 0's logit") and then failed to load it after vLLM had
    started (num_labels=1, as TRL loads it, does not fit a two-row score head)."""
    from rollout_sleep.weights.checkpoints import make_reward_checkpoint

    path = Path(make_reward_checkpoint(tmp_path / "rm", "tiny", seed=0, dtype="float32"))
    assert validate_rewards([str(path)]) == []
    config = json.loads((path / "config.json").read_text())
    config["id2label"], config["label2id"] = {"0": "bad", "1": "good"}, {"bad": 0, "good": 1}
    (path / "config.json").write_text(json.dumps(config))
    (problem,) = validate_rewards([str(path)])
    assert problem.startswith(f"reward model {str(path)!r} has 2 labels; a reward model has one")


def test_a_reward_that_exits_the_process_is_a_reward_error(tmp_path):
    """``sys.exit()`` in a reward, or in its module when imported (argparse on the recipe's command line does it
    too), is named as the reward's error: the old code let the ``SystemExit`` through, and a run whose reward
    called ``sys.exit()`` at step 1 ended with exit code 0 and no message, as if it had finished."""
    (tmp_path / "exiting_rewards.py").write_text(textwrap.dedent("""
        import sys

        def one(completion, example):
            sys.exit()

        def batch(prompts, completions, **kwargs):
            raise SystemExit(3)
        """))
    (tmp_path / "exits_on_import.py").write_text("import sys\nsys.exit(2)\n\ndef f(completion, example):\n    return 1.0\n")
    rows = [{"prompt": "1+1=", "answer": "2"}] * 2
    for name, said in (("one", "reward 'one' raised SystemExit (it called sys.exit(None)); a reward must return its "
                               "scores (or raise), never exit the process on completion 0"),
                       ("batch", "reward 'batch' raised SystemExit (it called sys.exit(3)); a reward must return its "
                                 "scores (or raise), never exit the process on a batch of 2 completions")):
        rewards = resolve_rewards([f"{tmp_path / 'exiting_rewards.py'}:{name}"])
        with pytest.raises(RewardError) as err:
            score_rewards(rewards, ["1+1="] * 2, ["2", "3"], rows)
        assert str(err.value).startswith(said), str(err.value)
    with pytest.raises(RewardError, match=r"importing .*exits_on_import.py' failed: SystemExit \(it called "
                                          r"sys.exit\(2\)\)"):
        resolve_rewards([f"{tmp_path / 'exits_on_import.py'}:f"])
    assert validate_rewards([f"{tmp_path / 'exits_on_import.py'}:f"])[0].startswith("reward ")  # a config problem


def test_huge_finite_rewards_keep_their_advantages():
    """Rewards were float32: ±1e20 squared overflowed the group's variance (1e40), so every advantage, the loss and
    the gradient were 0 without a word; 1e39, a finite Python float, became inf and stopped the run as "infinite".
    They are float64 now and the group statistics scaled, so any finite reward keeps its advantage."""
    from types import SimpleNamespace

    import rollout_sleep.grpo.rewards as rw
    from helpers import load_recipe

    def alternating(size):
        def fn(completions, **kwargs):
            return [size if i % 2 else -size for i in range(len(completions))]
        return fn

    for size in (1e20, 1e39, 1e300):
        rewards = [rw._describe("big", alternating(size), 1.0)]
        table = score_rewards(rewards, ["p"] * 4, ["a", "b", "c", "d"], [{"prompt": "p"}] * 4)
        assert table.dtype == torch.float64 and table[:, 0].tolist() == [-size, size, -size, size]
        adv = group_advantages(combine(table, [1.0]), group_size=2)
        assert adv.dtype == torch.float32 and adv.tolist() == pytest.approx([-0.7071068, 0.7071068] * 2), size
    assert group_advantages(torch.tensor([1e20, -1e20]), group_size=2).tolist() == pytest.approx([0.7071068, -0.7071068])

    recipe = load_recipe()  # the step's check: finite rewards pass, inf and an overflowing weighted total stop it
    step = SimpleNamespace(step=0, main=True, rewards=[SimpleNamespace(name="big")])
    table = torch.tensor([[1e39], [0.0]], dtype=torch.float64)
    recipe.GRPORecipe._check_rewards(step, combine(table, [1.0]), table, rows=[4, 5])
    table = torch.tensor([[math.inf], [0.0]], dtype=torch.float64)
    with pytest.raises(recipe.NonFiniteError, match=r"1 of 2 rewards of step 1 are infinite \(from big; the first "
                                                    r"for dataset row 4\)"):
        recipe.GRPORecipe._check_rewards(step, combine(table, [1.0]), table, rows=[4, 5])
    table = torch.tensor([[0.0], [1e308]], dtype=torch.float64)
    with pytest.raises(recipe.NonFiniteError, match=r"the weighted total of 1 of 2 completions of step 1 overflows .*"
                                                    r"the first for dataset row 5\): scale the rewards or "
                                                    r"reward_weights down"):
        recipe.GRPORecipe._check_rewards(step, combine(table, [10.0]), table, rows=[4, 5])


def test_an_int_beyond_float64_is_a_reward_error_naming_the_reward(tmp_path):
    """``10**400`` raised a bare OverflowError from float(), without the reward's name."""
    from rollout_sleep.grpo.errors import RewardError

    (tmp_path / "r.py").write_text("def big(completions, **kw):\n    return [10**400] * len(completions)\n")
    with pytest.raises(RewardError, match=r"reward 'big' returned a number too large for a float64 for completion 0 "
                                          r"\(10000000000000000000\.\.\., 401 digits\)"):
        score_rewards(resolve_rewards([f"{tmp_path}/r.py:big"]), ["p"], ["c"], [{"prompt": "p"}])


def test_a_reward_file_whose_sibling_module_is_another_is_refused(tmp_path, monkeypatch):
    """Two tasks' reward files each ``import shadow_helper`` from beside them: the second got the first's module
    (Python imports a name once per process) and scored by the first task's rule, silently."""
    import sys

    for task in "AB":
        (tmp_path / task).mkdir()
        (tmp_path / task / "shadow_helper.py").write_text(f'TARGET = "{task}"\n')
        (tmp_path / task / "rw.py").write_text(f'import shadow_helper\ndef r(completions, **kw):\n'
                                               f'    return [float(shadow_helper.TARGET == "{task}")] * len(completions)\n')
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "shadow_helper", raising=False)
    try:
        (a,) = resolve_rewards([f"{tmp_path}/A/rw.py:r"])
        with pytest.raises(RewardError, match=r"it imports 'shadow_helper', which beside it is .*B/shadow_helper.py, but "
                                              r"a module 'shadow_helper' from .*A/shadow_helper.py is imported already"):
            resolve_rewards([f"{tmp_path}/B/rw.py:r"])
        assert resolve_rewards([f"{tmp_path}/A/rw.py:r"])[0].fn is a.fn  # the same file again: its own module
        (tmp_path / "B" / "shadow_helper.py").write_text('TARGET = "A"\n')  # the same code: the same module
        resolve_rewards([f"{tmp_path}/B/rw.py:r"])
    finally:
        sys.modules.pop("shadow_helper", None)


def test_all_zero_weights_and_a_blank_system_prompt_are_refused():
    """``reward_weights=[0, 0]`` trained nothing at every step; ``data.system_prompt=''`` added an empty system
    message to every prompt. Both said before anything starts."""
    from rollout_sleep.grpo.data import prepare_prompts, synthetic_arithmetic

    with pytest.raises(RewardError, match=r"reward_weights are all 0 \(\[0, 0.0\]\).*give at least one reward a "
                                          r"weight"):
        resolve_rewards(["digits_format", "length_target"], [0, 0.0])
    assert [r.weight for r in resolve_rewards(["digits_format", "length_target"], [0, 1])] == [0.0, 1.0]
    with pytest.raises(ValueError, match=r"data.system_prompt is ' ', which would add a system message holding "
                                         r"nothing visible.*data.system_prompt=null"):
        prepare_prompts(synthetic_arithmetic(4), tokenizer=None, system_prompt=" ")


def test_a_text_reward_over_conversations_is_told_the_completions_format(tmp_path):
    """A reward written for text (``c.strip()``) given conversational data failed at step 1 with an
    AttributeError whose message showed the completion as text, hiding that it received a list of messages."""
    (tmp_path / "r.py").write_text("def has_hash(completions, **kw):\n"
                                   "    return [float('#' in c.strip()) for c in completions]\n")
    msgs = [[{"role": "assistant", "content": "# 4"}]]
    with pytest.raises(RewardError, match=r"reward 'has_hash' raised AttributeError: 'list' object has no attribute "
                                          r"'strip' on completion 0: .*the data is conversational: each completion is "
                                          r"a list of messages"):
        score_rewards(resolve_rewards([f"{tmp_path}/r.py:has_hash"]), [[{"role": "user", "content": "2+2"}]], msgs,
                      [{"prompt": "p"}])

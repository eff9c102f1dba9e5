"""Rows a reward cannot score: a column the reward reads, missing, null or blank in some rows of the dataset, is
refused before vLLM starts (the old code scored those rows without it: 0.0 for a correct completion)."""

from __future__ import annotations

import json
import logging
import textwrap
from pathlib import Path

import pytest

from helpers import ROOT, EngineReached, load_recipe, run_until_engine, stop_at_engine


CONFIG = ROOT / "configs" / "tiny-cpu.yaml"
ENGINE_START = "starting the vLLM engine"


def _task(tmp_path: Path) -> tuple[Path, Path]:
    rows = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(8)]
    del rows[3]["answer"]  # the key left out of one line
    rows[5]["answer"] = None  # null in another
    rows[6]["answer"] = "  "  # blank in a third: no completion matches it
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "rw.py").write_text(textwrap.dedent("""
        def exact(completions, answer, **kwargs):
            return [float(c.strip() == a) for c, a in zip(completions, answer)]

        def exact_where_known(completions, answer=None, **kwargs):
            return [None if a is None else float(c.strip() == a) for c, a in zip(completions, answer)]
    """))
    return data, tmp_path / "rw.py"


@pytest.mark.parametrize("reward, fix", [
    ("arithmetic_exact", "Fill in 'answer' in those rows or remove them"),
    ("{rw}:exact", "give its parameter a default (answer=None) and return None for them"),
])
def test_rows_without_the_column_a_reward_reads_are_refused_before_vllm(tmp_path, monkeypatch, reward, fix):
    data, rw = _task(tmp_path)
    name = reward.split(":")[-1]
    code, out = run_until_engine(monkeypatch, CONFIG, f"output_dir={tmp_path / 'run'}", f"data.dataset={data}",
                                 f"rewards=[digits_format, {reward.format(rw=rw)}]", "wandb.mode=disabled")
    assert code == 2, out[-3000:]
    assert (f"reward {name!r} reads column 'answer', which is missing, null or blank in 3 of 8 rows of "
            f"data.dataset {str(data)!r}: row(s) 3, 5, 6 (counted from 0)") in out, out[-3000:]
    assert fix in out and ENGINE_START not in out and not (tmp_path / "run").exists(), out[-3000:]


def test_a_reward_that_declares_the_column_optional_may_skip_those_rows(tmp_path, monkeypatch):
    """``answer=None`` in the signature: the function handles rows without it (returns None, TRL's "does not
    apply"), so the run goes on to start the engine."""
    data, rw = _task(tmp_path)
    recipe = load_recipe()

    stop_at_engine(monkeypatch, recipe)
    cfg = recipe.load_config(str(CONFIG), [f"output_dir={tmp_path / 'run'}", f"data.dataset={data}",
                                           f"rewards=[{rw}:exact_where_known]", "wandb.mode=disabled",
                                           "train.memory_plan=off"])
    with pytest.raises(EngineReached):
        recipe.GRPORecipe(cfg).setup()


READERS = textwrap.dedent("""
    def from_kwargs(completions, **kwargs):
        return [float(c.strip() == a) for c, a in zip(completions, kwargs["answer"])]

    def from_kwargs_pop(prompts, completions, **kw):
        answers = kw.pop("answer")
        return [float(c.strip() == a) for c, a in zip(completions, answers)]

    def per_example(completion, example):
        return float(completion.strip() == example["answer"])

    def kwargs_get(completions, **kwargs):
        answers = kwargs.get("answer") or [None] * len(completions)
        return [None if a is None else float(c.strip() == a) for c, a in zip(completions, answers)]

    def guarded(completions, **kwargs):
        if "answer" not in kwargs:
            return [None] * len(completions)
        return [None if a is None else float(c.strip() == a) for c, a in zip(completions, kwargs["answer"])]

    def example_get(completion, example):
        return None if example.get("answer") is None else float(completion.strip() == example["answer"])
""")


@pytest.mark.parametrize("name, fix", [
    ("from_kwargs", "read it with kwargs.get('answer') and return None for them"),
    ("from_kwargs_pop", "read it with kw.get('answer') and return None for them"),
    ("per_example", "Fill in 'answer' in those rows or remove them"),
])
def test_a_column_read_through_kwargs_or_the_example_is_checked_too(tmp_path, name, fix):
    """A reward that takes the column through ``**kwargs`` (``kwargs["answer"]``), or, one completion at a time,
    through its example (``example["answer"]``), reads it as surely as one that names it: the old check saw no
    column there, so rows without it were scored without it (0.0 for a correct completion), and a dataset without
    the column failed at the first step, after vLLM had started."""
    from rollout_sleep.grpo.errors import RewardError
    from rollout_sleep.grpo.rewards import check_columns, check_row_values, resolve_rewards

    def validate_rewards(specs, columns, data, source="the dataset"):  # the recipe's checks, in its order
        try:
            rewards = resolve_rewards(specs, load_models=False)
            check_columns(rewards, list(columns))
            check_row_values(rewards, data, source)
        except RewardError as err:
            return [str(err)]
        return []

    data, _ = _task(tmp_path)
    rw = tmp_path / "readers.py"
    rw.write_text(READERS)
    recipe = load_recipe()
    ds = recipe.load_prompts(str(data))
    (problem,) = validate_rewards([f"{rw}:{name}"], columns=ds.column_names, data=ds, source=str(data))
    assert problem.startswith(f"reward {name!r} reads column 'answer', which is missing, null or blank in 3 of 8 "
                              f"rows of data.dataset {str(data)!r}: row(s) 3, 5, 6 (counted from 0)"), problem
    assert fix in problem, problem
    (problem,) = validate_rewards([f"{rw}:{name}"], columns=["prompt"], data=ds.remove_columns("answer"))
    assert problem.startswith(f"reward {name!r} needs dataset column(s) ['answer']"), problem
    for optional in ("kwargs_get", "guarded", "example_get"):  # read so that a missing value is handled
        assert validate_rewards([f"{rw}:{optional}"], columns=ds.column_names, data=ds, source=str(data)) == []


def test_the_recipe_refuses_a_kwargs_reader_before_vllm(tmp_path, monkeypatch):
    data, _ = _task(tmp_path)
    rw = tmp_path / "readers.py"
    rw.write_text(READERS)
    code, out = run_until_engine(monkeypatch, CONFIG, f"output_dir={tmp_path / 'run'}", f"data.dataset={data}",
                                 f"rewards=[{rw}:from_kwargs]", "wandb.mode=disabled")
    assert code == 2 and "reward 'from_kwargs' reads column 'answer', which is missing, null or blank" in out, \
        out[-3000:]
    assert ENGINE_START not in out and "Traceback" not in out, out[-3000:]


def test_a_column_read_where_present_that_the_dataset_lacks_is_warned_about_before_vllm(tmp_path, monkeypatch, caplog):
    """A reward that reads its column where present (``solution=None``, ``kwargs.get``, ``"x" in kwargs``,
    ``example.get``) over a dataset without that column got None for every completion: it never scored, and
    the run trained on the other rewards without a word (its metric NaN). Now said before vLLM starts, naming
    the reward, the column and the dataset's columns; over a dataset that has the column, nothing is said."""
    from rollout_sleep.grpo.rewards import absent_optional_columns, resolve_rewards

    rw = tmp_path / "readers.py"
    rw.write_text(READERS)
    _, exact = _task(tmp_path)
    specs = [f"{rw}:{n}" for n in ("kwargs_get", "guarded", "example_get")]
    rewards = resolve_rewards(specs, load_models=False)
    assert absent_optional_columns(rewards, ["prompt", "answer"]) == []
    notes = absent_optional_columns(rewards, ["prompt", "solution"])
    assert [n.split(" reads")[0] for n in notes] == [f"reward {r.name!r}" for r in rewards], notes
    assert notes[0].startswith("reward 'kwargs_get' reads column(s) ['answer'] where present, and the dataset "
                               "has none of them (its columns: ['prompt', 'solution'])"), notes[0]
    # a parameter with a default may be a setting, not a column (TRL's reasoning_delimiters=None): not said
    assert absent_optional_columns(resolve_rewards([f"{exact}:exact_where_known"]), ["prompt", "solution"]) == []

    data = tmp_path / "renamed.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1=", "solution": str(i + 1)}) + "\n" for i in range(8)))
    recipe = load_recipe()
    stop_at_engine(monkeypatch, recipe)
    # loading the recipe configured the package's logger not to propagate, and caplog listens at the root
    # (whether an earlier test in this process had loaded it decided what caplog saw)
    monkeypatch.setattr(logging.getLogger("rollout_sleep"), "propagate", True)
    cfg = recipe.load_config(str(CONFIG), [f"output_dir={tmp_path / 'run'}", f"data.dataset={data}",
                                           f"rewards=[{rw}:kwargs_get, digits_format]",
                                           "wandb.mode=disabled", "train.memory_plan=off"])
    with caplog.at_level("WARNING", logger="rollout_sleep.grpo.rewards"), pytest.raises(EngineReached):
        recipe.GRPORecipe(cfg).setup()
    assert "reward 'kwargs_get' reads column(s) ['answer'] where present" in caplog.text, caplog.text


def test_a_reward_reading_prompt_or_completion_by_name_is_refused(tmp_path):
    """TRL passes a reward the prompt as ``prompts`` and the generated text as ``completions``; dataset columns
    named ``prompt`` / ``completion`` are not passed. A reward that required one (a parameter, or
    ``kwargs["completion"]``) passed the column check over a dataset holding it, then failed at the first step
    after vLLM had started."""
    from rollout_sleep.grpo.errors import RewardError
    from rollout_sleep.grpo.rewards import check_columns, resolve_rewards

    rw = tmp_path / "ref.py"
    rw.write_text(textwrap.dedent("""
        def by_param(completions, completion, **kwargs):
            return [float(c == r) for c, r in zip(completions, completion)]

        def by_kwargs(completions, **kwargs):
            return [float(c == r) for c, r in zip(completions, kwargs["completion"])]

        def by_prompt(prompt, completions, **kwargs):
            return [0.0] * len(completions)
    """))
    for name, col in (("by_param", "completion"), ("by_kwargs", "completion"), ("by_prompt", "prompt")):
        rewards = resolve_rewards([f"{rw}:{name}"], load_models=False)
        with pytest.raises(RewardError, match=rf"reward '{name}' reads \['{col}'\], which a reward is never passed "
                                              r"under that name .* rename the dataset column"):
            check_columns(rewards, ["prompt", "completion"])


def test_a_reward_that_scores_nothing_while_others_score_is_named():
    """Per step, the rewards that returned None/NaN for every completion while another reward scored some (a
    column read where present but never there, a format never matched): they add nothing, silently."""
    import torch

    from rollout_sleep.grpo.rewards import resolve_rewards, silent_rewards

    rewards = resolve_rewards(["digits_format", "length_target"], load_models=False)
    nan = float("nan")
    assert silent_rewards(torch.tensor([[1.0, nan], [0.0, nan]]), rewards) == ["length_target"]
    assert silent_rewards(torch.tensor([[1.0, nan], [0.0, 2.0]]), rewards) == []
    assert silent_rewards(torch.tensor([[nan, nan], [nan, nan]]), rewards) == []  # the step stops on that instead
    assert silent_rewards(torch.tensor([[nan], [nan]]), rewards[:1]) == []


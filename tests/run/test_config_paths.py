"""Relative paths in a YAML config are read from the YAML's folder, so a config runs from any working directory;
paths given on the command line are read from the working directory. Both are recorded as absolute paths, so a
resume compares files, not words. (The old loader read every path from
the working directory: the shipped example only ran from the repository root.)"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from rollout_sleep.run.config import ConfigError, load_config

from helpers import ROOT, EngineReached, load_recipe, stop_at_engine



@pytest.fixture()
def project(tmp_path) -> Path:
    """proj/configs/run.yaml naming ../data/qa.jsonl and ../task/rw.py; the tests run from elsewhere/."""
    proj = tmp_path / "proj"
    for d in ("configs", "data", "task"):
        (proj / d).mkdir(parents=True)
    (proj / "data" / "qa.jsonl").write_text("".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n"
                                                    for i in range(8)))
    (proj / "task" / "rw.py").write_text("def exact(completions, answer, **kwargs):\n"
                                         "    return [float(c.strip() == a) for c, a in zip(completions, answer)]\n")
    (proj / "configs" / "run.yaml").write_text(textwrap.dedent("""
        data: {dataset: ../data/qa.jsonl}
        rewards: [../task/rw.py:exact, digits_format]
        train: {steps: 1, prompts_per_step: 4, generations: 2, max_tokens: 2, memory_plan: "off"}
        wandb: {mode: disabled}
        output_dir: runs/paths
    """))
    (tmp_path / "elsewhere").mkdir()
    return proj


def test_yaml_paths_are_read_from_the_yamls_folder(project, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path / "elsewhere")
    cfg = load_config(project / "configs" / "run.yaml")
    assert cfg.data.dataset == str(project / "data" / "qa.jsonl")
    assert cfg.rewards == [f"{project / 'task' / 'rw.py'}:exact", "digits_format"]
    assert cfg.output_dir == "runs/paths"  # the run's output: relative to the working directory
    (tmp_path / "elsewhere" / "mine.jsonl").write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n")
    cfg = load_config(project / "configs" / "run.yaml", ["data.dataset=mine.jsonl"])
    assert cfg.data.dataset == str(tmp_path / "elsewhere" / "mine.jsonl")  # a command-line path: from the working
    # directory, recorded absolute


def test_a_path_written_for_the_working_directory_says_where_it_was_looked_for(project, tmp_path, monkeypatch):
    (project / "configs" / "old.yaml").write_text("data: {dataset: data/qa.jsonl}\n")
    monkeypatch.chdir(project)  # data/qa.jsonl exists here, not next to the YAML
    with pytest.raises(ConfigError) as err:
        load_config(project / "configs" / "old.yaml")
    message = str(err.value)
    assert f"data.dataset {str(project / 'configs' / 'data' / 'qa.jsonl')!r} not found" in message, message
    assert "relative paths in a config file are read from its folder" in message
    assert "'data/qa.jsonl' exists in the working directory" in message


def test_the_recipe_runs_a_yaml_from_another_working_directory(project, tmp_path, monkeypatch):
    """Up to the engine's start (every check, the data, the reward import), from a folder that is neither the
    YAML's nor the project's; the shipped example config too."""
    recipe = load_recipe()

    stop_at_engine(monkeypatch, recipe)
    monkeypatch.chdir(tmp_path / "elsewhere")
    for config in (project / "configs" / "run.yaml", ROOT / "configs" / "example-gsm8k.yaml"):
        cfg = recipe.load_config(str(config), [f"output_dir={tmp_path / config.stem}", "train.memory_plan=off"])
        run = recipe.GRPORecipe(cfg)
        with pytest.raises(EngineReached):
            run.setup()
        assert len(run.data) == 8 and [r.name for r in run.rewards][0] in ("exact", "gsm8k_correct")


def test_home_paths_are_expanded_in_a_yaml_and_on_the_command_line(project, tmp_path, monkeypatch):
    """``~/...`` for a reward file, a reward-model folder and a model folder, as users write them: the old code
    expanded ``~`` for data.dataset and output_dir only, so a reward file was 'not found', a reward-model folder an
    'unknown reward', and model.path passed the config's check and then crashed with a traceback (transformers took
    it for a hub id)."""
    from rollout_sleep.weights.checkpoints import make_checkpoint, make_reward_checkpoint

    home = tmp_path / "home"
    (home / "task").mkdir(parents=True)
    (home / "task" / "rw.py").write_text((project / "task" / "rw.py").read_text())
    (home / "qa.jsonl").write_text((project / "data" / "qa.jsonl").read_text())
    make_reward_checkpoint(home / "rm", "tiny", dtype="float32")
    make_checkpoint(home / "ckpt", "tiny", dtype="float32")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path / "elsewhere")
    (project / "configs" / "home.yaml").write_text(textwrap.dedent("""
        model: {path: ~/ckpt, dtype: float32}
        data: {dataset: ~/qa.jsonl}
        rewards: [~/task/rw.py:exact, ~/rm]
        train: {steps: 1, prompts_per_step: 4, generations: 2, max_tokens: 2, memory_plan: "off"}
        wandb: {mode: disabled}
    """))
    expected = (str(home / "ckpt"), str(home / "qa.jsonl"), [f"{home / 'task' / 'rw.py'}:exact", str(home / "rm")])
    cfg = load_config(project / "configs" / "home.yaml", [f"output_dir={tmp_path / 'run'}"])
    assert (cfg.model.path, cfg.data.dataset, cfg.rewards) == expected
    cfg = load_config(None, ["model.path=~/ckpt", "data.dataset=~/qa.jsonl", "rewards=[~/task/rw.py:exact, ~/rm]"])
    assert (cfg.model.path, cfg.data.dataset, cfg.rewards) == expected

    recipe = load_recipe()

    class Reached(Exception):
        pass

    def engine(cfg, model, *args, **kwargs):
        assert model == str(home / "ckpt")
        raise Reached

    monkeypatch.setattr(recipe, "build_engine", engine)
    run = recipe.GRPORecipe(recipe.load_config(str(project / "configs" / "home.yaml"),
                                               [f"output_dir={tmp_path / 'run'}"]))
    with pytest.raises(Reached):
        run.setup()
    assert [r.name for r in run.rewards] == ["exact", "rm"]


def test_a_resume_compares_the_files_its_paths_name(project, tmp_path, monkeypatch):
    """A run started with ``data.dataset=data/qa.jsonl`` on the command line, resumed from another working directory
    whose ``data/qa.jsonl`` is another file: the old loader kept the words, so the resume compared equal words and
    trained on the other file silently. And the same file named by the YAML and then on the command line was
    refused as a changed key (``'/proj/data/qa.jsonl' -> 'data/qa.jsonl'``)."""
    from rollout_sleep.run import output_dir

    from workers.recipe_cli import ENGINE_START, run

    other = tmp_path / "other"
    (other / "data").mkdir(parents=True)
    (other / "data" / "qa.jsonl").write_text(json.dumps({"prompt": "9+9=", "answer": "18"}) + "\n")
    out = tmp_path / "run"
    monkeypatch.chdir(project)
    first = load_config(None, ["data.dataset=data/qa.jsonl"]).to_dict()
    out.mkdir()
    output_dir.write_run_config(out, first)
    staging = output_dir.stage(out / "checkpoints" / "step_1")
    staging.mkdir(parents=True)
    import torch

    torch.save({"state": {}}, staging / "optimizer.bin")  # a torch file: a zip (other bytes are damage)
    output_dir.commit(staging, out / "checkpoints" / "step_1", {"step": 1, "config": first})
    # the same file, named by the YAML (read from its folder): the same run
    from_yaml = load_config(project / "configs" / "run.yaml").data.dataset
    same = json.loads(json.dumps(first))
    same["data"]["dataset"] = from_yaml
    output_dir.check_output_dir(out, same, resume=True)
    # the same words from another working directory: another file, refused before the engine starts
    monkeypatch.chdir(other)
    code, text = run(out, "data.dataset=data/qa.jsonl", "train.steps=2", "train.prompts_per_step=1", timeout=300)
    assert code == 1, text[-3000:]
    assert f"holds a different run: data.dataset: {str(project / 'data' / 'qa.jsonl')!r} -> " \
           f"{str(other / 'data' / 'qa.jsonl')!r}" in text, text[-3000:]
    assert ENGINE_START not in text and "Traceback" not in text


def test_a_run_saved_with_relative_paths_resumes_from_its_working_directory(project, monkeypatch):
    """Runs saved before paths were recorded absolute hold command-line paths as written: read from the working
    directory (their old reading), they are the same file, not a changed key."""
    from rollout_sleep.run import output_dir

    monkeypatch.chdir(project)
    new = load_config(None, ["data.dataset=data/qa.jsonl", "rewards=[task/rw.py:exact]"]).to_dict()
    old = json.loads(json.dumps(new))
    old["data"]["dataset"], old["rewards"] = "data/qa.jsonl", ["task/rw.py:exact"]
    assert new["data"]["dataset"] == str(project / "data" / "qa.jsonl")
    assert output_dir.config_changes(old, new)["fixed"] == []

"""A careless or hostile user against the GRPO recipe: what it must refuse (before anything is written or vLLM
starts) and what it must never do (delete files it did not write, let two runs share a folder)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rollout_sleep import run_dir
from rollout_sleep.config import ConfigError, RecipeConfig, check_processes, load_config, validate_rewards
from rollout_sleep.data import check_prompts, load_prompts

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "grpo.py"
CONFIG = ROOT / "configs" / "tiny-cpu.yaml"
ENGINE_START = "starting the vLLM engine"


def test_overwrite_deletes_only_what_a_run_wrote(tmp_path):
    """overwrite=true pointed at a folder that is not a run (a home-like folder with its own ``checkpoints``
    and ``metrics.jsonl``) is refused and nothing is deleted; in a real run's folder, only the recipe's own
    entries of ``checkpoints`` go. (The old code deleted the whole ``checkpoints`` folder and the metrics.)"""
    home = tmp_path / "home"
    (home / "checkpoints").mkdir(parents=True)
    (home / "checkpoints" / "thesis.pdf").write_text("precious")
    (home / "metrics.jsonl").write_text('{"accuracy": 0.9}\n')
    cfg = RecipeConfig().to_dict()
    with pytest.raises(run_dir.RunDirError, match="not a run of this recipe .* so overwrite=true will not delete"):
        run_dir.check_output_dir(home, cfg, resume=False, overwrite=True)
    assert run_dir.clear_run(home, cfg) == []
    assert (home / "checkpoints" / "thesis.pdf").read_text() == "precious" and (home / "metrics.jsonl").exists()

    run = tmp_path / "run"
    for name in ("step_2", ".partial-step_4", "incomplete/step_3", "my_notes"):
        (run / "checkpoints" / name).mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    run_dir.write_run_config(run, cfg)
    run_dir.check_output_dir(run, cfg, resume=False, overwrite=True)
    assert run_dir.clear_run(run, cfg) == ["metrics.jsonl", "checkpoints", "run_config.json"]
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["my_notes"]


def test_a_model_the_run_did_not_build_is_never_deleted(tmp_path):
    """An earlier run trained the user's own checkpoint kept at ``<output_dir>/model``; a new run there with a
    built-in size must not delete it as a "stale built model" (the old code did)."""
    out = tmp_path / "run"
    (out / "model").mkdir(parents=True)
    (out / "model" / "config.json").write_text("{}")
    old = RecipeConfig()
    old.model.path = str(out / "model")
    run_dir.write_run_config(out, old.to_dict())
    new = RecipeConfig().to_dict()  # model.path: tiny
    assert not run_dir.drop_stale_model(out, new)
    assert run_dir.clear_run(out, new) == ["run_config.json"] and (out / "model" / "config.json").exists()


def test_config_refuses_non_finite_weights_and_a_file_as_output_dir(tmp_path):
    afile = tmp_path / "notes.txt"
    afile.write_text("x")
    with pytest.raises(ConfigError) as err:
        load_config(None, ["reward_weights=[.nan, 1]", f"output_dir={afile}"])
    assert err.value.problems == [
        f"output_dir {str(afile)!r} is a file, not a folder: give a new or existing folder",
        "reward_weights must be finite numbers, got [nan, 1.0]: a NaN weight would zero every reward it scales "
        "(NaN rewards are skipped), an infinite one stops the first step"]
    with pytest.raises(ConfigError, match="reward_weights must be finite"):
        load_config(None, ["reward_weights=[1, .inf]"])
    load_config(None, ["reward_weights=[-1, 0.5]"])  # negative weights are fine (TRL's too)


def test_dataset_columns_named_like_trainer_arguments_are_refused(tmp_path, monkeypatch):
    """A dataset column ``completions`` (reference answers, say) would replace the generated completions that
    a TRL-style reward receives (the old code passed the column, silently); TRL itself fails at the first step."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        def same(prompts, completions, **kwargs):
            return [float(c == "4") for c in completions]
    """))
    assert validate_rewards(["my_rewards.py:same"], columns=["prompt", "answer"]) == []
    (problem,) = validate_rewards(["my_rewards.py:same"], columns=["prompt", "completions", "trainer_state"])
    assert problem.startswith("dataset column(s) ['completions', 'trainer_state'] have the names of arguments")
    assert validate_rewards(["digits_format"], columns=["prompt", "completions"]) == []  # per-example: no clash


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


def test_prompts_per_step_must_split_evenly_across_processes():
    cfg = RecipeConfig()
    assert check_processes(cfg, 1) == [] and check_processes(cfg, 4) == []
    cfg.train.prompts_per_step = 3
    cfg.engine.tensor_parallel_size = 4
    assert check_processes(cfg, 2) == [
        "engine.tensor_parallel_size must be 1 (an engine per rank) or the number of processes (2, one engine "
        "across ranks), got 4",
        "train.prompts_per_step (3) must be a multiple of the number of processes (2): each rank rolls out and "
        "trains an equal share"]


def test_one_run_at_a_time_in_an_output_dir(tmp_path):
    out = tmp_path / "run"
    held = run_dir.lock(out)
    with pytest.raises(run_dir.RunDirError, match=f"is in use by process {os.getpid()}"):
        run_dir.lock(out)
    held.close()  # (a process that ends, even killed, releases it)
    run_dir.lock(out).close()


def test_recipe_refuses_an_empty_dataset_and_a_busy_output_dir_before_the_engine(tmp_path):
    """Launched as users do (imports and checks only, no vLLM): an empty .jsonl (the old code showed a bare
    StopIteration traceback) and an output_dir another run holds (the old code let both write into it)."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    busy = tmp_path / "busy"
    held = run_dir.lock(busy)
    cases = {"empty": ([f"output_dir={tmp_path / 'a'}", f"data.dataset={empty}"], 2,
                       f"data.dataset {str(empty)!r} cannot be used: it has no rows"),
             "busy": ([f"output_dir={busy}"], 1, f"output_dir {str(busy)!r} is in use by process {os.getpid()}")}
    procs = {name: subprocess.Popen([sys.executable, str(RECIPE), "--config", str(CONFIG), "wandb.mode=disabled",
                                     *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    env={**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"})
             for name, (args, _, _) in cases.items()}
    outs = {name: p.communicate(timeout=300)[0] for name, p in procs.items()}
    held.close()
    for name, (_, code, message) in cases.items():
        assert procs[name].returncode == code and message in outs[name], (name, outs[name][-3000:])
        assert ENGINE_START not in outs[name] and "Traceback" not in outs[name], (name, outs[name][-3000:])
    assert sorted(p.name for p in busy.iterdir()) == [".lock"]  # the busy folder was not written into


def test_rewards_as_users_write_them(tmp_path, monkeypatch):
    """What TRL accepts is accepted (a numpy array, 0-d tensors and numpy scalars); a file reward imports the
    modules beside it (as ``python file.py`` would); a per-example reward that needs a third argument is
    refused up front, not at step 1; a reward named twice keeps two metrics. (The old code refused the first
    two, accepted the third until the first step, and logged one metric for both of the last.)"""
    import numpy as np
    import torch

    from rollout_sleep.rewards import reward_metrics, resolve_rewards, score_rewards

    task = tmp_path / "task"
    task.mkdir()
    (task / "helpers.py").write_text("def target():\n    return 'b'\n")
    (task / "rw.py").write_text(textwrap.dedent("""
        import numpy as np
        import torch
        from helpers import target

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


def test_a_save_killed_between_its_last_write_and_its_rename_is_not_lost(tmp_path):
    """The save of step 4 wrote everything (its recipe_state.json too), set an earlier save of step 4 aside, and
    was killed before the rename: the staging folder is the only complete copy of step 4, so the next start
    renames it instead of deleting it (the old code deleted it and resumed from an older step). An incomplete
    staging folder is still deleted."""
    import torch
    from safetensors.torch import save_file

    ckpts = tmp_path / "checkpoints"
    for step in (2, 4):
        staging = run_dir.stage(ckpts / f"step_{step}")
        staging.mkdir(parents=True)
        save_file({"w": torch.ones(3)}, str(staging / "model.safetensors"))
        run_dir.commit(staging, ckpts / f"step_{step}", {"step": step})
    os.replace(ckpts / "step_4", run_dir.stage(ckpts / "step_4"))  # killed before the rename
    (ckpts / ".partial-step_6").mkdir()  # killed while writing
    (ckpts / ".partial-step_6" / "model.safetensors").write_bytes(b"\0" * 4)
    assert run_dir.clear_staging(ckpts) == [ckpts / ".partial-step_6"]
    assert run_dir.newest_complete(ckpts) == (ckpts / "step_4", [])


def test_overwrite_without_resume_false_is_refused():
    """overwrite=true alone (resume defaults to true) used to resume the earlier run, silently ignoring it."""
    with pytest.raises(ConfigError, match="pass resume=false with overwrite=true"):
        load_config(None, ["overwrite=true"])
    load_config(None, ["overwrite=true", "resume=false"])


def test_yaml_mistakes_are_named_in_full(tmp_path):
    """A key given twice in the YAML was silently dropped (PyYAML keeps the last: ``train: {steps: 3}`` then
    ``train: {lr: 1}`` ran 12 steps); a wrong value inside a section was named without its section."""
    twice = tmp_path / "twice.yaml"
    twice.write_text("train: {steps: 3}\nmodel: {path: tiny}\ntrain: {lr: 1.0}\n")
    with pytest.raises(ConfigError, match="key 'train' is given twice"):
        load_config(twice)
    nested = tmp_path / "nested.yaml"
    nested.write_text("train:\n  steps: [3]\n  stepz: 3\ndata: {system_prompt: 42}\n")
    with pytest.raises(ConfigError) as err:
        load_config(nested)
    assert err.value.problems[:2] == ["train.steps must be an integer, got [3]",
                                      "unknown key 'train.stepz'; train has: " + ", ".join(
                                          f.name for f in __import__("dataclasses").fields(RecipeConfig().train))]
    assert err.value.problems[2] == "data.system_prompt must be a string or null, got 42"


def test_a_resume_with_other_reward_weights_is_another_run(tmp_path):
    """The weights define the objective as much as the rewards do (the old code let a resume change them
    silently); writing out the default weights is not a change."""
    cfg = RecipeConfig().to_dict()
    run_dir.write_run_config(tmp_path, cfg)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    run_dir.check_output_dir(tmp_path, {**cfg, "reward_weights": [1.0, 1.0]}, resume=True)
    with pytest.raises(run_dir.RunDirError, match=r"holds a different run: reward_weights: \[1.0, 1.0\] -> \[1.0, 0.1\]"):
        run_dir.check_output_dir(tmp_path, {**cfg, "reward_weights": [1.0, 0.1]}, resume=True)


def test_a_huge_watchdog_timeout_means_no_limit_not_a_crash():
    """``watchdog.train_s=1e12`` ("never") overflowed the timers: the first watched phase raised OverflowError
    and the watchdog's thread died (no phase was watched any more)."""
    from rollout_sleep.watchdog import Watchdog

    wd = Watchdog({"train": 1e12, "save": 1.0})
    with wd.phase("train", "a long thing"):
        pass
    with wd.phase("save", "a short thing", timeout=1e300):
        pass
    assert wd._thread.is_alive()
    wd.close()


def test_a_reward_model_with_two_labels_is_refused_before_the_engine(tmp_path):
    """The old code only warned ("the reward is label 0's logit") and then failed to load it after vLLM had
    started (num_labels=1, as TRL loads it, does not fit a two-row score head)."""
    from rollout_sleep.checkpoints import make_reward_checkpoint

    path = Path(make_reward_checkpoint(tmp_path / "rm", "tiny", seed=0, dtype="float32"))
    assert validate_rewards([str(path)]) == []
    config = json.loads((path / "config.json").read_text())
    config["id2label"], config["label2id"] = {"0": "bad", "1": "good"}, {"bad": 0, "good": 1}
    (path / "config.json").write_text(json.dumps(config))
    (problem,) = validate_rewards([str(path)])
    assert problem.startswith(f"reward model {str(path)!r} has 2 labels; a reward model has one")


def test_the_warnings_advice_on_resume_is_accepted(tmp_path, caplog):
    """Extending a run whose data.num_prompts is unset warns "set data.num_prompts to N to keep the earlier
    order"; doing so was then refused as "a different run" (data: num_prompts None -> N)."""
    cfg = RecipeConfig().to_dict()  # steps 12 x prompts_per_step 8, num_prompts unset: 96 prompts
    run_dir.write_run_config(tmp_path, cfg)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    longer = json.loads(json.dumps(cfg))
    longer["train"]["steps"] = 20
    with caplog.at_level("WARNING", logger="rollout_sleep.run_dir"):
        run_dir.check_output_dir(tmp_path, longer, resume=True)
    assert "set data.num_prompts to 96 to keep the earlier order" in caplog.text
    longer["data"]["num_prompts"] = 96
    run_dir.check_output_dir(tmp_path, longer, resume=True)  # the advice followed: the same data, accepted
    longer["data"]["num_prompts"] = 50
    with pytest.raises(run_dir.RunDirError, match="holds a different run: data.num_prompts: None -> 50 "):
        run_dir.check_output_dir(tmp_path, longer, resume=True)


def test_resume_into_a_folder_that_is_not_a_run_is_refused(tmp_path):
    """resume=true (the default) into another tool's folder with ``metrics.jsonl`` and ``checkpoints/step_5``:
    the old code moved step_5 into checkpoints/incomplete, rewrote the metrics file and appended to it."""
    (tmp_path / "checkpoints" / "step_5").mkdir(parents=True)
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n')
    with pytest.raises(run_dir.RunDirError, match="not a run of this recipe .* so the run would move its checkpoints"):
        run_dir.check_output_dir(tmp_path, RecipeConfig().to_dict(), resume=True)

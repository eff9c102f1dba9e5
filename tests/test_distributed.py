"""Sync from DDP, FSDP2 and DeepSpeed ZeRO-3 trainers: 2 processes over gloo, one real engine per rank (one
launch serves the three trainers: CI time); and a TP=2 engine across the two ranks (its own launch)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import clear_cpu_tp_shm
from rollout_sleep.serve.server import free_port

WORKER = Path(__file__).with_name("dist_worker.py")
TP_WORKER = Path(__file__).with_name("tp_worker.py")


def launch(script: list[str], ckpts, out: Path) -> str:
    """torchrun, 2 processes over gloo; returns the output's tail (for failure messages)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           *script, ckpts["tied0"], ckpts["tied1"], str(out)]
    clear_cpu_tp_shm()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    finally:
        clear_cpu_tp_shm()
    return proc.stdout[-2000:] + proc.stderr[-4000:]


def _has_deepspeed() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


MODES = ["ddp", "fsdp2", pytest.param("zero3", marks=pytest.mark.skipif(
    not _has_deepspeed(), reason="deepspeed not installed (the test extra installs it)"))]


@pytest.fixture(scope="module")
def wrapped_runs(request, ckpts, tmp_path_factory):
    """One launch for every trainer mode this session selected: ``{mode: (rank rows, output tail)}``."""
    selected = [item.callspec.params["mode"] for item in request.session.items
                if getattr(item, "module", None) is not None and item.module.__name__ == __name__
                and "mode" in getattr(getattr(item, "callspec", None), "params", {})]
    selected = [m for m in ("ddp", "fsdp2", "zero3") if m in selected and (m != "zero3" or _has_deepspeed())]
    out = tmp_path_factory.mktemp("wrapped")
    tail = launch([str(WORKER), ",".join(selected)], ckpts, out)
    return {m: ([json.loads(p.read_text()) for p in sorted(out.glob(f"{m}_rank*.json"))], tail) for m in selected}


@pytest.mark.parametrize("mode", MODES)
def test_sync_from_wrapped_trainer_verifies_on_every_rank(mode, wrapped_runs):
    rows, tail = wrapped_runs[mode]
    assert len(rows) == 2, tail
    for row in rows:
        assert "error" not in row, row
        assert row["ok"] and row["compared"] == 25, row
        assert row["same_tokens_on_ranks"], row
        assert row["sharded"] == (mode != "ddp")
        assert not row["corrupted_ok"] and row["corrupted_named"] == ["model.layers.0.mlp.down_proj.weight"], row
        # the update check read this rank's stepped weights around the real step (fp32, SGD lr 0.05: they move)
        assert row["sampled"] > 0 and row["updated"]["train/updated_fraction/float32"] > 0.9, row


def test_tensor_parallel_engine_across_two_ranks_follows_the_trainer(ckpts, tmp_path):
    """One TP=2 engine over both ranks: sleep, wake with the trainer's weights (each rank streams the full
    tensors, vLLM's loaders keep each rank's shard), reset; then the engine computes with the new weights."""
    tail = launch([str(TP_WORKER)], ckpts, tmp_path)
    rows = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank*.json"))]
    assert len(rows) == 2, tail
    for row in rows:
        assert row["phases"] == ["wake_weights", "load", "wake_kv_cache", "reset"]
        assert row["after"] != row["before"]
        assert row["after"] == row["hf"], row  # greedy, 4 prompts x 8 tokens, fp32
        assert row["logprob_gap"] < 1e-3, row  # teacher-forced, same bound as conftest.assert_follows
        assert row["verify_ok"] and row["compared"] == 25, row  # each rank's shards, cut as vLLM cuts them
        # row 0 of down_proj (row parallel: its columns are split) lives on rank 0 only; the last row of
        # k_proj is in the second rank's slice of the fused qkv_proj
        assert not row["corrupted_ok"]
        assert set(row["corrupted_named"]) <= {"model.layers.0.mlp.down_proj.weight",
                                               "model.layers.1.self_attn.k_proj.weight"}, row
    named = set(rows[0]["corrupted_named"]) | set(rows[1]["corrupted_named"])
    assert named == {"model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.k_proj.weight"}, rows
    assert rows[0]["after"] == rows[1]["after"]

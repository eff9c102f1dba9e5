"""Sync from DDP, FSDP2 and DeepSpeed ZeRO-3 trainers: 2 processes over gloo, one real engine per rank."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("dist_worker.py")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_worker(mode: str, ckpts, out: Path) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           str(WORKER), mode, ckpts["tied0"], ckpts["tied1"], str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    rows = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
    assert len(rows) == 2, proc.stdout[-2000:] + proc.stderr[-4000:]
    return rows


def _has_deepspeed() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


@pytest.mark.parametrize("mode", ["ddp", "fsdp2", pytest.param("zero3", marks=pytest.mark.skipif(
    not _has_deepspeed(), reason="deepspeed not installed (the test extra installs it)"))])
def test_sync_from_wrapped_trainer_verifies_on_every_rank(mode, ckpts, tmp_path):
    rows = run_worker(mode, ckpts, tmp_path)
    for row in rows:
        assert row["ok"] and row["compared"] == 25, row
        assert row["same_tokens_on_ranks"], row
        assert row["sharded"] == (mode != "ddp")
        assert not row["corrupted_ok"] and row["corrupted_named"] == ["model.layers.0.mlp.down_proj.weight"], row

"""One tensor-parallel engine across two ranks (vLLM's external_launcher, gloo, CPU) follows the trainer."""

from __future__ import annotations

import json

from helpers import WORKERS, torchrun


TP_WORKER = WORKERS / "tp_worker.py"


def test_tensor_parallel_engine_across_two_ranks_follows_the_trainer(ckpts, tmp_path):
    """One TP=2 engine over both ranks: sleep, wake with the trainer's weights (each rank streams the full
    tensors, vLLM's loaders keep each rank's shard), reset; then the engine computes with the new weights."""
    tail = torchrun([str(TP_WORKER)], ckpts, tmp_path)
    rows = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank*.json"))]
    assert len(rows) == 2, tail
    for row in rows:
        assert row["phases"] == ["wake_weights", "load", "wake_kv_cache", "reset"]
        assert row["after"] != row["before"]
        assert row["after"] == row["hf"], row  # greedy, 4 prompts x 8 tokens, fp32
        assert row["logprob_gap"] < 1e-3, row  # teacher-forced, same bound as helpers.assert_follows
        assert row["verify_ok"] and row["compared"] == 25, row  # each rank's shards, cut as vLLM cuts them
        # row 0 of down_proj (row parallel: its columns are split) lives on rank 0 only; the last row of
        # k_proj is in the second rank's slice of the fused qkv_proj
        assert not row["corrupted_ok"]
        assert set(row["corrupted_named"]) <= {"model.layers.0.mlp.down_proj.weight",
                                               "model.layers.1.self_attn.k_proj.weight"}, row
    named = set(rows[0]["corrupted_named"]) | set(rows[1]["corrupted_named"])
    assert named == {"model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.k_proj.weight"}, rows
    assert rows[0]["after"] == rows[1]["after"]

"""Sync from DDP, FSDP2 and DeepSpeed ZeRO-3 trainers: 2 processes over gloo, one real engine per rank,
verify after every sync."""

from __future__ import annotations

import json

import pytest

from helpers import WORKERS, built_once, torchrun


WORKER = WORKERS / "dist_worker.py"


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

    def launch(out):
        (out / "tail.txt").write_text(torchrun([str(WORKER), ",".join(selected)], ckpts, out))

    out = built_once(tmp_path_factory, request.config, "wrapped", launch)  # one launch for the session's workers
    tail = (out / "tail.txt").read_text()
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

"""A checkpoint's spec: names, shapes and dtypes read from safetensors headers (sharded, FP8, rotary tables)."""

from __future__ import annotations

import json

import pytest
import torch

from rollout_sleep.weights.checkpoints import family_config, random_model
from rollout_sleep.weights.stream import WeightStream


def test_read_checkpoint_spec_sharded_index_and_fp8(tmp_path):
    """Shapes and dtypes come from safetensors' own reader: shards named by the index, fp8 included."""
    from safetensors.torch import save_file

    from rollout_sleep.weights.spec import read_checkpoint_spec

    save_file({"a.weight": torch.zeros(3, 4, dtype=torch.bfloat16)}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({"b.weight": torch.zeros(5, dtype=torch.float8_e4m3fn),
               "b.scale": torch.zeros((), dtype=torch.float32)}, tmp_path / "model-00002-of-00002.safetensors")
    save_file({"stale.weight": torch.zeros(1)}, tmp_path / "old-consolidated.safetensors")  # not in the index
    index = {"metadata": {}, "weight_map": {"a.weight": "model-00001-of-00002.safetensors",
                                            "b.weight": "model-00002-of-00002.safetensors",
                                            "b.scale": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    spec = read_checkpoint_spec(tmp_path)
    assert {n: (s.shape, s.dtype) for n, s in spec.items()} == {
        "a.weight": ((3, 4), torch.bfloat16), "b.weight": ((5,), torch.float8_e4m3fn), "b.scale": ((), torch.float32)}
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002"):
        read_checkpoint_spec(tmp_path)


def test_checkpoint_with_rotary_tables_and_shards_takes_a_trainer_sync(tmp_path):
    """An old-style checkpoint that also stores ``rotary_emb.inv_freq`` (vLLM drops it at load), saved in
    shards with an index: the trainer's stream (which never holds those buffers) must pass the strict check
    (it was refused as 'missing weight ...inv_freq')."""
    from safetensors.torch import load_file, save_file

    from rollout_sleep.weights.spec import check_weights, read_checkpoint_spec

    model = random_model(family_config("qwen2.5", "tiny", "float32"), seed=0, std=0.3, dtype=torch.float32)
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    tensors = load_file(shards[0])
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(16)
    save_file(tensors, shards[0], metadata={"format": "pt"})
    spec = read_checkpoint_spec(tmp_path)
    assert "model.layers.0.self_attn.rotary_emb.inv_freq" not in spec
    check_weights(WeightStream(model).spec(), spec, strict=True, dtype=torch.float32)

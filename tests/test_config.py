"""Recipe config: malformed input fails loudly with the key and what is allowed (pure logic)."""

from __future__ import annotations

import pytest

from rollout_sleep.config import ConfigError, load_config


def test_engine_cache_settings_defaults_and_overrides():
    cfg = load_config(None)
    assert (cfg.engine.kv_cache, cfg.engine.keep_trainer_cache, cfg.save_final) == ("step", True, True)
    cfg = load_config(None, ["engine.kv_cache=gpu_share", "engine.keep_trainer_cache=false", "save_final=false"])
    assert (cfg.engine.kv_cache, cfg.engine.keep_trainer_cache, cfg.save_final) == ("gpu_share", False, False)


@pytest.mark.parametrize("override, message", [
    ("engine.kv_cache=all", "engine.kv_cache must be one of step, gpu_share, got 'all'"),
    ("engine.keep_trainer_cache=maybe", "engine.keep_trainer_cache must be true or false"),
    ("engine.kv_cache_bites=1", "unknown key 'engine.kv_cache_bites'; engine has: "),
    ("train.steps=many", "train.steps must be an integer"),
])
def test_malformed_overrides_name_the_problem(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_unreadable_and_non_mapping_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping of sections"):
        load_config(bad)

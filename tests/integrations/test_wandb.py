"""The W&B tracker's checks: ``wandb.mode=online`` needs credentials where wandb looks for them (the recipe
refuses a run without them before vLLM starts: tests/recipes/test_step_errors.py)."""

from __future__ import annotations

from rollout_sleep.integrations.wandb import credentials_problem


def test_wandb_credentials_are_found_where_wandb_looks(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb"))
    monkeypatch.delenv("NETRC", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert credentials_problem("disabled") is None and credentials_problem("offline") is None
    assert "has no API key" in credentials_problem("online")
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert credentials_problem("online") is None
    monkeypatch.setenv("WANDB_API_KEY", "short")
    assert "cannot use its credentials" in credentials_problem("online")

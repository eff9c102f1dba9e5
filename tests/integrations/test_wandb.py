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


def test_a_table_goes_with_the_next_steps_metrics():
    """The memory plan's table was logged with ``commit=False`` before the first ``log(step=1)``: W&B wrote it as a
    history row of its own at step 0 (and again at step 0 on every resume). It now rides on the next step's log.
    (The call order only: a stand-in for wandb's run.)"""
    from types import SimpleNamespace

    from rollout_sleep.integrations.wandb import WandbTracker

    calls = []
    tracker = WandbTracker.__new__(WandbTracker)
    tracker.run = SimpleNamespace(log=lambda data, **kw: calls.append((sorted(data), kw)))
    tracker._wandb = SimpleNamespace(Table=lambda columns, data: ("table", columns, data))
    tracker._pending = {}
    tracker.log_table("memory_plan", ["component"], [["weights"]])
    assert calls == []
    tracker.log({"loss": 1.0}, step=1)
    tracker.log({"loss": 0.5}, step=2)
    assert calls == [(["loss", "memory_plan"], {"step": 1}), (["loss"], {"step": 2})]

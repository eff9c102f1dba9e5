"""Memory on the engine's side: what a report measures, when PyTorch's cache is handed back or kept, KV-cache
sizing."""

from __future__ import annotations

import pytest
import torch


def test_cpu_memory_report_says_what_it_measures(engine):
    rep = engine.sleep(level=2)
    assert rep.memory_kind == ("cuda_free" if torch.cuda.is_available() else "cpu_rss")
    assert set(rep.memory_gib) == {"before", "asleep"}
    engine.wake_up(reload_checkpoint=True)


def test_release_cached_memory_only_when_short(monkeypatch):
    """Pure logic (no GPU here): empty PyTorch's cache only if free memory can't hold what the engine maps back."""
    import rollout_sleep.engine.memory as mem_mod

    emptied = []
    monkeypatch.setattr(mem_mod.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(mem_mod.torch.cuda, "mem_get_info", lambda: (10 * 2**30, 80 * 2**30))
    monkeypatch.setattr(mem_mod.torch.cuda, "empty_cache", lambda: emptied.append(1))
    assert mem_mod.release_cached_memory(8.5) is False and not emptied      # 10 GiB free >= 8.5 + 1 margin
    assert mem_mod.release_cached_memory(9.5) is True and len(emptied) == 1  # short by the margin
    assert mem_mod.release_cached_memory(None) is True and len(emptied) == 2  # need unknown: always


def test_kv_cache_bytes_for_matches_vllms_cache(engine):
    """vLLM turns the engine's KV-cache bytes into blocks; our per-token size must give the same token count."""
    from rollout_sleep.engine.memory import kv_cache_bytes_for

    cache = engine.llm.llm_engine.vllm_config.cache_config
    tokens = cache.num_gpu_blocks * cache.block_size
    assert kv_cache_bytes_for(engine.model_path, tokens, engine.dtype, cache.block_size) == 256 << 20
    assert kv_cache_bytes_for(engine.model_path, tokens + 1, engine.dtype, cache.block_size) > 256 << 20


def test_sleep_keeping_the_trainer_cache_suppresses_only_the_sleeps_empty_cache(monkeypatch):
    """Pure logic (no GPU here): inside the sleep, vLLM's ``empty_cache`` is a no-op; after it, the real one."""
    import rollout_sleep.engine.memory as mem_mod

    calls = []
    monkeypatch.setattr(mem_mod.torch.cuda, "empty_cache", lambda: calls.append("emptied"))
    with mem_mod.cache_kept():
        mem_mod.torch.cuda.empty_cache()
    assert calls == []
    mem_mod.torch.cuda.empty_cache()
    assert calls == ["emptied"]
    with pytest.raises(RuntimeError), mem_mod.cache_kept():
        raise RuntimeError("vLLM failed mid-sleep")
    mem_mod.torch.cuda.empty_cache()
    assert calls == ["emptied", "emptied"]


def test_keeping_the_trainer_cache_also_blocks_torch_accelerator_empty_cache(monkeypatch):
    """Pure logic (no GPU here): vLLM 0.32 empties the cache at wake through ``torch.accelerator``."""
    import rollout_sleep.engine.memory as mem_mod

    calls = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("cuda"))
    monkeypatch.setattr(torch.accelerator, "empty_cache", lambda: calls.append("accelerator"))
    with mem_mod.cache_kept():
        torch.cuda.empty_cache()
        torch.accelerator.empty_cache()
    assert calls == []
    torch.accelerator.empty_cache()
    assert calls == ["accelerator"]


def test_keep_trainer_cache_reports_what_happened(monkeypatch):
    """Pure logic (no GPU here): the report says whether PyTorch's cached free memory survived the call,
    whichever way vLLM released it (one it does not go through ``empty_cache`` for is caught too)."""
    import rollout_sleep.engine.memory as mem_mod
    from rollout_sleep.engine.phases import CycleReport

    mem = {"reserved": 10 << 30, "allocated": 6 << 30}
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda: mem["reserved"])
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda: mem["allocated"])
    monkeypatch.setattr(torch.accelerator, "empty_cache", lambda: mem.update(reserved=mem["allocated"]))
    kept = CycleReport("sleep", memory_kind="cuda_free")
    with mem_mod.keeping_cache(kept, True):
        torch.accelerator.empty_cache()  # vLLM 0.32's wake: blocked
    assert kept.trainer_cache_kept is True and mem["reserved"] == 10 << 30
    lost = CycleReport("wake", memory_kind="cuda_free")
    with mem_mod.keeping_cache(lost, True):
        mem["reserved"] = mem["allocated"]  # released some other way
    assert lost.trainer_cache_kept is False and lost.as_dict()["trainer_cache_kept"] is False
    off = CycleReport("sleep", memory_kind="cuda_free")
    with mem_mod.keeping_cache(off, False):
        pass
    assert off.trainer_cache_kept is None and "trainer_cache_kept" not in off.as_dict()


def test_a_wake_told_always_releases_the_cache_even_with_room(monkeypatch):
    """Pure logic (no GPU here: the free memory is faked): ``always`` empties PyTorch's cache where vLLM would
    fit beside it."""
    import rollout_sleep.engine.memory as mem_mod
    from rollout_sleep.engine.phases import CycleReport

    emptied = []
    monkeypatch.setattr(mem_mod.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(mem_mod.torch.cuda, "mem_get_info", lambda *a: (40 * 2**30, 80 * 2**30))
    monkeypatch.setattr(mem_mod.torch.cuda, "empty_cache", lambda: emptied.append(1))
    budget = mem_mod.WakeBudget()
    budget.need_gib = 10.0  # 40 GiB free: room enough
    for always in (False, True):
        report = CycleReport("wake", 2)
        report.memory_kind = "cuda_free"
        budget.before_wake(report, always=always)
        assert report.cache_released is always
    assert emptied == [1]


def test_a_wake_without_keep_trainer_cache_asks_to_release_the_cache_always(monkeypatch, engine):
    """``keep_trainer_cache=False``: the wake hands PyTorch's cached blocks back even where vLLM would fit beside
    them, so the rollout holds none of what the trainer freed (at level 0 nothing else empties the cache after
    training: the sleep that does runs before it); ``True``: only when vLLM would not fit."""
    import rollout_sleep.engine.memory as mem_mod

    asked = []

    class Recorded(mem_mod.WakeBudget):
        def before_wake(self, report, always=False):
            asked.append(always)
            return super().before_wake(report, always)

    monkeypatch.setattr(engine, "_wake_budget", Recorded())
    for keep in (True, False):
        monkeypatch.setattr(engine, "keep_trainer_cache", keep)
        engine.sleep(level=2)
        engine.wake_up(reload_checkpoint=True)
    assert asked == [False, True]

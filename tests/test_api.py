"""The public API: ``import rollout_sleep`` is light, every exported name resolves; the logger's set-up."""

import io
import json
import logging
import os
import subprocess
import sys
import warnings

import rollout_sleep
from rollout_sleep import log


def test_import_is_light_and_every_export_resolves():
    # A fresh interpreter: this one has torch, vLLM, ... loaded by other tests already.
    code = (
        "import json, sys, rollout_sleep; "
        "heavy = sorted(m for m in ('vllm', 'torch', 'transformers', 'wandb', 'trl', 'accelerate', 'datasets') "
        "if m in sys.modules); "
        "print(json.dumps(heavy))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []
    for name in rollout_sleep.__all__:
        assert getattr(rollout_sleep, name) is not None, name
    assert rollout_sleep.Engine.__module__.startswith("rollout_sleep.")
    try:
        rollout_sleep.NotAThing
    except AttributeError as err:
        assert "NotAThing" in str(err)
    else:
        raise AssertionError("an unknown name must raise AttributeError")


def test_logger_rank_zero_and_benign_filter(monkeypatch):
    # configure() changes process-wide state: put it all back for the tests that follow.
    saved = {name: (logging.getLogger(name).handlers[:], logging.getLogger(name).level,
                    logging.getLogger(name).propagate) for name in ("rollout_sleep", "vllm")}
    catch = warnings.catch_warnings()
    catch.__enter__()
    log.configure(verbose=True, stream=io.StringIO())  # undo an earlier test's configure(): its env vars included
    env_before = dict(os.environ)
    try:
        out = io.StringIO()
        monkeypatch.setenv("RANK", "0")
        configure_once = log.configure(verbose=False, stream=out)
        log.configure(verbose=False, stream=out)  # idempotent: still one handler
        assert len([h for h in configure_once.handlers if getattr(h, log._HANDLER_TAG, False)]) == 1
        logging.getLogger("rollout_sleep.engine.engine").info("load route: reload")
        logging.getLogger("rollout_sleep.engine.engine").debug("hidden unless verbose")
        vllm = logging.getLogger("vllm.v1.worker.cpu_worker")
        vllm.warning("sleep mode is not supported on CPU, ignore it.")  # benign: dropped
        vllm.info("an info line")  # below WARNING: dropped
        layerwise = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
        layerwise.warning("Gemma2Model: Failed to load weights")  # its only own tensor, a constant buffer: dropped
        layerwise.warning("QKVParallelLinear: Failed to load weights")  # not benign: shown
        lines = out.getvalue().splitlines()
        assert lines == ["rollout_sleep: load route: reload",
                         "vllm: warning: QKVParallelLinear: Failed to load weights"], lines

        assert os.environ.get("VLLM_CONFIGURE_LOGGING") == "0" or "VLLM_CONFIGURE_LOGGING" in env_before

        out = io.StringIO()
        monkeypatch.setenv("RANK", "1")
        log.configure(verbose=True, stream=out)  # the last call wins: vLLM is left as it configures itself
        assert not any(getattr(h, log._HANDLER_TAG, False) for h in logging.getLogger("vllm").handlers)
        assert os.environ.get("VLLM_CONFIGURE_LOGGING") == env_before.get("VLLM_CONFIGURE_LOGGING")
        logging.getLogger("rollout_sleep.weights.stream").info("rank 1 info: hidden")
        logging.getLogger("rollout_sleep.weights.stream").warning("fell back to the reload route")
        assert out.getvalue().splitlines() == ["rollout_sleep[rank 1]: warning: fell back to the reload route"]
    finally:
        catch.__exit__(None, None, None)
        for var in set(os.environ) - set(env_before):
            del os.environ[var]
        for name, (handlers, level, propagate) in saved.items():
            lg = logging.getLogger(name)
            lg.handlers[:] = handlers
            lg.setLevel(level)
            lg.propagate = propagate


def test_no_private_name_used_across_modules():
    # One home per concept, and each module's underscore names are its own: no module of the package imports
    # another's private name, nor reaches one through a module object (``feed._finite_probe``).
    import ast
    from pathlib import Path

    root = Path(rollout_sleep.__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text())
        ours = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("rollout_sleep")):
                for a in node.names:
                    if a.name.startswith("_") and not a.name.startswith("__"):
                        found.append(f"{path.relative_to(root)}:{node.lineno} imports {node.module}.{a.name}")
                    ours.add(a.asname or a.name)
            elif isinstance(node, ast.Import):
                ours.update(a.asname or a.name for a in node.names if a.name.startswith("rollout_sleep"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in ours \
                    and node.attr.startswith("_") and not node.attr.startswith("__"):
                found.append(f"{path.relative_to(root)}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert not found, found


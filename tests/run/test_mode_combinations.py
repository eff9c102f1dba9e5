"""Every combination of the engine's modes runs or is refused by ``load_config`` before anything is written or
started (``rollout_sleep.run.modes``). The combinations come from the schema (``mode_keys``: a new mode key or value is
enumerated by itself) times the device and the kind of model; accepted ones are built by the factory with every
mode reaching the engine, refused ones name their keys, and a refused run through the recipe's entry leaves its
output folder empty."""

from __future__ import annotations

import itertools
import json
import os
import random
import subprocess
import sys

import pytest

from helpers import ROOT, WORKERS
from rollout_sleep.run import factory
from rollout_sleep.run.config import ConfigError, load_config
from rollout_sleep.run.modes import DEVICES, RULES, refusals
from rollout_sleep.run.schema import RecipeConfig, mode_keys

MODES = mode_keys()
MODELS = ("size", "checkpoint", "config-only")  # model.path: a size built by the run, a folder with weights, without
# rules on keys that pick no engine mode (no enumerated combination breaks them): the key, and a config that does
OUTSIDE_MODES = {"train.kl_coef": ("cpu", ["model.lora.rank=16", "train.kl_coef=0.1"],
                                   "model.lora.rank=16 with train.kl_coef=0.1"),
                 "train.stochastic_rounding": ("cpu", ["train.stochastic_rounding=true"],
                                               "train.stochastic_rounding=true with model.dtype=float32")}


def outside_modes(rule) -> str | None:
    """The key of ``rule`` that picks no engine mode (``None``: all of its keys do)."""
    return next((k for k in rule.keys if k in OUTSIDE_MODES), None)


@pytest.fixture(scope="module")
def model_paths(ckpts, tmp_path_factory):
    from rollout_sleep.weights.checkpoints import make_config_dir

    return {"size": "tiny", "checkpoint": str(ckpts["tied0"]),
            "config-only": make_config_dir(tmp_path_factory.mktemp("config-only"), "tiny")}


def _set(cfg, key: str, value) -> None:
    *path, leaf = key.split(".")
    obj = cfg
    for part in path:
        obj = getattr(obj, part)
    setattr(obj, leaf, value)


def combinations(paths):
    """``(cfg, device, model kind, {key: value})`` for every combination of the schema's mode values."""
    for values in itertools.product(*MODES.values()):
        chosen = dict(zip(MODES, values))
        for device, model in itertools.product(DEVICES, MODELS):
            cfg = RecipeConfig()
            for key, value in chosen.items():
                _set(cfg, key, value)
            cfg.model.path = paths[model]
            yield cfg, device, model, chosen


def show(value) -> str:
    """A value as an override writes it."""
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def overrides(chosen: dict, path: str) -> list[str]:
    return [f"{k}={show(v)}" for k, v in chosen.items()] + [f"model.path={path}"]


def test_the_schema_marks_the_engine_modes():
    """The keys whose values pick how the engine runs, each with every value that stands for a mode."""
    assert MODES == {"model.dtype": ("float32", "bfloat16", "float16"), "model.share_weights": (None, True, False),
                     "model.lora.rank": (0, 16),
                     "engine.kv_cache": ("step", "gpu_share"), "engine.sleep_level": (1, 2),
                     "engine.load_method": ("auto", "reload", "load_weights", "direct"),
                     "engine.keep_trainer_cache": (True, False),
                     "engine.tensor_parallel_size": (1, 2)}


def test_every_combination_runs_or_is_refused_naming_its_keys(model_paths, monkeypatch):
    """Refused: every message names each key of its rule with the value given (and the device where it
    matters). Accepted: the factory builds the engine the config asks for and every engine-mode key reaches its
    constructor; the engine's own load-route check agrees on CPU."""
    from rollout_sleep.engine.loader import Loader
    from rollout_sleep.weights.spec import read_checkpoint_spec

    built: list[tuple[str, dict]] = []
    monkeypatch.setattr("rollout_sleep.engine.engine.Engine", lambda path, **kw: built.append(("Engine", kw)))
    spec = read_checkpoint_spec(model_paths["checkpoint"])
    fired, accepted, total = set(), {d: 0 for d in DEVICES}, 0
    runs = {(key, value): 0 for key, values in MODES.items() for value in values}
    for cfg, device, model, chosen in combinations(model_paths):
        total += 1
        messages = refusals(cfg, device)
        broken = [r for r in RULES if r.refused(cfg, device)]
        assert len(messages) == len(broken)
        for rule, message in zip(broken, messages):
            fired.add(rule)
            for key in rule.keys:
                named = f"on {device.upper()}" if key == "device" else f"{key}="
                assert named in message, (message, key)
                if key in chosen:
                    assert f"{key}={show(chosen[key])}" in message, message
            assert "Fix: " in message, message
        if messages:
            continue
        accepted[device] += 1
        for key, value in chosen.items():
            runs[(key, value)] += 1
        built.clear()
        # what the run starts the engine from: the size built as a checkpoint, or as a config alone where the
        # trainer views the base vLLM draws (a LoRA run on CUDA)
        shares_base = (bool(cfg.model.lora.rank) or cfg.model.share_weights is True) and device == "cuda"
        path = model_paths["config-only" if model == "config-only" or (model == "size" and shares_base)
                           else "checkpoint"]
        factory.build_engine(cfg, path, rank=1, kv_cache_bytes=64 << 20, device=device)
        (kind, kw), = built
        assert kind == "Engine"
        assert (kw["dtype"], kw["keep_trainer_cache"], kw["load_method"], kw["tensor_parallel_size"]) == \
            (cfg.model.dtype, cfg.engine.keep_trainer_cache, cfg.engine.load_method, cfg.engine.tensor_parallel_size)
        assert kw.get("enable_lora", False) == bool(cfg.model.lora.rank)
        assert (kw.get("load_format") == "dummy") == (path == model_paths["config-only"])
        assert kw.get("gpu_memory_utilization") == (cfg.engine.gpu_memory_utilization if device == "cuda" else None)
        assert kw["seed"] == cfg.train.seed + (1 if cfg.engine.tensor_parallel_size == 1 else 0)
        assert kw["kv_cache_bytes"] == 64 << 20
        if device == "cpu":  # what the engine itself would decide at its first load
            loader = Loader(model_path=model_paths["checkpoint"], spec=spec, tied=True, on_cuda=False,
                            sleep_mode=False, load_method=cfg.engine.load_method)
            assert loader.resolve_method(None, strict=True) == "reload"
        if cfg.model.lora.rank:  # the adapter goes into one in-process engine's slot (AdapterSync: TP 1)
            assert cfg.engine.tensor_parallel_size == 1
    assert total == len(DEVICES) * len(MODELS) * len(list(itertools.product(*MODES.values())))
    dead = [r.keys for r in RULES if r not in fired and not outside_modes(r)]
    assert not dead, f"rules no combination breaks: {dead}"
    assert all(accepted.values()) and all(runs.values()), [kv for kv, n in runs.items() if not n]


def test_load_config_applies_every_rule_and_accepts_what_runs(model_paths):
    """Through ``load_config`` itself (the recipe's first call): one combination per rule is refused with the
    rule's message among the problems; a sample of the accepted combinations loads."""
    firsts, ok = {}, []
    for cfg, device, model, chosen in combinations(model_paths):
        broken = [r for r in RULES if r.refused(cfg, device)]
        for rule in broken:
            firsts.setdefault(rule, (device, overrides(chosen, cfg.model.path), rule.message(cfg, device)))
        if not broken:
            ok.append((device, overrides(chosen, cfg.model.path)))
    for rule in RULES:
        if outside_modes(rule):
            firsts[rule] = OUTSIDE_MODES[outside_modes(rule)]
    assert set(firsts) == set(RULES)
    for rule, (device, args, message) in firsts.items():
        with pytest.raises(ConfigError) as err:
            load_config(None, args, device=device)
        assert any(p.startswith(message) for p in err.value.problems), (message, err.value.problems)
    for device, args in random.Random(0).sample(ok, 150):
        load_config(None, args, device=device)


def test_the_engines_measured_start_replaces_the_workspace(tmp_path):
    """The engine's measured start (weights, KV cache, workspace) replaces the plan's workspace estimate."""
    from rollout_sleep.run.memory_check import plan_run, with_engine_measured
    from rollout_sleep.run.memory_plan import GIB
    from rollout_sleep.weights.checkpoints import make_checkpoint

    path = make_checkpoint(tmp_path / "bf16", "tiny", seed=0, dtype="bfloat16")
    cfg = load_config(None, ["model.dtype=bfloat16"], device="cuda")
    one = plan_run(cfg, path, processes=1, shards=(1, 1, 1), longest_prompt=16, kv_bytes=256 << 20,
                   reward_bytes=0, base_shared=False)[0]
    r1 = one.phases["rollout"]
    measured = with_engine_measured(one, r1["engine_weights"] + r1["kv_cache"] + 2 * GIB)
    assert measured.phases["rollout"]["engine_workspace"] == 2 * GIB


def test_a_refused_run_writes_nothing(model_paths, tmp_path):
    """The recipe's entry on refused configs, each with an empty output folder: exit 2 with the keys named, and the
    folder still empty (nothing printed as starting, no ``model/``, ``run_config.json`` or ``memory_plan.json``)."""
    cases = [(["engine.load_method=direct"], False, "engine.load_method=direct on CPU"),
             ([f"model.path={model_paths['config-only']}"], False, "model.path="),
             (["engine.quantization=fp8"], False, "engine.quantization was removed"),
             (["model.lora.rank=16", "engine.tensor_parallel_size=2"], True,
              "model.lora.rank=16 with engine.tensor_parallel_size=2")]
    runs = []
    for i, (args, cuda, _) in enumerate(cases):
        out = tmp_path / f"run{i}"
        out.mkdir()
        runs.append({"args": ["--config", str(ROOT / "configs" / "tiny-cpu.yaml"), "wandb.mode=disabled",
                              f"output_dir={out}", *args], "cuda": cuda})
    proc = subprocess.run([sys.executable, str(WORKERS / "refused_run_worker.py"), json.dumps(runs)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"})
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")]
    assert line, proc.stdout[-3000:] + proc.stderr[-3000:]
    for i, (result, (args, _, message)) in enumerate(zip(json.loads(line[-1][len("RESULTS "):]), cases)):
        assert result["code"] == 2 and message in result["stderr"], (args, result)
        assert "starting the vLLM engine" not in result["stdout"], (args, result)
        assert list((tmp_path / f"run{i}").iterdir()) == [], (args, sorted((tmp_path / f"run{i}").rglob("*")))

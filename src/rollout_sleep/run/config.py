"""Recipe configuration: YAML files and ``section.key=value`` overrides onto the dataclasses of
:mod:`rollout_sleep.run.schema` (every key, its default and meaning).

:func:`load_config` checks everything that can be known before the run starts (keys, types of every
field including optional ones, choices, ranges, reward names, the dataset's path) and raises one
:class:`ConfigError` listing every problem, each with what is allowed.

>>> cfg = load_config(None, ["train.steps=3", "engine.sleep_level=1"])
>>> cfg.train.steps, cfg.engine.sleep_level
(3, 1)
>>> load_config(None, ["train.stepz=3"])
Traceback (most recent call last):
...
rollout_sleep.run.config.ConfigError: unknown key 'train.stepz'; train has: ...
>>> load_config(None, ["train.steps=-1", "model.dtype=float64x"])
Traceback (most recent call last):
...
rollout_sleep.run.config.ConfigError: 2 problems in the config:
  - model.dtype must be one of float32, bfloat16, float16, got 'float64x'
  - train.steps must be >= 1, got -1
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from .modes import REPLACES_PARAMETERS
from .schema import DTYPES, KV_CACHE_SIZING, OFFLOAD_MODES, EngineConfig, RecipeConfig

MIXED_PRECISION = ("no", "bf16", "fp16")
WANDB_MODES = ("offline", "online", "disabled")
MEMORY_PLAN_MODES = ("refuse", "warn", "off")
DATASET_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


class ConfigError(ValueError):
    """A malformed config: unknown key, wrong type, value out of range, unreadable file. ``problems``
    lists each one."""

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            msg = self.problems[0]
        else:
            msg = f"{len(self.problems)} problems in the config:\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(msg)


# ---------------------------------------------------------------------------------------------- types
def _describe(tp: Any) -> str:
    args = typing.get_args(tp)
    if type(None) in args:
        return " or ".join(_describe(a) for a in args if a is not type(None)) + " or null"
    if _union(tp):
        return " or ".join(_describe(a) for a in args)
    if typing.get_origin(tp) is list:
        return f"a list of {_describe(args[0]).split(' ', 1)[1]}s" if args else "a list"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _union(tp: Any) -> bool:
    """``tp`` is a union of several types besides ``None`` (``bool | str``)."""
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and \
        len([a for a in typing.get_args(tp) if a is not type(None)]) > 1


def _convert(value: Any, tp: Any) -> Any:
    """``value`` as type ``tp`` (bool/int/float/str, ``X | None``, ``list[X]``); raises TypeError."""
    args = typing.get_args(tp)
    if type(None) in args:
        if value is None:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(value, inner)
    if _union(tp):  # bool | str (train.offload_optimizer): the first type that takes the value
        for inner in args:
            try:
                return _convert(value, inner)
            except TypeError:
                pass
        raise TypeError
    if typing.get_origin(tp) is list:
        if not isinstance(value, list):
            raise TypeError
        return [_convert(v, args[0]) for v in value] if args else value
    if tp in (int, float) and isinstance(value, str):
        try:  # YAML reads 1e9 as a string
            value = float(value)
        except ValueError:
            raise TypeError from None
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise TypeError


def _quoted(value: Any) -> str:
    """A note for text that YAML would read as true/false unquoted (``compile: "true"`` in a file: quoted, it is
    a string), so that "must be true or false, got 'true'" says why and what to write; empty otherwise."""
    if isinstance(value, str) and isinstance(_parse(value), bool):
        return f" (quoted text: write {value} without quotes)"
    return ""


def _parse(text: str) -> Any:
    """An override's value as YAML: "3" -> 3, "true" -> True, "[a, b]" -> list, "null" -> None."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, but a key given twice in one mapping is an error (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _keys_set(cfg: RecipeConfig, key: str, value: Any) -> list[str]:
    """The keys an override sets: its own, or each key of the mapping a section is given.

    >>> _keys_set(RecipeConfig(), "model", "{dtype: float32, lora: {rank: 8}}")
    ['model.dtype', 'model.lora.rank']
    """
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part, None) if dataclasses.is_dataclass(obj) else None
    value = _parse(value) if isinstance(value, str) and dataclasses.is_dataclass(obj) else value
    if not (dataclasses.is_dataclass(obj) and isinstance(value, dict)):
        return [key]
    return [leaf for k, v in value.items() for leaf in _keys_set(cfg, f"{key}.{k}", v)]


# Keys that were removed, and why (a config that still sets one is refused naming it, as an unknown key is)
REMOVED_KEYS = {
    "engine.quantization": "engine.quantization was removed: FP8 rollouts from a bf16 trainer measured no faster on "
                           "an H100, took more memory and had ~97% of their samples dropped by the sampling "
                           "correction (docs/benchmarks.md#fp8-rollouts-from-a-bf16-trainer-measured-then-removed). "
                           "Drop the key (the engine computes in model.dtype)",
}


def _set(obj: Any, dotted: str, value: Any, problems: list[str], from_text: bool = False) -> None:
    """Set ``dotted`` in the config ``obj`` (a mapping for a section sets each of its keys)."""
    if dotted in REMOVED_KEYS:
        problems.append(REMOVED_KEYS[dotted])
        return
    root = obj
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(obj)]
        if part not in names:
            where = ".".join(parts[:i]) or "the config"
            problems.append(f"unknown key {dotted!r}; {where} has: {', '.join(names)}")
            return
        if i < len(parts) - 1:
            obj = getattr(obj, part)
            if not dataclasses.is_dataclass(obj):
                problems.append(f"{'.'.join(parts[:i + 1])} is not a section (in {dotted!r})")
                return
    current = getattr(obj, part)
    if dataclasses.is_dataclass(current):
        if from_text:
            value = _parse(value)
        if not isinstance(value, dict):
            problems.append(f"{dotted} is a section; give it a mapping, got {value!r}")
            return
        for k, v in value.items():  # from the root, so that messages name the whole key (train.steps)
            _set(root, f"{dotted}.{k}", v, problems)
        return
    tp = typing.get_type_hints(type(obj))[part]
    if from_text:  # text for a string field stays text ("null" for an optional one is None)
        takes_str = tp is str or (typing.get_origin(tp) is not list and str in typing.get_args(tp)
                                  and not _union(tp))  # bool | str: YAML's reading (true, false, stream)
        value = (None if value in ("null", "~") and tp is not str else value) if takes_str else _parse(value)
    try:
        setattr(obj, part, _convert(value, tp))
    except TypeError:
        if _union(tp):  # bool | str: the field's own value check names its choices
            setattr(obj, part, value)
        else:
            problems.append(f"{dotted} must be {_describe(tp)}, got {value!r}{_quoted(value)}")


# ------------------------------------------------------------------------------------- value checks
def _check_values(cfg: RecipeConfig, device: str) -> list[str]:
    """Choices and ranges of every field."""
    from rollout_sleep.engine.loader import LOAD_METHODS
    from rollout_sleep.engine.state import check_level
    from rollout_sleep.grpo.loss import GRPOLoss
    from rollout_sleep.weights.checkpoints import SHAPES
    from .optim import OPTIMIZERS, missing_package, run_stochastic_rounding

    out: list[str] = []

    def choice(key: str, value: Any, allowed: tuple) -> None:
        if value not in allowed:
            out.append(f"{key} must be one of {', '.join('null' if a is None else str(a) for a in allowed)}, "
                       f"got {value!r}")

    def at_least(key: str, value: Any, low: float, optional: bool = False) -> None:
        if value is None and optional:
            return
        if not math.isfinite(value) or value < low:
            out.append(f"{key} must be >= {low}, got {value!r}")

    m, e, d, t, w = cfg.model, cfg.engine, cfg.data, cfg.train, cfg.watchdog
    if m.path not in SHAPES and not Path(m.path).expanduser().joinpath("config.json").is_file():
        given = Path(m.path).expanduser()
        what = ("a file, not a folder: give the folder holding it" if given.is_file() else
                "a folder without a config.json" if given.is_dir() and m.path else "no such folder")
        out.append(f"model.path {m.path!r} is neither a size ({', '.join(SHAPES)}) nor a local checkpoint "
                   f"folder ({what}): vLLM and the trainer load the model from a local folder. A hub model: "
                   "download it first (huggingface-cli download org/name --local-dir DIR) and give model.path=DIR")
    if m.tie_word_embeddings is not None and m.path not in SHAPES:  # a checkpoint's config.json decides
        out.append(f"model.tie_word_embeddings={str(m.tie_word_embeddings).lower()} applies only to a size this "
                   f"project builds (model.path one of {', '.join(SHAPES)}); model.path {m.path!r} is a checkpoint, "
                   f"tied or not as its config.json says{_tied_note(m.path)}. Drop model.tie_word_embeddings (or set "
                   f"it to null), or save a checkpoint tied the way you want")
    choice("model.dtype", m.dtype, DTYPES)
    at_least("model.seed", m.seed, 0)
    out += _check_lora(cfg)
    if not (0 < e.gpu_memory_utilization <= 1):
        out.append(f"engine.gpu_memory_utilization must be in (0, 1], got {e.gpu_memory_utilization!r}")
    choice("engine.kv_cache", e.kv_cache, KV_CACHE_SIZING)
    at_least("engine.kv_cache_bytes", e.kv_cache_bytes, 1, optional=True)
    at_least("engine.kv_cache_margin", e.kv_cache_margin, 0)
    if isinstance(e.kv_cache_margin, (int, float)) and e.kv_cache_margin > 10:
        out.append(f"engine.kv_cache_margin must be <= 10 (the share added to one step's KV cache), got "
                   f"{e.kv_cache_margin!r}: for a cache of a given size set engine.kv_cache_bytes")
    if e.kv_cache_margin != EngineConfig.kv_cache_margin and (e.kv_cache != "step" or e.kv_cache_bytes is not None):
        sized_by = "engine.kv_cache_bytes" if e.kv_cache_bytes is not None else f"engine.kv_cache={e.kv_cache}"
        out.append(f"engine.kv_cache_margin={e.kv_cache_margin} (in the config file or an override) sizes the "
                   f"step-sized KV cache only, and {sized_by} sizes this one: drop engine.kv_cache_margin, or use "
                   "engine.kv_cache=step without engine.kv_cache_bytes")
    at_least("engine.max_model_len", e.max_model_len, 1, optional=True)
    try:
        check_level(e.sleep_level, what="engine.sleep_level")
    except ValueError as err:
        out.append(str(err))
    choice("engine.load_method", e.load_method, LOAD_METHODS)
    at_least("engine.verify_every", e.verify_every, 0)
    at_least("engine.tensor_parallel_size", e.tensor_parallel_size, 1)
    if d.dataset != "synthetic":
        path = Path(d.dataset).expanduser()
        if not path.exists():
            out.append(f"data.dataset {d.dataset!r} not found (use 'synthetic' or a local folder or file)")
        elif path.is_file() and path.suffix.lower() not in DATASET_SUFFIXES:
            out.append(f"data.dataset {path.name!r} has an unsupported suffix; use one of "
                       f"{', '.join(DATASET_SUFFIXES)} (or a folder load_dataset reads)")
    at_least("data.num_prompts", d.num_prompts, 1, optional=True)
    for key in ("steps", "prompts_per_step"):
        at_least(f"train.{key}", getattr(t, key), 1)
    out += GRPOLoss.config_problems(cfg)  # the loss's keys (generations, loss, clip_eps, kl_coef, sampling_*, ...)
    if not (math.isfinite(t.lr) and t.lr > 0):
        out.append(f"train.lr must be > 0, got {t.lr!r}")
    at_least("train.weight_decay", t.weight_decay, 0)
    choice("train.mixed_precision", t.mixed_precision, MIXED_PRECISION)
    choice("train.optimizer", t.optimizer, OPTIMIZERS)
    if t.optimizer in OPTIMIZERS:
        # with one copy of the weights (one process assumed here; the recipe checks again at launch) null rounds
        # stochastically: torchao's optimizers, not bitsandbytes'
        from .one_copy import before_engine

        rounding = run_stochastic_rounding(cfg, before_engine(cfg, device, processes=1).on)
        if missing_package(t.optimizer, rounding):
            out.append(missing_package(t.optimizer, rounding))
    if t.expandable_segments and device == "cuda" and not cfg.model.lora.rank:  # on CPU: nothing to change
        from .one_copy import before_engine

        decision = before_engine(cfg, device, processes=1)
        if not decision.on:
            out.append(f"train.expandable_segments=true needs an engine that sleeps at level 0 (one copy of the "
                       f"weights, or model.lora), and this run takes two copies ({decision.why}): with two copies "
                       "vLLM's wake allocates its weights in its sleep pool, which expandable segments break: set "
                       "train.expandable_segments=false")
    if not any(t.offload_optimizer is m or (isinstance(m, str) and t.offload_optimizer == m) for m in OFFLOAD_MODES):
        out.append(f"train.offload_optimizer must be one of false, true, stream, got {t.offload_optimizer!r}"
                   f"{_quoted(t.offload_optimizer)}")
    choice("train.memory_plan", t.memory_plan, MEMORY_PLAN_MODES)
    at_least("train.update_check_every", t.update_check_every, 0)
    if t.memory_budget_gib is not None and not (math.isfinite(t.memory_budget_gib) and t.memory_budget_gib > 0):
        out.append(f"train.memory_budget_gib must be > 0 (or null: the free GPU memory), got {t.memory_budget_gib!r}")
    at_least("train.memory_headroom_gib", t.memory_headroom_gib, 0)
    choice("wandb.mode", cfg.wandb.mode, WANDB_MODES)
    bad = sorted(set(str(cfg.wandb.project)) & set("/\\#?%:"))
    if cfg.wandb.mode != "disabled" and (bad or not str(cfg.wandb.project).strip() or len(str(cfg.wandb.project)) > 128):
        out.append(f"wandb.project must be a W&B project name (1-128 characters, none of / \\ # ? % :), got "
                   f"{cfg.wandb.project!r}" + (": the entity (team) is not part of it; set it with WANDB_ENTITY"
                                               if "/" in bad else ""))
    if cfg.wandb.mode != "disabled" and Path(cfg.output_dir, "wandb").expanduser().is_file():
        out.append(f"{Path(cfg.output_dir, 'wandb')} is a file: W&B writes its run there as a folder; move the file")
    for f in dataclasses.fields(w):
        if f.name.endswith("_s"):
            at_least(f"watchdog.{f.name}", getattr(w, f.name), 0)
    at_least("save_every", cfg.save_every, 0)
    if cfg.overwrite and cfg.resume:
        out.append("overwrite=true deletes the earlier run in output_dir, but resume=true (the default) would "
                   "continue it: pass resume=false with overwrite=true to start over")
    if not cfg.output_dir.strip():
        out.append("output_dir must not be empty")
    elif Path(cfg.output_dir).expanduser().exists() and not Path(cfg.output_dir).expanduser().is_dir():
        out.append(f"output_dir {cfg.output_dir!r} is a file, not a folder: give a new or existing folder")
    if cfg.reward_weights is not None and not all(math.isfinite(x) for x in cfg.reward_weights):
        out.append(f"reward_weights must be finite numbers, got {cfg.reward_weights!r}: a NaN weight would zero "
                   "every reward it scales (NaN rewards are skipped), an infinite one stops the first step")
    return out


def _tied_note(path: str) -> str:
    """`` (tie_word_embeddings: true)``, as the checkpoint's config.json at ``path`` says, or nothing."""
    import json

    try:
        raw = json.loads((Path(path).expanduser() / "config.json").read_text())
    except (OSError, ValueError):
        return ""
    tied = (raw.get("text_config") or raw).get("tie_word_embeddings", raw.get("tie_word_embeddings"))
    return f" (tie_word_embeddings: {str(tied).lower()})" if isinstance(tied, bool) else ""


def _check_lora(cfg: RecipeConfig) -> list[str]:
    """``model.lora``: a rank vLLM can serve, a positive alpha, targets (what LoRA does not combine with:
    :mod:`rollout_sleep.run.modes`).

    >>> _check_lora(load_config(None, ["model.lora.rank=16"]))
    []
    >>> from rollout_sleep.run.schema import ModelConfig, ModelLoraConfig
    >>> _check_lora(RecipeConfig(model=ModelConfig(lora=ModelLoraConfig(rank=1024, alpha=-1.0, targets=[]))))
    ["model.lora.rank must be between 0 (off) and 512 (vLLM's largest max_lora_rank), got 1024", 'model.lora.alpha must be > 0, got -1.0', 'model.lora.targets must name at least one module (or all-linear)']
    """
    from rollout_sleep.lora.adapter import VLLM_LORA_RANKS

    lora, out = cfg.model.lora, []
    if not 0 <= lora.rank <= VLLM_LORA_RANKS[-1]:
        out.append(f"model.lora.rank must be between 0 (off) and {VLLM_LORA_RANKS[-1]} (vLLM's largest "
                   f"max_lora_rank), got {lora.rank}")
    if lora.alpha is not None and not (math.isfinite(lora.alpha) and lora.alpha > 0):
        out.append(f"model.lora.alpha must be > 0, got {lora.alpha!r}")
    if not lora.targets:
        out.append("model.lora.targets must name at least one module (or all-linear)")
    targets = [lora.targets] if isinstance(lora.targets, str) else list(lora.targets)
    embeddings = [t for t in targets if "embed" in t or t == "wte"]
    if embeddings:  # measured on CPU: the rollouts' log-probs drift off the trainer's from step 2, verify passing
        out.append(f"model.lora.targets: {embeddings} adapt the embedding, which this LoRA path does not support: "
                   "vLLM's embedding adapter computes other log-probs than PEFT's trainer after the first update, "
                   "and verify (which compares the adapter's tensors) cannot see it. Target the linear layers "
                   "(all-linear, or names such as q_proj)")
    return out


def check_processes(cfg: RecipeConfig, processes: int, distributed_type: str = "NO",
                    fsdp_version: int | None = None) -> list[str]:
    """Problems of the config with ``processes`` ranks and accelerate's ``distributed_type`` (and, under FSDP,
    its ``fsdp_version``), known once the launcher started them: the tensor-parallel size, prompts that do not
    split evenly (every rank must train equal shares, or the reward gathers would wait forever), one copy of the
    weights where the launch cannot keep it or the optimizer's state cannot be streamed, and ``train.compile``
    where the launch wraps the model in a way its compiled blocks cannot run under.

    >>> check_processes(RecipeConfig(), 3)
    ['train.prompts_per_step (8) must be a multiple of the number of processes (3): each rank rolls out and trains an equal share']
    """
    out = []
    tp = cfg.engine.tensor_parallel_size
    if tp not in (1, processes):
        out.append(f"engine.tensor_parallel_size must be 1 (an engine per rank) or the number of processes "
                   f"({processes}, one engine across ranks), got {tp}")
    if cfg.train.prompts_per_step % processes:
        out.append(f"train.prompts_per_step ({cfg.train.prompts_per_step}) must be a multiple of the number of "
                   f"processes ({processes}): each rank rolls out and trains an equal share")
    if cfg.model.share_weights is True and processes > 1:
        out.append(f"model.share_weights=true needs one process (the trainer views one engine's weights; with "
                   f"{processes} DDP keeps a copy per rank, FSDP and ZeRO-3 shard the weights their own way): "
                   "launch one process, or set model.share_weights=null")
    elif cfg.model.share_weights is True and distributed_type in REPLACES_PARAMETERS:
        out.append(f"model.share_weights=true with accelerate's {distributed_type}: "
                   f"{REPLACES_PARAMETERS[distributed_type]}, so the trainer's parameters are no longer views of "
                   "vLLM's weights: launch without it (plain accelerate launch, or python), or set "
                   "model.share_weights=null")
    if cfg.train.expandable_segments and not cfg.model.lora.rank and processes > 1:
        out.append(f"train.expandable_segments=true needs an engine that sleeps at level 0, and with {processes} "
                   "processes the run takes two copies of the weights (one copy needs one process): launch one "
                   "process, or set train.expandable_segments=false")
    elif cfg.train.expandable_segments and not cfg.model.lora.rank and distributed_type in REPLACES_PARAMETERS:
        out.append(f"train.expandable_segments=true needs an engine that sleeps at level 0, and under accelerate's "
                   f"{distributed_type} the run takes two copies of the weights "
                   f"({REPLACES_PARAMETERS[distributed_type]}): launch without it, or set "
                   "train.expandable_segments=false")
    if cfg.train.compile:
        from .compiled import launch_problem

        problem = launch_problem(distributed_type, fsdp_version)
        if problem:
            out.append(problem)
    if cfg.train.offload_optimizer == "stream" and distributed_type in ("FSDP", "DEEPSPEED"):
        out.append(f"train.offload_optimizer=stream with accelerate's {distributed_type}: the streamed step moves "
                   "a plain optimizer's state one parameter at a time, and "
                   f"{REPLACES_PARAMETERS[distributed_type]}: use its own CPU offload (FSDP's fsdp_offload_params, "
                   "DeepSpeed's zero_optimization.offload_optimizer.device=cpu) with train.offload_optimizer=false")
    elif cfg.train.step_per_tensor and distributed_type in ("FSDP", "DEEPSPEED"):
        out.append(f"train.step_per_tensor=true with accelerate's {distributed_type}: the per-tensor step steps a "
                   f"plain optimizer one parameter at a time, and {REPLACES_PARAMETERS[distributed_type]}: set "
                   "train.step_per_tensor=false")
    return out


def validate_rewards(names: list[str], columns: list[str] | None = None,
                     weights: list[float] | None = None) -> list[str]:
    """Problems with the rewards a config names (unknown names, import paths that do not resolve, bad
    signatures, weights that do not match) and, given the dataset's ``columns``, the columns they need that it
    lacks. Reward models are only checked, not loaded. A check: the resolved rewards are dropped (the recipe
    resolves its own once, and checks the dataset's rows against them: ``check_row_values``).

    >>> for problem in validate_rewards(["arithmetic_exact"], columns=["prompt"]):
    ...     print(problem)
    reward 'arithmetic_exact' needs dataset column(s) ['answer']; the dataset has ['prompt']
    """
    from rollout_sleep.grpo.errors import RewardError
    from rollout_sleep.grpo.rewards import check_columns, resolve_rewards

    try:
        rewards = resolve_rewards(list(names), weights, load_models=False)
        if columns is not None:
            check_columns(rewards, list(columns))
    except RewardError as err:
        return [str(err)]
    return []


def _from_folder(spec: str, folder: Path, must_exist: bool = False) -> str:
    """``spec`` read relative to ``folder`` when it is a relative local path (``must_exist``: only if it exists
    there); anything else (absolute, ``~``, a name) as it is."""
    if not spec or spec.startswith("~") or Path(spec).is_absolute():
        return spec
    resolved = (folder / spec).resolve()
    return str(resolved) if resolved.exists() or not must_exist else spec


def resolve_yaml_paths(cfg: RecipeConfig, folder: Path) -> dict[str, str]:
    """Read the input paths a YAML config gave relative to its own ``folder`` (so a config runs from any working
    directory): ``data.dataset`` (but ``synthetic``), reward files (``path/x.py:fn``) and reward-model folders,
    and ``model.path`` where it names a folder there (else it stays as written: a size, or refused).
    ``output_dir`` stays relative to the working directory, as the run's output. Returns ``{resolved: as written}``.

    >>> from rollout_sleep.run.schema import DataConfig
    >>> cfg = RecipeConfig(data=DataConfig(dataset="../d.jsonl"), rewards=["digits_format", "r/x.py:f", "pkg.m:f"])
    >>> moved = resolve_yaml_paths(cfg, Path("/proj/configs"))
    >>> cfg.data.dataset, cfg.rewards
    ('/proj/d.jsonl', ['digits_format', '/proj/configs/r/x.py:f', 'pkg.m:f'])
    """
    from rollout_sleep.grpo.rewards import REWARDS
    from rollout_sleep.weights.checkpoints import SHAPES

    moved: dict[str, str] = {}

    def keep(written: str, resolved: str) -> str:
        if resolved != written:
            moved[resolved.split(":")[0]] = written.split(":")[0]
        return resolved

    if cfg.data.dataset != "synthetic":
        cfg.data.dataset = keep(cfg.data.dataset, _from_folder(cfg.data.dataset, folder))
    rewards = []
    for spec in cfg.rewards:
        if not isinstance(spec, str) or spec in REWARDS:
            rewards.append(spec)
            continue
        target, colon, attr = spec.rpartition(":")
        if colon and (target.endswith(".py") or "/" in target):  # a file reward; 'pkg.module:fn' is imported
            rewards.append(keep(spec, f"{_from_folder(target, folder)}:{attr}"))
        elif not colon:  # a reward-model folder ('x/y', or a bare name that exists there)
            rewards.append(keep(spec, _from_folder(spec, folder, must_exist="/" not in spec)))
        else:
            rewards.append(spec)
    cfg.rewards = rewards
    if cfg.model.path not in SHAPES:
        explicit = cfg.model.path.startswith(("./", "../"))
        cfg.model.path = keep(cfg.model.path, _from_folder(cfg.model.path, folder, must_exist=not explicit))
    return moved


def expand_home(cfg: RecipeConfig) -> None:
    """``~`` in the input paths (``data.dataset``, ``model.path``, reward files ``~/x.py:fn`` and reward-model
    folders) expanded to the home folder, wherever they were given, so every reader of the config sees the path
    itself (a model path ``~/ckpt`` would otherwise be taken for a hub id).

    >>> from rollout_sleep.run.schema import DataConfig
    >>> cfg = RecipeConfig(data=DataConfig(dataset="~/d.jsonl"), rewards=["~/r.py:f", "~/rm", "digits_format"])
    >>> expand_home(cfg)
    >>> [p.startswith("~") for p in (cfg.data.dataset, *cfg.rewards)]
    [False, False, False, False]
    """
    def expand(path: str) -> str:
        return str(Path(path).expanduser()) if isinstance(path, str) and path.startswith("~") else path

    cfg.data.dataset = expand(cfg.data.dataset)
    cfg.model.path = expand(cfg.model.path)
    cfg.rewards = [expand(spec) for spec in cfg.rewards]  # 'file.py:fn' and folders alike: ':' stays in the name


def with_input_paths_from(config: dict, folder: Path) -> dict:
    """A copy of the config dict ``config`` with its relative input paths (``data.dataset``, reward files and
    folders, ``model.path`` folders) read from ``folder``, as :func:`load_config` records them now. A run saved
    before paths were recorded absolute kept command-line paths as written; a resume compares those read from
    its working directory (their old reading).

    >>> with_input_paths_from({"data": {"dataset": "d.jsonl"}, "model": {"path": "tiny"}, "rewards": ["f.py:g"]},
    ...                       Path("/proj"))
    {'data': {'dataset': '/proj/d.jsonl'}, 'model': {'path': 'tiny'}, 'rewards': ['/proj/f.py:g']}
    """
    import copy

    out = copy.deepcopy(config)
    cfg = RecipeConfig()
    data, model = out.get("data"), out.get("model")
    if isinstance(data, dict) and isinstance(data.get("dataset"), str):
        cfg.data.dataset = data["dataset"]
    if isinstance(model, dict) and isinstance(model.get("path"), str):
        cfg.model.path = model["path"]
    rewards = out.get("rewards")
    cfg.rewards = list(rewards) if isinstance(rewards, list) else []
    resolve_yaml_paths(cfg, folder)
    if isinstance(data, dict) and isinstance(data.get("dataset"), str):
        data["dataset"] = cfg.data.dataset
    if isinstance(model, dict) and isinstance(model.get("path"), str):
        model["path"] = cfg.model.path
    if isinstance(rewards, list):
        out["rewards"] = cfg.rewards
    return out


def load_config(path: str | Path | None, overrides: list[str] = (), *, device: str | None = None) -> RecipeConfig:
    """Defaults, then the YAML file (if any), then ``key=value`` overrides, in that order; then every check,
    the combinations of engine modes this ``device`` (``"cuda"`` / ``"cpu"``; default: this machine's) cannot
    run included (:mod:`rollout_sleep.run.modes`). Relative input paths in the YAML are read from the YAML's
    folder (:func:`resolve_yaml_paths`); those given as overrides, from the working directory; both are kept as
    absolute paths (what a resume compares). Raises
    :class:`ConfigError` listing every problem found."""
    cfg = RecipeConfig()
    problems: list[str] = []
    moved: dict[str, str] = {}
    if path is not None:
        try:
            data = yaml.load(Path(path).read_text(), Loader=_UniqueKeyLoader) or {}
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"cannot read config {str(path)!r}: {err}") from err
        if not isinstance(data, dict):
            raise ConfigError(f"config {str(path)!r} must be a mapping of sections, got {type(data).__name__}")
        for key, value in data.items():
            _set(cfg, str(key), value, problems)
        moved = resolve_yaml_paths(cfg, Path(path).resolve().parent)
    given: dict[str, str] = {}  # each key the overrides set, with the override that set it
    for item in overrides:
        if "=" not in item:
            problems.append(f"override {item!r} must look like section.key=value")
            continue
        key, value = item.split("=", 1)
        for leaf in _keys_set(cfg, key.strip(), value):  # a key given twice: refused, as in the YAML file (the
            if leaf in given and given[leaf].strip() != item.strip():  # same override repeated is no ambiguity)
                problems.append(f"{leaf} is given twice on the command line ({given[leaf]}, then {item}): give it "
                                f"once")
            given.setdefault(leaf, item)
        _set(cfg, key.strip(), value, problems, from_text=True)
    expand_home(cfg)
    # a field with a wrong type kept its default, so the value checks below still apply to the rest.
    # The rewards are checked here (resolved, then dropped) so that a bad name is listed with every other problem
    # of the config, before a process group or the data exist; the recipe resolves them once for the run, with
    # the dataset's columns (resolving again is cheap: modules stay imported, reward models are not loaded).
    from .modes import detect_device, refusals

    device = device or detect_device()
    problems += _check_values(cfg, device) + refusals(cfg, device) + \
        validate_rewards(cfg.rewards, weights=cfg.reward_weights)
    if problems:
        raise ConfigError([_say_where(p, moved, Path(path)) for p in problems] if moved else problems)
    # command-line paths (and YAML ones not found beside it) are read from the working directory (as checked
    # above, and named as written): recorded absolute, so that a resume from another working directory compares
    # the files, not the words
    resolve_yaml_paths(cfg, Path.cwd())
    return cfg


def _say_where(problem: str, moved: dict[str, str], config: Path) -> str:
    """A problem about a path the YAML gave relative to its folder, with that said (and the working directory's
    file of that name, if there is one: the old reading)."""
    for resolved, written in moved.items():
        if resolved in problem:
            problem += (f" ({written!r} in {str(config)!r}: relative paths in a config file are read from its folder, "
                        f"{str(config.resolve().parent)!r}")
            if Path(written).expanduser().exists():
                problem += (f"; {written!r} exists in the working directory: write it relative to the config's "
                            f"folder, or absolute, or pass it on the command line")
            problem += ")"
    return problem

"""Rewards: built-in functions, user functions by import path (TRL's signature or ours), reward models.

A config names each reward (``rewards: [...]``, optionally ``reward_weights: [...]``, TRL's name) as one of:

- a built-in name: ``digits_format``, ``arithmetic_exact``, ``length_target`` (or one added with :func:`register`);
- an import path ``package.module:function`` or a file ``path/to/rewards.py:function`` (relative to the
  working directory here; a YAML config's relative paths are first read from its folder, see
  :func:`rollout_sleep.run.config.resolve_yaml_paths`), so a YAML-driven ``accelerate launch`` reaches user code;
- a local sequence-classification checkpoint directory: a reward model (see :mod:`rollout_sleep.grpo.reward_model`).

Two function signatures are accepted:

- TRL's, batched: ``fn(prompts, completions, **kwargs) -> list[float | None]``; ``kwargs`` holds every dataset
  column by name (one value per completion), ``completion_ids`` and ``trainer_state``, as GRPOTrainer passes them;
- ours, one completion at a time: ``fn(completion: str, example: dict) -> float``.

``None`` or NaN means "this reward does not apply here" (TRL): the weighted sum skips it (``nansum``), each
reward's logged mean and std cover the completions it scored (``nanmean``), and a completion for which every
reward is ``None``/NaN is unscorable: NaN, no advantage, out of its group's baseline (TRL 1.16 likewise), and
reported (:func:`unscorable_report`). A NaN (rather than ``None``) is said once per reward, since it is often a
bug. An infinite reward is an error.

>>> arithmetic_exact(" 42", {"answer": "42"})
1.0
>>> arithmetic_exact("41", {"answer": "42"})
0.0
>>> digits_format("12a4", {})
0.75
>>> round(length_target("x" * 8, {}, target=4), 2)
0.0
>>> [r.name for r in resolve_rewards(["digits_format"])]
['digits_format']
>>> resolve_rewards(["no_such_reward"])
Traceback (most recent call last):
...
rollout_sleep.grpo.errors.RewardError: unknown reward 'no_such_reward': ...
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import math
import numbers
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .code_digest import code_digest
from .errors import RewardError

logger = logging.getLogger(__name__)

RewardFn = Callable[..., float]
REWARDS: dict[str, RewardFn] = {}

# Keyword arguments TRL's GRPOTrainer passes besides the dataset columns.
TRL_ARGS = ("prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric", "environments")
NOT_PASSED = ("prompt", "completion")  # dataset columns a TRL-style reward never receives (TRL 1.16 drops them)


def register(fn: RewardFn) -> RewardFn:
    """Make a reward selectable by its function name."""
    REWARDS[fn.__name__] = fn
    return fn


@register
def arithmetic_exact(completion: str, example: dict) -> float:
    """1.0 when the first integer in the completion equals ``example["answer"]``."""
    m = re.search(r"-?\d+", completion)
    return float(m is not None and m.group(0) == str(example["answer"]).strip())


arithmetic_exact.columns = ("answer",)  # a per-example reward names the dataset columns it reads here


@register
def digits_format(completion: str, example: dict) -> float:
    """Share of the completion's non-space characters that are digits (a dense format reward)."""
    chars = [c for c in completion if not c.isspace()]
    return sum(c.isdigit() for c in chars) / len(chars) if chars else 0.0


@register
def length_target(completion: str, example: dict, target: int = 8) -> float:
    """1.0 at ``target`` characters, falling linearly to 0 at 0 or 2×target characters."""
    return max(0.0, 1.0 - abs(len(completion) - target) / target)


def get_reward(name: str) -> RewardFn:
    if name not in REWARDS:
        raise KeyError(f"unknown reward {name!r}; known: {sorted(REWARDS)}")
    return REWARDS[name]


def score(names: list[str], completions: list[str], examples: list[dict]) -> list[float]:
    """Sum of the named built-in rewards for each (completion, example) pair."""
    fns = [get_reward(n) for n in names]
    return [sum(fn(c, ex) for fn in fns) for c, ex in zip(completions, examples)]


# ----------------------------------------------------------------------------------------- resolution
@dataclass
class Reward:
    """One resolved reward: ``batched`` (TRL's signature, or a reward model) or per example (ours)."""

    name: str
    fn: Callable
    weight: float = 1.0
    batched: bool = True
    required_columns: tuple[str, ...] = ()  # dataset columns the function names without a default, or reads
    accepts_any_column: bool = True  # it takes **kwargs (TRL passes every column)
    accepted: tuple[str, ...] = field(default=())  # the keyword names it accepts, when not **kwargs
    read_through: str | None = None  # the **kwargs parameter it reads required columns from (kwargs["answer"])
    optional_columns: tuple[str, ...] = ()  # columns it reads where present: kwargs.get("x"), "x" in kwargs


def _import(spec: str) -> Callable:
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise RewardError(f"reward {spec!r}: an import path reads 'package.module:function' or 'file.py:function'")
    if target.endswith(".py") or "/" in target:
        path = Path(target).expanduser()
        if not path.is_file():
            raise RewardError(f"reward {spec!r}: file {target!r} not found (paths are relative to the working "
                              f"directory, {Path.cwd()})")
        name = f"rollout_sleep_user_rewards.{path.stem}"
        module = sys.modules.get(name)
        if module is None or getattr(module, "__file__", None) != str(path.resolve()):
            shadowed = _shadowed_sibling(path.resolve())
            if shadowed:
                raise RewardError(f"reward {spec!r}: {shadowed}")
            if str(path.resolve().parent) not in sys.path:  # as `python file.py`: modules beside it import
                sys.path.insert(0, str(path.resolve().parent))
            loader = importlib.util.spec_from_file_location(name, path.resolve())
            module = importlib.util.module_from_spec(loader)
            sys.modules[name] = module
            try:
                loader.loader.exec_module(module)
            except (Exception, SystemExit) as err:
                del sys.modules[name]
                raise RewardError(f"reward {spec!r}: importing {target!r} failed: {_raised(err)}") from err
    else:
        if "" not in sys.path and str(Path.cwd()) not in sys.path:
            sys.path.insert(0, str(Path.cwd()))  # as `python -m` does: modules next to the run are importable
        try:
            module = importlib.import_module(target)
        except (Exception, SystemExit) as err:
            raise RewardError(f"reward {spec!r}: cannot import module {target!r}: {_raised(err)}") from err
    if not hasattr(module, attr):
        public = sorted(n for n in vars(module) if not n.startswith("_") and callable(getattr(module, n)))
        raise RewardError(f"reward {spec!r}: module {target!r} has no {attr!r}; its callables: {public}")
    fn = getattr(module, attr)
    if not callable(fn):
        raise RewardError(f"reward {spec!r}: {attr!r} is a {type(fn).__name__}, not a function")
    return fn


def _shadowed_sibling(path: Path) -> str | None:
    """Why a module the reward file imports from its own folder would be another one, or ``None``: Python imports a
    name once per process, so ``import utils`` beside a second reward file gets the ``utils`` imported first (a
    first reward file's sibling, or an installed module), silently."""
    import ast

    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError):
        return None  # the import itself says what is wrong
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names} | \
        {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module and not n.level}
    for name in sorted(names):
        mine = next((f for f in (path.parent / f"{name}.py", path.parent / name / "__init__.py") if f.is_file()), None)
        loaded = getattr(sys.modules.get(name), "__file__", None)
        if mine is not None and loaded and Path(loaded).resolve() != mine.resolve() and \
                Path(loaded).read_bytes() != mine.read_bytes():  # the same code twice is the same module
            return (f"it imports {name!r}, which beside it is {mine}, but a module {name!r} from {loaded} is imported "
                    f"already (Python imports a name once per process, so it would get that one): rename one of "
                    f"them (e.g. {path.parent.name}_{name}.py)")
    return None


def _keys_read(fn: Callable, param: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The keys ``fn``'s source reads from its parameter ``param`` (``**kwargs``, or the example dict): those
    whose missing or null value is not handled (``param["x"]``, ``param.pop("x")``), and those it reads where
    present (``param.get("x")``, ``param.pop("x", default)``, a key tested with ``"x" in param`` first). Empty
    where the source cannot be read (a builtin, a callable object, a lambda defined among others on one line)."""
    import ast
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError, ValueError):
        return (), ()
    func = next((n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                 and n.name == getattr(fn, "__name__", None)), None)
    if func is None:
        return (), ()

    def is_param(node) -> bool:
        return isinstance(node, ast.Name) and node.id == param

    def key(node) -> str | None:
        return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None

    read, handled = [], set()
    for node in ast.walk(func):
        if isinstance(node, ast.Subscript) and is_param(node.value) and isinstance(node.ctx, ast.Load) and \
                key(node.slice):
            read.append(key(node.slice))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and is_param(node.func.value) \
                and node.args and key(node.args[0]):
            if node.func.attr == "pop" and len(node.args) == 1 and not node.keywords:
                read.append(key(node.args[0]))
            elif node.func.attr in ("get", "pop"):
                handled.add(key(node.args[0]))
        elif isinstance(node, ast.Compare) and key(node.left) and len(node.ops) == 1 and \
                isinstance(node.ops[0], (ast.In, ast.NotIn)) and is_param(node.comparators[0]):
            handled.add(key(node.left))
    return tuple(dict.fromkeys(k for k in read if k not in handled)), tuple(sorted(handled))


def _describe(name: str, fn: Callable, weight: float) -> Reward:
    """Classify ``fn`` by its signature: TRL's batched one or ours; raise when it is neither."""
    if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None)):
        raise RewardError(f"reward {name!r} is async; the recipe calls rewards synchronously: make it a plain function")
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError) as err:
        raise RewardError(f"reward {name!r}: cannot read its signature ({err})") from err
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    named = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if "completions" in params or "prompts" in params:
        required = tuple(n for n, p in params.items()
                         if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is p.empty
                         and n not in TRL_ARGS)
        kwargs = next((n for n, p in params.items() if p.kind is p.VAR_KEYWORD), None)
        read, handled = _keys_read(fn, kwargs) if kwargs else ((), ())
        read = tuple(k for k in read if k not in TRL_ARGS and k not in params)
        # a parameter with a default may be a setting (max_len=None), not a column: only reads say "column"
        optional = tuple(k for k in handled if k not in TRL_ARGS and k not in params)
        return Reward(name, fn, weight, batched=True, required_columns=required + read, accepts_any_column=var_kw,
                      accepted=tuple(named), read_through=kwargs if read else None, optional_columns=optional)
    positional = [n for n, p in params.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [n for n, p in params.items() if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL,
                                                                                          p.VAR_KEYWORD)]
    if positional[:1] == ["completion"] and len(positional) >= 2 and len(required) <= 2:
        columns = getattr(fn, "columns", None)  # declared, or read from the example: example["answer"]
        read, handled = _keys_read(fn, positional[1])
        optional = tuple(k for k in handled if k != "prompt")
        columns = tuple(columns) if columns is not None else tuple(k for k in read if k != "prompt")
        return Reward(name, fn, weight, batched=False, required_columns=columns, optional_columns=optional)
    raise RewardError(f"reward {name!r} has signature {name.split(':')[-1]}{inspect.signature(fn)}; a reward takes "
                      f"TRL's `(prompts, completions, **kwargs) -> list[float | None]` (batched) or "
                      f"`(completion: str, example: dict) -> float`")


def resolve_rewards(specs: list, weights: list[float] | None = None, *, columns: list[str] | None = None,
                    load_models: bool = True) -> list[Reward]:
    """The rewards a config names (see the module docstring), with their weights (1.0 each by default).

    ``columns``: the dataset's columns, to check that each function gets the columns it names.
    ``load_models``: load reward models now; ``False`` only checks their checkpoints (the recipe loads them
    once the engine is up)."""
    if not specs:
        raise RewardError("no rewards configured: give `rewards: [...]` at least one entry")
    if weights is not None and len(weights) != len(specs):
        raise RewardError(f"reward_weights has {len(weights)} entries but rewards has {len(specs)} ({specs}); "
                          f"give one weight per reward")
    if weights is not None and weights and all(isinstance(w, (int, float)) and w == 0 for w in weights):
        raise RewardError(f"reward_weights are all 0 ({list(weights)}): every completion's total would be 0, so no "
                          "step would train anything; give at least one reward a weight")
    out = []
    for i, spec in enumerate(specs):
        weight = 1.0 if weights is None else float(weights[i])
        if not isinstance(spec, str):
            raise RewardError(f"rewards[{i}] must be a name, an import path or a checkpoint directory, got {spec!r}")
        if spec in REWARDS:
            out.append(_describe(spec, REWARDS[spec], weight))
        elif Path(spec).expanduser().is_dir():
            from .reward_model import RewardModel

            model = RewardModel(str(Path(spec).expanduser()), load=load_models)
            out.append(Reward(model.name, model, weight, batched=True))
        elif ":" in spec:
            fn = _import(spec)
            out.append(_describe(getattr(fn, "__name__", spec), fn, weight))  # TRL's metric name: the function's
        else:
            raise RewardError(f"unknown reward {spec!r}: not a built-in ({', '.join(sorted(REWARDS))}), not an import "
                              f"path ('module:function', 'file.py:function') and not a local checkpoint directory")
    seen: dict[str, int] = {}
    for r in out:  # one metric per reward: a name used again (same function twice, two lambdas) gets a suffix
        seen[r.name] = seen.get(r.name, 0) + 1
        if seen[r.name] > 1:
            r.name = f"{r.name}_{seen[r.name]}"
    if columns is not None:
        check_columns(out, columns)
    return out


def rewards_fingerprint(rewards: list[Reward]) -> dict[str, str]:
    """Reward name -> a digest of what computes it: a user's function with the code of its own it uses
    (:mod:`rollout_sleep.grpo.code_digest`), a reward model's config and the names and sizes of its files. The
    library's built-ins and functions whose source cannot be read are left out. A resume compares them with the
    run's."""
    import hashlib

    out = {}
    for r in rewards:
        folder = getattr(r.fn, "path", None)
        if folder is not None and Path(folder, "config.json").is_file():  # a reward model's checkpoint
            digest = hashlib.blake2b(Path(folder, "config.json").read_bytes(), digest_size=16)
            for f in sorted(Path(folder).iterdir()):
                digest.update(f"{f.name}:{f.stat().st_size}".encode())
            out[r.name] = digest.hexdigest()
        elif (found := code_digest(r.fn)) is not None:
            out[r.name] = found
    return out


def check_columns(rewards: list[Reward], columns: list[str]) -> None:
    """Each function's named columns are in the dataset, and TRL-style functions accept every column (TRL
    passes them all: one without ``**kwargs`` would fail at the first step)."""
    extra = [c for c in columns if c != "prompt"]
    clash = [c for c in extra if c in TRL_ARGS and c not in ("completion_ids", "environments")]  # those two are not passed
    if clash and any(r.batched for r in rewards):
        raise RewardError(f"dataset column(s) {clash} have the names of arguments rewards receive from the "
                          f"trainer (prompts, completions, trainer_state, log_extra, log_metric); every column is "
                          f"passed by name too (as TRL does), so they would collide: rename them in the dataset")
    for r in rewards:
        never = [c for c in r.required_columns if c in NOT_PASSED] if r.batched else []
        if never:
            raise RewardError(f"reward {r.name!r} reads {never}, which a reward is never passed under that name "
                              f"(TRL's rule: the prompt comes as `prompts`, the generated text as `completions`, its "
                              f"token ids as `completion_ids`; a dataset column of that name is not passed): rename "
                              f"the dataset column (e.g. 'reference') and read it under its new name")
        missing = [c for c in r.required_columns if c not in columns]
        if missing:
            raise RewardError(f"reward {r.name!r} needs dataset column(s) {missing}; the dataset has {columns}")
        if r.batched and not r.accepts_any_column and r.accepted:
            refused = [c for c in extra if c not in r.accepted]
            if refused:
                raise RewardError(f"reward {r.name!r} does not accept dataset column(s) {refused}, which are passed "
                                  f"to every reward by name (as TRL does): add `**kwargs` to its signature")


def absent_optional_columns(rewards: list[Reward], columns: list[str]) -> list[str]:
    """Warnings for the columns a reward reads where present (a parameter defaulting to ``None``, ``.get``) that
    the dataset lacks: that reward gets ``None`` (or its default) for every completion, which TRL's rule reads as
    "does not apply", so it never scores; often a column named otherwise (``answer`` for ``solution``)."""
    out = []
    for r in rewards:
        absent = [c for c in r.optional_columns if c not in columns and c not in NOT_PASSED]
        if absent:
            out.append(f"reward {r.name!r} reads column(s) {absent} where present, and the dataset has none of them "
                       f"(its columns: {list(columns)}): it gets None or its default for every completion. Rename the "
                       "dataset column, or the reward's parameter, if they mean the same")
    return out


def silent_rewards(table: torch.Tensor, rewards: list[Reward]) -> list[str]:
    """The rewards that scored none of a step's completions (every value ``None`` or NaN) while another reward
    scored some: they add nothing to the total, silently (a column they read is missing, a format they never
    match)."""
    if len(rewards) < 2 or not table.numel() or bool(torch.isnan(table).all()):
        return []
    return [r.name for j, r in enumerate(rewards) if bool(torch.isnan(table[:, j]).all())]


def _empty(value) -> bool:
    """Missing, null (``None``, NaN) or blank text (``""``: a JSON row's empty answer, which no completion matches)."""
    return value is None or (isinstance(value, float) and math.isnan(value)) or \
        (isinstance(value, str) and not value.strip())


def check_row_values(rewards: list[Reward], data, source: str) -> None:
    """Every column a reward reads (see :func:`check_columns`) holds a value in every row: a row where it is
    missing, null (``None``, NaN) or blank text would be scored without it, e.g. 0.0 for a correct completion,
    with no word.
    ``data`` is the dataset the run uses, ``source`` its name for the message. A TRL-style function that is
    meant to skip such rows says so with a default (``answer=None``): the column is then not required."""
    for r in rewards:
        for column in r.required_columns:
            if column not in data.column_names:
                continue  # check_columns reports it
            empty = [i for i, v in enumerate(data[column]) if _empty(v)]
            if not empty:
                continue
            shown = ", ".join(map(str, empty[:5])) + (", ..." if len(empty) > 5 else "")
            how = f"read it with {r.read_through}.get({column!r})" if r.read_through and column not in r.accepted \
                else f"give its parameter a default ({column}=None)"
            skip = f"; if {r.name!r} is meant to skip such rows, {how} and return None for them" if r.batched else ""
            raise RewardError(f"reward {r.name!r} reads column {column!r}, which is missing, null or blank in {len(empty)} "
                              f"of {len(data)} rows of data.dataset {source!r}: row(s) {shown} (counted from 0). "
                              f"Their completions would be scored without it (a correct one as wrong). Fill in "
                              f"{column!r} in those rows or remove them{skip}")


# ---------------------------------------------------------------------------------------------- scoring
def _text(completion) -> str:
    return completion[-1]["content"] if isinstance(completion, list) else completion


_SAID_NAN: set[str] = set()  # rewards whose NaN was reported (once per reward and process)


def _check_values(r: Reward, values, n: int) -> list[float]:
    if getattr(values, "ndim", None) == 1 and hasattr(values, "tolist"):  # a 1-d torch tensor or numpy array
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        raise RewardError(f"reward {r.name!r} returned {type(values).__name__}; it must return a list with one "
                          f"float (or None) per completion")
    values = list(values)
    if len(values) != n:
        raise RewardError(f"reward {r.name!r} returned {len(values)} rewards for {n} completions; it must return "
                          f"exactly one per completion")
    out = []
    for i, v in enumerate(values):
        if getattr(v, "ndim", None) == 0 and hasattr(v, "item"):  # a 0-d tensor or numpy scalar
            v = v.item()
        if v is None:
            out.append(math.nan)
        elif isinstance(v, numbers.Real):
            try:
                out.append(float(v))
            except OverflowError as err:  # an int beyond float64 (10**400)
                raise RewardError(f"reward {r.name!r} returned a number too large for a float64 for completion "
                                  f"{i} ({str(v)[:20]}..., {len(str(v))} digits): rewards must be finite floats; "
                                  f"scale it down") from err
        else:
            raise RewardError(f"reward {r.name!r} returned {v!r} (a {type(v).__name__}) for completion {i}; "
                              f"rewards must be numbers or None")
    nans = sum(1 for v, x in zip(values, out) if v is not None and math.isnan(x))
    if nans and r.name not in _SAID_NAN:
        _SAID_NAN.add(r.name)
        logger.warning("reward %r returned NaN for %d of %d completions: NaN counts as None, \"does not apply to this "
                       "completion\" (TRL's rule): the total skips it and rewards/%s/mean covers the others. If the NaN "
                       "is a bug, fix the reward; to skip a completion on purpose return None (said once per reward)",
                       r.name, nans, n, r.name)
    return out


def _example_text(prompt, completion, example: dict) -> str:
    cols = {k: v for k, v in example.items() if k != "prompt"}
    form = (" (the data is conversational: each completion is a list of messages, [{'role': 'assistant', "
            "'content': ...}], as TRL passes it; its text is completion[0]['content'])") if isinstance(completion, list) \
        else ""
    return f"prompt={prompt!r}, completion={_text(completion)!r}{form}, columns={cols!r}"


def score_rewards(rewards: list[Reward], prompts: list, completions: list, examples: list[dict], *,
                  completion_ids: list[list[int]] | None = None, trainer_state=None,
                  log_metric: Callable | None = None) -> torch.Tensor:
    """``[len(completions), len(rewards)]`` float64 rewards (NaN where a reward returned ``None``): every finite
    Python float stays finite (float32 would turn 1e39 into inf).

    ``prompts``/``completions`` are in the dataset's format (text, or lists of messages); ``examples`` are the
    dataset rows, one per completion. A reward that raises is reported with its name and the failing example."""
    n = len(completions)
    table = torch.full((n, len(rewards)), math.nan, dtype=torch.float64)
    columns = {k: [ex[k] for ex in examples] for k in (examples[0] if examples else {}) if k not in
               ("prompt", "completion", "completion_ids")}
    extra = {"completion_ids": completion_ids, "trainer_state": trainer_state,
             "log_extra": lambda column, values: None, "log_metric": log_metric or (lambda name, value: None)}
    for j, r in enumerate(rewards):
        if r.batched:
            kwargs = {"prompts": prompts, "completions": completions, **columns, **extra}
            if not r.accepts_any_column and r.accepted:
                kwargs = {k: v for k, v in kwargs.items() if k in r.accepted}
            try:
                values = r.fn(**kwargs)
            except RewardError:
                raise
            except SystemExit as err:  # calling it again would exit again: the batch is named
                raise RewardError(f"reward {r.name!r} raised {_raised(err)} on a batch of {n} completions") from err
            except Exception as err:
                raise _locate(r, err, prompts, completions, examples, kwargs) from err
            table[:, j] = torch.tensor(_check_values(r, values, n), dtype=torch.float64)
        else:
            vals = []
            for i, (c, ex) in enumerate(zip(completions, examples)):
                try:
                    vals.append(r.fn(_text(c), ex))
                except (Exception, SystemExit) as err:
                    raise RewardError(f"reward {r.name!r} raised {_raised(err)} on completion {i}: "
                                      f"{_example_text(prompts[i], c, ex)}") from err
            table[:, j] = torch.tensor(_check_values(r, vals, n), dtype=torch.float64)
    return table


def _raised(err: BaseException) -> str:
    """What a reward raised, in words. A ``SystemExit`` (``sys.exit()``, ``exit()``, argparse on the recipe's
    command line) is said as such: let through, it would end the run with its code (0: as if it had finished)
    and no message.

    >>> _raised(SystemExit(0))
    'SystemExit (it called sys.exit(0)); a reward must return its scores (or raise), never exit the process'
    """
    if isinstance(err, SystemExit):
        return (f"SystemExit (it called sys.exit({err.code!r})); a reward must return its scores (or raise), never "
                "exit the process")
    return f"{type(err).__name__}: {err}"


def _locate(r: Reward, err: Exception, prompts, completions, examples, kwargs) -> RewardError:
    """Call a failing batched reward one completion at a time to name the example it fails on."""
    for i in range(len(completions)):
        one = {k: (v[i:i + 1] if isinstance(v, list) and len(v) == len(completions) else v) for k, v in kwargs.items()}
        try:
            r.fn(**one)
        except (Exception, SystemExit) as row_err:
            return RewardError(f"reward {r.name!r} raised {_raised(row_err)} on completion {i}: "
                               f"{_example_text(prompts[i], completions[i], examples[i])}")
    return RewardError(f"reward {r.name!r} raised {_raised(err)} on a batch of {len(completions)} "
                       f"completions (each alone scores fine)")


def combine(table: torch.Tensor, weights: list[float] | torch.Tensor) -> torch.Tensor:
    """Weighted sum of each completion's rewards, skipping NaN (``None``), as TRL's ``nansum``; a completion
    every reward skipped stays NaN (unscorable: zero advantage, out of its group's baseline, as in TRL 1.16;
    :func:`unscorable_report` says which).

    >>> combine(torch.tensor([[1.0, float("nan")], [float("nan"), float("nan")], [0.5, 2.0]]), [1.0, 0.5])
    tensor([1.0000,    nan, 1.5000])
    """
    w = torch.as_tensor(weights, dtype=table.dtype)
    total = (table * w).nansum(dim=1)
    total[torch.isnan(table).all(dim=1)] = math.nan
    return total


def unscorable_report(table: torch.Tensor, rewards: list[Reward], rows: list[int]) -> str | None:
    """What to warn about the completions no reward scored (every one ``None``/NaN), or ``None`` when each
    completion has a score: how many, the dataset rows of their prompts (``rows``: one per completion) and the
    rewards. TRL warns the same way and, like the recipe, gives them no advantage.

    >>> nan = float("nan")
    >>> print(unscorable_report(torch.tensor([[1.0, nan], [nan, nan]]), resolve_rewards(["digits_format",
    ...       "length_target"]), rows=[7, 9]))
    no reward scored 1 of 2 completions (every one of digits_format, length_target returned None or NaN), of dataset row(s) 9: they get no advantage and stay out of their group's baseline; make at least one reward score every completion
    """
    unscored = torch.isnan(table).all(dim=1).nonzero().flatten().tolist()
    if not unscored:
        return None
    which = sorted({rows[i] for i in unscored})
    shown = ", ".join(map(str, which[:8])) + (", ..." if len(which) > 8 else "")
    return (f"no reward scored {len(unscored)} of {len(table)} completions (every one of "
            f"{', '.join(r.name for r in rewards)} returned None or NaN), of dataset row(s) {shown}: they get no "
            f"advantage and stay out of their group's baseline; make at least one reward score every completion")


def reward_metrics(rewards: list[Reward], table: torch.Tensor) -> dict[str, float]:
    """Per-reward mean and std over the completions it scored (``rewards/<name>/mean``, TRL's keys and its
    ``nanmean``/``nanstd``)."""
    out = {}
    for j, r in enumerate(rewards):
        col = table[:, j]
        ok = col[~torch.isnan(col)]
        out[f"rewards/{r.name}/mean"] = float(ok.mean()) if len(ok) else math.nan
        out[f"rewards/{r.name}/std"] = float(ok.std()) if len(ok) > 1 else math.nan
    return out


def reward_summary(total: torch.Tensor, group_size: int) -> dict[str, float]:
    """TRL's overall reward metrics of a step's weighted totals (all ranks', groups consecutive; NaN:
    unscorable): ``reward`` (mean) and ``reward_std`` over the scored completions, ``frac_reward_zero_std``
    (the share of groups whose rewards are all alike: no learning signal from them).

    >>> nan = float("nan")
    >>> {k: round(v, 3) for k, v in reward_summary(torch.tensor([1.0, 1.0, 0.0, 2.0, nan, 3.0]), 2).items()}
    {'reward': 1.4, 'reward_std': 1.14, 'frac_reward_zero_std': 0.333}
    """
    scored = total[~torch.isnan(total)]
    groups = total.view(-1, group_size)
    count = (~torch.isnan(groups)).sum(1)
    mean = groups.nanmean(1, keepdim=True)
    std = ((groups - mean).square().nansum(1) / (count - 1)).sqrt()  # NaN where fewer than 2 are scored
    std = torch.where(count > 1, std, torch.full_like(std, math.nan))
    return {"reward": float(scored.mean()) if len(scored) else math.nan,
            "reward_std": float(scored.std()) if len(scored) > 1 else math.nan,
            "frac_reward_zero_std": float(torch.isclose(std, torch.zeros_like(std)).float().mean())}

"""A run's output folder: who may write into it, atomic checkpoints, and resuming from the newest complete one.

- :func:`check_output_dir` refuses to start a run over a different one (``resume=false`` into a folder that
  holds metrics or checkpoints, or a resume with other values of the keys that define the saved state: each key's
  resume class is in :mod:`rollout_sleep.run.schema`; :func:`config_changes` compares two configs by it,
  against the settings saved beside the checkpoint the resume loads).
- :func:`stage` / :func:`commit` make a save atomic: every rank writes into a hidden staging folder, then the
  main process writes ``recipe_state.json`` (step, W&B id, every file's size and checksum) and renames the folder
  to ``step_N``. A crash mid-save leaves only the staging folder, never a ``step_N`` that looks saved.
- :func:`saving` / :func:`writing` turn a write that fails (full disk, read-only folder, ...) into a
  :class:`WriteError` naming the path, the cause and the fix; a failed save's partial folder is deleted.
- :func:`newest_complete` picks the newest ``step_N`` whose files are all there and whole (``verify``: and
  unchanged since the save, by their checksums), with the reason each newer one was skipped; :func:`set_aside`
  moves a skipped one (or one that failed to load) into ``checkpoints/incomplete/``.
- The run's settings are ``run_config.json``; where that file is gone, those saved beside the newest complete
  checkpoint stand in for it.

>>> checkpoint_problem(Path("/nonexistent/step_3"))
'no recipe_state.json (the save did not finish)'
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from . import integrity

logger = logging.getLogger(__name__)

STATE_FILE = "recipe_state.json"
RUN_CONFIG = "run_config.json"
DATASET_KEYS = ("dataset_rows", "dataset_fingerprint",  # what the run read, beside its settings (check_dataset,
                "prompts_fingerprint", "rewards_fingerprint")  # check_inputs)
LOG_FILE = "run.log"  # the main process's log, and the traceback of an error that stopped the run
STAGING_PREFIX = ".partial-"
_STEP = re.compile(r"step_(\d+)$")


class RunDirError(RuntimeError):
    """The output folder cannot be used as asked (it holds another run, or nothing can be resumed)."""


class NothingToTrain(Exception):
    """A resume whose newest complete checkpoint is already at ``train.steps``: not an error (exit code 0)."""


class WriteError(RunDirError):
    """A file of the run could not be written (a checkpoint, the metrics, the run's settings): the message names
    the path, the cause (no space left on device, permission denied, ...) and what to do."""


# ----------------------------------------------------------------------------------- output folder
def _lookup(cfg: dict, dotted: str) -> Any:
    if dotted == "reward_weights" and cfg.get("reward_weights") is None:  # unset: 1.0 each
        return [1.0] * len(cfg.get("rewards") or [])
    for part in dotted.split("."):
        cfg = cfg.get(part) if isinstance(cfg, dict) else None
    return cfg


def saved_steps(ckpt_dir: Path) -> list[Path]:
    """``step_N`` folders, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := _STEP.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def logged_steps(log: Path) -> list[int]:
    """Steps in a ``metrics.jsonl`` (unreadable lines are skipped)."""
    if not log.exists():
        return []
    steps = []
    for line in log.read_text().splitlines():
        try:
            steps.append(int(json.loads(line)["step"]))
        except (ValueError, KeyError, TypeError):
            continue
    return steps


def config_changes(old: dict, new: dict) -> dict[str, list[tuple[str, Any, Any]]]:
    """The keys whose value differs between ``old`` and ``new`` (config dicts), as ``(key, old, new)`` grouped by
    resume class (``fixed`` / ``applied`` / ``free``, from :func:`rollout_sleep.run.schema.resume_classes`).
    A key ``old`` does not hold (a config from before that key existed) is not compared; ``reward_weights`` unset
    is 1.0 each; input paths are compared as files (a relative one in ``old``, saved before paths were recorded
    absolute, is read from the working directory); ``model.tie_word_embeddings`` is not compared when ``new``'s
    ``model.path`` is a checkpoint, not a size of ``SHAPES`` (its config.json decides: the key never had an effect,
    and runs saved with it set must resume without it).

    >>> config_changes({"train": {"lr": 1.0, "seed": 0}}, {"train": {"lr": 2.0, "seed": 1}})["fixed"]
    [('train.seed', 0, 1)]
    """
    from .config import with_input_paths_from
    from .schema import FIXED, RESUME_CLASSES, resume_classes

    from rollout_sleep.weights.checkpoints import SHAPES

    old = with_input_paths_from(old, Path.cwd())  # a run saved with relative paths: as it read them
    out: dict[str, list] = {c: [] for c in RESUME_CLASSES}
    for key, klass in resume_classes().items():
        if not _holds(old, key):
            continue
        if key == "model.tie_word_embeddings" and _lookup(new, "model.path") not in SHAPES:
            continue
        before, after = _lookup(old, key), _lookup(new, key)
        if before != after:
            out[klass if klass in out else FIXED].append((key, before, after))  # unclassified: the safe side
    return out


def _holds(cfg: dict, dotted: str) -> bool:
    *sections, last = dotted.split(".")
    for part in sections:
        cfg = cfg.get(part) if isinstance(cfg, dict) else None
    return isinstance(cfg, dict) and last in cfg


def resume_point(out: Path) -> tuple[Path | None, dict]:
    """The newest complete checkpoint a resume in ``out`` would load and its ``recipe_state.json`` (the step, and
    the settings it was trained with if it was saved with them); ``(None, {})`` if there is none. Reads only."""
    found, _ = newest_complete(out / "checkpoints")
    if found is None:
        return None, {}
    return found, json.loads((found / STATE_FILE).read_text())


def trained_settings(out: Path) -> dict | None:
    """The settings a resume in ``out`` compares its own with: those saved beside the checkpoint it would load;
    for a checkpoint saved before settings were saved beside it (or none), the run's last (``run_config.json``);
    ``None`` if neither. Read before the run rewrites ``run_config.json``. Reads only."""
    _, state = resume_point(out)
    return state["config"] if isinstance(state.get("config"), dict) else _previous_config(out)


def check_steps_left(out: Path, steps: int) -> None:
    """Raise :class:`NothingToTrain` if the checkpoint a resume in ``out`` would load is already at ``steps`` or
    beyond (a finished run launched again): said before anything starts. A checkpoint whose files changed since
    its save does not count (the resume sets it aside and trains its steps again). Reads only."""
    found, state = resume_point(out)
    if found is None or int(state["step"]) < steps:
        return
    found, _ = newest_complete(out / "checkpoints", verify=True)  # its checksums: read only for a finished run
    state = json.loads((found / STATE_FILE).read_text()) if found is not None else {"step": 0}
    if int(state["step"]) >= steps:
        raise NothingToTrain(f"the run in {out} is already at step {state['step']} (train.steps={steps}, checkpoint "
                             f"{found.name}): nothing to train. Raise train.steps to continue it, or use a new "
                             "output_dir for a new run.")


def check_output_dir(out: Path, config: dict, resume: bool, overwrite: bool = False) -> None:
    """Raise :class:`RunDirError` if starting here would overwrite part of another run, or resume a checkpoint
    with settings it cannot continue under (:data:`~rollout_sleep.run.schema.FIXED` keys changed). Reads only."""
    steps, saved = logged_steps(out / "metrics.jsonl"), saved_steps(out / "checkpoints")
    if not resume and not overwrite and (steps or saved):
        held = []
        if steps:
            held.append(f"metrics for steps {min(steps)}-{max(steps)}")
        if saved:
            held.append("checkpoints " + ", ".join(p.name for p in saved))
        raise RunDirError(f"output_dir {str(out)!r} already holds a run ({'; '.join(held)}); resume=false would "
                          "start over in it and mix the two runs. Use a new output_dir, set resume=true to "
                          "continue that run, or overwrite=true to delete it first.")
    old = _previous_config(out)
    if old is None and _run_files(out):  # every run writes its settings before its first metrics or checkpoint
        what = "overwrite=true will not delete anything in it" if overwrite and not resume else \
            "the run would move its checkpoints aside and write into its metrics"
        raise RunDirError(f"output_dir {str(out)!r} holds {', '.join(_run_files(out))} but no {RUN_CONFIG}, nor a "
                          f"complete checkpoint saved with the run's settings: it is not a run of this recipe (or "
                          f"one from before {RUN_CONFIG} existed), so {what}. Use a new (or empty) output_dir.")
    if old is not None and _run_config_file(out) is None:
        found, _ = resume_point(out)
        logger.info("%s is missing or unreadable in %s: the run's settings are read from its checkpoint %s "
                    "(saved beside it in %s); %s is written again when the run starts", RUN_CONFIG, out,
                    found.name, STATE_FILE, RUN_CONFIG)
    if resume and old is not None:
        # the settings the checkpoint a resume loads was trained with (saved beside it), else the run's last
        ckpt, state = resume_point(out)
        trained = state.get("config") if isinstance(state.get("config"), dict) else old  # as trained_settings
        fixed = config_changes(trained, config)["fixed"]
        if fixed and (steps or saved):
            where = f"its checkpoint {ckpt.name} was trained with" if ckpt is not None and trained is not old \
                else "it ran with"
            raise RunDirError(f"output_dir {str(out)!r} holds a different run: "
                              + "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in fixed)
                              + f" ({where} the first value of each). These settings define the saved state, so a "
                              "resume cannot continue under the new ones. Use a new output_dir for this run, or "
                              "revert those settings to resume it.")


def check_dataset(out: Path, rows: int, fingerprint: str, source: str, resume: bool) -> None:
    """Raise :class:`RunDirError` when resuming the run in ``out`` over a dataset that now gives another number of
    rows, or other rows, than it did (``dataset_rows`` / ``dataset_fingerprint`` in its settings, see
    :func:`write_run_config`; the fingerprint is :func:`rollout_sleep.grpo.data.rows_fingerprint`). Each step's
    rows are drawn from the row count (a fresh permutation of all rows per epoch): a file that grew or shrank
    gives every later step another order, so some rows of the current epoch would be trained twice and others
    not at all; a file edited in place (rows reordered, answers changed) would train the remaining steps on
    other prompts or rewards than the saved steps, silently. Reads only; what a run did not record is not
    checked."""
    old = _trained_record(out, resume)
    if old is None:
        return
    if old.get("dataset_rows") not in (None, rows):
        what = (f"{old['dataset_rows']} rows of data.dataset {source!r}, which now gives {rows}: each step's rows are "
                "drawn from the row count (a fresh permutation of all rows per epoch), so resuming would train the "
                "remaining steps in another order (rows of the current epoch twice, others not at all)")
        restore = f"restore the dataset to its {old['dataset_rows']} rows"
    elif old.get("dataset_fingerprint") not in (None, fingerprint):
        what = (f"other rows of data.dataset {source!r}: its {rows} rows (their order, prompts or other columns) "
                f"changed since the run read them (fingerprint {old['dataset_fingerprint']}, now {fingerprint}), so "
                "resuming would train the remaining steps on other prompts or answers than the saved steps")
        restore = "restore the dataset as it was"
    else:
        return
    raise RunDirError(f"output_dir {str(out)!r} holds a run over {what}. To resume, {restore}; to train on the "
                      "changed rows, start a new run (a new output_dir, or resume=false overwrite=true)")


def check_inputs(out: Path, record: dict, resume: bool) -> None:
    """Raise :class:`RunDirError` when resuming the run in ``out`` with other prompts than it generated from (the
    token ids vLLM was given: a chat template, ``data.system_prompt`` or tokenizer edited in the model's folder) or
    other reward code (a reward file or a reward model's checkpoint changed): the remaining steps would train
    another objective under the same metric names, silently. ``record``: this run's ``prompts_fingerprint``
    and ``rewards_fingerprint`` (reward name -> digest of its source file or checkpoint). Reads only; what a run
    did not record is not checked."""
    old = _trained_record(out, resume)
    if old is None:
        return
    changed = []
    if old.get("prompts_fingerprint") not in (None, record.get("prompts_fingerprint")):
        changed.append("the prompts' token ids (the model folder's chat template or tokenizer, or how the prompts "
                       "are formatted, changed since the run tokenized them)")
    before, now = old.get("rewards_fingerprint"), record.get("rewards_fingerprint") or {}
    if isinstance(before, dict):
        scheme = lambda digest: str(digest).rpartition(":")[0]  # noqa: E731 - digests of one scheme compare
        changed += [f"code of reward {name!r} (its source file, or its checkpoint, changed since the run read it)"
                    for name, digest in before.items()
                    if name in now and now[name] != digest and scheme(now[name]) == scheme(digest)]
    if changed:
        raise RunDirError(f"output_dir {str(out)!r} holds a run trained with other inputs: {'; '.join(changed)}. "
                          "Resuming "
                          "would train the remaining steps on another objective than the saved steps, under the same "
                          "metric names. To resume, restore them as they were; to train with the new ones, start a "
                          "new run (a new output_dir, or resume=false overwrite=true)")


def lock(out: Path):
    """Create ``out`` and lock it for this process (an exclusive ``flock`` on ``out/.lock``, released when the
    returned file is closed or the process ends, even killed); raise :class:`RunDirError` if another process
    holds it: two runs writing into one folder would mix their metrics and checkpoints."""
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    fh = open(out / ".lock", "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "another process"
        fh.close()
        raise RunDirError(f"output_dir {str(out)!r} is in use by {holder}: two runs in one folder would mix their "
                          "metrics and checkpoints. Wait for it to end, or use another output_dir.") from None
    except OSError as err:  # a file system without locks (some network or FUSE mounts): run unguarded, say so
        logger.warning("cannot lock %s (%s): nothing stops a second run from writing into it at the same time",
                       out, err)
    fh.seek(0)
    fh.truncate()
    fh.write(f"process {os.getpid()} on {os.uname().nodename}\n")
    fh.flush()
    return fh


def _run_files(out: Path) -> list[str]:
    """Which of the names a run writes (metrics, checkpoints) exist in ``out``."""
    return [n for n in ("metrics.jsonl", "metrics.superseded.jsonl", "checkpoints") if (out / n).exists()]


def _run_config_file(out: Path) -> dict | None:
    try:
        return json.loads((out / RUN_CONFIG).read_text())
    except (OSError, ValueError):
        return None


def _trained_record(out: Path, resume: bool) -> dict | None:
    """The settings and dataset record a resume in ``out`` continues (:func:`_previous_config`), or ``None``: not a
    resume, nothing recorded, or nothing trained yet (no step logged or saved: nothing to keep consistent with)."""
    old = _previous_config(out) if resume else None
    if old is None or not (logged_steps(out / "metrics.jsonl") or saved_steps(out / "checkpoints")):
        return None
    return old


def _previous_config(out: Path) -> dict | None:
    """The run's settings (with its dataset record): ``run_config.json``; where that file is gone or unreadable,
    those saved beside the newest complete checkpoint (every save records them); ``None`` if neither."""
    recorded = _run_config_file(out)
    if recorded is not None:
        return recorded
    _, state = resume_point(out)
    if not isinstance(state.get("config"), dict):
        return None
    return {**state["config"], **{k: state[k] for k in DATASET_KEYS if k in state}}


def _remove(p: Path) -> bool:
    if p.is_dir():
        shutil.rmtree(p)
    elif p.exists():
        p.unlink()
    else:
        return False
    return True


def drop_stale_model(out: Path, config: dict) -> bool:
    """Delete ``out/model`` (the random-weight checkpoint the recipe builds for a size) when the earlier
    run in ``out`` built it with other model settings: it would otherwise be reused silently."""
    from rollout_sleep.weights.checkpoints import SHAPES

    old = _previous_config(out)
    if config.get("model", {}).get("path") not in SHAPES or old is None or old.get("model") == config.get("model"):
        return False
    if (old.get("model") or {}).get("path") not in SHAPES:  # the earlier run did not build out/model: not ours
        return False
    if _remove(out / "model"):
        logger.warning("deleted %s: built with the earlier model settings %s", out / "model", old.get("model"))
        return True
    return False


def model_problem(path: Path) -> str | None:
    """Why the random-weight checkpoint the recipe builds for a size (``out/model``) is not whole, or ``None``:
    its ``config.json`` gets the builder's mark last (:func:`rollout_sleep.weights.checkpoints.make_checkpoint`),
    and its weight files must be whole (a build killed or out of space left a folder that looked built)."""
    try:
        config = json.loads((path / "config.json").read_text())
    except OSError:
        return "it has no config.json"
    except ValueError:
        return "its config.json is unreadable"
    mark = config.get("rollout_sleep") if isinstance(config, dict) else None
    if not isinstance(mark, dict):
        return "its config.json lacks the build's last step (the build did not finish)"
    weights = sorted(path.glob("*.safetensors"))
    if not weights and "dummy" not in str(mark.get("weights", "")):
        return "it holds no weights (*.safetensors)"
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return f"{index.name} is unreadable"
        missing = sorted(s for s in shards if not (path / s).is_file())
        if missing:
            return f"{missing[0]} is missing"
    for p in weights:
        problem = integrity.safetensors_problem(p)
        if problem:
            return problem
    return None


def build_model(path: Path, build, what: str, needs_weights: bool = False) -> str | None:
    """Build the recipe's random-weight checkpoint ``path`` whole or not at all: ``build(folder)`` writes into a
    hidden staging folder beside it, renamed to ``path`` once done. A ``path`` already whole is kept; one that is
    not (:func:`model_problem`: a build killed or out of space, before builds were staged) is deleted and built
    again, and so is one holding a config alone (built for a trainer that viewed vLLM's random weights: one copy,
    or a LoRA run's shared base) where this run ``needs_weights`` on disk (its trainer loads its own copy); the
    reason is returned (else ``None``). A build that fails raises :class:`WriteError` naming ``what``, the cause
    and the fix, its partial folder deleted."""
    redo = None
    if path.exists():
        problem = model_problem(path)
        if problem is not None:
            redo = f"the earlier build was incomplete ({problem})"
        elif needs_weights and not any(path.glob("*.safetensors")):
            redo = ("the earlier run built its config alone (its trainer viewed vLLM's random weights), and this "
                    "run's trainer loads its own copy")
        if redo is None:
            return None
        _remove(path)
        logger.warning("deleted %s: %s; building it again", path, redo)
    staging = path.with_name(STAGING_PREFIX + path.name)
    try:
        _remove(staging)  # a build that stopped half-way
        build(staging)
        os.replace(staging, path)
    except Exception as err:  # safetensors' own error type on a full disk, an OSError, torch's RuntimeError
        cause, fix = write_problem(err, staging)
        with contextlib.suppress(OSError):
            _remove(staging)
        raise WriteError(f"cannot build {what} in {path}: {cause}. The partial build was deleted. "
                         f"{fix[0].upper()}{fix[1:]}, then rerun.") from err
    return redo


def clear_run(out: Path, config: dict) -> list[str]:
    """``overwrite=true``: delete an earlier run's metrics, checkpoints and settings (and the random-weight
    model it built, if the model settings changed). Returns what was deleted."""
    if _previous_config(out) is None:  # not a run of this recipe (check_output_dir refuses those): touch nothing
        return []
    gone = ["model"] if drop_stale_model(out, config) else []
    for name in ["metrics.jsonl", "metrics.superseded.jsonl", "checkpoints", RUN_CONFIG, "memory_plan.json"]:
        if name == "checkpoints":  # only what the recipe writes there; anything else stays
            ckpts = out / name
            ours = [p for p in ckpts.iterdir() if _STEP.match(p.name) or p.name.startswith(STAGING_PREFIX)
                    or p.name == "incomplete"] if ckpts.is_dir() else []
            if [_remove(p) for p in ours]:
                gone.append(name)
            if ckpts.is_dir() and not any(ckpts.iterdir()):
                ckpts.rmdir()
        elif _remove(out / name):
            gone.append(name)
    gone += [p.name for p in (out / LOG_FILE, *sorted(out.glob("run.rank*.log"))) if _remove(p)]
    if gone:
        logger.info("overwrite=true: deleted %s from %s", ", ".join(gone), out)
    return gone


def log_file(out: Path, rank: int) -> Path:
    """The log file of process ``rank`` in the run folder ``out`` (:data:`LOG_FILE` for rank 0)."""
    return out / (LOG_FILE if rank == 0 else f"run.rank{rank}.log")


def write_run_config(out: Path, config: dict, dataset: dict | None = None) -> None:
    """Record the run's settings (what :func:`check_output_dir` compares a resume against) and ``dataset``, what
    its dataset gave (:data:`DATASET_KEYS`: what :func:`check_dataset` compares a resume against)."""
    write_atomic(out / RUN_CONFIG, json.dumps({**config, **(dataset or {})}, indent=1, default=str))


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all: into ``<path>.tmp``, synced, then renamed over ``path``. A
    write that fails (a full disk) leaves the earlier ``path`` as it was (``Path.write_text`` would have emptied
    it first) and no ``.tmp`` file."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def read_json(path: Path, what: str) -> dict:
    """The JSON object in ``path`` (a file the run rewrites, e.g. the memory plan), or ``{}`` when there is none;
    one that cannot be read (emptied or cut by a write that failed in an older version, edited by hand) is said
    in the log and taken as none, so that it never stops a run from going on (it is written anew)."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        logger.warning("%s %s cannot be read (%s): it is written anew", what, path, err)
        return {}
    if not isinstance(data, dict):
        logger.warning("%s %s holds no JSON object: it is written anew", what, path)
        return {}
    return data


# ----------------------------------------------------------------------------------- failed writes
LOW_SPACE = 16 << 20  # free bytes under which a write that failed without an errno is taken for a full disk
_FIX = {errno.ENOSPC: "free space on that disk, or set output_dir to a disk with room",
        errno.EDQUOT: "free space within your quota, or set output_dir to a disk with room",
        errno.EACCES: "make it writable for this user, or set output_dir to a writable folder",
        errno.EPERM: "make it writable for this user, or set output_dir to a writable folder",
        errno.EROFS: "the file system is mounted read-only: set output_dir to a writable folder",
        errno.ENOTDIR: "a file stands where a folder is needed: move it away, or set another output_dir",
        errno.EEXIST: "a file stands where a folder is needed: move it away, or set another output_dir"}


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def write_problem(err: BaseException, path: Path) -> tuple[str, str]:
    """What stopped a write at ``path``, in words, and what to do: the ``OSError`` in ``err``'s chain (its errno:
    no space left on device, permission denied, read-only file system, ...); failing that, what ``path``'s disk
    says (torch's writer reports a full disk as ``RuntimeError: [enforce fail at inline_container.cc] ...
    unexpected pos``, without an errno): nearly no free space, or a probe write failing with an errno.

    >>> write_problem(OSError(errno.ENOSPC, "No space left on device"), Path("/x"))[0]
    'no space left on device (errno ENOSPC)'
    """
    seen, e = set(), err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno:
            return _errno_words(e.errno), _FIX.get(e.errno, "fix the cause above, then rerun")
        e = e.__cause__ or e.__context__
    folder = _existing(path if path.is_dir() or not path.exists() else path.parent)
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    if free is not None and free < LOW_SPACE:
        return (f"no space left on device ({free / 2**20:.1f} MiB free on the disk holding {folder}; the write "
                f"failed with {type(err).__name__}: {err})", _FIX[errno.ENOSPC])
    probe = folder / f".write-probe-{os.getpid()}"
    try:
        with open(probe, "wb") as fh:
            fh.write(b"\0" * 4096)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as probe_err:
        if probe_err.errno:
            return _errno_words(probe_err.errno), _FIX.get(probe_err.errno, "fix the cause above, then rerun")
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    return f"{type(err).__name__}: {err}", "fix the cause above, then rerun"


def _errno_words(code: int) -> str:
    return f"{os.strerror(code).lower()} (errno {errno.errorcode.get(code, code)})"


def check_writable(folder: Path) -> None:
    """Create ``folder`` if needed and write (then delete) a small file in it; raise :class:`WriteError` naming
    the cause and the fix if that fails: a checkpoints folder that cannot be written is found before the run
    starts, not at its first save."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-probe-{os.getpid()}"
        try:
            probe.write_bytes(b"\0")
        finally:
            with contextlib.suppress(OSError):
                probe.unlink()
    except OSError as err:
        cause, fix = write_problem(err, folder)
        raise WriteError(f"cannot write into {folder}: {cause}. The run needs it for its checkpoints: {fix}.") \
            from err


@contextlib.contextmanager
def writing(path: Path, what: str, after: str = ""):
    """Turn a failed write at ``path`` (an ``OSError``, or torch's ``RuntimeError``) into a :class:`WriteError`:
    ``cannot <what> <path>: <cause>. <after><fix>``."""
    try:
        yield
    except RunDirError:  # already says what happened (a busy folder, an earlier failed write)
        raise
    except (OSError, RuntimeError) as err:
        cause, fix = write_problem(err, path)
        raise WriteError(f"cannot {what} {path}: {cause}. {after}{fix[0].upper()}{fix[1:]}.") from err


@contextlib.contextmanager
def saving(staging: Path, final: Path, step: int):
    """A save of ``final`` (written into ``staging``) that fails becomes a :class:`WriteError` naming the path,
    the cause and the fix; the partial save is deleted (a leftover is never taken for a checkpoint: it has no
    ``step_N`` name) and the message names the newest complete checkpoint, which a rerun resumes from."""
    try:
        yield
    except RunDirError:
        raise
    except Exception as err:  # torch's RuntimeError, safetensors' own error type, an OSError: a save that failed
        cause, fix = write_problem(err, staging)  # before the cleanup: the partial files show a full disk
        try:
            _remove(staging)
            left = "The partial save was deleted"
        except OSError as rm_err:
            left = (f"The partial save {staging} could not be deleted ({rm_err.strerror or rm_err}); the next start "
                    "deletes it")
        newest, _ = newest_complete(final.parent)
        resume = (f"the newest complete checkpoint is {newest} (a rerun with the same output_dir resumes from it)"
                  if newest is not None else "no complete checkpoint was saved yet (a rerun starts at step 0)")
        size = ""
        if newest is not None and "space" in cause:
            mib = sum(p.stat().st_size for p in newest.rglob("*") if p.is_file()) / 2**20
            size = f" (a checkpoint takes ~{mib:.1f} MiB)"
        raise WriteError(f"cannot save the checkpoint of step {step} to {final}: {cause}. {left}; {resume}. To go "
                         f"on: {fix}{size}, then rerun.") from err


# ----------------------------------------------------------------------------------- atomic saves
def stage(final: Path) -> Path:
    """The hidden folder every rank writes a save of ``final`` into (``step_N`` -> ``.partial-step_N``)."""
    return final.with_name(STAGING_PREFIX + final.name)


def commit(staging: Path, final: Path, state: dict) -> Path:
    """Main process, after every rank wrote into ``staging``: record ``state`` plus every file's size and
    checksum (:func:`rollout_sleep.run.integrity.checksum`, compared when the checkpoint is resumed) in
    ``recipe_state.json`` (written last, synced to disk) and rename ``staging`` to ``final``."""
    files = {}
    for p in sorted(staging.rglob("*")):
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
            files[str(p.relative_to(staging))] = p.stat().st_size
    sums = integrity.checksums(staging, list(files))
    write_atomic(staging / STATE_FILE, json.dumps({**state, "files": files, "checksums": sums}))
    earlier = set_aside(final, "replaced by a new save of the same step") if final.exists() else None
    try:  # (``final`` exists when a step is saved again, e.g. after resuming from an older checkpoint)
        os.replace(staging, final)
    except OSError:
        if earlier is not None:  # the earlier save of the step stays the checkpoint
            with contextlib.suppress(OSError):
                os.replace(earlier, final)
        raise
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return final


# ----------------------------------------------------------------------------------- resuming
def checkpoint_problem(path: Path, verify: bool = False) -> str | None:
    """Why the checkpoint at ``path`` cannot be resumed from, or ``None`` if it is complete: its
    ``recipe_state.json`` exists and parses, every file it lists has the recorded size, and its
    ``.safetensors`` / torch zip files are whole (a check that also covers saves without a file list).
    ``verify``: every file also has the checksum recorded at its save (reads every file: once, for the
    checkpoint a resume loads); for one saved before checksums were recorded (said in the log), no file is
    damaged as far as its format tells (:func:`damaged_file`)."""
    state_file = path / STATE_FILE
    if not state_file.exists():
        return f"no {STATE_FILE} (the save did not finish)"
    try:
        state = json.loads(state_file.read_text())
        int(state["step"])
    except (ValueError, KeyError, TypeError):
        return f"{STATE_FILE} is unreadable"
    listed = state.get("files", {})
    if not (isinstance(listed, dict) and all(isinstance(k, str) and isinstance(v, int) for k, v in listed.items())):
        return f"{STATE_FILE} is unreadable (its 'files' is not a map of file names to sizes)"
    outside = [rel for rel in listed if Path(rel).is_absolute() or ".." in Path(rel).parts]
    if outside:  # never read (nor trust) a file outside the checkpoint folder
        return f"{STATE_FILE} lists {outside[0]!r}, a file outside the checkpoint folder"
    for rel, size in listed.items():
        f = path / rel
        if not f.is_file():
            return f"{rel} is missing"
        if f.stat().st_size != size:
            return f"{rel} has {f.stat().st_size} bytes, {size} were saved"
    files = [p for p in path.rglob("*") if p.is_file()]
    if not any(p.name != STATE_FILE for p in files):
        return "it holds no saved state"
    for p in files:
        problem = integrity.format_problem(p)
        if problem:
            return problem
    if not verify:
        return None
    if "checksums" not in state:
        logger.info("checkpoint %s was saved before checksums were recorded: its check is partial (sizes and "
                    "formats: torch's per-record CRCs, no NaN or Inf in saved weights; no checksums)", path)
        return damaged_file(path)
    saved = state["checksums"]
    if not (isinstance(saved, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in saved.items())):
        return f"{STATE_FILE} is unreadable (its 'checksums' is not a map of file names to checksums)"
    # only files the save listed are summed: a checksum of another name (never written by a save) is a mismatch
    unlisted = sorted(rel for rel in saved if rel not in listed)
    if unlisted:
        return (f"{unlisted[0]} does not match the checksum recorded at its save ({saved[unlisted[0]]}, now file "
                f"missing: the save did not list it): {STATE_FILE} was changed after the save")
    now = integrity.checksums(path, sorted(saved))
    for rel, recorded in saved.items():
        if now[rel] != recorded:
            return (f"{rel} does not match the checksum recorded at its save ({recorded}, now {now[rel]}): its "
                    "contents changed after the save (a disk or copy error, or an edit)")
    return None


def newest_complete(ckpt_dir: Path, verify: bool = False) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest complete ``step_N`` under ``ckpt_dir`` and the newer ones skipped, each with its reason
    (``verify``: see :func:`checkpoint_problem`)."""
    skipped = []
    for path in reversed(saved_steps(ckpt_dir)):
        problem = checkpoint_problem(path, verify)
        if problem is None:
            return path, skipped
        skipped.append((path, problem))
    return None, skipped


def damaged_file(path: Path) -> str | None:
    """What a full read of the checkpoint at ``path`` finds damaged in one of its files
    (:func:`rollout_sleep.run.integrity.damage`), or ``None``: for a checkpoint without checksums, or one that
    failed to load."""
    for p in sorted(path.rglob("*")):
        problem = integrity.damage(p) if p.is_file() and p.name != STATE_FILE else None
        if problem:
            return problem
    return None


def set_aside(path: Path, reason: str) -> Path:
    """Move a checkpoint that will not be used (incomplete, changed since its save, or failed to load) into
    ``checkpoints/incomplete/`` (kept, never deleted). A move that fails (a folder of another user, or
    immutable) raises :class:`WriteError` naming the folder, the reason and the fix: left in place, the
    checkpoint would be picked again by every resume."""
    target_dir = path.parent / "incomplete"
    target = target_dir / path.name
    try:
        target_dir.mkdir(exist_ok=True)
        if target.exists():
            target = target_dir / f"{path.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        os.replace(path, target)
    except OSError as err:
        cause, _ = write_problem(err, path)
        raise WriteError(f"cannot move checkpoint {path} to {target_dir}: {cause}. It is set aside because {reason}; "
                         f"left in place, every resume would pick it again. Move it out of {path.parent} by hand "
                         f"(or delete it), or make it and {path.parent} writable for this user (e.g. chattr -i, "
                         "chown), then rerun.") from err
    logger.info("moved %s to %s: %s", path, target, reason)
    return target


def clear_staging(ckpt_dir: Path) -> list[Path]:
    """Delete staging folders left by saves that crashed (never a checkpoint: their step was not renamed).
    One that is complete (the crash came between its ``recipe_state.json`` and its rename) is renamed instead:
    it may be the only copy of that step (:func:`commit` sets an earlier save of the step aside first)."""
    gone = []
    if ckpt_dir.is_dir():
        for p in list(ckpt_dir.iterdir()):
            if not p.name.startswith(STAGING_PREFIX):
                continue
            final = p.parent / p.name[len(STAGING_PREFIX):]
            if _STEP.match(final.name) and not final.exists() and checkpoint_problem(p) is None:
                os.replace(p, final)
                logger.warning("renamed %s to %s: a complete save whose rename did not happen", p, final)
            else:
                _remove(p)
                gone.append(p)
                logger.warning("deleted %s: a save that did not finish", p)
    return gone


def supersede_metrics(log: Path, through_step: int) -> int:
    """Keep the lines of steps <= ``through_step`` in ``log``; move the others (steps that will run again)
    to ``metrics.superseded.jsonl`` beside it. Returns how many lines moved."""
    if not log.exists():
        return 0
    keep, moved = [], []
    for line in log.read_text().splitlines():
        try:
            step = int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            step = None
        (keep if step is not None and step <= through_step else moved).append(line)
    if moved:
        with open(log.with_name("metrics.superseded.jsonl"), "a") as fh:
            fh.write("".join(ln + "\n" for ln in moved))
        write_atomic(log, "".join(ln + "\n" for ln in keep))
    return len(moved)

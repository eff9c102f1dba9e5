"""What the tests share besides fixtures (those are in ``conftest.py``): the repository's paths, the tiny
models' dtype and prompts, transformers' reference outputs, and the check that an engine computes with a model's
weights. Imported explicitly (``from helpers import ...``; ``tests/`` is on pytest's ``pythonpath``)."""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import importlib.util
import io
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]  # the repository
WORKERS = Path(__file__).resolve().parent / "workers"  # scripts the tests launch
RECIPE = ROOT / "recipes" / "grpo.py"
BENCHMARKS = ROOT / "benchmarks"

DTYPE = "float32"  # fp32 on CPU: vLLM and transformers then agree token for token


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


@contextlib.contextmanager
def two_ranks():
    """Around a launch of several processes: one such launch at a time across the suite's workers (pytest-xdist),
    vLLM's CPU tensor-parallel files cleared before and after. Those files have fixed names, so two launches at
    once would share them and one's clearing would break the other; and each launch keeps both cores busy by
    itself. Yields torchrun's command for 2 processes over gloo on loopback, its port chosen inside the lock (one
    chosen before a wait may be taken after it)."""
    from rollout_sleep.serve.server import free_port

    with open(Path(tempfile.gettempdir()) / "rollout-sleep-tests-ranks.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        clear_cpu_tp_shm()
        try:
            yield [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                   "127.0.0.1", "--master_port", str(free_port())]
        finally:
            clear_cpu_tp_shm()


def run_launch(cmd: list[str], *, timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)`` for a launcher of several processes
    (torchrun): when it runs past ``timeout``, or the test is interrupted (Ctrl-C, pytest-timeout), every process
    it started is stopped too. torchrun starts each rank in a session of its own, so killing the launcher alone, as
    ``subprocess.run`` does, leaves the ranks holding the cores, ports and shared-memory files the next launch
    needs. SIGTERM first (torchrun stops its ranks), then SIGKILL to whatever of the tree is left."""
    import psutil

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException as stopped:
        try:
            tree = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            tree = []
        proc.terminate()  # torchrun stops its ranks
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        _, alive = psutil.wait_procs(tree, timeout=5)
        for p in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        try:
            out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:  # a pipe still held by a process outside the tree: give up on it
            out, err = "", ""
        if isinstance(stopped, subprocess.TimeoutExpired):
            raise subprocess.TimeoutExpired(cmd, timeout, output=out, stderr=err) from None
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run_ranks(args: list[str], *, timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    """``args`` (a script and its arguments) under torchrun in 2 processes, inside :func:`two_ranks`, through
    :func:`run_launch`."""
    with two_ranks() as torchrun:
        return run_launch([*torchrun, *args], timeout=timeout, env=env)


def built_once(tmp_path_factory, config, name: str, build) -> Path:
    """A folder ``build(folder)`` fills once per test session: under pytest-xdist the workers share it (the first
    builds it while the others wait on a lock), so a costly module fixture is not built again by each worker that
    runs one of the module's tests. A build that raised is not tried again by the next worker: it raises the
    same error. Returns the folder. ``config``: pytest's (``request.config``)."""
    if not hasattr(config, "workerinput"):  # one process: its own temp folder
        folder = tmp_path_factory.mktemp(name)
        build(folder)
        return folder
    shared = tmp_path_factory.getbasetemp().parent  # this session's, shared by its workers
    folder, failed = shared / name, shared / f"{name}.failed"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if failed.exists():
            raise RuntimeError(f"building {name} failed in another worker: {failed.read_text()}")
        if not (folder / ".built").exists():
            folder.mkdir(exist_ok=True)  # left by a worker that died mid-build: built again over it
            try:
                build(folder)
            except BaseException as err:
                failed.write_text(f"{type(err).__name__}: {err}")
                raise
            (folder / ".built").touch()
    return folder


def run_recipe(config, *args: str, timeout: float = 300):
    """``recipes/grpo.py --config CONFIG ARGS`` in a child process, vLLM's log at WARNING: (the finished process,
    its stdout and stderr together)."""
    proc = subprocess.run([sys.executable, str(RECIPE), "--config", str(config), *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"})
    return proc, proc.stdout + proc.stderr


def run_recipe_ranks(config, *args: str, timeout: float = 600):
    """:func:`run_recipe` in 2 processes over gloo (torchrun), vLLM's CPU tensor-parallel files cleared before and
    after: (the finished launcher, its stdout and stderr together)."""
    proc = run_ranks([str(RECIPE), "--config", str(config), *args], timeout=timeout,
                     env={**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"})
    return proc, proc.stdout + proc.stderr


class EngineReached(BaseException):
    """Raised where the recipe would start vLLM (:func:`stop_at_engine`): every check before it has passed. A
    ``BaseException``, as ``SystemExit`` is, so that no handler for errors (the recipe's own ``run``) reports it."""


def stop_at_engine(monkeypatch, recipe) -> None:
    """Make ``recipe`` (:func:`load_recipe`) raise :class:`EngineReached` instead of starting vLLM."""
    def engine(*args, **kwargs):
        raise EngineReached

    monkeypatch.setattr(recipe, "build_engine", engine)


def without_package(monkeypatch, package: str) -> None:
    """``importlib.util.find_spec`` finds no ``package`` for the rest of the test (as on a machine without it)."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a))


def load_recipe():
    """``recipes/grpo.py`` as a module (the recipe is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("grpo_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_until_engine(monkeypatch, config, *args: str) -> tuple[int, str]:
    """``recipes/grpo.py --config CONFIG ARGS`` in this process (the recipe's own ``run``), stopped where it would
    start vLLM: (the exit code it would end with, what it printed: stdout, stderr, the logs at WARNING and up, and
    Python's warnings). For the refusals that come before vLLM, without a child process's ~11 s of imports. A run
    that passes every check raises :class:`EngineReached`. The launch itself (the exit code reaching the shell, the
    message printed once) is tested in child processes elsewhere. What the run sets process-wide (the loggers,
    the environment, accelerate's state) is put back after it."""
    import warnings

    from accelerate.state import AcceleratorState

    from rollout_sleep import log

    loggers = {name: logging.getLogger(name) for name in ("", "rollout_sleep", "vllm")}
    saved = {name: (lg.handlers[:], lg.level, lg.propagate) for name, lg in loggers.items()}
    env = dict(os.environ)
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out), \
                warnings.catch_warnings(record=True) as caught:
            recipe = load_recipe()  # configures the library's logging at import, as the script does
            stop_at_engine(monkeypatch, recipe)
            log.configure(stream=out)
            other = logging.StreamHandler(out)  # what other libraries log reaches a user's console too
            other.setLevel(logging.WARNING)
            loggers[""].addHandler(other)
            code = recipe.run(["--config", str(config), *args])
        out.writelines(f"{w.category.__name__}: {w.message}\n" for w in caught)
    finally:
        for name, (handlers, level, propagate) in saved.items():
            loggers[name].handlers[:] = handlers
            loggers[name].setLevel(level)
            loggers[name].propagate = propagate
        os.environ.clear()
        os.environ.update(env)
        AcceleratorState._reset_state(reset_partial_state=True)
    if code == 130:  # Ctrl-C during the test: the recipe said it and returned; the test run stops too
        raise KeyboardInterrupt
    return code, out.getvalue()


def benchmark(name: str):
    """The script ``benchmarks/<name>.py`` as a module, for tests of its logic (the benchmarks are scripts that
    import each other by name, as ``python benchmarks/<name>.py`` lets them)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    return importlib.import_module(name)


def items_of(sd, skip=(), stop_after=None, error_after=None, error=None):
    """A generator over ``sd``'s items: leaving ``skip`` out, ending after ``stop_after`` items, or raising
    ``error`` after ``error_after`` items (by default a trainer dying mid-sync; a Ctrl-C on its side)."""
    for i, (name, tensor) in enumerate(sd.items()):
        if i == error_after:
            raise error or RuntimeError("trainer died mid-sync")
        if i == stop_after:
            return
        if name not in skip:
            yield name, tensor


def torchrun(script: list[str], ckpts, out: Path) -> str:
    """``script`` under torchrun, 2 processes over gloo, given the tied checkpoints and ``out``; returns the
    output's tail (for failure messages)."""
    proc = run_ranks([*script, ckpts["tied0"], ckpts["tied1"], str(out)], timeout=600)
    return proc.stdout[-2000:] + proc.stderr[-4000:]


def views_on_fused_layout(family: str = "qwen3", pad_rows: int = 16):
    """A trainable model whose parameters are views of engine tensors laid out as vLLM lays them out (q/k/v rows
    of one ``qkv_proj``, gate/up of one ``gate_up_proj``, an embedding padded by ``pad_rows``), on the CPU:
    (engine tensors by name, the model, the one-copy invariant's problems of a model). The same tensors at every
    call (seeded)."""
    from transformers import AutoModelForCausalLM

    from rollout_sleep.weights import layout
    from rollout_sleep.weights.checkpoints import family_config
    from rollout_sleep.weights.spec import ties_head
    from rollout_sleep.weights.views import coverage_problems, model_on_views, model_spans, span

    packed = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    config = family_config(family, "tiny", "float32")
    with torch.device("meta"):
        spec = {n: tuple(p.shape) for n, p in AutoModelForCausalLM.from_config(config).named_parameters()}
    shapes = {}
    for name, shape in spec.items():
        module, _, leaf = name.rpartition(".")
        parent, _, sub = module.rpartition(".")
        fused = next((f for f, subs in packed.items() if sub in subs), None)
        if fused:
            rows = sum(spec[f"{parent}.{s}.{leaf}"][0] for s in packed[fused])
            shapes[f"{parent}.{fused}.{leaf}"] = (rows, *shape[1:])
        else:
            shapes[name] = (shape[0] + pad_rows, *shape[1:]) if "embed_tokens" in name else shape
    gen = torch.Generator().manual_seed(0)
    tensors = {n: torch.randn(s, generator=gen) for n, s in shapes.items()}
    plan = layout.placements(spec, packed, shapes, ties_head(config))
    model = model_on_views(config, {n: layout.view(tensors[w.param], w) for n, w in plan.items()}, torch.float32,
                           trainable=True)
    filled = layout.filled_bytes(plan, {n: (s, torch.float32) for n, s in shapes.items()})
    engine_spans = {n: span(t) for n, t in tensors.items()}
    return tensors, model, lambda m: coverage_problems(engine_spans, model_spans(m), filled)


def overridden(defaults: list[str] | tuple[str, ...], overrides: tuple[str, ...]) -> list[str]:
    """A test's default ``key=value`` overrides, less the keys the test gives itself, then the test's: the recipe
    refuses a key given twice with two values.

    >>> overridden(["wandb.mode=disabled", "save_every=0"], ("wandb.mode=online",))
    ['save_every=0', 'wandb.mode=online']
    """
    given = {o.split("=", 1)[0] for o in overrides}
    return [d for d in defaults if d.split("=", 1)[0] not in given] + list(overrides)


@contextlib.contextmanager
def cpu_mesh(monkeypatch):
    """A one-process gloo group and its CPU device mesh, for DTensors (FSDP2's parameters, gradients and optimizer
    state) in a test; the group is destroyed afterwards unless one was already there."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from rollout_sleep.serve.server import free_port

    created = not dist.is_initialized()
    if created:
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", str(free_port()))
        dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (dist.get_world_size(),))
    finally:
        if created:
            dist.destroy_process_group()

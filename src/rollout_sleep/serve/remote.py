"""The engine contract over HTTP: :class:`RemoteEngine` drives a ``vllm serve`` (a
:class:`~rollout_sleep.serve.server.ServerProcess` or any server with the sleep-mode dev endpoints) with the
in-process engine's state machine (:mod:`rollout_sleep.engine.state`) and errors. What HTTP cannot carry
(in-memory weights, reading the weights back, a ``SamplingParams`` object) is refused by name
(:class:`~rollout_sleep.engine.contract.UnsupportedOperation`).

    >>> with ServerProcess("/ckpt/a") as server:                        # doctest: +SKIP
    ...     engine = RemoteEngine(server.client(), "/ckpt/a")
    ...     engine.sleep(level=2)                                       # the trainer runs here
    ...     engine.wake_up(weights="/ckpt/a-step-10")                   # wake, reload, wake KV, reset
    ...     engine.generate(["2+2="], max_tokens=4)
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Iterable

from rollout_sleep.engine.completion import Completion
from rollout_sleep.engine.contract import UnsupportedOperation, as_prompts, closing, operation
from rollout_sleep.engine.phases import CycleReport, timed
from rollout_sleep.engine.state import LEVELS, EngineStateError, IncompleteWeightsError, SleepState, load_then_finish
from rollout_sleep.weights.spec import check_checkpoint_dir, read_checkpoint_spec

from .server import ServerClient, ServerError, ServerUnreachableError


class RemoteEngine(SleepState):
    """The engine interface over HTTP: generate, sleep, wake up (with a reload from a checkpoint path)
    and reset, with the in-process engine's state machine and errors. Weights travel as a checkpoint
    directory the server can read (a remote server cannot take in-memory tensors).

    Args:
        client: a :class:`ServerClient`.
        model_path: *optional*, the served checkpoint (default: the server's model id), used to validate
            reload paths (names, shapes and dtypes) before asking the server: a bad reload leaves vLLM
            half-loaded and kills it at the next request.

    The server's dtype and device come from its ``/server_info`` (a dev route). Its memory is not visible
    to a client: ``memory_before_gib`` / ``memory_loaded_gib`` are ``None``. :meth:`close` releases this
    client only; the server runs on (stop a :class:`ServerProcess` with its own ``stop``).
    """

    subject = "server"
    asleep_risk = "a request would hang until it wakes"
    levels = LEVELS
    in_process = False  # weights travel as a checkpoint directory; they cannot be read back
    _incomplete: str | None = None  # why the last reload did not complete (requests refused until one does)
    memory_before_gib = None
    memory_loaded_gib = None

    def __init__(self, client: ServerClient, model_path: str | os.PathLike | None = None):
        self.client = client
        self.model_id = client.models()[0]
        self.model_path = str(model_path or self.model_id)
        self._spec = None
        self._level: int | None = None
        if client.is_sleeping():
            raise EngineStateError(f"the server at {client.base_url} is asleep; wake it before attaching "
                                   "(its sleep level is unknown to this client)")
        self.dtype, device = _served_dtype_and_device(client)
        self.on_cuda = device == "cuda"

    def _require_server_awake(self, what: str, cause: Exception | None = None) -> None:
        """The server itself must be awake: another client may have put it to sleep (a request would then
        wait, silently, until it wakes or the client times out)."""
        try:
            asleep = self.client.request("GET", "/is_sleeping", timeout=min(10.0, self.client.timeout))["is_sleeping"]
        except ServerError:
            if cause is None:
                return  # the request itself will say what is wrong
            raise cause from None
        if asleep:
            raise EngineStateError(
                f"cannot {what}: the server at {self.client.base_url} is asleep, put to sleep by another client "
                "(this RemoteEngine did not): a request would wait until it wakes. Whoever put it to sleep must "
                "wake it (POST /wake_up; after a level-2 sleep also reload its weights), or do it here: "
                "client.wake_up(), then engine.load_weights(<checkpoint>)") from cause

    @operation("generate")
    def generate(self, prompts: Iterable[str] | Iterable[list[int]], sampling: Any = None, *, max_tokens: int = 16,
                 temperature: float = 1.0, n: int = 1, seed: int | None = None, **params: Any) -> list[Completion]:
        """Completions with token ids and the sampler's log-probs, ``n`` per prompt, in prompt order; sampling
        settings as keywords (the completions API's names: ``max_tokens``, ``min_tokens``, ``top_k``, ...)."""
        if sampling is not None:
            raise UnsupportedOperation(self, "generate(sampling=...)", "a SamplingParams object does not travel "
                                       "over the completions API", "pass the sampling settings as keyword arguments "
                                       "(max_tokens=..., temperature=..., n=...)")
        prompts = as_prompts(prompts)
        self.require_awake("generate")
        self._require_server_awake("generate")
        body = {"max_tokens": max_tokens, "temperature": temperature, "n": n, "logprobs": 0,
                "return_token_ids": True, **params}
        if seed is not None:
            body["seed"] = seed
        if not prompts:
            return []
        # One request per kind (the completions API takes a list of strings or a list of token-id lists, not a
        # mix), so the server batches each; choice k of a request belongs to its prompt k // n.
        kinds = [[i for i, p in enumerate(prompts) if isinstance(p, str)],
                 [i for i, p in enumerate(prompts) if not isinstance(p, str)]]
        out = []
        for where in filter(None, kinds):
            try:
                resp = self.client.completions([prompts[i] for i in where], model=self.model_id, **body)
            except ServerUnreachableError as err:  # e.g. put to sleep by someone else while we waited
                self._require_server_awake("generate", cause=err)
                raise
            for c in sorted(resp["choices"], key=lambda c: c["index"]):
                lps = (c.get("logprobs") or {}).get("token_logprobs")
                out.append(Completion(where[c["index"] // n], list(c.get("prompt_token_ids") or []),
                                      list(c.get("token_ids") or []), lps, c["text"], c.get("finish_reason")))
        return sorted(out, key=lambda c: c.prompt_index)  # stable: a prompt's n completions keep their order

    @operation("score")
    def score(self, sequences: Iterable[list[int]]) -> list[list[float]]:
        """Log-prob of every token of each sequence given its prefix (the first token has none), teacher-forced, as
        :meth:`Engine.score <rollout_sleep.engine.engine.Engine.score>`: the server's ``prompt_logprobs``."""
        seqs = [[int(t) for t in s] for s in sequences]
        self.require_awake("score")
        self._require_server_awake("score")
        if not seqs:
            return []
        resp = self.client.completions(seqs, model=self.model_id, max_tokens=1, temperature=0.0, prompt_logprobs=0,
                                       return_token_ids=True)
        out = []
        for c, seq in zip(sorted(resp["choices"], key=lambda c: c["index"]), seqs):
            steps = c.get("prompt_logprobs") or []
            out.append([step[str(tok)]["logprob"] for step, tok in zip(steps[1:], seq[1:])])
        return out

    @operation("run a function on the model")
    def run_on_model(self, fn: Any) -> Any:
        """Refused: the model lives in the server's process."""
        raise UnsupportedOperation(self, "run_on_model", "the model lives in the server's process",
                                   "an in-process Engine loaded from the same checkpoint")

    @operation("push weights")
    def push(self, weights: Any, **kwargs: Any) -> CycleReport:
        """Refused: a push takes in-memory weights into vLLM's own sleep/wake (an in-process integration)."""
        raise UnsupportedOperation(self, "push", "a push hands in-memory weights to a vLLM this process drives",
                                   "load_weights(<checkpoint directory>) (or wake_up(weights=...))")

    @operation("sleep")
    def sleep(self, level: int = 2) -> CycleReport:
        level = self.check_sleep(level)
        report = CycleReport("sleep", level, memory_kind="none")
        with timed(report, "sleep", sync=False):
            self.client.sleep(level)
        self._level = level
        return report

    @operation("wake up")
    def wake_up(self, weights: str | os.PathLike | None = None, *, reload_checkpoint: bool = False,
                method: str | None = None, strict: bool = True) -> CycleReport:
        """Wake in the memory-safe order: weights → reload (from ``weights``, a checkpoint directory) →
        KV cache → reset the prefix cache. Level 2 needs ``weights`` or ``reload_checkpoint=True``.
        ``method``: vLLM's reload from the path (``None`` / ``auto`` / ``reload``); ``strict``: a full checkpoint."""
        self._check_route("wake_up", weights, method, strict)
        path = self.check_wake(
            weights, reload_checkpoint, awake_hint="use load_weights(path) to reload it",
            level2_hint="waking from level 2 needs weights: level 2 discarded them. Pass weights=<checkpoint "
                        f"directory>, or reload_checkpoint=True to reload {self.model_path}")
        if path is not None:
            self._validate(path)
        report = CycleReport("wake", self._level, memory_kind="none")
        with timed(report, "wake_weights", sync=False):
            self.client.wake_up(["weights"])
        def load():
            with timed(report, "load", sync=False):
                self._reload(path)

        def finish():
            with timed(report, "wake_kv_cache", sync=False):
                self.client.wake_up(["kv_cache"])
            self._level = None
            with timed(report, "reset", sync=False):
                self._reset()

        # whatever happened to the reload, the wake is finished so the server is in a known state
        load_then_finish(load if path is not None else None, finish, what="reload")
        return report

    @operation("load weights")
    def load_weights(self, weights: str | os.PathLike, *, method: str | None = None, strict: bool = True) -> CycleReport:
        """Reload an awake server from a checkpoint directory, then reset its prefix cache."""
        self._check_route("load_weights", weights, method, strict)
        self.check_awake_for_load()
        self._validate(weights)
        report = CycleReport("load", memory_kind="none")
        with timed(report, "load", sync=False):
            self._reload(weights)
        with timed(report, "reset", sync=False):
            self._reset()
        return report

    @operation("reset the prefix cache")
    def reset_prefix_cache(self) -> None:
        self.require_awake("reset the prefix cache")
        self._reset()

    @operation("verify weights")
    def verify_weights(self, model: Any) -> Any:
        """Refused: the bitwise proof reads every weight where the engine holds it."""
        raise UnsupportedOperation(self, "verify_weights", "a server's weights cannot be read back over HTTP",
                                   "verify an in-process Engine loaded from the same checkpoint, or compare the "
                                   "server's score(...) (teacher-forced log-probs) with the trainer's")

    @closing
    def close(self) -> None:
        """Release this client (the server runs on: whoever started it stops it)."""

    def _check_route(self, method_name: str, weights: Any, method: str | None, strict: bool) -> None:
        """What a server can load: a checkpoint directory, whole, through vLLM's reload."""
        if weights is not None and not isinstance(weights, (str, os.PathLike)):
            raise UnsupportedOperation(self, f"{method_name}(weights=<{type(weights).__name__}>)",
                                       "a vllm serve takes new weights only as a checkpoint directory it can read",
                                       "save them (model.save_pretrained(path)) and pass the path, or use an "
                                       "in-process Engine for in-memory weights")
        if method not in (None, "auto", "reload"):
            raise UnsupportedOperation(self, f"{method_name}(method={method!r})", "a server reloads from a path "
                                       "with vLLM's reload_weights only", "method=None (or 'reload')")
        if not strict:
            raise UnsupportedOperation(self, f"{method_name}(strict=False)", "a server reloads whole checkpoints",
                                       "a checkpoint directory with every tensor (strict=True)")

    def require_awake(self, what: str) -> None:
        """Refuse ``what`` unless awake with a completed reload (see :meth:`SleepState.require_awake`)."""
        super().require_awake(what)
        if self._incomplete is not None:
            raise IncompleteWeightsError(
                f"cannot {what}: the last reload did not complete ({self._incomplete}), so the server may hold a mix "
                "of old and new weights (and a half-reloaded vLLM dies at its next request); call "
                "load_weights(<checkpoint directory>) with a complete checkpoint first")

    def _reload(self, path: str | os.PathLike) -> None:
        """vLLM's reload from ``path`` (validated). Until one completes, requests are refused: a reload that failed
        or was interrupted (Ctrl-C, a timeout) may have left the server's weights half-replaced."""
        self._incomplete = f"the reload from {path} was interrupted"
        try:
            self.client.reload_weights(str(path))
        except BaseException as err:  # noqa: BLE001  (Ctrl-C included: re-raised as it is)
            self._incomplete = f"the reload from {path} failed: {type(err).__name__}: {str(err)[:200]}".rstrip(": ")
            raise
        self._incomplete = None

    def _reset(self) -> None:
        if not self.client.reset_prefix_cache():
            raise EngineStateError("the server refused to reset its prefix cache (requests still hold blocks)")

    def _validate(self, path: str | os.PathLike) -> None:
        if self._spec is None and Path(self.model_path).is_dir():
            self._spec = read_checkpoint_spec(self.model_path)
        check_checkpoint_dir(path, self._spec)


def _served_dtype_and_device(client: ServerClient) -> tuple[Any, str]:
    """The served model's torch dtype and the server's device type, from its ``/server_info`` dev route
    (JSON where vLLM offers it, else its text form)."""
    import torch

    try:
        info = client.server_info()
    except ServerUnreachableError:
        raise
    except ServerError as err:
        raise ServerError(f"{err}; RemoteEngine reads the served dtype and device from /server_info, a dev "
                          "route: start the server with VLLM_SERVER_DEV_MODE=1 (ServerProcess does)") from None
    if isinstance(info, dict):
        dtype, device = info["model_config"]["dtype"], info["device_config"]["device"]
    else:
        dtype = re.search(r"dtype=(torch\.\w+)", info).group(1)
        device = re.search(r"device_config=(\w+)", info).group(1)
    return getattr(torch, str(dtype).replace("torch.", "")), str(device).split(":")[0]

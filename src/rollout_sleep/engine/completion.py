"""What a rollout returns (:class:`Completion`), how it is read out of vLLM's request outputs cheaply, and
the one check that vLLM samples at the temperature asked (:func:`temperature_problem`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Completion:
    """One sampled completion: token ids and the sampler's log-prob of each sampled token."""

    prompt_index: int
    prompt_token_ids: list[int]
    token_ids: list[int]
    logprobs: list[float] | None
    text: str
    finish_reason: str | None


def fast_output_kwargs(sampling_kwargs: dict) -> dict:
    """``SamplingParams`` keyword arguments with vLLM's cheap output path where the caller left it open:
    flat log-probs (one list per request instead of a dict per token, where the version has them) and no
    detokenization (vLLM decodes every request at every step, and each log-prob token too, on the engine's
    thread when it runs in-process; one batched decode afterwards is far cheaper). Stop strings need
    vLLM's text, so they keep it."""
    from vllm import SamplingParams

    out = dict(sampling_kwargs)
    if "flat_logprobs" in getattr(SamplingParams, "__struct_fields__", ()):
        out.setdefault("flat_logprobs", True)
    if not out.get("stop"):
        out.setdefault("detokenize", False)
    return out


def temperature_problem(temperature: float, key: str = "temperature") -> str | None:
    """Why vLLM would not sample at exactly ``temperature``, or ``None``. vLLM raises a temperature between 0 and
    its floor (``_MAX_TEMP``, 0.01 in vLLM 0.26-0.32) to that floor, with only a log line; a trainer that scores
    the completions at the asked temperature would then compare other distributions than vLLM sampled from
    (at 1e-4 the log-probs differ by ~0.6 per token). Asks the installed vLLM's ``SamplingParams``, without
    starting an engine. The one check of it: the recipe (``train.temperature``) and the TRL plugin
    (``GRPOConfig.temperature``) call it."""
    import logging

    from vllm import SamplingParams

    vllm_logger = logging.getLogger("vllm")
    quiet = vllm_logger.level
    vllm_logger.setLevel(logging.ERROR)  # its clamp warning: this function says it better
    try:
        sampled = SamplingParams(temperature=temperature).temperature
    except Exception as err:  # vLLM's validation error (a ValueError in some versions, not in 0.32)
        return f"{key}={temperature} is refused by vLLM: {err}"
    finally:
        vllm_logger.setLevel(quiet)
    if sampled == temperature:
        return None
    low = sampled > temperature
    return (f"{key}={temperature:g} is {'below' if low else 'above'} vLLM's {'lowest' if low else 'highest'} "
            f"sampling temperature: vLLM would sample at {sampled:g} while the trainer scores the completions at "
            f"{temperature:g}, so every log-prob ratio would compare two different distributions. Set "
            f"{key}={sampled:g}" + (" or higher" if low else " or lower"))


def sampled_logprobs(logprobs: Any, token_ids: list[int]) -> list[float]:
    """The sampler's log-prob of each sampled token, from vLLM's per-token dicts or its flat lists."""
    if hasattr(logprobs, "start_indices"):  # FlatLogprobs
        if len(logprobs.logprobs) == len(token_ids) and logprobs.token_ids == token_ids:
            return list(logprobs.logprobs)  # logprobs=0: exactly the sampled tokens, one per position
        out = []
        for pos, tok in enumerate(token_ids):
            start, end = logprobs.start_indices[pos], logprobs.end_indices[pos]
            j = start if logprobs.token_ids[start] == tok else logprobs.token_ids.index(tok, start, end)
            out.append(logprobs.logprobs[j])
        return out
    return [step[tok].logprob for step, tok in zip(logprobs, token_ids)]

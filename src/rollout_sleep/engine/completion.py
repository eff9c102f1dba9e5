"""What a rollout returns (:class:`Completion`) and how it is read out of vLLM's request outputs cheaply."""

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

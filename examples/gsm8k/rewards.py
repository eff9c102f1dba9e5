"""Reward functions for GSM8K-style math, written for TRL's GRPOTrainer (and used unchanged by the recipe).

TRL's signature: ``fn(prompts, completions, **kwargs) -> list[float | None]``, called once per batch.
``completions`` are lists of messages (``[{"role": "assistant", "content": ...}]``) for conversational data,
strings otherwise; every dataset column arrives as a keyword argument, one value per completion (here
``answer``: GSM8K's worked solution, ending in ``#### <number>``).
"""

import re

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
FINAL = re.compile(r"####\s*(-?\d[\d,]*(?:\.\d+)?)\s*$")


def _content(completion):
    return completion[0]["content"] if isinstance(completion, list) else completion


def _number(text):
    return float(text.replace(",", ""))


def gold_number(answer: str):
    """The final number of a GSM8K answer (after ``####``), or None if it has none."""
    match = FINAL.search(answer.strip())
    return _number(match.group(1)) if match else None


def gsm8k_correct(completions, answer, **kwargs):
    """1.0 when the completion's last number equals the gold answer, else 0.0; None for a row without a
    gold number (that reward then does not count for it)."""
    rewards = []
    for completion, solution in zip(completions, answer):
        gold = gold_number(solution)
        if gold is None:
            rewards.append(None)
            continue
        found = NUMBER.findall(_content(completion))
        rewards.append(float(bool(found) and _number(found[-1]) == gold))
    return rewards


def gsm8k_format(completions, **kwargs):
    """1.0 when the completion ends with ``#### <number>`` (GSM8K's answer line), else 0.0."""
    return [float(FINAL.search(_content(c).strip()) is not None) for c in completions]

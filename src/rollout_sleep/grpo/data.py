"""Prompts as ``datasets.Dataset``: the embedded synthetic arithmetic task, or any local dataset, in TRL's
formats: standard (``prompt`` is text) or conversational (``prompt`` is a list of ``{"role", "content"}``
messages, rendered with the tokenizer's chat template). Completions reach the rewards in the same format:
text, or ``[{"role": "assistant", "content": text}]``.

>>> ds = synthetic_arithmetic(4, seed=0)
>>> sorted(ds.column_names)
['answer', 'prompt']
>>> as_conversation(ds, system_prompt="Answer with a number.")[0]["prompt"]
[{'role': 'system', 'content': 'Answer with a number.'}, {'role': 'user', 'content': '6+6='}]
>>> completions_for_rewards(["12"], conversational=True)
[[{'role': 'assistant', 'content': '12'}]]
"""

from __future__ import annotations

import functools
import random
import unicodedata
from pathlib import Path

from .files import file_problem, mixed_column_problem, unreadable_problem


def synthetic_arithmetic(n: int = 1024, seed: int = 0, max_operand: int = 9):
    """``n`` verifiable prompts "a+b=" with their answers (generated, no download)."""
    from datasets import Dataset

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        rows.append({"prompt": f"{a}+{b}=", "answer": str(a + b)})
    return Dataset.from_list(rows)


def load_prompts(source: str, *, prompt_column: str = "prompt", split: str = "train", n: int | None = None,
                 seed: int = 0):
    """``synthetic`` (the embedded task) or a local dataset: a folder ``load_dataset`` reads, or a
    ``.jsonl`` / ``.json`` / ``.parquet`` / ``.csv`` file. The prompt column is renamed to ``prompt``."""
    if source == "synthetic":
        return synthetic_arithmetic(n or 1024, seed)
    from datasets import load_dataset

    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"dataset {source!r} not found (use 'synthetic' or a local path)")
    kinds = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
    if path.is_file() and path.suffix.lower() not in kinds:  # data.JSONL is JSON Lines too
        raise ValueError(f"unsupported dataset file {path.name!r}; use one of {sorted(kinds)}")
    problem = unreadable_problem(path)  # pyarrow reads bytes that are not UTF-8 into the rows, to fail when one is read
    if problem:
        raise ValueError(problem)
    try:
        if path.is_file():
            ds = load_dataset(kinds[path.suffix.lower()], data_files=str(path), split=split)
        else:
            ds = load_dataset(str(path), split=split)
    except StopIteration:  # an empty file (the recipe says "it has no rows")
        raise
    except Exception as err:  # datasets' own messages name neither the file nor the line
        raise ValueError(file_problem(path, err)) from err
    problem = mixed_column_problem(ds)
    if problem:
        raise ValueError(problem)
    if prompt_column not in ds.column_names:
        raise KeyError(f"dataset {source!r} has no column {prompt_column!r}; columns: {ds.column_names}")
    if prompt_column != "prompt" and "prompt" in ds.column_names:
        raise ValueError(f"data.prompt_column={prompt_column!r} renames column {prompt_column!r} to 'prompt' (rewards "
                         f"receive it as `prompts`), and dataset {source!r} has a 'prompt' column already: drop or "
                         f"rename that column, or set data.prompt_column=prompt")
    if prompt_column != "prompt":
        ds = ds.rename_column(prompt_column, "prompt")
    if n and n > len(ds):
        raise ValueError(f"it has {len(ds)} rows, fewer than data.num_prompts={n}: lower data.num_prompts, or set it "
                         f"to null to use every row")
    return ds.select(range(n)) if n else ds


def rows_fingerprint(ds) -> str:
    """A digest of every row the run reads, every column, in order: a resume compares it with the run's, so that a
    dataset edited in place (rows reordered, prompts or answers changed, the row count kept) is refused, not
    trained on silently. Taken from the rows, not from datasets' ``_fingerprint`` (which follows the file's path
    and modification time, not its contents); ~0.2 s per 100k rows of GSM8K-sized text.

    >>> rows_fingerprint(synthetic_arithmetic(4, seed=0)) == rows_fingerprint(synthetic_arithmetic(4, seed=0))
    True
    """
    import hashlib
    import json

    digest = hashlib.blake2b(digest_size=16)
    for batch in ds.iter(batch_size=1024):
        digest.update(json.dumps(batch, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def check_rows(ds, source: str, num_prompts: int | None, per_step: int) -> str | None:
    """The problem (or ``None``) with a dataset too small for one step: with fewer rows than
    ``train.prompts_per_step`` every step would hold some prompts twice, so the recipe refuses it (TRL's
    sampler yields no batch from such a dataset at all)."""
    if len(ds) >= per_step:
        return None
    used = f"the first {num_prompts} rows (data.num_prompts)" if num_prompts else f"{len(ds)} rows"
    return (f"data.dataset {source!r} gives {used}, fewer than train.prompts_per_step ({per_step}): every step "
            f"would repeat prompts within itself. Lower train.prompts_per_step to {len(ds)} or less, or use more rows "
            f"({'raise data.num_prompts, ' if num_prompts else ''}a larger dataset)")


@functools.lru_cache(maxsize=2)  # the epoch a step reads and the next one
def epoch_order(epoch: int, rows: int, seed: int) -> tuple[int, ...]:
    """The permutation of all ``rows`` that epoch ``epoch`` reads, drawn from ``seed`` and the epoch number only
    (numpy's generator, seeded by a hash of the two: the same on every machine and Python version)."""
    import hashlib

    import numpy as np

    key = hashlib.sha256(f"rollout-sleep data order: seed {seed}, epoch {epoch}".encode()).digest()
    return tuple(np.random.default_rng(int.from_bytes(key[:8], "little")).permutation(rows).tolist())


def step_rows(step: int, rows: int, per_step: int, seed: int) -> list[int]:
    """The dataset rows step ``step`` (counted from 0) trains on.

    The steps read one stream of epochs, each a fresh seeded permutation of the whole dataset
    (:func:`epoch_order`), ``per_step`` rows at a time; a step that crosses an epoch's end continues into the
    next epoch's permutation (so such a step may hold a row twice, once from each epoch). A function of its
    arguments only: a run resumed at any step draws exactly the rows an uninterrupted run would.

    >>> [step_rows(s, 6, 4, seed=0) for s in range(3)]
    [[3, 2, 0, 5], [1, 4, 2, 0], [3, 1, 4, 5]]
    """
    if rows < 1 or per_step < 1:
        raise ValueError(f"step_rows needs rows >= 1 and per_step >= 1, got {rows} and {per_step}")
    out: list[int] = []
    position = step * per_step
    while len(out) < per_step:
        epoch, offset = divmod(position, rows)
        taken = epoch_order(epoch, rows, seed)[offset: offset + per_step - len(out)]
        out += taken
        position += len(taken)
    return out


def is_conversational(ds) -> bool:
    """Whether the dataset's prompts are lists of messages (TRL's test, on the first row)."""
    from trl.data_utils import is_conversational as trl_is_conversational

    return len(ds) > 0 and trl_is_conversational({"prompt": ds[0]["prompt"]})


def as_conversation(ds, system_prompt: str | None = None):
    """Plain prompts become one user message each; ``system_prompt`` (if given) is put first in every
    conversation that has no system message yet. Decided row by row: a text row is never read as a list of
    messages (one per character)."""

    def convert(example):
        prompt = example["prompt"]
        messages = list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        if system_prompt is not None and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system_prompt}] + messages
        return {"prompt": messages}

    return ds.map(convert)


def prepare_prompts(ds, tokenizer, *, chat_template: bool = False, system_prompt: str | None = None):
    """The dataset the recipe trains on: conversational when the data is, or when ``chat_template`` or a
    ``system_prompt`` asks for it; a clear error if it then needs a chat template the tokenizer lacks."""
    if system_prompt is not None and not isinstance(system_prompt, str):
        raise ValueError(f"data.system_prompt must be text, got {system_prompt!r} (quote it in YAML or overrides)")
    if system_prompt is not None and not _visible(system_prompt):
        raise ValueError(f"data.system_prompt is {system_prompt!r}, which would add a system message holding nothing "
                         "visible to every prompt: set data.system_prompt=null for no system message")
    if chat_template or system_prompt is not None:
        ds = as_conversation(ds, system_prompt)
    if is_conversational(ds) and not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"the prompts are conversations but the tokenizer of {tokenizer.name_or_path!r} has no chat "
                         f"template: use an instruct/chat checkpoint, set tokenizer.chat_template, or give plain "
                         f"text prompts (data.chat_template: false, no data.system_prompt)")
    return ds


ROLES = ("system", "user", "assistant", "tool")
"""The message roles a prompt may hold: the ones TRL's data utilities and chat templates (Qwen's, Llama's) know; a
template may drop a message of any other role without a word, and the tiny checkpoints' own template prints any."""


def _visible(text: str) -> bool:
    """Whether ``text`` holds a character one can see: not whitespace, nor a Unicode format character (category
    Cf: zero-width space U+200B, joiners, BOM, ...), which models read as tokens but a reader never sees."""
    return any(not c.isspace() and unicodedata.category(c) != "Cf" for c in text)


def _blank(text: str) -> str:
    """Why ``text`` without a visible character is blank, in words."""
    if not text:
        return "is empty"
    return f"is only whitespace ({text!r:.20})" if text.isspace() else \
        f"has no visible character ({text!r:.30}: whitespace and invisible format characters only)"


def _prompt_problem(prompt) -> str | None:
    """What makes one prompt unusable, or ``None``. Text must hold a visible character (whitespace and Unicode
    format characters such as U+200B do not count, see :func:`_visible`). A conversation must be a non-empty list
    of ``{"role", "content"}`` messages with text values and a role of :data:`ROLES`; every user message must
    hold visible text, and so must at least one message (a blank system or assistant message beside a user's
    question is harmless, a conversation with nothing visible is not a prompt)."""
    if isinstance(prompt, str):
        if not _visible(prompt):
            return _blank(prompt)
        return _encoded_messages(prompt)
    if prompt is None:
        return "is null (missing)"
    if not isinstance(prompt, list) or not prompt:
        kind = type(prompt).__name__
        return f"is {'an' if kind[0] in 'aeiou' else 'a'} {kind} ({prompt!r:.80}), not text or a non-empty list of messages"
    for m in prompt:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            return f"has a message without a text 'role' and 'content': {m!r:.80}"
        if m["role"] not in ROLES:
            return f"has a message with role {m['role']!r:.40}, not one of {', '.join(ROLES)}"
    for i, m in enumerate(prompt):
        if m["role"] == "user" and not _visible(m["content"]):
            return f"has a user message (message {i}) whose content {_blank(m['content'])}"
    if not any(_visible(m["content"]) for m in prompt):
        return "has no message with visible content (each is empty, whitespace or invisible characters)"
    return None


def _encoded_messages(text: str) -> str | None:
    """Text that holds a conversation written out as JSON or as a Python literal (a CSV cell cannot hold a list):
    the chat template would never see it, the model would read the brackets and quotes as the prompt."""
    stripped = text.strip()
    if not (stripped.startswith("[") and stripped.endswith("]") and "role" in stripped):
        return None
    import ast
    import json

    for parse in (json.loads, ast.literal_eval):
        try:
            value = parse(stripped)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            continue
        if isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m for m in value):
            return ("is text holding a list of messages written out ({!r:.60}...): it would be sent as text, brackets "
                    "and quotes included, without the chat template. Give the messages as a list in a JSON Lines "
                    "or Parquet file (a CSV cell holds text only)").format(stripped)
    return None


def _rows(indices: list[int]) -> str:
    """``row 3`` or ``rows 0, 1, 2, ...``: the first few of ``indices``."""
    return ("row " if len(indices) == 1 else "rows ") + ", ".join(map(str, indices[:3])) + \
        (", ..." if len(indices) > 3 else "")


def prompt_problems(ds, where: str = "the dataset") -> list[str]:
    """What makes the prompts of ``ds`` unusable, each named with ``where`` (the dataset file and column), rows
    and the fix; empty when every prompt can be used. Looks at every row: prompts that are neither non-empty text
    nor messages (:func:`_prompt_problem`), and a mix of text and conversations (the chat template would get one
    format, the tokenizer the other; the format of row 0 decided for all, which read text as one message per
    character, silently, or failed in the tokenizer at a later step)."""
    prompts = ds["prompt"] if len(ds) else []
    bad, text, chats = [], [], []  # one pass: (row, why) of the unusable; the rows of each usable format
    for i, p in enumerate(prompts):
        why = _prompt_problem(p)
        if why:
            bad.append((i, why))
        else:
            (text if isinstance(p, str) else chats).append(i)
    out = []
    if bad:
        hint = ""
        if any(isinstance(prompts[i], (int, float)) for i, _ in bad):
            hint = (". A number is not text: quote it (JSON Lines: \"prompt\": \"12\"; a CSV column of numbers is "
                    "read as numbers even when quoted, so give such prompts as JSON Lines), or point "
                    "data.prompt_column at the column that holds the prompts")
        out.append(f"{where}: {len(bad)} of {len(prompts)} prompt(s) cannot be used (rows counted from 0), e.g. "
                   + "; ".join(f"row {i} {why}" for i, why in bad[:3])
                   + f". Fix or drop those rows: every prompt must be text with a visible character, or a non-empty "
                     f"list of {{\"role\", \"content\"}} messages with a role of {', '.join(ROLES)} (every user "
                     f"message with visible text){hint}")
    if text and chats:
        out.append(f"{where} mixes two prompt formats: {len(text)} text prompt(s) (e.g. {_rows(text)}) and "
                   f"{len(chats)} list(s) of messages (e.g. {_rows(chats)}; rows counted from 0). Use one format in every row: "
                   f"write each text prompt as [{{\"role\": \"user\", \"content\": <text>}}] (or each "
                   f"conversation as text)")
    return out


CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "model_max_length",
                "max_sequence_length", "max_seq_length", "seq_len")
"""The config.json keys vLLM reads a model's context length from (it takes the smallest present)."""


# RoPE types whose max_position_embeddings is already the scaled length: vLLM does not multiply it by the factor
_ROPE_PRESCALED = ("su", "longrope", "llama3", "yarn", "deepseek_yarn", "deepseek_llama_scaling")


def _rope_parameters(raw: dict) -> list[dict]:
    """The RoPE parameter dicts of a config.json (the older ``rope_scaling`` wins over ``rope_parameters``, as in
    transformers), one per layer type where they are nested."""
    params = raw.get("rope_scaling") or raw.get("rope_parameters")
    if not isinstance(params, dict) or not params:
        return []
    if all(isinstance(v, dict) for v in params.values()):  # per layer type: {"full_attention": {...}, ...}
        return [v for v in params.values() if v]
    return [params]


def model_context(model_path: str) -> tuple[int, str] | None:
    """The context length vLLM gives a model when ``engine.max_model_len`` is null, with where it comes from (the
    config key, and the RoPE factor where one stretches it): the smallest of :data:`CONTEXT_KEYS` in its
    ``config.json`` (or its ``text_config``), multiplied by the RoPE scaling factor for the scalings that vLLM
    multiplies (linear, dynamic, ...; not YaRN, Llama 3's or LongRoPE, whose ``max_position_embeddings`` is already
    the scaled length; LongRoPE takes ``original_max_position_embeddings``). ``None`` where it cannot tell."""
    import json

    try:
        raw = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    raw = raw.get("text_config") or raw
    found = [(raw[k], k) for k in CONTEXT_KEYS if isinstance(raw.get(k), int) and raw[k] > 0]
    if not found:
        return None
    length, key = min(found)
    if isinstance(raw.get("model_max_length"), int) and raw["model_max_length"] > 0:  # vLLM: it wins (Command-R)
        length, key = raw["model_max_length"], "model_max_length"
    rope = _rope_parameters(raw)
    if not rope or "gemma3" in str(raw.get("model_type", "")):  # Gemma 3's length is already scaled
        return length, key
    factor = 1.0
    for params in rope:
        kind = params.get("rope_type", params.get("type", "default"))
        if kind not in _ROPE_PRESCALED:
            factor = params.get("factor", factor)
    factor = 1.0 if not isinstance(factor, (int, float)) else factor
    if any(params.get("rope_type", params.get("type")) == "longrope" for params in rope):
        original = raw.get("original_max_position_embeddings")
        return (original, "original_max_position_embeddings") if isinstance(original, int) else \
            (int(length * factor), key)
    if factor == 1.0:
        return length, key
    return int(length * factor), f"{key} × its RoPE scaling factor {factor:g}"


def engine_context(model_path: str, max_model_len: int | None) -> tuple[int | None, str]:
    """The context vLLM will run the model with, and what to call it in messages: ``engine.max_model_len`` when
    set, else the model's (:func:`model_context`; ``None`` where it cannot tell). Raises ``ValueError`` for a
    ``max_model_len`` beyond the model's context, which vLLM refuses at its start (unless its
    ``VLLM_ALLOW_LONG_MAX_MODEL_LEN`` is set)."""
    import os

    known = model_context(model_path)
    if max_model_len is None:
        return (known[0], f"the model's {known[1]}") if known else (None, "engine.max_model_len")
    allowed = os.environ.get("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "").strip().lower() in ("1", "true")
    if known and max_model_len > known[0] and known[1] != "original_max_position_embeddings" and not allowed:
        raise ValueError(f"engine.max_model_len ({max_model_len}) exceeds the model's context, its {known[1]} "
                         f"({known[0]}): vLLM refuses to start with it. Lower engine.max_model_len to {known[0]} or "
                         f"less, or set it to null (the model's own)")
    return max_model_len, "engine.max_model_len"


def check_prompts(ds, tokenizer, max_model_len: int | None, max_tokens: int,
                  context_from: str = "engine.max_model_len", where: str = "the dataset") -> list[list[int]]:
    """Every prompt's token ids (:func:`prompt_token_ids`), or a ``ValueError`` naming the rows the recipe could
    not generate from, before the engine starts: an empty dataset, a prompt :func:`prompt_problems` refuses
    (``where`` names the dataset there), one the chat template refuses, a prompt whose tokens leave no room for a
    completion within the context ``max_model_len`` (named ``context_from`` in the messages: the setting or the
    model config key it comes from; vLLM refuses a prompt longer than it), or ``max_tokens`` beyond it. Prompts
    whose completions would be cut short of ``max_tokens`` get a warning naming them."""
    import logging

    if len(ds) == 0:
        raise ValueError(f"{where} has no rows")
    problems = prompt_problems(ds, where)
    if problems:
        raise ValueError("; ".join(problems))
    if max_model_len is not None and max_tokens > max_model_len:
        raise ValueError(f"train.max_tokens ({max_tokens}) exceeds the context, {context_from} ({max_model_len}): "
                         f"vLLM refuses such a request; lower train.max_tokens")
    try:
        token_ids = prompt_token_ids(tokenizer, list(ds["prompt"]))
    except Exception as err:  # e.g. a chat template that refuses the roles' order (jinja2's TemplateError)
        prompts = list(ds["prompt"])
        row = next((i for i, p in enumerate(prompts) if _fails(tokenizer, p)), None)
        which = (f"row {row} of {where} ({prompts[row]!r:.120}) cannot be tokenized" if row is not None else
                 f"the prompts of {where} cannot be tokenized")
        template = " by the model's chat template (model.path)" if isinstance(prompts[row or 0], list) else ""
        raise ValueError(f"{which}{template}: {type(err).__name__}: {err}. Fix or drop that row, or give a chat "
                         f"template that takes it" + (" (data.system_prompt adds a system message, which some "
                                                     "templates refuse)" if template else "")) from err
    if max_model_len is None:
        return token_ids
    lengths = [len(ids) for ids in token_ids]
    long = [(i, n) for i, n in enumerate(lengths) if n >= max_model_len]
    if long:
        raise ValueError(f"{len(long)} prompt(s) have >= {context_from} ({max_model_len}) tokens, leaving no "
                         f"room for a completion, e.g. " + ", ".join(f"row {i}: {n} tokens" for i, n in long[:3]) +
                         ": filter or shorten those prompts"
                         + (", or raise engine.max_model_len" if context_from == "engine.max_model_len" else ""))
    cut = [(i, n) for i, n in enumerate(lengths) if n + max_tokens > max_model_len]
    if cut:
        logging.getLogger(__name__).warning(
            "%d prompt(s) leave fewer than train.max_tokens=%d tokens for their completions within %s=%d, which cuts "
            "those completions short: %s", len(cut), max_tokens, context_from, max_model_len,
            ", ".join(f"row {i}: {n} prompt tokens" for i, n in cut[:5]) + (", ..." if len(cut) > 5 else ""))
    return token_ids


def prompts_fingerprint(token_ids: list[list[int]]) -> str:
    """A digest of every prompt's token ids, in order: what vLLM generates from, after the chat template, the
    system prompt and the tokenizer (a resume compares it with the run's)."""
    import hashlib

    digest = hashlib.blake2b(digest_size=16)
    for ids in token_ids:
        digest.update(len(ids).to_bytes(4, "little"))
        digest.update(b"".join(int(i).to_bytes(4, "little") for i in ids))
    return digest.hexdigest()


def _fails(tokenizer, prompt) -> bool:
    try:
        prompt_token_ids(tokenizer, [prompt])
    except Exception:
        return True
    return False


def prompt_token_ids(tokenizer, prompts: list) -> list[list[int]]:
    """Token ids of each prompt as TRL's GRPOTrainer makes them: the chat template with the generation
    prompt for conversations, the tokenizer alone for text."""
    prompts = list(prompts)
    chats = [i for i, p in enumerate(prompts) if isinstance(p, list)]
    if chats and len(chats) < len(prompts):  # never a text prompt through the chat template, nor messages as text
        text = next(i for i, p in enumerate(prompts) if not isinstance(p, list))
        raise ValueError(f"prompt_token_ids got text and lists of messages together (e.g. prompt {text} is a "
                         f"{type(prompts[text]).__name__}, prompt {chats[0]} a list of messages): give every prompt "
                         f"in one format (prompt_problems names the dataset rows that differ)")
    if chats:
        return [list(ids) for ids in tokenizer.apply_chat_template(prompts, add_generation_prompt=True, tokenize=True,
                                                                   return_dict=True)["input_ids"]]
    return tokenizer(text=prompts).input_ids


def completions_for_rewards(texts: list[str], conversational: bool) -> list:
    """Completions in the prompts' format, as TRL hands them to reward functions."""
    return [[{"role": "assistant", "content": t}] for t in texts] if conversational else list(texts)

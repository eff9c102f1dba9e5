"""Prompts as ``datasets.Dataset``: the embedded synthetic arithmetic task, or any local dataset.

>>> ds = synthetic_arithmetic(4, seed=0)
>>> sorted(ds.column_names)
['answer', 'prompt']
"""

from __future__ import annotations

import random
from pathlib import Path


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

    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"dataset {source!r} not found (use 'synthetic' or a local path)")
    kinds = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
    if path.is_file():
        if path.suffix not in kinds:
            raise ValueError(f"unsupported dataset file {path.name!r}; use one of {sorted(kinds)}")
        ds = load_dataset(kinds[path.suffix], data_files=str(path), split=split)
    else:
        ds = load_dataset(str(path), split=split)
    if prompt_column not in ds.column_names:
        raise KeyError(f"dataset {source!r} has no column {prompt_column!r}; columns: {ds.column_names}")
    if prompt_column != "prompt":
        ds = ds.rename_column(prompt_column, "prompt")
    return ds.select(range(min(n, len(ds)))) if n else ds

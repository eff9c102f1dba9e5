"""What the engine's weights look like: the checkpoint's spec, name checks, and vLLM's fused layout.

vLLM loads checkpoint-format names (``model.layers.0.self_attn.q_proj.weight``) but stores some of them
fused (``qkv_proj``, ``gate_up_proj``) as declared by the model class's ``packed_modules_mapping``. This
module maps one to the other (tensor parallel size 1), so weights can be validated before a load,
copied straight into vLLM's parameters, and compared after it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "I8": torch.int8, "BOOL": torch.bool}


class WeightMismatchError(ValueError):
    """Weights offered to the engine do not match what it holds.

    ``loaded`` is ``None`` when the problem was found before anything was loaded (the engine is unchanged),
    else the number of tensors already loaded (a stream checked as it passes): the engine is then marked
    incomplete and refuses to generate until a complete load.
    """

    def __init__(self, problems: list[str], *, loaded: int | None = None, hint: str = ""):
        self.problems = problems
        self.loaded = loaded
        self.hint = hint
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        if loaded is None:
            state = "nothing was loaded, the engine was left untouched"
        else:
            state = (f"found after {loaded} tensor(s) of the stream were loaded: the engine is marked incomplete "
                     "and refuses to generate until a complete load_weights(...) / wake_up(weights=...)")
        super().__init__(f"{len(problems)} weight problem(s); {state}:\n  {shown}" + (f"\n{hint}" if hint else ""))


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype


def read_checkpoint_spec(path: str | Path) -> dict[str, TensorSpec]:
    """Names, shapes and dtypes of every tensor in a safetensors checkpoint, from the headers only."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}")
    spec: dict[str, TensorSpec] = {}
    for f in files:
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        for name, info in header.items():
            if name != "__metadata__":
                spec[name] = TensorSpec(tuple(info["shape"]), _DTYPES[info["dtype"]])
    return spec


def tied_embeddings(model_dir: str | Path) -> bool:
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    text_cfg = cfg.get("text_config", cfg)
    return bool(text_cfg.get("tie_word_embeddings", cfg.get("tie_word_embeddings", False)))


def check_weights(
    offered: dict[str, tuple[tuple[int, ...], torch.dtype]],
    expected: dict[str, TensorSpec],
    *,
    optional: Iterable[str] = (),
    strict: bool = True,
    dtype: torch.dtype | None = None,
    loaded: int | None = None,
) -> None:
    """Raise :class:`WeightMismatchError` listing every unknown, missing, mis-shaped or non-float tensor.

    ``optional`` names may be offered or not (e.g. ``lm_head.weight`` of a tied model). With ``strict``
    every expected name must be offered (a full sync); otherwise a subset is fine. With ``dtype`` (the
    engine's; callers pass it under strict) every floating tensor must have it (vLLM would cast silently). ``loaded``:
    see :class:`WeightMismatchError`.
    """
    optional = set(optional)
    problems = []
    wrong_dtype = False
    for name, (shape, _) in offered.items():
        want = expected.get(name)
        if want is None:
            if name not in optional:
                problems.append(f"unexpected weight {name!r} (shape {list(shape)}): the model has no such tensor")
            continue
        if tuple(shape) != want.shape:
            problems.append(f"shape mismatch for {name!r}: got {list(shape)}, the model has {list(want.shape)}")
        got = offered[name][1]
        if got.is_floating_point != want.dtype.is_floating_point:
            problems.append(f"dtype mismatch for {name!r}: got {got}, the model holds {want.dtype}")
        elif dtype is not None and got.is_floating_point and got != dtype:
            problems.append(f"dtype mismatch for {name!r}: got {got}, the engine computes in {dtype} "
                            "(vLLM would cast it silently)")
            wrong_dtype = True
    if strict:
        missing = sorted(set(expected) - set(offered) - optional)
        problems += [f"missing weight {name!r} (shape {list(expected[name].shape)})" for name in missing]
    if problems:
        hint = ("Cast to the engine's dtype: WeightStream(model, dtype=engine.dtype), or tensor.to(engine.dtype); "
                "strict=False lets vLLM cast.") if wrong_dtype else ""
        raise WeightMismatchError(problems, loaded=loaded, hint=hint)


@dataclass(frozen=True)
class Placement:
    """Where a checkpoint tensor lives inside vLLM: parameter name and row offset along dim 0."""

    param: str
    row: int


def check_checkpoint_dir(path: str | Path, expected: dict[str, TensorSpec] | None, *,
                         optional: Iterable[str] = ()) -> Path:
    """A weights path must be a checkpoint directory whose tensors match ``expected`` (skipped when
    ``None``): vLLM's ``reload_weights`` from a bad path leaves the model half-loaded."""
    p = Path(path)
    if not p.is_dir() or not any(p.glob("*.safetensors")):
        raise FileNotFoundError(f"weights path {str(path)!r} is not a checkpoint directory with safetensors files "
                                "(a reload from it would leave vLLM half-loaded)")
    short = [f"{f.name}: {f.stat().st_size} bytes, its header describes {size}" for f in sorted(p.glob("*.safetensors"))
             if (size := _described_size(f)) > f.stat().st_size]
    if short:
        raise WeightMismatchError([f"truncated checkpoint file {s} (an interrupted copy or save?)" for s in short])
    if expected is not None:
        check_weights({n: (s.shape, s.dtype) for n, s in read_checkpoint_spec(p).items()}, expected,
                      optional=optional, strict=True)
    return p


def _described_size(f: Path) -> int:
    """The size in bytes a safetensors file must have, from its header (8 + header + the data's end)."""
    with open(f, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        try:
            header = json.loads(fh.read(n))
        except ValueError:
            return 1 << 62  # the header itself is cut or corrupt
    ends = [info["data_offsets"][1] for name, info in header.items() if name != "__metadata__"]
    return 8 + n + max(ends, default=0)


def placements(checkpoint_names: dict[str, TensorSpec], packed: dict[str, list[str]],
               engine_params: set[str], tied: bool) -> dict[str, Placement]:
    """Map each checkpoint name to the vLLM parameter (and row offset) that holds it (TP=1 layout).

    Fused parameters are the row-wise concatenation of their shards in ``packed`` order, as vLLM's
    ``QKVParallelLinear`` / ``MergedColumnParallelLinear`` store them with one tensor-parallel rank.
    Names that vLLM does not hold as a parameter are left out (the caller reports them).
    """
    out: dict[str, Placement] = {}
    names = list(checkpoint_names) + (["lm_head.weight"] if tied and "lm_head.weight" not in checkpoint_names else [])
    for name in names:
        if name in engine_params:
            out[name] = Placement(name, 0)
            continue
        if tied and name == "lm_head.weight" and "model.embed_tokens.weight" in engine_params:
            out[name] = Placement("model.embed_tokens.weight", 0)
            continue
        module, _, leaf = name.rpartition(".")
        parent, _, sub = module.rpartition(".")
        for fused, shards in packed.items():
            if sub in shards:
                fused_name = f"{parent}.{fused}.{leaf}"
                if fused_name not in engine_params:
                    break
                row = 0
                for shard in shards[: shards.index(sub)]:
                    row += checkpoint_names[f"{parent}.{shard}.{leaf}"].shape[0]
                out[name] = Placement(fused_name, row)
                break
    return out

"""What the engine's weights are: the checkpoint's spec (names, shapes, dtypes) and the checks of weights
offered against it, before anything is loaded. Where vLLM keeps each tensor is :mod:`rollout_sleep.weights.layout`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch


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


def checkpoint_files(path: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint: those its index (``model.safetensors.index.json``) names,
    else every ``*.safetensors`` in the directory (or ``path`` itself, a single file)."""
    path = Path(path)
    if not path.is_dir():
        return [path]
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = [path / f for f in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise FileNotFoundError(f"{index} names shard(s) that are not there: {missing}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}")
    return files


def _unused_by_vllm() -> tuple[str, ...]:
    """Name parts of checkpoint tensors vLLM's loaders drop (rotary tables saved by old trainers), from
    vLLM's own list where it is loaded (a client process need not import vLLM)."""
    import sys

    try:
        if "vllm" not in sys.modules:
            raise ImportError
        from vllm.model_executor.models.utils import AutoWeightsLoader

        return tuple(AutoWeightsLoader.REMOVE_UNUSED_ROTARY_EMBEDS_MAPPER.orig_to_new_substr)
    except Exception:  # another vLLM: the names it has dropped for years
        return ("rotary_pos_emb.inv_freq", "rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


def read_checkpoint_spec(path: str | Path) -> dict[str, TensorSpec]:
    """Names, shapes and dtypes of every tensor in a safetensors checkpoint (sharded or not), read
    through ``safetensors.safe_open`` without loading any tensor (every dtype, fp8 included). Tensors
    vLLM drops at load (``rotary_emb.inv_freq`` of old checkpoints) are not weights and are left out."""
    from safetensors import safe_open

    if Path(path).is_dir() and not any(Path(path).glob("*.safetensors")) and Path(path, "config.json").exists():
        return config_spec(path)  # weights built by vLLM (load_format="dummy"): the names the model saves
    unused = _unused_by_vllm()
    spec: dict[str, TensorSpec] = {}
    for f in checkpoint_files(path):
        with safe_open(str(f), framework="pt") as fh:
            for name in fh.keys():
                if any(u in name for u in unused):
                    continue
                s = fh.get_slice(name)
                spec[name] = TensorSpec(tuple(s.get_shape()), _torch_dtype(s.get_dtype()))
    return spec


def config_spec(path: str | Path) -> dict[str, TensorSpec]:
    """The tensors a checkpoint of ``path``'s config would hold (a model built on the meta device: no memory),
    for a folder with a config and no weights (vLLM's ``load_format="dummy"``)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(path))
    dtype = getattr(config, "torch_dtype", None) or getattr(config, "dtype", None) or torch.float32
    dtype = getattr(torch, str(dtype).replace("torch.", "")) if not isinstance(dtype, torch.dtype) else dtype
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    spec = {n: TensorSpec(tuple(t.shape), t.dtype) for n, t in model.state_dict().items()
            if not any(u in n for u in _unused_by_vllm())}
    if ties_head(config):
        spec.pop(HEAD, None)  # save_pretrained leaves a tied head out
    return spec


# safetensors' dtype names → torch dtype attribute names (those this torch lacks are skipped)
_DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
                "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu", "I64": "int64", "I32": "int32", "I16": "int16",
                "I8": "int8", "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
                "C64": "complex64"}


def _torch_dtype(name: str) -> torch.dtype:
    """safetensors' dtype names (``BF16``, ``F8_E4M3``, ...) as torch dtypes.

    >>> _torch_dtype("F8_E4M3")
    torch.float8_e4m3fn
    """
    dtype = getattr(torch, _DTYPE_NAMES.get(name, ""), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"safetensors dtype {name!r} has no torch dtype in this torch ({torch.__version__})")
    return dtype


# The tied head, in one place: a tied model's LM head is its input embedding. Its checkpoint (and a load) may leave
# the head out, vLLM holds it once, and a head that is given must equal the embedding.
HEAD = "lm_head.weight"
EMBEDDING = "model.embed_tokens.weight"  # the embedding's checkpoint name in Llama-style models
TIED = (EMBEDDING, HEAD)


def ties_head(config: Any) -> bool:
    """Whether a model's LM head is its input embedding: ``config`` is a transformers config (or ``None``), the
    dict of a checkpoint's ``config.json`` (a multimodal one's ``text_config`` decides), or a checkpoint directory.

    >>> ties_head({"tie_word_embeddings": True}), ties_head({"text_config": {"tie_word_embeddings": False}})
    (True, False)
    """
    if isinstance(config, (str, Path)):
        config = json.loads((Path(config) / "config.json").read_text())
    if isinstance(config, Mapping):
        text = config.get("text_config", config)
        return bool(text.get("tie_word_embeddings", config.get("tie_word_embeddings", False)))
    return bool(getattr(config, "tie_word_embeddings", False))


def optional_names(tied: bool) -> set[str]:
    """The checkpoint names a full load may leave out: a tied head (the embedding holds it)."""
    return {HEAD} if tied else set()


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


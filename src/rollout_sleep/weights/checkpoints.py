"""Random-weight checkpoints (Qwen3 and other families) with an offline tokenizer, built locally (no downloads).

The checkpoints have the real Qwen3 architecture and parameter shapes, so vLLM loads them with its
normal Qwen3 code path; only the weights are random. Use them for tests (``tiny``), the demo, and GPU
benchmarks (``qwen3-0.6b`` / ``qwen3-4b`` / ``qwen3-8b`` shapes). A real local HF checkpoint directory can
be used anywhere a path produced here is accepted.

Other architectures (``FAMILIES``: Qwen2.5, Llama 3, Mistral, Gemma 2 / 3, Phi-3, Qwen3-MoE, Mixtral) are
built the same way with ``family=...``: ``size="tiny"`` for CPU tests, or one of the family's realistic
shapes (``FAMILIES[family].shapes``) for GPU benchmarks.

Example:
    >>> from rollout_sleep.weights.checkpoints import make_checkpoint
    >>> path = make_checkpoint("/tmp/tiny", size="tiny", seed=0)  # doctest: +SKIP
    >>> path = make_checkpoint("/tmp/gemma", size="tiny", family="gemma2")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Special tokens of the byte-level tokenizer; Qwen-style names so chat-like prompts read naturally.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# Qwen's ChatML layout (without tools or thinking), so conversational data renders as it would for Qwen.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class Shape:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int | None  # None: the tokenizer's size rounded up to a multiple of 64
    tie_word_embeddings: bool
    max_position_embeddings: int = 4096


# Parameter shapes from the public Qwen3 configs (hidden / layers / heads / kv heads / head dim / MLP / vocab).
SHAPES: dict[str, Shape] = {
    "tiny": Shape(128, 2, 4, 2, 32, 256, None, True, 1024),
    "qwen3-0.6b": Shape(1024, 28, 16, 8, 128, 3072, 151936, True),
    "qwen3-4b": Shape(2560, 36, 32, 8, 128, 9728, 151936, True),
    "qwen3-8b": Shape(4096, 36, 32, 8, 128, 12288, 151936, False),
    "qwen3-14b": Shape(5120, 40, 40, 8, 128, 17408, 151936, False),  # one H100 with one copy (model.share_weights)
    "qwen3-32b": Shape(5120, 64, 64, 8, 128, 25600, 151936, False),  # make_config_dir: too big to write
}


# A tiny shape shared by every non-Qwen3 family (CPU tests): hidden 128, 2 layers, GQA 4/2 heads of 32
# (vLLM's CPU attention needs a head size of 32 or more; some vLLM models take hidden / heads as head size).
_TINY = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
             intermediate_size=128, max_position_embeddings=1024)
_TINY_MOE = dict(_TINY, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64)


@dataclass(frozen=True)
class Family:
    """One architecture the factory builds: its transformers ``model_type``, what sets it apart, the
    config fields every shape shares, and its named shapes (``tiny`` for CPU; realistic ones for GPU)."""

    model_type: str
    traits: str
    common: dict[str, Any] = field(default_factory=dict)
    shapes: dict[str, dict[str, Any]] = field(default_factory=dict)
    tied: bool = False


# Shapes from the public configs of each family (only the parameter shapes; weights are random).
FAMILIES: dict[str, Family] = {
    "qwen3": Family("qwen3", "q/k norms, tied head at small sizes", tied=True),  # shapes: SHAPES
    "qwen3-untied": Family("qwen3", "q/k norms, untied head", tied=False),
    "qwen2.5": Family(
        "qwen2", "biases in q/k/v (fused into qkv_proj by vLLM)", dict(rope_theta=1_000_000.0), {
            "tiny": _TINY,
            "qwen2.5-1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                                 intermediate_size=8960, vocab_size=151936),
            "qwen2.5-7b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                               intermediate_size=18944, vocab_size=152064),
        }),
    "llama3": Family(
        "llama", "GQA, untied head, llama3 rope", dict(rope_theta=500_000.0), {
            "tiny": _TINY,
            "llama3.2-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                                head_dim=64, intermediate_size=8192, vocab_size=128256),
            "llama3.1-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                head_dim=128, intermediate_size=14336, vocab_size=128256),
        }),
    "mistral": Family(
        "mistral", "GQA, untied head, no sliding window", dict(rope_theta=1_000_000.0, sliding_window=None), {
            "tiny": _TINY,
            "mistral-7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                               head_dim=128, intermediate_size=14336, vocab_size=32768),
        }),
    "gemma2": Family(
        "gemma2", "(1 + w) norms, pre/post norms, soft-capping, scaled embedding, tied head",
        dict(query_pre_attn_scalar=32, sliding_window=512, hidden_activation="gelu_pytorch_tanh"), {
            "tiny": _TINY,
            "gemma2-2b": dict(hidden_size=2304, num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                              head_dim=256, intermediate_size=9216, vocab_size=256000, query_pre_attn_scalar=256,
                              sliding_window=4096),
            "gemma2-9b": dict(hidden_size=3584, num_hidden_layers=42, num_attention_heads=16, num_key_value_heads=8,
                              head_dim=256, intermediate_size=14336, vocab_size=256000, query_pre_attn_scalar=256,
                              sliding_window=4096),
        }, tied=True),
    "gemma3": Family(
        "gemma3_text", "(1 + w) norms, q/k norms, scaled embedding, tied head",
        dict(query_pre_attn_scalar=32, sliding_window=512), {
            "tiny": _TINY,
            "gemma3-4b": dict(hidden_size=2560, num_hidden_layers=34, num_attention_heads=8, num_key_value_heads=4,
                              head_dim=256, intermediate_size=10240, vocab_size=262208, query_pre_attn_scalar=256,
                              sliding_window=1024),
        }, tied=True),
    "phi3": Family(
        "phi3", "checkpoint already fused (qkv_proj, gate_up_proj), untied head", dict(rope_theta=10_000.0), {
            "tiny": dict(_TINY, num_key_value_heads=4),
            "phi3-mini": dict(hidden_size=3072, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                              intermediate_size=8192, vocab_size=32064),
        }),
    "qwen3-moe": Family(
        "qwen3_moe", "mixture of experts (vLLM stacks the experts: w13 / w2), q/k norms", dict(rope_theta=1_000_000.0), {
            "tiny": _TINY_MOE,
            # a few B in total (~3.2B, ~0.5B active): Qwen3-30B-A3B's expert width, fewer layers and experts
            "qwen3-moe-3b": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=4,
                                 head_dim=128, intermediate_size=3072, moe_intermediate_size=768, num_experts=48,
                                 num_experts_per_tok=8, vocab_size=151936),
            "qwen3-30b-a3b": dict(hidden_size=2048, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                                  head_dim=128, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
                                  num_experts_per_tok=8, vocab_size=151936),
        }),
    "mixtral": Family(
        "mixtral", "mixture of experts (w1/w2/w3 per expert, stacked by vLLM), untied", dict(rope_theta=1_000_000.0), {
            "tiny": dict(_TINY, num_local_experts=4, num_experts_per_tok=2),
            # ~3.5B in total: Mixtral's 8 experts / top-2 at a quarter of its width
            "mixtral-3.5b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=8,
                                 head_dim=128, intermediate_size=4096, num_local_experts=8, num_experts_per_tok=2,
                                 vocab_size=32000),
        }),
}


def family_config(family: str = "qwen3", size: str = "tiny", dtype: str = "bfloat16",
                  tie_word_embeddings: bool | None = None, tokenizer=None):
    """The transformers config of a ``family``'s shape (see ``FAMILIES``), with the byte-level tokenizer's
    special tokens. ``qwen3`` / ``qwen3-untied`` take the sizes of ``SHAPES``."""
    from transformers import AutoConfig

    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; choose one of {sorted(FAMILIES)}")
    fam = FAMILIES[family]
    if fam.model_type == "qwen3":
        tie = fam.tied if tie_word_embeddings is None and family != "qwen3" else tie_word_embeddings
        return qwen3_config(size, dtype, tie, tokenizer)
    if size not in fam.shapes:
        raise ValueError(f"unknown size {size!r} for family {family!r}; choose one of {sorted(fam.shapes)}")
    tokenizer = tokenizer or build_tokenizer()
    kwargs = dict(fam.common)
    kwargs.update(fam.shapes[size])
    kwargs.setdefault("vocab_size", -(-len(tokenizer) // 64) * 64)
    if kwargs["vocab_size"] < len(tokenizer):
        raise ValueError(f"vocab_size {kwargs['vocab_size']} is smaller than the tokenizer ({len(tokenizer)})")
    kwargs.setdefault("max_position_embeddings", 4096)
    tie = fam.tied if tie_word_embeddings is None else tie_word_embeddings
    return AutoConfig.for_model(
        fam.model_type, tie_word_embeddings=tie, torch_dtype=dtype, bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **kwargs)


def build_tokenizer():
    """A byte-level BPE tokenizer with no merges: 256 byte tokens + Qwen-style specials.

    It encodes any text losslessly and needs no vocabulary file from a hub.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        model_max_length=1 << 20,
        chat_template=CHAT_TEMPLATE,
    )


def qwen3_config(size: str = "tiny", dtype: str = "bfloat16", tie_word_embeddings: bool | None = None,
                 tokenizer=None):
    """The ``Qwen3Config`` of a shape (see ``SHAPES``), with the byte-level tokenizer's special tokens
    (``tokenizer``: one already built by :func:`build_tokenizer`)."""
    from transformers import Qwen3Config

    if size not in SHAPES:
        raise ValueError(f"unknown checkpoint size {size!r}; choose one of {sorted(SHAPES)}")
    shape = SHAPES[size]
    tie = shape.tie_word_embeddings if tie_word_embeddings is None else tie_word_embeddings
    tokenizer = tokenizer or build_tokenizer()
    return Qwen3Config(
        vocab_size=shape.vocab_size or -(-len(tokenizer) // 64) * 64,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        head_dim=shape.head_dim,
        max_position_embeddings=shape.max_position_embeddings,
        rope_theta=1_000_000.0,
        tie_word_embeddings=tie,
        torch_dtype=dtype,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def make_checkpoint(
    path: str | os.PathLike,
    size: str = "tiny",
    seed: int = 0,
    dtype: str = "bfloat16",
    tie_word_embeddings: bool | None = None,
    init_std: float | None = None,
    device: str | None = None,
    family: str = "qwen3",
) -> str:
    """Write a random-weight checkpoint (config, safetensors, tokenizer) to ``path``.

    Args:
        path: output directory (created).
        size: one of ``SHAPES`` (``tiny``, ``qwen3-0.6b``, ``qwen3-4b``, ``qwen3-8b``).
        seed: seed of the random weights; two seeds give two different models of the same shape.
        dtype: ``bfloat16`` / ``float32`` / ``float16``: the dtype stored and declared in the config.
        tie_word_embeddings: *optional*, overrides the shape's default (untied models avoid a vLLM CPU
            bug where a path reload keeps a stale LM head).
        init_std: *optional*, std of the random normal init (default: the config's 0.02, or 0.3 for
            ``tiny`` so that its greedy outputs are not a flat, tie-prone distribution).
        device: *optional*, where to draw the weights (default: CUDA if available, else CPU).
        family: *optional*, the architecture (``FAMILIES``; default ``qwen3``). Other families take
            ``size="tiny"`` or one of their own shapes.

    Returns:
        The directory, as a string.
    """
    import torch

    tokenizer = build_tokenizer()
    config = family_config(family, size, dtype, tie_word_embeddings, tokenizer)
    std = init_std if init_std is not None else size_init_std(size, config)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = random_model(config, seed=seed, std=std, device=device, dtype=getattr(torch, dtype))
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, max_shard_size="5GB")
    tokenizer.save_pretrained(out)
    config_file = out / "config.json"
    cfg = json.loads(config_file.read_text())
    cfg["rollout_sleep"] = {"family": family, "size": size, "seed": seed, "random_weights": True}
    config_file.write_text(json.dumps(cfg, indent=2))
    return str(out)


def size_init_std(size: str | None, config) -> float:
    """The std of a size's random weights (:func:`make_checkpoint`): 0.3 for ``tiny``, so that its greedy outputs are
    not a flat, tie-prone distribution; the config's ``initializer_range`` otherwise."""
    return 0.3 if size == "tiny" else config.initializer_range


def save_weights(weights, folder: str | os.PathLike, *, like: str | os.PathLike | None = None,
                 shard_bytes: int = 2 << 30) -> str:
    """Write ``(checkpoint name, tensor)`` pairs (a :class:`~rollout_sleep.weights.stream.WeightStream`) as a
    checkpoint folder vLLM reloads from: safetensors shards, and the ``config.json`` of the checkpoint ``like``
    where it has one. The folder belongs to the caller's syncs: its earlier ``*.safetensors`` are replaced.
    Returns the folder's absolute path."""
    import shutil

    from safetensors.torch import save_file

    out = Path(folder).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("*.safetensors"), *out.glob("*.safetensors.index.json")]:
        old.unlink()
    if like is not None and Path(like, "config.json").is_file():
        shutil.copyfile(Path(like, "config.json"), out / "config.json")
    shard: dict = {}
    size = count = 0
    for name, tensor in weights:
        # a copy: the stream's tensors may be views of the trainer's (tied, fused) or of a reused bucket
        shard[name] = tensor.detach().to("cpu", copy=True).contiguous()
        size += shard[name].numel() * shard[name].element_size()
        if size >= shard_bytes:
            save_file(shard, str(out / f"model-{count:05d}.safetensors"))
            shard, size, count = {}, 0, count + 1
    if shard or not count:
        save_file(shard, str(out / f"model-{count:05d}.safetensors"))
    return str(out)


def init_nonpersistent_buffers(model, device) -> None:
    """Compute the non-persistent buffers (rotary tables, Gemma's embedding scale) of a model built on the meta
    device (or moved with ``to_empty``, which leaves them uninitialized: garbage, NaN) on ``device``; parameters
    are not touched (they may be views of an engine's weights)."""
    import torch

    device = torch.device(device)
    with torch.no_grad():
        for module in model.modules():
            if any(n in module._non_persistent_buffers_set for n, _ in module.named_buffers(recurse=False)):
                for n, b in list(module.named_buffers(recurse=False)):
                    if b.is_meta or b.device.type != device.type:
                        module.register_buffer(n, torch.empty_like(b, device=device),
                                               persistent=n not in module._non_persistent_buffers_set)
                # the module's own parameters stand aside on the meta device meanwhile: transformers' init of a
                # module with such buffers (Gemma's scaled embedding) also draws its weights, which may be views
                # of an engine's memory
                own = dict(module.named_parameters(recurse=False))
                for n, p in own.items():
                    setattr(module, n, torch.nn.Parameter(torch.empty_like(p, device="meta"),
                                                          requires_grad=p.requires_grad))
                try:
                    model._init_weights(module)
                finally:
                    for n, p in own.items():
                        setattr(module, n, p)


def make_config_dir(path: str | os.PathLike, size: str = "tiny", dtype: str = "bfloat16",
                    tie_word_embeddings: bool | None = None, family: str = "qwen3") -> str:
    """Write only the config and tokenizer of a shape to ``path``: no weights. vLLM builds random weights
    from it with ``load_format="dummy"``, and a trainer can view those (``shared_base.trainer_from_engine``): a
    32B shape needs no 64 GB checkpoint on disk.

    >>> import tempfile, json, pathlib
    >>> d = make_config_dir(tempfile.mkdtemp(), "tiny")
    >>> sorted(p.name for p in pathlib.Path(d).iterdir() if p.suffix == ".safetensors")
    []
    """
    tokenizer = build_tokenizer()
    config = family_config(family, size, dtype, tie_word_embeddings, tokenizer)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    # A checkpoint saved from a model names its class; a bare config does not, and vLLM 0.26 then picks a
    # non-generative runner ("LLM.generate() is only supported for generative models"): name it here.
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    config_file = out / "config.json"
    cfg = json.loads(config_file.read_text())
    cfg["rollout_sleep"] = {"family": family, "size": size, "random_weights": True, "weights": "none (dummy load)"}
    config_file.write_text(json.dumps(cfg, indent=2))
    return str(out)


def random_model(config, *, seed: int = 0, std: float | None = None, device: str = "cpu", dtype=None,
                 norm_noise: float | None = None):
    """A transformers causal LM of ``config`` with seeded random weights, built on ``device`` without a
    default init pass. Norm weights are their identity (1, or 0 for Gemma's ``1 + w`` norms) plus
    ``norm_noise`` (default 0.1, 0 for Qwen3 as it always was), so a misplaced norm changes outputs."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = dtype or getattr(torch, str(getattr(config, "torch_dtype", None) or getattr(config, "dtype", "float32"))
                             .replace("torch.", ""))
    with torch.device("meta"):  # built in ``dtype`` as from_pretrained builds it (rotary tables stay fp32)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model = model.to_empty(device=device)
    init_nonpersistent_buffers(model, device)
    fill_random_(model, config, seed=seed, std=std, norm_noise=norm_noise)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def fill_random_(model, config, *, seed: int = 0, std: float | None = None, norm_noise: float | None = None) -> None:
    """Draw ``model``'s weights in place, seeded, as :func:`random_model` does (normal ``std``, norms at their
    identity plus ``norm_noise``), on the device they live on: a trainer that views vLLM's memory writes the
    engine's weights with it."""
    import torch

    std = config.initializer_range if std is None else std
    gemma_norm = config.model_type.startswith("gemma")
    if norm_noise is None:
        norm_noise = 0.0 if config.model_type == "qwen3" else 0.1
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                # small noise around the identity, so a norm loaded in the wrong place changes outputs
                p.fill_(0.0 if gemma_norm else 1.0)
                if norm_noise:
                    p.add_(torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32) * norm_noise)
            else:
                p.copy_(torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32) * std)


def make_reward_checkpoint(path: str | os.PathLike, size: str = "tiny", seed: int = 0, dtype: str = "bfloat16",
                           device: str | None = None) -> str:
    """Write a random-weight Qwen3 sequence classifier with one label (a reward model's layout: what
    ``AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)`` and TRL load) to ``path``."""
    import torch
    from transformers import Qwen3ForSequenceClassification

    tokenizer = build_tokenizer()
    config = qwen3_config(size, dtype, False, tokenizer)
    config.num_labels = 1
    std = size_init_std(size, config)  # as make_checkpoint: tiny scores then spread
    torch_dtype = getattr(torch, dtype)
    with torch.device("meta"):
        model = Qwen3ForSequenceClassification(config)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to_empty(device=device).to(torch_dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32) * std)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, max_shard_size="5GB")
    tokenizer.save_pretrained(out)
    return str(out)

"""Random-weight Qwen3 checkpoints with an offline tokenizer, built locally (no downloads).

The checkpoints have the real Qwen3 architecture and parameter shapes, so vLLM loads them with its
normal Qwen3 code path; only the weights are random. Use them for tests (``tiny``), the demo, and GPU
benchmarks (``qwen3-0.6b`` / ``qwen3-4b`` / ``qwen3-8b`` shapes). A real local HF checkpoint directory can
be used anywhere a path produced here is accepted.

Example:
    >>> from rollout_sleep.checkpoints import make_checkpoint
    >>> path = make_checkpoint("/tmp/tiny", size="tiny", seed=0)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

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
}


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
) -> str:
    """Write a random-weight Qwen3 checkpoint (config, safetensors, tokenizer) to ``path``.

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

    Returns:
        The directory, as a string.
    """
    import torch
    from transformers import Qwen3ForCausalLM

    tokenizer = build_tokenizer()
    config = qwen3_config(size, dtype, tie_word_embeddings, tokenizer)
    std = init_std if init_std is not None else (0.3 if size == "tiny" else config.initializer_range)
    torch_dtype = getattr(torch, dtype)
    with torch.device("meta"):
        model = Qwen3ForCausalLM(config)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to_empty(device=device).to(torch_dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32) * std)
    if config.tie_word_embeddings:
        model.tie_weights()
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, max_shard_size="5GB")
    tokenizer.save_pretrained(out)
    config_file = out / "config.json"
    cfg = json.loads(config_file.read_text())
    cfg["rollout_sleep"] = {"size": size, "seed": seed, "random_weights": True}
    config_file.write_text(json.dumps(cfg, indent=2))
    return str(out)


def make_reward_checkpoint(path: str | os.PathLike, size: str = "tiny", seed: int = 0, dtype: str = "bfloat16",
                           device: str | None = None) -> str:
    """Write a random-weight Qwen3 sequence classifier with one label (a reward model's layout: what
    ``AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)`` and TRL load) to ``path``."""
    import torch
    from transformers import Qwen3ForSequenceClassification

    tokenizer = build_tokenizer()
    config = qwen3_config(size, dtype, False, tokenizer)
    config.num_labels = 1
    std = 0.3 if size == "tiny" else config.initializer_range  # as make_checkpoint: tiny scores then spread
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

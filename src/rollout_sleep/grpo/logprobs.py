"""The log-probs of the sampled completions under the trainer's model, without holding a batch's logits.

:func:`completion_logprobs` runs the model on a padded batch and returns each completion token's log-prob (float32,
at the loss's temperature). Where the model allows (:func:`fused_head_problem`), its LM head is fused with the
log-softmax (:func:`linear_selected_logprobs`): no ``[B, n, V]`` logits nor their gradient ever exist; elsewhere the
model's logits go through :func:`selected_logprobs`, chunked so float32 exists for one chunk at a time.
"""

from __future__ import annotations

import functools
import inspect

import torch


class _SelectedLogProbs(torch.autograd.Function):
    """``log_softmax(logits.float() / temperature)`` at the target tokens, computed in row chunks: float32 never
    exists for more than a chunk, and backward recomputes the softmax from the (bf16) logits instead of keeping
    float32 copies (``batch x len x vocab`` x 4 bytes: 2.5 GB for 32 x 128 tokens of a 152k vocabulary)."""

    @staticmethod
    def forward(ctx, logits, targets, n, temperature):  # logits [B, T, V]; positions [:, :n] predict targets [B, n]
        rows = _chunk_rows(logits, n)
        out = torch.empty(targets.shape, dtype=torch.float32, device=logits.device)
        lse = torch.empty_like(out)
        for b in range(0, logits.shape[0], rows):
            x = _scaled(logits[b: b + rows, :n], temperature)
            lse[b: b + rows] = torch.logsumexp(x, -1)
            out[b: b + rows] = x.gather(-1, targets[b: b + rows, :, None])[..., 0] - lse[b: b + rows]
        ctx.save_for_backward(logits, targets, lse)
        ctx.n, ctx.temperature = n, temperature
        return out

    @staticmethod
    def backward(ctx, grad_out):
        logits, targets, lse = ctx.saved_tensors
        n, t, rows = ctx.n, ctx.temperature, _chunk_rows(logits, ctx.n)
        grad = torch.empty_like(logits)
        grad[:, n:].zero_()  # positions past n predict nothing here; the rest is written below
        for b in range(0, logits.shape[0], rows):
            g = grad_out[b: b + rows, :, None].float() / t  # d(x / t) / dx = 1 / t
            d = (_scaled(logits[b: b + rows, :n], t) - lse[b: b + rows, :, None]).exp_().mul_(-g)  # -g * softmax
            d.scatter_add_(-1, targets[b: b + rows, :, None], g)
            grad[b: b + rows, :n] = d
        return grad, None, None, None


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    x = logits.float()
    return x if temperature == 1.0 else x / temperature


def _chunk_rows(logits: torch.Tensor, n: int, budget_bytes: int = 256 * 2**20) -> int:
    return max(1, budget_bytes // max(1, n * logits.shape[-1] * 4))


def selected_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Float32 log-prob of ``targets`` (``[B, n]``) under ``logits / temperature`` (``[B, T >= n, V]``, positions
    ``:n``): the distribution vLLM samples from at that temperature (and TRL scores)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return _SelectedLogProbs.apply(logits, targets, targets.shape[1], float(temperature))


_HEAD_BUDGET = 256 * 2**20  # bytes of float32 logits one chunk of the fused head may hold


def _head_chunk(width: int, budget_bytes: int = _HEAD_BUDGET) -> int:
    """Rows (forward) or vocabulary columns (backward) per chunk of :func:`linear_selected_logprobs`: float32
    logits of ``width`` columns (rows) each within ``budget_bytes``."""
    return max(1, budget_bytes // max(1, width * 4))


class _LinearSelectedLogProbs(torch.autograd.Function):
    """:func:`selected_logprobs` of ``hidden @ weight.T`` without the logits: forward in row chunks, backward in
    vocabulary chunks, each recomputing its logits from ``hidden`` and ``weight`` (which the LM head keeps for its
    backward anyway). Only float32 log-sum-exps (one per row) are kept between forward and backward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, dtype):  # hidden [N, H], weight [V, H], targets [N]
        with torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)
            out = torch.empty(targets.shape, dtype=torch.float32, device=hidden.device)
            lse = torch.empty_like(out)
            rows = _head_chunk(w.shape[0])
            for r in range(0, h.shape[0], rows):
                x = _scaled_fresh(torch.nn.functional.linear(h[r: r + rows], w), temperature)  # as lm_head would
                lse[r: r + rows] = torch.logsumexp(x, -1)
                out[r: r + rows] = x.gather(-1, targets[r: r + rows, None])[:, 0] - lse[r: r + rows]
                del x
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.temperature, ctx.dtype = temperature, dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, targets, lse = ctx.saved_tensors
        t, dtype = ctx.temperature, ctx.dtype
        need_h, need_w = ctx.needs_input_grad[:2]
        with torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)
            g = grad_out.float() / t  # d(x / t) / dx = 1 / t
            grad_h = torch.zeros(h.shape, dtype=torch.float32, device=h.device) if need_h else None
            grad_w = torch.empty(w.shape, dtype=dtype, device=w.device) if need_w else None
            cols = _head_chunk(h.shape[0])
            for v in range(0, w.shape[0], cols):
                wc = w[v: v + cols]
                # -g * softmax, plus g at the target (in this chunk): the gradient of the chunk's logits, in the
                # logits' dtype as the unfused path hands it to the LM head's backward
                d = _scaled_fresh(torch.nn.functional.linear(h, wc), t).sub_(lse[:, None]).exp_().mul_(-g[:, None])
                local = targets - v  # targets outside the chunk add 0 (no boolean indexing: no device sync)
                here = (local >= 0) & (local < wc.shape[0])
                d.scatter_add_(1, local.clamp(0, wc.shape[0] - 1)[:, None], (g * here)[:, None])
                d = d.to(dtype)
                if need_h:
                    grad_h += d @ wc
                if need_w:
                    torch.mm(d.t(), h, out=grad_w[v: v + cols])
                del d
        grad_h = grad_h.to(hidden.dtype) if need_h else None
        grad_w = grad_w.to(weight.dtype) if need_w else None
        return grad_h, grad_w, None, None, None


def _scaled_fresh(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """:func:`_scaled` of a temporary: divided in place (one float32 chunk at a time, not two)."""
    x = logits.float()
    return x if temperature == 1.0 else x.div_(temperature)


def linear_selected_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             temperature: float = 1.0) -> torch.Tensor:
    """:func:`selected_logprobs` of the logits ``hidden @ weight.T`` (an LM head without bias), never holding more
    than one chunk of logits: ``hidden`` ``[B, n, H]`` (position ``i`` predicts ``targets[:, i]``), ``weight``
    ``[V, H]``, ``targets`` ``[B, n]``; float32 ``[B, n]``.

    Logits are computed as the LM head computes them (``F.linear`` in the weight's dtype, or autocast's dtype
    under autocast), divided by ``temperature`` and log-softmaxed in float32, chunk by chunk (at most 256 MiB of
    float32 logits each). Backward recomputes each chunk's logits (one more ``hidden @ W.T`` in all) and returns
    the gradients of ``hidden`` (accumulated in float32 over vocabulary chunks) and ``weight`` (each vocabulary
    chunk's rows in one product over all positions, as the unfused LM head's). A tied weight receives its gradient
    like any other use of the parameter: autograd adds it to the embedding's.

    >>> h, w = torch.randn(2, 3, 8, dtype=torch.float64), torch.randn(11, 8, dtype=torch.float64)
    >>> tgt = torch.tensor([[1, 2, 3], [4, 5, 10]])
    >>> ref = torch.log_softmax(h @ w.T / 0.7, -1).gather(-1, tgt[..., None])[..., 0]
    >>> torch.allclose(linear_selected_logprobs(h, w, tgt, 0.7).double(), ref.float().double(), atol=1e-6)
    True
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    kind = hidden.device.type
    dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else weight.dtype
    b, n, width = hidden.shape
    out = _LinearSelectedLogProbs.apply(hidden.reshape(b * n, width), weight, targets.reshape(b * n),
                                        float(temperature), dtype)
    return out.view(b, n)


FUSED_HEAD = True
"""Whether :func:`completion_logprobs` takes the fused LM head (:func:`linear_selected_logprobs`) where the model
allows it (see :func:`fused_head_problem`); ``False``: always the model's own logits."""

# Model types whose causal LM returns ``lm_head(hidden)`` as its logits with nothing after it (transformers 5: the
# project's families, tests/grpo/test_fused_head.py). Gemma 2 / 3 qualify without final-logit soft-capping only.
FUSED_MODEL_TYPES = frozenset({"qwen3", "qwen2", "llama", "mistral", "phi3", "qwen3_moe", "mixtral", "gemma2",
                               "gemma3_text"})
# config attributes that transform the logits after the LM head (soft-capping, scaling): their models fall back
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")
_fallbacks_logged: set[str] = set()


def fused_config_problem(config) -> str | None:
    """Why a model of this transformers ``config`` cannot take the fused LM head (``None``: it can): a model type
    not known to return the LM head's output unchanged, or logits transformed after the head."""
    config = getattr(config, "text_config", None) or config
    kind = getattr(config, "model_type", None)
    if kind not in FUSED_MODEL_TYPES:
        return f"model type {kind!r} is not known to return its LM head's output as the logits"
    for attr in _LOGIT_TRANSFORMS:
        value = getattr(config, attr, None)
        if value is not None and not (attr in ("logit_scale", "logits_scaling") and value == 1):
            return f"its logits are transformed after the LM head ({attr}={value})"
    return None


def fused_head_problem(model) -> tuple[torch.nn.Module | None, str | None]:
    """``(lm_head, None)`` where :func:`completion_logprobs` can run ``model``'s LM head fused with the log-softmax
    (:func:`linear_selected_logprobs`), else ``(None, why not)``. The head is swapped for the fused function during
    the model's own forward, so wrappers (DDP, DeepSpeed, PEFT) run as usual and see the head's weight in the graph.

    Falls back to the model's logits (then :func:`selected_logprobs`) for: a model ``torch.compile`` wraps, or a
    compiled or hooked (accelerate) head; model types and configs :func:`fused_config_problem` refuses; a head that
    is not a plain ``nn.Linear`` without bias (LoRA or quantized heads); and a sharded weight (FSDP2's DTensor,
    DeepSpeed ZeRO-3's partitioned parameter), which is only whole inside its module's forward hooks. One copy
    (``model.share_weights``: the weight a view of vLLM's, its real rows only) takes the fused head."""
    from rollout_sleep.weights.stream import unwrap

    if not FUSED_HEAD:
        return None, "the fused head is off (rollout_sleep.grpo.logprobs.FUSED_HEAD)"
    m = model
    while True:  # the wrappers unwrap() strips, one at a time
        if hasattr(m, "_orig_mod"):
            return None, "torch.compile wraps the model"
        if type(m).__name__ == "DataParallel":  # replicas copy the swapped forward, bound to the original weight
            return None, "DataParallel replicates the model"
        if m is not unwrap(m):
            m = m.module
        elif hasattr(m, "get_base_model") and m.get_base_model() is not m:  # PEFT
            m = m.get_base_model()
        else:
            break
    config = getattr(m, "config", None)
    if config is None or not hasattr(m, "get_output_embeddings"):
        return None, f"{type(m).__name__} is not a transformers causal LM"
    problem = fused_config_problem(config)
    if problem:
        return None, problem
    head = m.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head.bias is not None:
        kind = "a Linear with a bias" if type(head) is torch.nn.Linear else type(head).__name__
        return None, f"the LM head is {kind}, not a plain Linear"
    if "forward" in head.__dict__ or getattr(head, "_compiled_call_impl", None) is not None:
        return None, "the LM head's forward is replaced (accelerate hooks) or compiled"
    w = head.weight
    if hasattr(w, "ds_id") or type(w).__name__ == "DTensor" or hasattr(w, "device_mesh"):
        return None, "the LM head's weight is sharded (FSDP2 / DeepSpeed ZeRO-3)"
    return head, None


def _fused_head(model) -> torch.nn.Module | None:
    head, problem = fused_head_problem(model)
    if problem and problem not in _fallbacks_logged:
        _fallbacks_logged.add(problem)
        import logging

        logging.getLogger(__name__).info("log-probs from the model's full logits (no fused LM head): %s", problem)
    return head


def _forward_kwargs(model, n: int) -> dict:
    """The keyword arguments the model under its wrappers (DDP, DeepSpeed, ``torch.compile``, PEFT) takes
    (Hugging Face causal LMs do; the wrappers pass keyword arguments through): ``logits_to_keep`` (the LM head on
    the completions' columns only) and ``use_cache=False``. Without it a training forward builds a KV cache
    (``config.use_cache``, unless gradient checkpointing turns it off) that nothing reads, and each decoder layer
    updates its own entry of it: under ``train.compile`` every layer then compiles its own graph (dynamo guards on
    ``past_key_values.layers[i]``) until ``torch._dynamo``'s recompile limit (8), past which the layers run eager."""
    from rollout_sleep.weights.stream import unwrap

    model = unwrap(model)
    if hasattr(model, "get_base_model"):  # PEFT
        model = unwrap(model.get_base_model())
    takes = _forward_parameters(getattr(model.forward, "__func__", model.forward))
    kw = {"logits_to_keep": n + 1} if "logits_to_keep" in takes else {}
    if "use_cache" in takes:
        kw["use_cache"] = False
    return kw


def _keeps_logits(model) -> bool:
    """Whether the model under its wrappers takes ``logits_to_keep`` (:func:`_forward_kwargs`)."""
    return "logits_to_keep" in _forward_kwargs(model, 0)


@functools.lru_cache(maxsize=64)
def _forward_parameters(forward) -> frozenset[str]:  # once per forward function, not per micro-batch
    return frozenset(inspect.signature(forward).parameters)


def completion_logprobs(model, ids: torch.Tensor, attn: torch.Tensor, positions: torch.Tensor,
                        n: int, temperature: float = 1.0) -> torch.Tensor:
    """Log-probs (``[batch, n]``, float32) of the last ``n`` columns of ``ids`` (the completions of
    :func:`pad_batch`) under ``model`` with its logits divided by ``temperature`` (the sampling distribution);
    the LM head runs on those columns only where the model allows.

    Where :func:`fused_head_problem` allows (Qwen3 and the project's other families, one process or DDP), the LM
    head is fused with the log-softmax (:func:`linear_selected_logprobs`): for the model's forward its head's
    ``forward`` is swapped for that function, so the model returns the log-probs as its "logits" and neither the
    ``[batch, n, vocab]`` logits nor their gradient ever exist; otherwise (logged once per reason) the model's
    logits and :func:`selected_logprobs`. Both agree to the dtype's rounding (tests/grpo/test_fused_head.py)."""
    kw = _forward_kwargs(model, n)
    targets = ids[:, -n:]
    head = _fused_head(model)
    if head is None:
        logits = model(input_ids=ids, attention_mask=attn, position_ids=positions, **kw).logits
        return selected_logprobs(logits[:, -(n + 1):], targets, temperature)
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")

    def fused(hidden):  # [B, n + 1, H] (or all positions without logits_to_keep): positions :n predict targets
        return linear_selected_logprobs(hidden[:, -(n + 1):-1], head.weight, targets, temperature)

    head.forward = fused
    try:
        out = model(input_ids=ids, attention_mask=attn, position_ids=positions, **kw).logits
    finally:
        del head.forward
    if out.shape != targets.shape:
        raise RuntimeError(f"the fused LM head returned {tuple(out.shape)}, expected {tuple(targets.shape)}: the "
                           "model transformed its head's output (set rollout_sleep.grpo.logprobs.FUSED_HEAD = False)")
    return out

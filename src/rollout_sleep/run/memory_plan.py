"""The GPU memory a run needs, per phase, planned before vLLM starts: arithmetic from the model's shape, the dtypes,
the optimizer, the micro-batch, the sequence length, gradient checkpointing and the engine's KV cache.

Two phases alternate on one device. **rollout**: vLLM awake (its weights, KV cache and workspace) beside what the
trainer keeps between steps (its weights, the optimizer state unless offloaded; gradients are freed after each
step). **training**: vLLM asleep (only what it cannot release: its CUDA graphs' pool and allocations outside its
sleep pools) beside the trainer's weights, gradients, optimizer state and the activations of one micro-batch.
With ``train.step_per_tensor`` the step goes one tensor at a time, smallest first, and frees each gradient after its
tensor steps (:class:`~rollout_sleep.run.per_tensor.PerTensorOptimizer`): training's peak is then the state plus the
larger of all gradients with the activations and, at the tensor where it is largest, the gradients still held
(``gradients_at_step``) with that tensor's step temporaries. With ``train.offload_optimizer=stream`` (per tensor too)
no optimizer state stays on the device: the state in training is what the step brings at its peak (that tensor's,
and with the copies overlapping the step the previous one's going back and the next one's coming in), counted
beside the gradients still held and the step temporaries, not beside the activations.

:func:`check` raises :class:`MemoryPlanError` (a :class:`~rollout_sleep.run.config.ConfigError`) naming the phase
that does not fit in the budget with the headroom kept, by how much, and what each knob would make of it.

>>> shape = ModelShape.from_config(_tiny_config())
>>> plan = plan_memory(PlanInputs(shape, dtype_bytes=2, micro_batch=8, seq_len=64, completion_len=32,
...                               kv_cache_bytes=2**20), budget_bytes=4 * GIB)
>>> plan.fits()
True
>>> check(dataclasses.replace(plan, budget_bytes=2**20))  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
rollout_sleep.run.memory_plan.MemoryPlanError: the memory plan does not fit in 2 phases:
  - rollout needs ... GiB of the 0.00 GiB available with 2.0 GiB of headroom kept (... GiB over). Knobs: ...
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from .config import ConfigError
from .offload import overlapped
from .optim import optimizer_state_bytes, optimizer_step_bytes

GIB = 2**30
PHASES = ("rollout", "training")
# What vLLM keeps while asleep at level 2 (its CUDA graphs' pool, allocations outside its sleep pools), measured on an
# H100 (vLLM 0.26, CUDA graphs): 0.8 GiB (Qwen3-0.6B), 1.3 GiB (4B), 1.2 GiB (8B); the plan takes the largest, rounded
# up, until the run measures its own (after the first sleep).
ENGINE_ASLEEP_BYTES = int(1.5 * GIB)
# vLLM sizes its activation workspace by a profiling forward over its token budget per scheduler step and samples up to
# max_num_seqs rows; these are vLLM's defaults for the offline LLM class on a GPU of 70 GiB or more.
ENGINE_PROFILE_TOKENS, ENGINE_MAX_SEQS = 16384, 1024
GROUPS = {"engine": ("engine_weights", "kv_cache", "engine_workspace")}  # measured as one: vLLM's memory at start
KNOB_NOTE = "train.memory_plan=warn runs anyway (off: no plan)"
OFFLOAD_SAID = {True: " (state offloaded during rollouts)",
                "stream": " (state in host memory, streamed to the step one tensor at a time)"}
PER_TENSOR_SAID = " (stepped one tensor at a time, smallest first)"


class MemoryPlanError(ConfigError):
    """The plan does not fit the device: raised before vLLM starts. ``problems``: one per phase."""

    def __init__(self, problems: list[str]):
        super().__init__(problems)
        if len(self.problems) == 1:
            self.args = (f"the memory plan does not fit: {self.problems[0]}",)
        else:
            self.args = (f"the memory plan does not fit in {len(self.problems)} phases:\n"
                         + "\n".join(f"  - {p}" for p in self.problems),)


def mlp_width(cfg: dict) -> int:
    """The MLP width a token passes through (what its activations scale with): ``intermediate_size`` for a dense
    model; for a mixture of experts, the routed experts each token visits (``num_experts_per_tok`` x the expert
    width) plus any shared experts. Mixtral's ``intermediate_size`` is one expert's: two of them run per token."""
    dense = cfg.get("intermediate_size") or 4 * cfg["hidden_size"]
    top_k = cfg.get("num_experts_per_tok")
    experts = cfg.get("num_experts") or cfg.get("num_local_experts") or cfg.get("n_routed_experts")
    if not top_k or not experts:
        return dense
    expert = cfg.get("moe_intermediate_size") or dense
    shared = cfg.get("shared_expert_intermediate_size") or (cfg.get("n_shared_experts") or 0) * expert
    return top_k * expert + shared


def experts_per_token(cfg: dict) -> int:
    """The routed experts each token visits (``num_experts_per_tok``) in a mixture of experts; 0 for a dense model."""
    experts = cfg.get("num_experts") or cfg.get("num_local_experts") or cfg.get("n_routed_experts")
    return int(cfg.get("num_experts_per_tok") or 0) if experts else 0


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs of a model: every parameter tensor's element count (tied weights once) and the
    decoder's dimensions (for activations and the KV cache)."""

    tensor_numels: tuple[int, ...]
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int  # the MLP width a token passes through (:func:`mlp_width`: routed experts for MoE)
    vocab_size: int
    embedding_numels: tuple[int, ...] = ()  # the input embeddings (bitsandbytes' adamw8bit: float32 state)
    experts_per_token: int = 0  # a mixture of experts: the routed experts each token visits (0: dense)

    @property
    def params(self) -> int:
        return sum(self.tensor_numels)

    @classmethod
    def _dims(cls, cfg: dict, numels, embeddings=()) -> "ModelShape":
        cfg = cfg.get("text_config", cfg)
        heads = cfg["num_attention_heads"]
        return cls(tuple(sorted(int(n) for n in numels)), cfg["hidden_size"], cfg["num_hidden_layers"], heads,
                   cfg.get("num_key_value_heads") or heads, cfg.get("head_dim") or cfg["hidden_size"] // heads,
                   mlp_width(cfg), cfg["vocab_size"], tuple(sorted(int(n) for n in embeddings)),
                   experts_per_token(cfg))

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> "ModelShape":
        """From a checkpoint folder: its config.json and its safetensors headers (no tensor is read)."""
        from rollout_sleep.weights.spec import read_checkpoint_spec

        if not any(Path(path).glob("*.safetensors")):  # a config alone (LoRA drawing its base in vLLM)
            from transformers import AutoConfig

            return cls.from_config(AutoConfig.from_pretrained(path))
        spec = read_checkpoint_spec(path)
        numels = [_numel(s.shape) for s in spec.values()]
        embeddings = [_numel(s.shape) for name, s in spec.items() if name.endswith("embed_tokens.weight")]
        return cls._dims(json.loads(Path(path, "config.json").read_text()), numels, embeddings)

    @classmethod
    def from_config(cls, config) -> "ModelShape":
        """From a transformers config: the model built on the meta device (no memory), its parameters counted."""
        import torch
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        embeddings = [m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding)]
        return cls._dims(config.to_dict(), [p.numel() for p in model.parameters()], embeddings)


def lora_adapter_numels(config, rank: int, targets) -> tuple[int, ...]:
    """Element counts of the LoRA adapter's tensors that PEFT puts on the model of transformers ``config`` (built on
    the meta device, no memory): ``targets`` as ``model.lora.targets`` (names such as ``q_proj``, or ``all-linear``).
    Counting PEFT's own adapter covers fused projections (Phi-3's ``qkv_proj``) and MoE experts, and a target that
    names no module fails here, before vLLM starts, with PEFT's message.

    >>> sum(lora_adapter_numels(_tiny_config(), 2, ["q_proj"]))  # 2 layers x rank 2 x (128 in + 128 out)
    1024
    """
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from rollout_sleep.lora.adapter import LoraSettings

    with torch.device("meta"):
        model = get_peft_model(AutoModelForCausalLM.from_config(config),
                               LoraSettings(rank, targets=targets).peft_config())
    return tuple(p.numel() for name, p in model.named_parameters() if "lora_" in name)


def checkpoint_params(path: str | Path) -> int:
    """Parameters stored in a checkpoint folder (safetensors headers only)."""
    from rollout_sleep.weights.spec import read_checkpoint_spec

    return sum(_numel(s.shape) for s in read_checkpoint_spec(path).values())


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


@dataclass(frozen=True)
class PlanInputs:
    """Everything the plan depends on. Byte sizes of dtypes: 2 for bf16/fp16, 4 for fp32.

    ``seq_len``: the longest prompt plus ``completion_len`` (a micro-batch is padded to its longest);
    ``shards``: how many ways the trainer's (weights, gradients, optimizer state) are split across ranks (1, 1, 1
    for one process or DDP; FSDP and ZeRO-3 split all three; ZeRO-1/2 the optimizer state, and gradients at 2).
    """

    shape: ModelShape
    dtype_bytes: int = 2
    optimizer: str = "adamw"
    stochastic_rounding: bool = False  # the optimizer comes from torchao (its state weighs what torchao's does)
    offload_optimizer: bool | str = False  # true: the state in host memory between steps; "stream": always
    step_per_tensor: bool = False  # the step one tensor at a time, smallest first (implied by "stream")
    # accelerate's DeepSpeed or FSDP steps and offloads the optimizer its own way: the per-tensor step and the
    # offloads are refused there, so the plan does not offer them
    owns_step: bool = False
    micro_batch: int = 32
    seq_len: int = 160
    completion_len: int = 128
    gradient_checkpointing: bool = True
    autocast: bool = False  # float32 weights under bf16/fp16 autocast: a low-precision copy of each weight in use
    reference_model: bool = False
    reward_model_bytes: int = 0
    kv_cache_bytes: int = 0
    engine_workspace_bytes: int | None = None  # None: estimate_engine_workspace
    engine_asleep_bytes: int = ENGINE_ASLEEP_BYTES
    shards: tuple[int, int, int] = (1, 1, 1)
    engine_shards: int = 1  # vLLM's tensor-parallel size: its weights split that many ways (kv_cache_bytes is per rank)
    # LoRA (``model.lora``): only the adapter trains; its tensors' element counts. The engine then sleeps at
    # level 0 (its weights stay), and with ``base_shared`` the trainer's frozen base is a view of them (held once).
    adapter_numels: tuple[int, ...] | None = None
    base_shared: bool = False
    # One copy (``model.share_weights``): every parameter trains, and the trainer's are views of the engine's
    # weights (held once); the engine sleeps at level 0 as for LoRA.
    weights_shared: bool = False
    # The trainer's LM head fused with the log-softmax (``grpo.logprobs.linear_selected_logprobs``, the default where
    # ``grpo.logprobs.fused_head_problem`` allows): no full logits or logits gradient; False: the model's own logits.
    fused_head: bool = True
    # ``adamw8bit`` with rounding stepped by one kernel per tensor (``run.optim.fused_step_runs``): no temporaries
    fused_step: bool = False

    @property
    def per_tensor(self) -> bool:
        """The step goes one tensor at a time (``train.step_per_tensor``, or ``stream``, which implies it)."""
        return self.step_per_tensor or self.offload_optimizer == "stream"


def layer_activation_bytes_per_token(s: ModelShape, b: int) -> int:
    """Bytes one decoder layer saves for its backward pass per token (a Llama/Qwen-style layer, transformers'
    eager modules, SDPA attention): two RMSNorms (their float32 input and their output), q/k norms likewise,
    the rotary halves, attention's q, k, v (k and v repeated to every head when a padding mask is given) and its
    output, o_proj's input, and the MLP's gate, activation, up and product. A mixture of experts also keeps, for
    each expert a token visits, the token's copy gathered for it and the expert's output before its routing
    weight scales it (transformers' expert loop): two hidden-wide tensors per routed expert."""
    qk = (s.num_heads + s.num_kv_heads) * s.head_dim
    norms = 2 * (4 * s.hidden_size + b * s.hidden_size) + 4 * qk + b * qk
    attention = b * qk + b * 4 * s.num_heads * s.head_dim + b * s.num_heads * s.head_dim
    routed = 2 * b * s.experts_per_token * s.hidden_size
    return norms + attention + 4 * b * s.intermediate_size + routed


def activation_bytes(i: PlanInputs) -> int:
    """Peak activation memory of one micro-batch's forward and backward: the layers (all of them, or with gradient
    checkpointing each layer's input plus one layer recomputed with its gradients), the embedding and final norm,
    and the LM head over the completion columns. Fused (``fused_head``, :func:`head_activation_bytes`): the head's
    input and its float32 gradient accumulator, and chunks of logits at most 256 MiB in float32; unfused: the
    logits kept for backward and their gradient, plus the float32 row chunks of the log-softmax."""
    s, b = i.shape, i.dtype_bytes
    tokens = i.micro_batch * i.seq_len
    layer = tokens * layer_activation_bytes_per_token(s, b)
    if i.gradient_checkpointing:
        layers = s.num_layers * tokens * s.hidden_size * b + 2 * layer
    else:
        layers = s.num_layers * layer + layer
    ends = tokens * s.hidden_size * (2 * b + 4)
    return layers + ends + head_activation_bytes(i)


def head_activation_bytes(i: PlanInputs) -> int:
    """What the LM head and log-softmax over the completion columns (``micro_batch x (completion_len + 1)``
    positions) add at their peak. Unfused: the ``[positions, vocab]`` logits kept for backward and their gradient
    (``dtype_bytes`` each), plus two float32 row chunks of the log-softmax (``grpo.logprobs._chunk_rows``: at most 256 MiB).
    Fused (``grpo.logprobs.linear_selected_logprobs``): no logits are kept; a chunk's logits exist one at a time (float32
    at most 256 MiB, with its ``dtype_bytes`` product and float32 temporaries: two chunks counted), beside the
    head's input (``dtype_bytes`` per hidden unit, also kept unfused but counted there in the logits' margin) and
    the float32 accumulator of its gradient.

    >>> from rollout_sleep.weights.checkpoints import qwen3_config
    >>> i = PlanInputs(ModelShape.from_config(qwen3_config("qwen3-8b")), micro_batch=32, completion_len=128)
    >>> [round(head_activation_bytes(dataclasses.replace(i, fused_head=f)) / GIB, 2) for f in (False, True)]
    [2.84, 0.59]
    """
    s, b = i.shape, i.dtype_bytes
    positions = i.micro_batch * (i.completion_len + 1)
    logits = positions * s.vocab_size
    chunk = min(256 * 2**20, logits * 4)
    if i.fused_head:
        return 2 * chunk + positions * s.hidden_size * (b + 4)
    return 2 * logits * b + 2 * chunk


def estimate_engine_workspace(s: ModelShape, b: int) -> int:
    """vLLM's memory beyond its weights and KV cache while awake: the activations of its profiling forward
    (``ENGINE_PROFILE_TOKENS`` tokens through a layer's widest tensors), the sampler's float32 logits
    (``ENGINE_MAX_SEQS`` rows), and what it keeps asleep too (CUDA graphs, ``ENGINE_ASLEEP_BYTES``)."""
    per_token = b * ((s.num_heads + 2 * s.num_kv_heads) * s.head_dim + 3 * s.intermediate_size + 2 * s.hidden_size)
    return ENGINE_PROFILE_TOKENS * per_token + ENGINE_MAX_SEQS * s.vocab_size * 4 + ENGINE_ASLEEP_BYTES


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per component per phase, the budget they must fit (``None``: unknown, no check) and the headroom
    each phase must leave."""

    inputs: PlanInputs
    phases: dict[str, dict[str, int]]
    budget_bytes: int | None = None
    headroom_bytes: int = 2 * GIB
    notes: tuple[str, ...] = field(default_factory=tuple)

    def total(self, phase: str) -> int:
        """The phase's peak. In training the optimizer step (its temporaries, and with the state offloaded the
        state too, which comes back for the step only) runs after the last micro-batch's activations are freed:
        whichever is larger counts. Per tensor, the step meets only the gradients not yet freed."""
        c = dict(self.phases[phase])
        if phase != "training":
            return sum(c.values())
        # the optimizer step's temporaries exist after the last micro-batch's activations are freed
        acts, state, step = (c.pop(k, 0) for k in ("activations", "optimizer_state", "optimizer_step"))
        offloaded = bool(self.inputs.offload_optimizer)  # true, stream: the state is on the device for the step only
        if self.inputs.per_tensor:  # one tensor steps at a time, with the gradients not yet freed
            grads, held = c.pop("gradients", 0), c.pop("gradients_at_step", 0)
            if offloaded:
                return sum(c.values()) + max(grads + acts, held + state + step)
            return sum(c.values()) + state + max(grads + acts, held + step)
        if offloaded:  # true: all of the state comes back for the step
            return sum(c.values()) + max(acts, state + step)
        return sum(c.values()) + state + max(acts, step)

    def peak_phase(self) -> str:
        return max(PHASES, key=self.total)

    def over(self, phase: str) -> int | None:
        """Bytes by which ``phase`` misses its budget less the headroom (<= 0: it fits); ``None``: no budget."""
        if self.budget_bytes is None:
            return None
        return self.total(phase) + self.headroom_bytes - self.budget_bytes

    def fits(self) -> bool | None:
        if self.budget_bytes is None:
            return None
        return all(self.over(p) <= 0 for p in PHASES)

    def as_dict(self) -> dict:
        """JSON-ready: components and totals per phase in GiB, the budget, the headroom, the inputs."""
        i = dataclasses.asdict(self.inputs)
        i["shape"] = {k: v for k, v in i["shape"].items() if k != "tensor_numels"} | {"params": self.inputs.shape.params}
        return {"phases": {p: {**{k: v / GIB for k, v in c.items()}, "total": self.total(p) / GIB}
                           for p, c in self.phases.items()},
                "budget_gib": None if self.budget_bytes is None else self.budget_bytes / GIB,
                "headroom_gib": self.headroom_bytes / GIB, "fits": self.fits(), "inputs": i, "notes": list(self.notes)}

    def rows(self) -> list[list]:
        """``[component, rollout GiB, training GiB]`` rows, totals last (for a table)."""
        names = list(dict.fromkeys(k for p in PHASES for k in self.phases[p]))
        out = [[k] + [round(self.phases[p].get(k, 0) / GIB, 3) for p in PHASES] for k in names]
        return out + [["total"] + [round(self.total(p) / GIB, 3) for p in PHASES]]

    def table(self) -> str:
        """The plan as text: a line per component, the totals, the budget and what is left."""
        i = self.inputs
        n = i.shape.params
        count = f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"
        head = (f"memory plan: {count} parameters x {i.dtype_bytes} bytes, optimizer "
                f"{i.optimizer}{' (torchao, bf16 stochastic rounding)' if i.stochastic_rounding else ''}"
                f"{OFFLOAD_SAID.get(i.offload_optimizer, '')}"
                f"{PER_TENSOR_SAID if i.step_per_tensor and i.offload_optimizer != 'stream' else ''}, micro-batch "
                f"{i.micro_batch} x {i.seq_len} tokens, gradient checkpointing "
                f"{'on' if i.gradient_checkpointing else 'off'}")
        if i.adapter_numels is not None:
            head += (f"; LoRA: {sum(i.adapter_numels) / 1e6:.1f}M adapter parameters train, the base "
                     f"{'is held once (the trainer views the engine' + chr(39) + 's weights)' if i.base_shared else 'is held twice (trainer and engine)'}"
                     ", the engine sleeps at level 0 (KV cache only)")
        if i.weights_shared:
            head += ("; one copy of the weights: the trainer trains the engine's (engine_weights; its "
                     "trainer_weights are views), the engine sleeps at level 0 (KV cache only)")
        lines = [head, f"  {'GiB':<18}{'rollout':>10}{'training':>10}"]
        for name, *vals in self.rows():
            lines.append(f"  {name:<18}" + "".join(f"{v:>10.2f}" for v in vals))
        if self.budget_bytes is None:
            lines.append("  budget: unknown (no GPU and no train.memory_budget_gib): not checked")
        else:
            left = [(self.budget_bytes - self.total(p)) / GIB for p in PHASES]
            lines.append(f"  {'free of ' + format(self.budget_bytes / GIB, '.2f'):<18}"
                         + "".join(f"{v:>10.2f}" for v in left) + f"   (headroom kept: {self.headroom_bytes / GIB:.1f})")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def per_tensor_step_peak(optimizer: str, numels, dtype_bytes: int, stochastic_rounding: bool = False,
                         state32=(), state_in: str = "device", overlap: bool | None = None,
                         fused_step: bool = False) -> tuple[int, int, int]:
    """The per-tensor step's peak (:class:`~rollout_sleep.run.per_tensor.PerTensorOptimizer`: smallest tensor
    first, each gradient freed after its tensor steps), for tensors of ``numels`` elements: ``(gradients still
    held, the state on the device, that tensor's step's temporaries)`` at the tensor where their sum is largest
    (``state32``: numels whose state bitsandbytes keeps in 32 bits). ``state_in="device"`` (the optimizer's
    default): all of the state, throughout. ``"host"`` (``stream``): with the copies overlapping the step
    (``overlap``: ``None``, the optimizer's default, is on with host state) up to three tensors': the previous
    one's still going back, this one's, and the next one's already coming in; serially, this one's alone.

    >>> per_tensor_step_peak("adamw", [10, 30, 20], 2, state_in="host")  # at the 20: 50 gradients
    (100, 252, 0)
    >>> per_tensor_step_peak("adamw", [10, 30, 20], 2, state_in="host", overlap=False)  # serially: the 20's state
    (100, 84, 0)
    >>> per_tensor_step_peak("adamw", [10, 30, 20], 2)  # on the device: every state, at the first (all gradients)
    (120, 252, 0)
    """
    overlap = overlapped(state_in, overlap)
    order = sorted(numels)
    states = [optimizer_state_bytes(optimizer, [(n, dtype_bytes)], [n] if n in state32 else (),
                                    stochastic_rounding=stochastic_rounding) for n in order]
    # on the device: the plain optimizer's state, counted as the plain plan does (bitsandbytes' shared maps once,
    # float32 state for the embeddings only, not for a head of the same size)
    whole = optimizer_state_bytes(optimizer, [(n, dtype_bytes) for n in order], state32,
                                  stochastic_rounding=stochastic_rounding)
    best, held = (0, 0, 0), sum(order) * dtype_bytes
    for i, n in enumerate(order):
        if state_in == "device":
            state = whole
        else:
            state = sum(states[max(i - 1, 0):i + 2]) if overlap else states[i]
        here = (held, state, optimizer_step_bytes(optimizer, [n], stochastic_rounding, fused_step))
        best = max(best, here, key=sum)
        held -= n * dtype_bytes
    return best


def plan_memory(i: PlanInputs, budget_bytes: int | None = None, headroom_bytes: int = 2 * GIB,
                notes: tuple[str, ...] = ()) -> MemoryPlan:
    """The per-phase plan of ``i`` (see the module's docstring for what each phase holds)."""
    s, b = i.shape, i.dtype_bytes
    engine_weights = s.params * b
    ws, gs, os_ = i.shards
    trained = s.tensor_numels if i.adapter_numels is None else i.adapter_numels
    base = 0 if i.adapter_numels is None else (0 if i.base_shared else s.params * b)
    weights = 0 if i.weights_shared else -(-(sum(trained) * b + base) // ws)
    state32 = s.embedding_numels if i.adapter_numels is None else ()
    if i.per_tensor:  # one tensor steps at a time; stream: its state brought from host memory for the step
        state_in = "host" if i.offload_optimizer == "stream" else "device"
        held, state, step = per_tensor_step_peak(i.optimizer, trained, b, i.stochastic_rounding, state32, state_in,
                                                 fused_step=i.fused_step)
    else:
        held = None
        state = optimizer_state_bytes(i.optimizer, [(n, b) for n in trained], state32,
                                      stochastic_rounding=i.stochastic_rounding)
        step = optimizer_step_bytes(i.optimizer, trained, i.stochastic_rounding, i.fused_step) // gs
    state = -(-state // os_)
    ref = s.params * b if i.reference_model else 0
    workspace = estimate_engine_workspace(s, b) if i.engine_workspace_bytes is None else i.engine_workspace_bytes
    resident = {"trainer_weights": weights, "optimizer_state": 0 if i.offload_optimizer else state, "gradients": 0}
    if ref:
        resident["reference_model"] = ref
    if i.reward_model_bytes:
        resident["reward_models"] = i.reward_model_bytes
    rollout = {**resident, "engine_weights": -(-engine_weights // i.engine_shards), "kv_cache": i.kv_cache_bytes,
               "engine_workspace": workspace}
    acts = activation_bytes(i) + (s.params * 2 if i.autocast else 0)
    training = {**resident, "optimizer_state": state, "gradients": -(-sum(trained) * b // gs), "activations": acts}
    if step:  # torchao steps a tensor at a time (the largest sets it), after the activations are freed
        training["optimizer_step"] = step
    if held is not None:
        training["gradients_at_step"] = held
    if i.adapter_numels is None and not i.weights_shared:
        training["engine_asleep"] = i.engine_asleep_bytes
    else:  # LoRA or one copy: the engine sleeps at level 0, releasing its KV cache only; its weights stay
        training["engine_weights"] = rollout["engine_weights"]
        training["engine_workspace"] = workspace
    return MemoryPlan(i, {"rollout": rollout, "training": training}, budget_bytes, headroom_bytes, tuple(notes))


def knob_alternatives(i: PlanInputs) -> list[tuple[str, PlanInputs]]:
    """The settings that lower the plan, each as ``(override, inputs with it)``."""
    from .optim import missing_package, optimizer_package

    out = []
    for leaner in {"adamw": ("adamw8bit", "adamw4bit"), "adamw8bit": ("adamw4bit",)}.get(i.optimizer, ()):
        package = optimizer_package(leaner, i.stochastic_rounding)
        needs = f" (needs {package}: pip install {package})" if missing_package(leaner, i.stochastic_rounding) else ""
        out.append((f"train.optimizer={leaner}{needs}", dataclasses.replace(i, optimizer=leaner)))
    if not i.per_tensor and not i.owns_step:  # no copies: before the offloads
        out.append(("train.step_per_tensor=true", dataclasses.replace(i, step_per_tensor=True)))
    if not i.offload_optimizer and not i.owns_step:
        out.append(("train.offload_optimizer=true", dataclasses.replace(i, offload_optimizer=True)))
    if i.offload_optimizer != "stream" and not i.owns_step:
        out.append(("train.offload_optimizer=stream", dataclasses.replace(i, offload_optimizer="stream")))
    if not i.gradient_checkpointing:
        out.append(("train.gradient_checkpointing=true", dataclasses.replace(i, gradient_checkpointing=True)))
    return out


def _largest_micro_batch(plan: MemoryPlan, phase: str) -> int | None:
    """The largest micro-batch (halving) with which ``phase`` fits, or ``None``."""
    mb = plan.inputs.micro_batch // 2
    while mb >= 1:
        alt = plan_memory(dataclasses.replace(plan.inputs, micro_batch=mb), plan.budget_bytes, plan.headroom_bytes)
        if alt.over(phase) <= 0:
            return mb
        mb //= 2
    return None


def problems(plan: MemoryPlan) -> list[str]:
    """One message per phase that does not fit: by how much, and what each knob makes of it."""
    out = []
    for phase in PHASES:
        over = plan.over(phase)
        if over is None or over <= 0:
            continue
        knobs = []
        for label, alt in knob_alternatives(plan.inputs):
            p = plan_memory(alt, plan.budget_bytes, plan.headroom_bytes)
            other = [q for q in PHASES if q != phase][0]
            verdict = "fits" if p.fits() else f"{phase} still {p.over(phase) / GIB:.2f} GiB over" \
                if p.over(phase) > 0 else f"{other} over"
            knobs.append(f"{label} -> {p.total(phase) / GIB:.2f} GiB ({verdict})")
        if phase == "training":
            mb = _largest_micro_batch(plan, phase)
            if mb is not None:
                knobs.append(f"train.micro_batch={mb} (the largest that fits, halving)")
        else:
            kv = plan.phases["rollout"]["kv_cache"]
            if kv > over:
                knobs.append(f"a KV cache of at most {(kv - over) / GIB:.2f} GiB (now {kv / GIB:.2f}: "
                             "engine.kv_cache_bytes, or with engine.kv_cache=step fewer train.prompts_per_step / "
                             "train.max_tokens, or a lower engine.kv_cache_margin)")
        out.append(f"{phase} needs {plan.total(phase) / GIB:.2f} GiB of the "
                   f"{plan.budget_bytes / GIB:.2f} GiB available with {plan.headroom_bytes / GIB:.1f} GiB of headroom "
                   f"kept ({over / GIB:.2f} GiB over). Knobs: " + ("; ".join(knobs) or "none lowers it")
                   + f". {KNOB_NOTE}")
    return out


def check(plan: MemoryPlan) -> None:
    """Raise :class:`MemoryPlanError` listing every phase that does not fit (nothing when the budget is unknown)."""
    found = problems(plan)
    if found:
        raise MemoryPlanError(found)


def compare(plan: MemoryPlan, measured: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Plan vs measured per phase and component (GiB): ``measured[phase][name]`` against the plan's component of
    the same name (``total`` against the phase's total, ``engine`` against vLLM's weights, KV cache and workspace);
    ``diff`` = measured - planned.

    >>> plan = MemoryPlan(PlanInputs(None), {"rollout": {"engine_weights": GIB, "kv_cache": GIB}, "training": {}})
    >>> rows = compare(plan, {"rollout": {"engine": 2.5, "total": 2.0, "unplanned": 1.0}})["rollout"]
    >>> rows["engine"], sorted(rows)
    ({'plan_gib': 2.0, 'measured_gib': 2.5, 'diff_gib': 0.5}, ['engine', 'total'])
    """
    out: dict[str, dict[str, float]] = {}
    for phase, values in measured.items():
        for name, value in values.items():
            if value is None:
                continue
            if name == "total":
                planned = plan.total(phase)
            elif name in GROUPS:
                planned = sum(plan.phases[phase].get(k, 0) for k in GROUPS[name])
            else:
                planned = plan.phases.get(phase, {}).get(name)
            if planned is None:
                continue
            out.setdefault(phase, {})[name] = {"plan_gib": planned / GIB, "measured_gib": value,
                                               "diff_gib": value - planned / GIB}
    return out


def _tiny_config():
    from rollout_sleep.weights.checkpoints import qwen3_config

    return qwen3_config("tiny")

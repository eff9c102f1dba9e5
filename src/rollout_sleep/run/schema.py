"""The recipe's configuration as dataclasses: every key, its default and what it means (the ``help`` of each
field is the one source of the recipe's ``--help`` and of :func:`help_text`). Loading and checking live in
:mod:`rollout_sleep.run.config`.

>>> "train.steps" in help_text()
True
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable


# What a changed value means when a run resumes from a checkpoint (every key has one; see ``resume_class``):
FIXED = "fixed"  # defines the saved state (model, data, seed, group shape, optimizer type): a resume is refused
APPLIED = "applied"  # a training setting: it takes effect from the resumed step on, and the change is logged
FREE = "free"  # how the run runs (steps, saves, memory, engine, logging, timeouts): it does not touch the state
RESUME_CLASSES = (FIXED, APPLIED, FREE)

DTYPES = ("float32", "bfloat16", "float16")
KV_CACHE_SIZING = ("step", "gpu_share")
OFFLOAD_MODES = (False, True, "stream")  # train.offload_optimizer (rollout_sleep.run.offload)


def _load_methods() -> tuple:
    from rollout_sleep.engine.loader import LOAD_METHODS  # imported when asked: the schema stays torch-free

    return LOAD_METHODS


def _opt(default: Any, help: str, *, resume: str, mode: tuple | Callable[[], tuple] | None = None) -> Any:
    """A field with its default, its meaning (``help``) and its resume class (:data:`FIXED` / :data:`APPLIED`
    / :data:`FREE`: required, so that no new key goes unclassified). ``mode``: the field picks how the engine
    runs; the values that stand for each of its modes, or what returns them from their home (:func:`mode_keys`:
    every combination is accepted or refused by :mod:`rollout_sleep.run.modes`)."""
    meta = {"help": help, "resume": resume, **({"mode": mode} if mode is not None else {})}
    return field(default=default, metadata=meta)


def _opt_list(factory: Callable[[], Any], help: str, *, resume: str) -> Any:
    return field(default_factory=factory, metadata={"help": help, "resume": resume})


def _section(cls: type, help: str) -> Any:
    return field(default_factory=cls, metadata={"help": help})


@dataclass
class ModelLoraConfig:
    rank: int = _opt(0, "LoRA rank (0: train every parameter). With a rank only the adapter trains and moves: "
                        "vLLM serves it (enable_lora) from the one copy of the base it holds, and on CUDA the "
                        "trainer's frozen base is a view of vLLM's weights; experimental (docs/lora.md)",
                     resume=FIXED, mode=(0, 16))
    alpha: float | None = _opt(None, "LoRA alpha: the adapter is scaled by alpha / rank (null: 2 x rank)", resume=FIXED)
    targets: list[str] = _opt_list(lambda: ["all-linear"], "modules the adapter adapts (PEFT's target_modules: "
                                                          "names such as q_proj, or all-linear)", resume=FIXED)


@dataclass
class ModelConfig:
    path: str = _opt("tiny", "a local HF checkpoint, or a size from checkpoints.SHAPES (built with random weights)",
                     resume=FIXED)
    seed: int = _opt(0, "seed of the random weights when path is a size", resume=FIXED)
    dtype: str = _opt("float32", "trainer and engine dtype: float32 / bfloat16 / float16", resume=FIXED, mode=DTYPES)
    tie_word_embeddings: bool | None = _opt(None, "tie the LM head to the embedding when path is a size "
                                                  "(null: the size's own choice; a checkpoint's own config "
                                                  "decides, so it must stay null there)", resume=FIXED)
    share_weights: bool | None = _opt(None, "one copy of the weights: the trainer's parameters are views of vLLM's "
                                            "weight tensors, the optimizer updates them in place and a sync moves "
                                            "nothing (CUDA, one process, one engine, no LoRA; "
                                            "docs/design.md). null: on where it applies, the decision logged; "
                                            "true: refuse to start where it does not; false: two copies, synced",
                                      resume=FREE, mode=(None, True, False))
    lora: ModelLoraConfig = _section(ModelLoraConfig, "a LoRA adapter instead of full-parameter training")


@dataclass
class EngineConfig:
    gpu_memory_utilization: float = _opt(0.35, "share of the GPU vLLM may take (its weights, KV cache, "
                                               "activations)", resume=FREE)
    kv_cache: str = _opt("step", "KV cache size on GPU: step = what one step's sequences need (+ "
                                 "kv_cache_margin), so vLLM maps back only that at every wake; gpu_share = vLLM's "
                                 "own sizing from gpu_memory_utilization; kv_cache_bytes wins over both", resume=FREE,
                         mode=KV_CACHE_SIZING)
    kv_cache_margin: float = _opt(0.0, "with kv_cache=step, the share added to one step's sequences (each as long "
                                        "as the longest prompt + max_tokens, in vLLM's 16-token blocks): room for "
                                        "attention backends with larger blocks, which the run warns of after vLLM "
                                        "starts, naming the margin that fits. 0: exactly one step's (a sequence "
                                        "that finds no room would wait for another to finish)",
                                  resume=FREE)
    kv_cache_bytes: int | None = _opt(None, "KV cache size in bytes (null: from kv_cache; 256 MiB on CPU)", resume=FREE)
    max_model_len: int | None = _opt(1024, "longest prompt + completion, in tokens (null: the model's)", resume=FREE)
    sleep_level: int = _opt(2, "sleep level while training: 2 discards weights and KV cache, 1 offloads the "
                               "weights to host memory (with model.lora the engine keeps its base weights: it "
                               "releases its KV cache only)", resume=FREE, mode=(1, 2))
    load_method: str = _opt("auto", "weight-load route: auto / reload / load_weights / direct (auto takes "
                                    "direct where it maps every tensor exactly)", resume=FREE, mode=_load_methods)
    verify_every: int = _opt(1, "run verify after every N-th sync (0: never)", resume=FREE)
    enforce_eager: bool | None = _opt(None, "vLLM without torch.compile and CUDA graphs (faster start, slower "
                                            "generation); null: eager on CPU (compiling costs ~15-20 s at each "
                                            "start there), compiled on GPU", resume=FREE)
    keep_trainer_cache: bool = _opt(True, "sleep without emptying PyTorch's cache (the trainer's; see Engine); false: "
                                          "empty it at every sleep and before every wake (the lowest peak)",
                                    resume=FREE, mode=(True, False))
    tensor_parallel_size: int = _opt(1, "1: an engine per rank (data-parallel rollouts); = the number of "
                                        "processes: one tensor-parallel engine across all ranks (every rank sees "
                                        "the same completions and trains on its share of the groups)", resume=FREE,
                                    mode=(1, 2))


@dataclass
class DataConfig:
    dataset: str = _opt("synthetic", "synthetic, or a local path (folder, .jsonl, .json, .parquet, .csv); relative: "
                                     "from the YAML's folder in a config file, from the working directory on the "
                                     "command line", resume=FIXED)
    prompt_column: str = _opt("prompt", "the dataset's column holding the prompts", resume=FIXED)
    num_prompts: int | None = _opt(None, "use the first N rows (null: all). Steps take train.prompts_per_step of "
                                         "them at a time, epoch by epoch, each epoch a fresh order drawn from "
                                         "train.seed", resume=FIXED)
    chat_template: bool = _opt(False, "turn plain text prompts into user messages (conversational prompts, "
                                      "lists of messages, always get the tokenizer's chat template)", resume=FIXED)
    system_prompt: str | None = _opt(None, "a system message before each prompt (turns text prompts into "
                                           "messages too)", resume=FIXED)


@dataclass
class TrainConfig:
    steps: int = _opt(12, "optimizer steps (each: rollout, sleep, train, wake with the new weights)", resume=FREE)
    prompts_per_step: int = _opt(8, "prompts per step, over all ranks", resume=FIXED)
    generations: int = _opt(8, "completions per prompt (the GRPO group)", resume=FIXED)
    max_tokens: int = _opt(8, "longest completion, in tokens", resume=APPLIED)
    temperature: float = _opt(1.0, "sampling temperature", resume=APPLIED)
    lr: float = _opt(3e-3, "AdamW learning rate", resume=APPLIED)
    weight_decay: float = _opt(0.0, "AdamW weight decay", resume=APPLIED)
    clip_eps: float = _opt(0.2, "PPO clip range of the policy ratio", resume=APPLIED)
    kl_coef: float = _opt(0.0, "weight of the KL penalty to the reference policy (0: no reference model)",
                          resume=APPLIED)
    kl_bias_correction: bool = _opt(True, "TRL's use_bias_correction_kl (its default): the KL times the policy "
                                          "ratio", resume=APPLIED)
    loss: str = _opt("dapo", "how token losses are summed, TRL's loss_type names and formulas: dapo (TRL's "
                             "default) / grpo / dr_grpo / bnpo", resume=APPLIED)
    micro_batch: int = _opt(64, "sequences per forward/backward pass (gradients accumulate over a step)", resume=FREE)
    max_grad_norm: float = _opt(1.0, "clip the gradients' global norm to this (.inf: no clipping)",
                                resume=APPLIED)
    mixed_precision: str = _opt("no", "no / bf16 / fp16 (accelerate)", resume=FIXED)
    gradient_checkpointing: bool = _opt(False, "recompute activations in the backward pass (less memory)", resume=FREE)
    compile: bool = _opt(False, "regional compilation of the trainer's model (accelerate's, in place): each "
                                "decoder layer compiled once with torch.compile (inductor), the compiled code reused "
                                "by every layer, fusing the elementwise work of the eager layers (RMSNorm, RoPE, "
                                "SiLU x up, casts). Parameter names and tensors stay the model's own (one copy's "
                                "views, LoRA, the sync, checkpoints); the first steps compile, and once more when "
                                "the sequence lengths change. Plain, one copy, LoRA, DDP, FSDP2 and CPU; refused "
                                "with DeepSpeed and FSDP1 (docs/design.md). On the H100 at 8B it took 0.55 s off "
                                "a 2.6 s training phase (docs/benchmarks.md)",
                         resume=FREE)
    optimizer: str = _opt("adamw", "adamw: PyTorch's AdamW (fused on GPU; its moments take the weights' dtype: 4 "
                                   "bytes of state per bf16 parameter) / adamw8bit: bitsandbytes' AdamW8bit (~2 "
                                   "bytes per parameter; needs pip install bitsandbytes) / adamw4bit: torchao's "
                                   "AdamW4bit (~1 byte per parameter; needs pip install torchao). With "
                                   "stochastic rounding each comes from torchao", resume=FIXED)
    stochastic_rounding: bool | None = _opt(None, "round each update into the bf16 weights up or down with the "
                                                  "probability that keeps it in expectation (torchao's "
                                                  "bf16_stochastic_round; needs pip install torchao): without a "
                                                  "float32 master copy a small lr's updates otherwise round away. "
                                                  "null: on only where the trainer steps vLLM's own bf16 weights "
                                                  "(one copy, no master possible); true: on (model.dtype=bfloat16 "
                                                  "only); false: off. On resume only the optimizer's class "
                                                  "is fixed (checked against the checkpoint's)", resume=APPLIED)
    offload_optimizer: bool | str = _opt(False, "the optimizer state in pinned host memory: false: on the GPU / "
                                                "true: off it except during the optimizer step (frees it for the "
                                                "rollout and the activations) / stream: off it always, the step "
                                                "moving one parameter's state at a time (the step holds up to "
                                                "three parameters' state, not all of it, beside the gradients). "
                                                "Each costs a copy each way per step, logged as "
                                                "optimizer_offload_s / _reload_s: true: the seconds the step waits "
                                                "for them; stream: each copy's own time (CUDA events), with "
                                                "optimizer_step_s the "
                                                "step's wall time and optimizer_copy_wait_s the copy time it did "
                                                "not hide", resume=FREE)
    step_per_tensor: bool = _opt(False, "the optimizer step one parameter at a time, smallest tensor first, each "
                                        "gradient freed once its tensor has stepped, the state staying where it "
                                        "is (no copies): the largest tensors (embedding, head) step beside their "
                                        "own gradients only, not all of them, so the step's peak (the state, the "
                                        "gradients not yet freed, one tensor's step temporaries) drops below the "
                                        "backward pass's. Bitwise the plain step's updates and state_dict (with "
                                        "stochastic rounding, other random draws). offload_optimizer=stream "
                                        "implies it. Not with DeepSpeed or FSDP (they own the step)", resume=FREE)
    expandable_segments: bool = _opt(False, "once vLLM has built its engine, PyTorch's allocator grows its segments "
                                            "in place (expandable_segments) for the trainer: fewer cached blocks "
                                            "no tensor can use, a lower device peak. Only where the engine sleeps at level 0 (one "
                                            "copy of the weights, LoRA with one base): a level-1/2 wake allocates "
                                            "in vLLM's sleep pool, which expandable segments break. CUDA only; "
                                            "experimental (docs/benchmarks.md)", resume=FREE)
    memory_plan: str = _opt("refuse", "the per-phase GPU memory plan printed before vLLM starts: refuse = stop "
                                      "with the knobs to turn when a phase does not fit / warn = say so and run "
                                      "anyway / off = no plan", resume=FREE)
    memory_budget_gib: float | None = _opt(None, "GPU memory the plan must fit, in GiB (null: the free memory at "
                                                 "start; on CPU the plan is then printed but not checked)", resume=FREE)
    memory_headroom_gib: float = _opt(2.0, "GiB each phase must leave free in the plan (the estimates' error, "
                                           "the allocator's fragmentation)", resume=FREE)
    sampling_correction: str = _opt("sequence_mask", "reweight the loss by the trainer/vLLM probability ratio "
                                                     "(TRL's vllm_importance_sampling_*): none / token_truncate / "
                                                     "token_mask / sequence_truncate / sequence_mask", resume=APPLIED)
    sampling_clip_min: float | None = _opt(None, "lower bound of the sampling correction's ratio (null: none)",
                                           resume=APPLIED)
    sampling_clip_max: float | None = _opt(3.0, "upper bound of the sampling correction's ratio (null: none)",
                                           resume=APPLIED)
    update_check_every: int = _opt(50, "compare a fixed sample of each trained tensor's weights before and after "
                                       "the optimizer step, at the first step and every N-th: logs "
                                       "train/updated_fraction (the share of sampled weights with a gradient "
                                       "that changed) and warns when the first step changed almost none "
                                       "(bf16 weights with a small lr: the updates round away); 0: off", resume=FREE)
    seed: int = _opt(0, "seed of sampling, data order and initialisation", resume=FIXED)


@dataclass
class WandbConfig:
    mode: str = _opt("offline", "offline / online / disabled", resume=FREE)
    project: str = _opt("rollout-sleep", "wandb project", resume=FREE)
    run_name: str | None = _opt(None, "wandb run name (null: wandb's)", resume=FREE)


@dataclass
class WatchdogConfig:
    """Seconds each phase may take before the run stops with the phase, the rank, what it waited for and
    every thread's stack (0: no limit for that phase). ``collective_s`` also sets torch.distributed's
    timeout for the process group."""
    enabled: bool = _opt(True, "stop a run whose phase outlasts its limit (with every thread's stack)", resume=FREE)
    setup_s: float = _opt(1800.0, "engine start, model load, resume", resume=FREE)
    generate_s: float = _opt(1800.0, "a rollout", resume=FREE)
    reward_s: float = _opt(1800.0, "scoring a step's completions (the reward functions and reward models)",
                           resume=FREE)
    sleep_s: float = _opt(600.0, "putting the engine to sleep", resume=FREE)
    wake_s: float = _opt(1200.0, "wake → load → KV cache → reset (a load while awake too)", resume=FREE)
    verify_s: float = _opt(1200.0, "verify", resume=FREE)
    train_s: float = _opt(3600.0, "a step's training (forward, backward, optimizer step; not the rewards)",
                          resume=FREE)
    save_s: float = _opt(3600.0, "saving a checkpoint", resume=FREE)
    collective_s: float = _opt(1800.0, "any wait for the other ranks (barriers, gathers); also "
                                       "torch.distributed's timeout", resume=FREE)


@dataclass
class RecipeConfig:
    model: ModelConfig = _section(ModelConfig, "the policy")
    engine: EngineConfig = _section(EngineConfig, "the colocated vLLM engine")
    data: DataConfig = _section(DataConfig, "the prompts")
    train: TrainConfig = _section(TrainConfig, "GRPO training")
    wandb: WandbConfig = _section(WandbConfig, "logging to wandb")
    watchdog: WatchdogConfig = _section(WatchdogConfig, "time limit of each phase, in seconds (0: none)")
    rewards: list[str] = _opt_list(lambda: ["digits_format", "arithmetic_exact"],
                                   "built-in names, import paths (module:function, file.py:function) or "
                                   "reward-model checkpoint directories", resume=FIXED)
    reward_weights: list[float] | None = _opt(None, "one per reward (TRL's reward_weights); default 1.0 each",
                                              resume=FIXED)
    output_dir: str = _opt("runs/grpo", "metrics, checkpoints and the run's config go here", resume=FREE)
    save_every: int = _opt(0, "save accelerate state every N steps (0: only at the end)", resume=FREE)
    save_final: bool = _opt(True, "save the state after the last step (benchmarks turn it off)", resume=FREE)
    resume: bool = _opt(True, "continue from the newest complete saved state in output_dir", resume=FREE)
    overwrite: bool = _opt(False, "with resume=false, an output_dir that holds a run is refused unless "
                                  "overwrite=true (then its metrics and checkpoints are deleted first, said in "
                                  "the log)", resume=FREE)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def resume_classes(cfg: type = RecipeConfig, prefix: str = "") -> dict[str, str]:
    """Every key's resume class (:data:`FIXED`, :data:`APPLIED` or :data:`FREE`), sections walked in order.

    >>> classes = resume_classes()
    >>> classes["model.path"], classes["train.lr"], classes["train.steps"]
    ('fixed', 'applied', 'free')
    """
    out = {}
    for f in dataclasses.fields(cfg):
        key = f"{prefix}{f.name}"
        if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory):
            out.update(resume_classes(f.default_factory, f"{key}."))
        else:
            out[key] = f.metadata.get("resume")
    return out


def describe(cfg: type = RecipeConfig, prefix: str = "") -> list[tuple[str, Any, str]]:
    """Every key of the config as ``(dotted key, default, meaning)``, sections walked in order."""
    out = []
    for f in dataclasses.fields(cfg):
        key = f"{prefix}{f.name}"
        if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory):
            out += describe(f.default_factory, f"{key}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        out.append((key, default, f.metadata.get("help", "")))
    return out


def mode_keys(cfg: type = RecipeConfig, prefix: str = "") -> dict[str, tuple]:
    """The keys that pick how the engine runs, each with the values that stand for its modes (a choice's every
    value; for a count, one and several)."""
    out = {}
    for f in dataclasses.fields(cfg):
        if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory):
            out.update(mode_keys(f.default_factory, f"{prefix}{f.name}."))
        elif "mode" in f.metadata:
            mode = f.metadata["mode"]
            out[f"{prefix}{f.name}"] = tuple(mode() if callable(mode) else mode)
    return out


def help_text(width: int = 100) -> str:
    """The config keys for ``--help``: ``key (default: value)`` and its meaning, wrapped to ``width``."""
    import json
    import textwrap

    lines = ["config keys (section.key=value on the command line, or in the --config YAML):"]
    for key, default, meaning in describe():
        lines.append(f"  {key} (default: {json.dumps(default)})")
        lines += textwrap.wrap(meaning, width, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines)

"""GRPO with a colocated vLLM engine that sleeps while the trainer trains.

Each step: rollout (engine awake: ``generations`` completions per prompt) → training (engine asleep at
``engine.sleep_level``; the trainer recomputes the sampled tokens' log-probs, group-normalized advantages,
clipped policy-gradient loss, optional KL to a frozen reference) → sync (wake → load → KV cache → reset,
``verify`` every ``engine.verify_every`` syncs). Per-step metrics go to ``<output_dir>/metrics.jsonl`` and
W&B (offline by default); the state is saved with accelerate every ``save_every`` steps, and a rerun with
the same ``output_dir`` resumes from the newest saved step with the same data order.

Launch (one process, or several: each rank gets its own engine and a share of the prompts):

    accelerate launch recipes/grpo.py --config configs/tiny-cpu.yaml
    accelerate launch --config_file configs/accelerate/ddp.yaml recipes/grpo.py --config configs/qwen3-0.6b.yaml
    python recipes/grpo.py --config configs/tiny-cpu.yaml train.steps=20 wandb.mode=disabled

What it simplifies: one optimizer step per rollout batch (so the "old" policy is the current one and the
clipping ratio is 1 at the step), no reward model. The vLLM-vs-trainer probability ratio is logged and, by
default, corrects the loss as TRL does (``train.sampling_correction``: sequence-level, ratios above 3 masked);
with one step per batch the trainer's old log-probs are its current ones, so this costs no extra forward pass.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.utils import set_seed  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from rollout_sleep.checkpoints import SHAPES, make_checkpoint  # noqa: E402
from rollout_sleep.config import ConfigError, RecipeConfig, load_config  # noqa: E402
from rollout_sleep.data import load_prompts  # noqa: E402
from rollout_sleep.engine import Engine, kv_cache_bytes_for  # noqa: E402
from rollout_sleep.grpo import grpo_update  # noqa: E402
from rollout_sleep.integrations.wandb import make_tracker  # noqa: E402
from rollout_sleep.manager import RolloutManager  # noqa: E402
from rollout_sleep.rewards import score  # noqa: E402


class GRPORecipe:
    def __init__(self, cfg: RecipeConfig):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.step = 0

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        self.acc = Accelerator(mixed_precision=cfg.train.mixed_precision, cpu=not torch.cuda.is_available())
        set_seed(cfg.train.seed)
        self.main = self.acc.is_main_process
        self.out.mkdir(parents=True, exist_ok=True)
        self.model_path = self._model_path()
        dtype = getattr(torch, cfg.model.dtype)
        self.tp = cfg.engine.tensor_parallel_size
        if self.tp not in (1, self.acc.num_processes):
            raise ConfigError(f"engine.tensor_parallel_size must be 1 (an engine per rank) or the number of processes "
                              f"({self.acc.num_processes}, one engine across ranks), got {self.tp}")
        self.data = load_prompts(cfg.data.dataset, prompt_column=cfg.data.prompt_column,
                                 n=cfg.data.num_prompts or cfg.train.steps * cfg.train.prompts_per_step,
                                 seed=cfg.train.seed)
        # The engine first, while the GPU is empty: vLLM sizes its KV cache from the free memory it sees.
        engine_kw = {"gpu_memory_utilization": cfg.engine.gpu_memory_utilization} if torch.cuda.is_available() else {}
        seed = cfg.train.seed + (self.acc.process_index if self.tp == 1 else 0)  # a TP engine samples alike on all ranks
        self.engine = Engine(self.model_path, dtype=cfg.model.dtype, seed=seed, tensor_parallel_size=self.tp,
                             max_model_len=cfg.engine.max_model_len, kv_cache_bytes=self._kv_cache_bytes(),
                             load_method=cfg.engine.load_method, enforce_eager=cfg.engine.enforce_eager,
                             keep_trainer_cache=cfg.engine.keep_trainer_cache,
                             **engine_kw)
        self.tokenizer = self.engine.tokenizer
        model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=dtype)
        if cfg.train.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        # fused on GPU: one kernel for all parameters (TRL/transformers' default optimizer too)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                                      fused=torch.cuda.is_available() or None)
        self.model, self.optimizer = self.acc.prepare(model, optimizer)
        self.layout = {"processes": self.acc.num_processes, "distributed_type": self.acc.distributed_type.value,
                       "trainer_sharded": any(hasattr(p, "full_tensor") or hasattr(p, "ds_id")
                                              for p in self.model.parameters())}
        self.ref_model = None
        if cfg.train.kl_coef > 0:
            self.ref_model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=dtype).to(self.acc.device)
            self.ref_model.eval().requires_grad_(False)
        self.manager = RolloutManager(self.engine, self.model, sleep_level=cfg.engine.sleep_level,
                                      verify_every=cfg.engine.verify_every)
        self.order = list(range(len(self.data)))
        random.Random(cfg.train.seed).shuffle(self.order)  # the data order: a function of the seed only
        run_id = self._resume()
        self.tracker = make_tracker(cfg.wandb.mode, main_process=self.main, project=cfg.wandb.project,
                                    config=cfg.to_dict(), name=cfg.wandb.run_name, directory=self.out,
                                    resume_id=run_id)
        self.timeline: list[dict] = []
        # Everything loaded so far lives for the whole run: keep it out of Python's garbage collector,
        # as vLLM does for its own startup heap. vLLM runs a full collection at every sleep; with the
        # trainer's heap (model, optimizer, data, W&B) frozen it stays short.
        gc.collect()
        gc.freeze()

    def _model_path(self) -> str:
        cfg = self.cfg.model
        if cfg.path not in SHAPES:
            return cfg.path
        path = self.out / "model"
        if self.main and not (path / "config.json").exists():
            make_checkpoint(path, cfg.path, seed=cfg.seed, dtype=cfg.dtype, tie_word_embeddings=cfg.tie_word_embeddings)
        self.acc.wait_for_everyone()
        return str(path)

    def _kv_cache_bytes(self) -> int | None:
        """The engine's KV cache size: ``engine.kv_cache_bytes`` if set; on GPU with ``engine.kv_cache: step``,
        one step's sequences on this engine (longest prompt of the data + ``max_tokens`` each) plus 25%, so a
        wake maps back only that; otherwise ``None`` (vLLM's share of the GPU, or the engine's CPU default)."""
        cfg, t = self.cfg.engine, self.cfg.train
        if cfg.kv_cache_bytes is not None or cfg.kv_cache != "step" or not torch.cuda.is_available():
            return cfg.kv_cache_bytes
        tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        longest = max(len(ids) for ids in tokenizer(list(self.data["prompt"])).input_ids)
        prompts = t.prompts_per_step if self.tp > 1 else -(-t.prompts_per_step // self.acc.num_processes)
        tokens = max(prompts * t.generations * (longest + t.max_tokens + 16), cfg.max_model_len or 0)
        return kv_cache_bytes_for(self.model_path, int(tokens * 1.25), self.cfg.model.dtype) // self.tp

    def _resume(self) -> str | None:
        """Load the newest saved state (if resuming); returns the W&B run id to continue."""
        saved = sorted((self.out / "checkpoints").glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
        if not (self.cfg.resume and saved):
            if self.main and (self.out / "metrics.jsonl").exists():
                (self.out / "metrics.jsonl").unlink()
            return None
        self.acc.load_state(str(saved[-1]))
        state = json.loads((saved[-1] / "recipe_state.json").read_text())
        self.step = state["step"]
        if self.main:  # drop log lines of steps after the saved one: they will run again
            log = self.out / "metrics.jsonl"
            if log.exists():
                keep = [ln for ln in log.read_text().splitlines() if json.loads(ln)["step"] <= self.step]
                log.write_text("".join(ln + "\n" for ln in keep))
        self.engine.load_weights(self.manager.stream)  # the engine must hold the restored weights
        self.acc.print(f"resumed from {saved[-1]} (step {self.step})")
        return state.get("wandb_id")

    # ------------------------------------------------------------------ train
    def train(self) -> None:
        cfg, t = self.cfg, self.cfg.train
        world, rank = self.acc.num_processes, self.acc.process_index
        while self.step < t.steps:
            t0 = time.perf_counter()
            idx = [self.order[(self.step * t.prompts_per_step + i) % len(self.order)] for i in range(t.prompts_per_step)]
            # an engine per rank: each rolls out its share of the prompts; one TP engine: all ranks submit the
            # same prompts (vLLM requires it) and each then trains on its share of the groups
            examples = [self.data[i] for i in (idx[rank::world] if self.tp == 1 else idx)]
            prompt_ids = [self.tokenizer(ex["prompt"]).input_ids for ex in examples]
            comps = self.manager.rollout(prompt_ids, n=t.generations, max_tokens=t.max_tokens,
                                         temperature=t.temperature)
            if self.tp > 1:
                mine = set(range(rank, len(examples), world))
                comps = [c for c in comps if c.prompt_index in mine]
                order = sorted(mine)
                examples, prompt_ids = [examples[i] for i in order], [prompt_ids[i] for i in order]
                remap = {old: new for new, old in enumerate(order)}
                for c in comps:
                    c.prompt_index = remap[c.prompt_index]
            rewards = torch.tensor(score(cfg.rewards, [c.text for c in comps], [examples[c.prompt_index] for c in comps]),
                                   dtype=torch.float32)
            with self.manager.training():
                stats = grpo_update(self.model, self.optimizer, prompt_ids, comps, rewards, group_size=t.generations,
                                    pad_id=self.tokenizer.pad_token_id, clip_eps=t.clip_eps, micro_batch=t.micro_batch,
                                    ref_model=self.ref_model, kl_coef=t.kl_coef, max_grad_norm=t.max_grad_norm,
                                    backward=self.acc.backward, autocast=self.acc.autocast,
                                    sampling_correction_mode=t.sampling_correction,
                                    sampling_clip_min=t.sampling_clip_min, sampling_clip_max=t.sampling_clip_max,
                                    loss_type=t.loss, temperature=t.temperature, max_completion_length=t.max_tokens,
                                    kl_bias_correction=t.kl_bias_correction)
            self.manager.sync()
            self.step += 1
            phases = self.manager.end_step()
            lengths = torch.tensor([len(c.token_ids) for c in comps], dtype=torch.float32)
            all_rewards = self.acc.gather(rewards.to(self.acc.device)).float()
            metrics = {"step": self.step, "first_prompt_index": idx[0], "reward_mean": float(all_rewards.mean()),
                       "reward_std": float(all_rewards.std()), "completion_len_mean": float(lengths.mean()),
                       "rollouts": int(all_rewards.numel()), **self.layout, **stats, **phases,
                       "step_s": time.perf_counter() - t0}
            self.timeline.append({k: v for k, v in phases.items() if k.endswith("_s")})
            if self.main:
                with open(self.out / "metrics.jsonl", "a") as fh:
                    fh.write(json.dumps(metrics) + "\n")
                self.tracker.log(metrics, step=self.step)
                self.acc.print(f"step {self.step}/{t.steps} reward {metrics['reward_mean']:.3f} "
                               f"loss {stats['loss']:.4f} step {metrics['step_s']:.2f}s")
            if (cfg.save_every and self.step % cfg.save_every == 0) or (cfg.save_final and self.step == t.steps):
                self.save()

    def save(self) -> None:
        path = self.out / "checkpoints" / f"step_{self.step}"
        self.acc.save_state(str(path))
        if self.main:
            (path / "recipe_state.json").write_text(json.dumps({"step": self.step,
                                                                "wandb_id": getattr(self.tracker, "id", None)}))
            print(f"saved {path}", flush=True)
        self.acc.wait_for_everyone()

    # ---------------------------------------------------------------- cleanup
    def cleanup(self) -> None:
        if self.main and self.timeline:
            png = phase_timeline(self.timeline, self.out / "phase_timeline.png")
            if png is not None:
                self.tracker.log_image("phase_timeline", png, step=self.step)
        self.tracker.finish()


def phase_timeline(rows: list[dict], path: Path) -> Path | None:
    """Stacked bars: seconds per phase for each step."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    phases = ["generate_s", "sleep_s", "train_s", "wake_weights_s", "load_s", "wake_kv_cache_s", "reset_s", "verify_s"]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    bottom = [0.0] * len(rows)
    for p in phases:
        vals = [r.get(p, 0.0) for r in rows]
        ax.bar(range(1, len(rows) + 1), vals, bottom=bottom, label=p[:-2])
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_xlabel("step")
    ax.set_ylabel("seconds")
    ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description="GRPO with a sleeping colocated vLLM engine")
    parser.add_argument("--config", help="YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args()
    recipe = GRPORecipe(load_config(args.config, args.overrides))
    recipe.setup()
    recipe.train()
    recipe.cleanup()
    os._exit(0)  # vLLM's in-process teardown is slow and would tear down accelerate's process group


if __name__ == "__main__":
    main()

"""``rollout-sleep demo``: GRPO on the embedded tiny model, on CPU, in about a minute.

A few rounds of rollout (vLLM) → a short training phase on a verifiable reward (plain PyTorch, the
trainer's own model; the engine sleeps meanwhile) → sync into vLLM (wake, load, reset, verify), with a
progress bar and a closing table of per-phase timings.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path


def run_demo(steps: int = 12, prompts_per_step: int = 8, generations: int = 8, max_tokens: int = 8,
             lr: float = 3e-3, seed: int = 0, workdir: str | None = None, quiet: bool = False,
             verbose: bool | None = None) -> dict:
    """Run the demo; returns ``{"rewards": [...], "steps": [per-step metrics]}``.

    ``quiet`` hides the demo's own progress bar and table. ``verbose`` configures logging
    (:func:`rollout_sleep.log.configure`): False hides the libraries' benign warnings and progress bars,
    True shows everything; None (the default) leaves logging as the caller set it.
    """
    if verbose is not None:
        from rollout_sleep.log import configure

        configure(verbose)
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    from rollout_sleep.engine.memory import kv_cache_bytes_for
    from rollout_sleep.grpo.data import synthetic_arithmetic
    from rollout_sleep.grpo.loss import GRPOLoss
    from rollout_sleep.grpo.rewards import score
    from rollout_sleep.run.config import load_config
    from rollout_sleep.run.factory import build_engine
    from rollout_sleep.run.manager import RolloutManager
    from rollout_sleep.weights.checkpoints import make_checkpoint

    torch.manual_seed(seed)
    work = Path(workdir or tempfile.mkdtemp(prefix="rollout-sleep-demo-"))
    ckpt = make_checkpoint(work / "tiny", "tiny", seed=seed, dtype="float32")
    # a KV cache for one rollout, not a share of the GPU: a GPU wake then maps (and a reset clears) only that
    max_len = 64 + max_tokens  # the arithmetic prompts are ~20 tokens
    kv = kv_cache_bytes_for(ckpt, prompts_per_step * generations * max_len)
    cfg = load_config(None, ["model.dtype=float32", f"train.seed={seed}", f"engine.max_model_len={max_len}",
                             f"engine.kv_cache_bytes={kv}", "engine.keep_trainer_cache=false"])
    engine = build_engine(cfg, ckpt, use_tqdm_on_load=bool(verbose))
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    manager = RolloutManager(engine, model, sleep_level=2, verify_every=1)
    data = synthetic_arithmetic(steps * prompts_per_step, seed=seed)
    tok = engine.tokenizer
    rewards_names = ["digits_format", "arithmetic_exact"]
    loss = GRPOLoss(group_size=generations, pad_id=tok.pad_token_id)
    history, rows = [], []
    bar = tqdm(range(steps), desc="GRPO demo", disable=quiet)
    for step in bar:
        batch = data[step * prompts_per_step: (step + 1) * prompts_per_step]
        examples = [dict(zip(batch, v)) for v in zip(*batch.values())]
        prompt_ids = [tok(ex["prompt"]).input_ids for ex in examples]
        comps = manager.rollout(prompt_ids, n=generations, max_tokens=max_tokens, temperature=1.0)
        rewards = torch.tensor(score(rewards_names, [c.text for c in comps],
                                     [examples[c.prompt_index] for c in comps]))
        with manager.training():
            stats = loss.step(model, optimizer, prompt_ids, comps, rewards)
        manager.sync()
        metrics = {**manager.end_step(), **stats, "reward": float(rewards.mean())}
        rows.append(metrics)
        history.append(metrics["reward"])
        bar.set_postfix(reward=f"{metrics['reward']:.3f}")
    if not quiet:
        print_table(rows)
        k = max(1, steps // 4)
        print(f"\nmean reward: first {k} steps {statistics.mean(history[:k]):.3f} -> last {k} steps "
              f"{statistics.mean(history[-k:]):.3f}; verify passed after all {manager.syncs} syncs")
    return {"rewards": history, "steps": rows}


def print_table(rows: list[dict]) -> None:
    """Median seconds per phase over the steps (the first step included, it is the warm-up)."""
    from rollout_sleep.engine.phases import PHASES

    print(f"\n{'phase':<15}{'median ms':>12}{'total s':>10}")
    for p in PHASES:
        vals = [r.get(f"{p}_s", 0.0) for r in rows]
        print(f"{p:<15}{statistics.median(vals) * 1e3:>12.2f}{sum(vals):>10.2f}")
    tps = statistics.median(r.get("tokens_per_s", 0.0) for r in rows)
    print(f"{'tokens/s':<15}{tps:>12.0f}   (generation, median step)")

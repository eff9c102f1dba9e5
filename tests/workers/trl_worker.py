"""Run by tests/integrations/test_trl.py: a few GRPO steps of TRL's own GRPOTrainer on CPU, with or without
the rollout_sleep patch. Prints one RESULT line (JSON)."""

import json
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from transformers import AutoTokenizer  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402
from trl_cpu import eager_trl_engine  # noqa: E402

from rollout_sleep.grpo.data import synthetic_arithmetic  # noqa: E402
from rollout_sleep.grpo.rewards import digits_format  # noqa: E402

ckpt, out, patched = sys.argv[1], sys.argv[2], sys.argv[3] == "patched"


def reward(prompts, completions, **kw):
    return [digits_format(c, {}) for c in completions]


eager_trl_engine()
args = GRPOConfig(output_dir=out, use_cpu=True, per_device_train_batch_size=8, gradient_accumulation_steps=1,
                  num_generations=4, max_completion_length=8, learning_rate=1e-2, max_steps=4, logging_steps=1,
                  report_to="none", save_strategy="no", use_vllm=True, vllm_mode="colocate",
                  vllm_enable_sleep_mode=False, vllm_max_model_length=256, seed=0, bf16=False)
if sys.argv[3] == "lora":  # a PEFT trainer whose adapter vLLM serves (rollout_sleep's LoRA route)
    from peft import LoraConfig

    from rollout_sleep.integrations.trl import lora_engine, patch

    args.max_steps, args.learning_rate = 2, 5e-2
    with lora_engine(rank=8):
        trainer = GRPOTrainer(model=ckpt, reward_funcs=[reward], args=args, train_dataset=synthetic_arithmetic(64),
                              processing_class=AutoTokenizer.from_pretrained(ckpt),
                              peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    patch(trainer)
else:
    trainer = GRPOTrainer(model=ckpt, reward_funcs=[reward], args=args, train_dataset=synthetic_arithmetic(64),
                          processing_class=AutoTokenizer.from_pretrained(ckpt))
if patched:
    from rollout_sleep.integrations.trl import patch

    patch(trainer)  # the one line
checks = []
if sys.argv[3] == "patched_twice":  # train() twice, one step each (a notebook's second call, a retry)
    from rollout_sleep import WeightStream, verify
    from rollout_sleep.integrations.trl import patch

    args.max_steps = 1
    patch(trainer)
    llm, engine = trainer.vllm_generation.llm, trainer.rollout_sleep_engine
    generate = llm.generate

    def checked(*a, **k):  # does vLLM hold the trainer's weights at each rollout?
        checks.append(verify(engine, WeightStream(trainer.model, dtype=engine.dtype)).ok)
        return generate(*a, **k)

    llm.generate = checked
    trainer.train()
try:
    trainer.train()
    ok, error = True, None
except Exception as err:  # stock TRL on CPU: expected to fail at the first weight sync
    ok, error = False, f"{type(err).__name__}: {err}"
extra = {}
if hasattr(trainer, "rollout_sleep_adapter"):
    ad = trainer.rollout_sleep_adapter
    stale = ad.verify().ok  # the last optimizer step ran after the last sync: vLLM's slot is one step behind
    ad.push()
    extra = {"adapter_pushes": ad.pushes, "stale_slot_passed_verify": stale, "adapter_verified": ad.verify().ok,
             "base_untouched": __import__("rollout_sleep").verify(
                 trainer.rollout_sleep_engine, __import__("rollout_sleep").WeightStream(
                     trainer.model, dtype=trainer.rollout_sleep_engine.dtype, merge_adapters=False)).ok}
print("RESULT " + json.dumps({"ok": ok, "error": error, "log": trainer.state.log_history, "checks": checks, **extra}),
      flush=True)
os._exit(0)

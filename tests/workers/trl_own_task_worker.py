"""Run by tests/recipes/test_own_task.py: TRL's GRPOTrainer on the shipped example's own files, exactly as a TRL user
would pass them (the JSONL through `datasets`, the reward functions imported from the user's module), with
rollout_sleep's patch so that colocated vLLM runs on CPU. Prints one RESULT line (JSON)."""

import importlib.util
import json
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from datasets import load_dataset  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402
from trl_cpu import eager_trl_engine  # noqa: E402

from rollout_sleep.integrations.trl import patch  # noqa: E402

ckpt, out, data_file, reward_file, reward_model = sys.argv[1:6]
spec = importlib.util.spec_from_file_location("user_rewards", reward_file)
user_rewards = importlib.util.module_from_spec(spec)
spec.loader.exec_module(user_rewards)

eager_trl_engine()
args = GRPOConfig(output_dir=out, use_cpu=True, per_device_train_batch_size=8, gradient_accumulation_steps=1,
                  num_generations=4, max_completion_length=16, learning_rate=1e-2, max_steps=2, logging_steps=1,
                  report_to="none", save_strategy="no", use_vllm=True, vllm_mode="colocate",
                  vllm_enable_sleep_mode=False, vllm_max_model_length=512, seed=0, bf16=False,
                  reward_weights=[1.0, 0.2, 0.5])
trainer = GRPOTrainer(model=ckpt, args=args, train_dataset=load_dataset("json", data_files=data_file, split="train"),
                      reward_funcs=[user_rewards.gsm8k_correct, user_rewards.gsm8k_format, reward_model],
                      processing_class=AutoTokenizer.from_pretrained(ckpt))
patch(trainer)
try:
    trainer.train()
    ok, error = True, None
except Exception as err:
    ok, error = False, f"{type(err).__name__}: {err}"
logs = trainer._logs  # the last batch as TRL saw it: prompts, completions, each reward, advantages
batch = {"prompt": list(logs["prompt"]), "completion": list(logs["completion"]), "advantages": list(logs["advantages"]),
         "rewards": {name: list(values) for name, values in logs["rewards"].items()}}
print("RESULT " + json.dumps({"ok": ok, "error": error, "log": trainer.state.log_history, "batch": batch}), flush=True)
os._exit(0)

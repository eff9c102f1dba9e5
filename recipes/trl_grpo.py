"""A stock TRL GRPO script plus one line: rollout_sleep's sync, checked reset and verify.

    accelerate launch recipes/trl_grpo.py --model /path/to/checkpoint          # CUDA: sleep mode on
    python recipes/trl_grpo.py --model /path/to/tiny --cpu                      # CPU: sleep mode off

Everything but the marked line is TRL's own API (GRPOConfig, GRPOTrainer).
"""

import argparse
import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import torch  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from rollout_sleep.grpo.data import synthetic_arithmetic  # noqa: E402
from rollout_sleep.grpo.rewards import arithmetic_exact, digits_format  # noqa: E402
from rollout_sleep.integrations.trl import patch  # noqa: E402


def reward_digits(prompts, completions, **kw):
    return [digits_format(c, {}) for c in completions]


def reward_exact(prompts, completions, answer, **kw):
    return [arithmetic_exact(c, {"answer": a}) for c, a in zip(completions, answer)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cpu", action="store_true")
    a = ap.parse_args()
    cuda = torch.cuda.is_available() and not a.cpu
    args = GRPOConfig(output_dir="runs/trl_grpo", use_cpu=not cuda, per_device_train_batch_size=32,
                      gradient_accumulation_steps=4, num_generations=8, max_completion_length=128 if cuda else 8,
                      learning_rate=1e-6 if cuda else 1e-2, max_steps=a.steps, logging_steps=1, report_to="none",
                      save_strategy="no", use_vllm=True, vllm_mode="colocate", vllm_enable_sleep_mode=cuda,
                      vllm_gpu_memory_utilization=0.3, vllm_max_model_length=1024, bf16=False)
    trainer = GRPOTrainer(model=a.model, reward_funcs=[reward_digits, reward_exact], args=args,
                          train_dataset=synthetic_arithmetic(a.steps * 16), processing_class=AutoTokenizer.from_pretrained(a.model))
    patch(trainer)  # <- the one line
    trainer.train()
    os._exit(0)


if __name__ == "__main__":
    main()

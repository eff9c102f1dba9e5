"""A run's machinery: the alternation loop and what the recipe needs around it.

- :mod:`.manager`: :class:`RolloutManager` (rollout → training → sync);
- :mod:`.config` + :mod:`.schema`: the recipe's configuration; :mod:`.modes`: the engine-mode combinations it
  refuses; :mod:`.factory`: the engine a config asks for; :mod:`.output_dir`: the run's folder, atomic
  checkpoints, resuming;
- :mod:`.memory_plan` (arithmetic) + :mod:`.memory_check` (the plan of a run, checked and measured),
  :mod:`.optim` (lean optimizers, what their state weighs), :mod:`.fused_adamw8bit` (the 8-bit AdamW's step in
  one kernel per tensor), :mod:`.offload` (their state in host memory);
- :mod:`.update_check`, :mod:`.watchdog`, :mod:`.nonfinite`, :mod:`.sampling_check`: guards against silent
  failures.

Imports :mod:`rollout_sleep.grpo`, :mod:`rollout_sleep.lora`, :mod:`rollout_sleep.engine` and below (never
:mod:`rollout_sleep.serve` or :mod:`rollout_sleep.cli`).
"""

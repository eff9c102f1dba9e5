"""Optional integrations, each importing its library lazily: :mod:`.trl` (TRL's GRPOTrainer driven through the
engine's checked cycle; imports :mod:`rollout_sleep.engine`, :mod:`rollout_sleep.lora`,
:mod:`rollout_sleep.weights`) and :mod:`.wandb` (the recipe's tracker). Used by recipes; the package never
imports them.
"""

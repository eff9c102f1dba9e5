"""GRPO's pieces, what a TRL user could reuse: the loss and advantages (:mod:`.loss`), rewards
(:mod:`.rewards`, :mod:`.reward_model`, their error in :mod:`.errors`) and prompts (:mod:`.data`; their files, :mod:`.files`).

Imports :mod:`rollout_sleep.weights` (to unwrap a trainer's model) and nothing else of the package.
"""

"""The error of the rewards: one home that :mod:`rollout_sleep.grpo.rewards` and
:mod:`rollout_sleep.grpo.reward_model` both raise from."""


class RewardError(ValueError):
    """A reward that cannot be resolved, does not fit the data, or failed on an example."""

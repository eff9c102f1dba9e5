"""``vllm serve`` managed from Python and driven over HTTP.

- :mod:`.server`: :class:`ServerProcess` (start, stop, the dev endpoints) and its HTTP client;
- :mod:`.remote`: :class:`RemoteEngine`, the engine's checked cycle over HTTP; :mod:`.args`: the server's
  flags; :mod:`.procgroup`: process groups that die with their parent.

Imports :mod:`rollout_sleep.engine` (its state machine and reports) and below; the server never imports the
engine that drives it.
"""

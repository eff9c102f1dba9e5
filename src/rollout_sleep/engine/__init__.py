"""The in-process engine: one ``vllm.LLM`` with a checked generate / sleep / wake / load cycle.

- :mod:`.engine`: :class:`Engine`; :mod:`.state`: the awake / asleep(level) state machine and its errors
  (shared with the HTTP engine); :mod:`.loader` + :mod:`.feed`: the load routes and the checks of a stream;
- :mod:`.phases`: phase names and :class:`CycleReport`; :mod:`.memory`: memory figures, the cache policy,
  KV-cache sizing; :mod:`.completion`: what a rollout returns, and the one check that vLLM samples at the
  temperature asked.

Imports :mod:`rollout_sleep.weights`, nothing above it.
"""

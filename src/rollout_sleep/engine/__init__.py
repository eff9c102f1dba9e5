"""The in-process engine: one ``vllm.LLM`` with a checked generate / sleep / wake / load cycle.

- :mod:`.contract`: what every engine offers (:class:`RolloutEngine`), its named errors and its one lock;
- :mod:`.engine`: :class:`Engine`; :mod:`.state`: the awake / asleep(level) / closed state machine and its errors
  (shared with the other engines); :mod:`.loader` + :mod:`.feed`: the load routes and the checks of a stream;
- :mod:`.phases`: phase names and :class:`CycleReport`; :mod:`.memory`: memory figures, the cache policy,
  KV-cache sizing; :mod:`.completion`: what a rollout returns, and the one check that vLLM samples at the
  temperature asked.

Imports :mod:`rollout_sleep.weights`, nothing above it.
"""

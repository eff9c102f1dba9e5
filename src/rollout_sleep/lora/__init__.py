"""LoRA with one copy of the base: vLLM holds the frozen base and serves the trainer's adapter.

- :mod:`.adapter`: :class:`LoraSettings` and :class:`AdapterSync` (adapter-only syncs, verify);
- :mod:`.worker`: what runs inside vLLM's worker (the adapter's slots); :mod:`.shared_base`: the trainer's
  base as views of vLLM's weights (:func:`trainer_from_engine`).

Imports :mod:`rollout_sleep.engine` and below.
"""

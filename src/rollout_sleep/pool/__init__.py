"""Several engine processes on one GPU, fed the trainer's weights through one IPC buffer (:class:`EnginePool`).

- :mod:`.pool`: the pool; :mod:`.process`: one engine process and its command pipe; :mod:`.packing`: the
  weights packed into one flat shared buffer; :mod:`.reports`: the pool's reports.

Imports :mod:`rollout_sleep.engine` and below. Self-contained: only the engine factory
(:mod:`rollout_sleep.run.factory`, when ``engine.processes > 1``) and the recipe import it, so the mode can be
removed with this folder.
"""

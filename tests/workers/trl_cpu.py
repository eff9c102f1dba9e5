"""For the TRL test workers: TRL builds its colocated ``vllm.LLM`` itself and has no ``enforce_eager`` option;
on CPU this starts it eager, as rollout_sleep's own engine starts there (vLLM's CPU build otherwise compiles
with inductor at every start: ~15-20 s of a tiny engine's start, nothing gained for 2-step runs)."""

import torch


def eager_trl_engine() -> None:
    import trl.generation.vllm_generation as vg

    if torch.cuda.is_available() or getattr(vg.LLM, "eager_on_cpu", False):
        return
    build = vg.LLM

    def eager(*args, **kwargs):
        kwargs.setdefault("enforce_eager", True)
        return build(*args, **kwargs)

    eager.eager_on_cpu = True
    vg.LLM = eager

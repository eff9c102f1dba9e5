"""GRPO with a colocated vLLM engine that sleeps while the trainer trains.

Each step: rollout (engine awake: ``generations`` completions per prompt) → training (engine asleep at
``engine.sleep_level``; the trainer recomputes the sampled tokens' log-probs, group-normalized advantages,
clipped policy-gradient loss, optional KL to a frozen reference) → sync (wake → load → KV cache → reset,
``verify`` every ``engine.verify_every`` syncs). Per-step metrics go to ``<output_dir>/metrics.jsonl`` and
W&B (offline by default); the state is saved with accelerate every ``save_every`` steps (atomically: a
staging folder renamed once complete), and a rerun with the same ``output_dir`` resumes from the newest
complete saved step with the same data order (newer incomplete ones, and one whose files changed since its save
or fail to load, are moved to ``checkpoints/incomplete``).
Each checkpoint keeps the settings it was trained with: a resume refuses changed settings that define the saved
state (model, data, seed, optimizer type, ...), and applies and names changed training settings (lr, ...).

Nothing silent: the whole config is checked before anything starts; an ``output_dir`` holding another run is
refused; an infinite reward or a NaN/inf gradient stops the step before the optimizer applies it (a reward's
None or NaN means "does not apply", as in TRL; completions no reward scored are named, once per step); every
phase (setup, generate, reward, sleep, train, wake, verify, save, waits for other ranks) has a watchdog timeout
(``watchdog.*``). An error stops the run with one message (its traceback in ``<output_dir>/run.log``); a save
that cannot be written names the path and the cause and leaves the newest complete checkpoint to resume from.

Data and rewards: any local dataset in TRL's formats (text or conversational prompts, chat template applied),
reward functions by built-in name or import path (TRL's ``fn(prompts, completions, **columns)`` or
``fn(completion, example)``), reward models (local sequence-classification checkpoints), ``reward_weights``;
all checked before vLLM starts. See docs/your-own-task.md and configs/example-gsm8k.yaml.

Launch (one process, or several: each rank gets its own engine and a share of the prompts):

    accelerate launch recipes/grpo.py --config configs/tiny-cpu.yaml
    accelerate launch --config_file configs/accelerate/ddp.yaml recipes/grpo.py --config configs/qwen3-0.6b.yaml
    python recipes/grpo.py --config configs/tiny-cpu.yaml train.steps=20 wandb.mode=disabled

What it simplifies: one optimizer step per rollout batch (so the "old" policy is the current one and the
clipping ratio is 1 at the step). The vLLM-vs-trainer probability ratio is logged and, by
default, corrects the loss as TRL does (``train.sampling_correction``: sequence-level, ratios above 3 masked; a step
whose mean weight falls below 0.5, or that masks most of its tokens, is warned about: ``rollout_sleep.run.sampling_check``);
with one step per batch the trainer's old log-probs are its current ones, so this costs no extra forward pass.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import logging
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from rollout_sleep import log  # noqa: E402  (light: imports neither torch nor vLLM)
from rollout_sleep.log import configure  # noqa: E402

configure(verbose="--verbose" in sys.argv)  # before torch / transformers / vLLM read their switches


def build_parser() -> argparse.ArgumentParser:
    """The command line; ``--help`` lists every config key with its default and meaning (from the config's
    dataclasses, :mod:`rollout_sleep.run.schema`)."""
    from rollout_sleep.run.schema import help_text

    parser = argparse.ArgumentParser(description="GRPO with a sleeping colocated vLLM engine", epilog=help_text(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="section.key=value (the keys below)")
    parser.add_argument("--verbose", action="store_true", help="show every library's logs and warnings")
    return parser


if __name__ == "__main__" and {"-h", "--help"} & set(sys.argv[1:]):
    build_parser().parse_args()  # prints the help and exits, before torch, transformers and vLLM load

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.utils import InitProcessGroupKwargs, broadcast_object_list, gather_object, set_seed  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from rollout_sleep.engine.completion import temperature_problem  # noqa: E402
from rollout_sleep.engine.loader import cpu_moe_problem  # noqa: E402
from rollout_sleep.engine.memory import (PhasePeaks, enable_expandable_segments, step_kv_cache_bytes,  # noqa: E402
                                         step_kv_cache_shortfall)
from rollout_sleep.engine.phases import plot_timeline  # noqa: E402
from rollout_sleep.grpo.data import (check_prompts, check_rows, completions_for_rewards,  # noqa: E402
                                     engine_context, is_conversational, load_prompts, prepare_prompts,
                                     prompt_problems, prompt_token_ids, prompts_fingerprint, rows_fingerprint,
                                     step_rows)
from rollout_sleep.grpo.errors import RewardError  # noqa: E402
from rollout_sleep.grpo.files import value_changes  # noqa: E402
from rollout_sleep.grpo.loss import GRPOLoss  # noqa: E402
from rollout_sleep.grpo.rewards import (absent_optional_columns, check_row_values, combine,  # noqa: E402
                                        resolve_rewards, reward_metrics, reward_summary, rewards_fingerprint,
                                        score_rewards, silent_rewards, unscorable_report)
from rollout_sleep.integrations.wandb import credentials_problem, make_tracker  # noqa: E402
from rollout_sleep.lora.adapter import AdapterSync, LoraSettings  # noqa: E402
from rollout_sleep.lora.shared_base import trainer_from_engine  # noqa: E402
from rollout_sleep.run import compiled, memory_check, memory_plan, one_copy, output_dir  # noqa: E402
from rollout_sleep.run.config import ConfigError, check_processes, load_config  # noqa: E402
from rollout_sleep.run.factory import build_engine  # noqa: E402
from rollout_sleep.run.manager import RolloutManager  # noqa: E402
from rollout_sleep.run.modes import detect_device  # noqa: E402
from rollout_sleep.run.nonfinite import NonFiniteError, check_finite, guard_optimizer  # noqa: E402
from rollout_sleep.run.offload import OptimizerOffload  # noqa: E402
from rollout_sleep.run.per_tensor import PerTensorOptimizer, state_in  # noqa: E402
from rollout_sleep.run.optim import (TORCHAO_CLASSES, build_optimizer, hyperparameters,  # noqa: E402
                                     fused_step_runs, missing_package, optimizer_mismatch, optimizer_record,
                                     run_stochastic_rounding, set_hyperparameters)
from rollout_sleep.run.sampling_check import SamplingCheck  # noqa: E402
from rollout_sleep.run.schema import RecipeConfig  # noqa: E402
from rollout_sleep.run.update_check import UpdateCheck, checkpoint_magnitude, lr_note  # noqa: E402
from rollout_sleep.run.watchdog import Watchdog  # noqa: E402
from rollout_sleep.weights.checkpoints import SHAPES, make_checkpoint, make_config_dir  # noqa: E402
from rollout_sleep.weights.layout import unchecked_problem  # noqa: E402


class GRPORecipe:
    def __init__(self, cfg: RecipeConfig):
        self.cfg = cfg
        self.out = Path(cfg.output_dir).expanduser()
        self.step = 0
        self.in_step: int | None = None  # the step running, while one does
        self.tp = cfg.engine.tensor_parallel_size
        lo = cfg.model.lora
        self.lora = LoraSettings(lo.rank, lo.alpha, list(lo.targets)) if lo.rank else None

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        # read-only checks first (every rank alike): nothing is written before they pass
        output_dir.check_output_dir(self.out, cfg.to_dict(), cfg.resume, cfg.overwrite)
        if cfg.resume:
            output_dir.check_steps_left(self.out, cfg.train.steps)  # a finished run: said before vLLM starts
        # what the resume compares its settings with, read before this run rewrites run_config.json (an older
        # checkpoint has none beside it)
        self.trained_settings = output_dir.trained_settings(self.out) if cfg.resume else None
        w = cfg.watchdog
        pg = [InitProcessGroupKwargs(timeout=timedelta(seconds=w.collective_s + 60))] \
            if w.enabled and w.collective_s > 0 else []  # torch.distributed's own timeout: a backstop to ours
        self.acc = Accelerator(mixed_precision=cfg.train.mixed_precision, cpu=not torch.cuda.is_available(),
                               kwargs_handlers=pg)
        self.main = self.acc.is_main_process
        timeouts = {f.name[:-2]: getattr(w, f.name) for f in dataclasses.fields(w) if f.name.endswith("_s")}
        self.watchdog = Watchdog(timeouts if w.enabled else {}, rank=self.acc.process_index,
                                 world=self.acc.num_processes, hint="set watchdog.{phase}_s higher (0: no limit)")
        with self.watchdog.phase("setup", "the data, the engine's start, the model's load and the resume"):
            self._setup()

    def _collective(self, what: str):
        """A watched wait for every rank (watchdog.collective_s)."""
        return self.watchdog.phase("collective", f"all {self.acc.num_processes} ranks to reach {what}")

    def _setup(self) -> None:
        """The run's pieces, in dependency order (each step says what it needs when the order matters)."""
        set_seed(self.cfg.train.seed)
        self._check_launch()
        # one copy of the weights where it applies (model.share_weights): known before the model folder is built
        self.model_type = self._model_type()  # where vLLM's layout is checked (one copy, a LoRA base's views)
        self.one_copy = one_copy.before_engine(self.cfg, detect_device(), self.acc.num_processes,
                                               self.acc.distributed_type.value, self.model_type)
        if not self.one_copy.on and self.cfg.model.share_weights is True:  # a reason load_config could not see
            raise ConfigError(f"model.share_weights=true: {self.one_copy.why}. Fix: model.share_weights=null (two "
                              "copies where one cannot be) or false")
        if not self.one_copy.on and self.cfg.model.lora.rank == 0:
            self.acc.print(self.one_copy.describe())  # before the plan and vLLM: both count two copies
        self._check_copies()
        self._check_saved_optimizer()  # the checkpoint a resume loads holds this optimizer's kind of state
        # read-only until the output dir is claimed: bad data, rewards or prompts stop the run with nothing written
        self._load_data_and_rewards()  # the rewards resolved once for the run: everything after uses self.rewards
        with self._model_files() as folder:  # the model's tokenizer (its chat template, its context) formats and
            self._prepare_prompts(folder)  # checks the prompts
            self._check_syncable(folder)
        output_dir.check_inputs(self.out, self.dataset_record, self.cfg.resume and not self.cfg.overwrite)
        self._claim_output_dir()
        self.model_path = self._model_path()
        kv_bytes = self._kv_cache_bytes()  # the longest prompt sizes one step's KV cache
        self.plan = self._memory_plan(kv_bytes)  # printed; a phase that does not fit stops the run here
        self._note_low_precision_lr()
        self._open_tracker()  # before vLLM starts: a W&B server that cannot be reached stops the run here
        # the engine first, while the GPU is empty: vLLM sizes its KV cache from the free memory it sees
        self._start_engine(kv_bytes)
        self._decide_one_copy(kv_bytes)  # what vLLM built can be viewed exactly, or the run takes two copies
        self._check_plan_with_engine()
        self._load_reward_models()  # beside the trainer, once the engine has sized its cache
        self._build_trainer()  # a shared LoRA base is a view of the engine's weights: after the engine
        self.loss = GRPOLoss.from_config(self.cfg, pad_id=self.tokenizer.pad_token_id)
        self.sampling_check = SamplingCheck.from_config(self.cfg)  # warns when the correction drops most samples
        self._silent_said: set[str] = set()  # rewards warned about for scoring none of a step's completions
        self.ref_model = self._reference_model()
        self.manager = self._rollout_manager()
        self._check_verifiable()  # both sides hold the checkpoint: a layout verify cannot read is found here
        self._resume()  # after the manager: a restored state is pushed to the engine
        if self.offload is not None:
            self.offload.offload()  # a resumed state is loaded onto the device: off it before the first rollout
        self._start_measuring()
        # Everything loaded so far lives for the whole run: keep it out of Python's garbage collector,
        # as vLLM does for its own startup heap. vLLM runs a full collection at every sleep; with the
        # trainer's heap (model, optimizer, data, W&B) frozen it stays short.
        gc.collect()
        gc.freeze()

    def _model_type(self) -> str | None:
        """The model's transformers ``model_type``, read from its config before anything starts (``None`` where
        ``model.path`` holds no local config: vLLM's, once it has read it, decides)."""
        path = self.cfg.model.path
        if path in SHAPES:
            return "qwen3"
        config = Path(path, "config.json")
        if not config.is_file():
            return None
        try:
            kind = json.loads(config.read_text()).get("model_type")
        except (OSError, ValueError, AttributeError) as err:
            raise ConfigError([f"model.path={path}: {config} cannot be read as a model config "
                               f"({type(err).__name__}: {err}); point model.path at a transformers model folder"]) from err
        if kind is not None and not isinstance(kind, str):
            raise ConfigError([f"model.path={path}: {config} has model_type {kind!r}, not a string; point model.path "
                               "at a transformers model folder"])
        return kind

    def _check_verifiable(self) -> None:
        """With ``engine.verify_every`` on and a model type whose vLLM layout the tests do not check, verify once
        before any step, while the engine and the trainer hold the same checkpoint: a mismatch then is verify's
        comparison, not a sync (vLLM's loader holds a tensor reordered under its name and shape), and the run is
        refused here, not after its first rollout and step."""
        unchecked = unchecked_problem(self.model_type)
        if not self.cfg.engine.verify_every or self.lora is not None or unchecked is None:
            return
        from rollout_sleep.weights.verify import verify

        report = verify(self.engine, self.model)
        if not report.ok:
            names = list(report.mismatched) + list(report.unplaced)
            raise ConfigError([f"engine.verify_every={self.cfg.engine.verify_every}: before any step, with the engine "
                               f"and the trainer loaded from the same checkpoint, verify finds {len(names)} tensor(s) "
                               f"different, e.g. {names[:3]}: {unchecked}, and verify compares "
                               "through that layout. Fix: engine.verify_every=0 for this model (the weights reach "
                               "vLLM through its own loader)"])

    def _check_copies(self) -> None:
        """What the one-copy decision (before vLLM starts, and again where it falls back to two copies) asks of the
        config: the optimizer's package (one copy in bf16 rounds stochastically with torchao's optimizers; two
        copies take the optimizer's own), and with two copies no expandable segments (the engine sleeps at level 2).
        ``load_config`` checked both for the decision it could foresee; the model's type or vLLM's layout may
        decide otherwise."""
        cfg, two = self.cfg, not self.one_copy.on
        missing = missing_package(cfg.train.optimizer, run_stochastic_rounding(cfg, self.one_copy.on))
        if missing:
            raise ConfigError(missing + (f" (two copies of the weights: {self.one_copy.why})" if two else ""))
        if two and cfg.train.expandable_segments and not cfg.model.lora.rank and detect_device() == "cuda":
            raise ConfigError([f"train.expandable_segments=true needs an engine that sleeps at level 0, and this run "
                               f"takes two copies of the weights ({self.one_copy.why}): set "
                               "train.expandable_segments=false"])

    def _optimizer_record(self) -> dict:
        """The optimizer this run builds, as a checkpoint records it (the one-copy decision picks its kind where
        ``train.stochastic_rounding`` is null)."""
        return optimizer_record(self.cfg.train.optimizer, run_stochastic_rounding(self.cfg, self.one_copy.on),
                                self.one_copy.on)

    def _check_saved_optimizer(self, found: Path | None = None, state: dict | None = None) -> None:
        """Refuse a resume whose checkpoint holds another optimizer class's state (before vLLM starts, and again
        once the one-copy decision is final), naming both and the fix."""
        if not self.cfg.resume:
            return
        if found is None:
            found, state = output_dir.resume_point(self.out)
        if found is None:
            return
        problem = optimizer_mismatch(state.get("optimizer"), self._optimizer_record(), found.name)
        if problem:
            raise ConfigError(problem)

    def _check_launch(self) -> None:
        """The config against what the launch gives: the number of ranks, and W&B's credentials (rank 0 logs)."""
        fsdp = getattr(self.acc.state, "fsdp_plugin", None)
        problems = check_processes(self.cfg, self.acc.num_processes, self.acc.distributed_type.value,
                                   getattr(fsdp, "fsdp_version", None) if fsdp is not None else None)
        wandb_problem = credentials_problem(self.cfg.wandb.mode) if self.main else None
        if problems or wandb_problem:
            raise ConfigError(problems + [wandb_problem] if wandb_problem else problems)

    def _load_data_and_rewards(self) -> None:
        """The dataset, and the rewards resolved once for the run, checked together: rows enough for a step, the
        columns and values the rewards read, vLLM's temperature bounds; every problem at once. Reward models are
        only checked here (:meth:`_load_reward_models` loads them once the engine is up). A resume's dataset must
        give the rows the run read (their count and fingerprint, recorded with its settings)."""
        cfg = self.cfg
        try:
            self.data = load_prompts(cfg.data.dataset, prompt_column=cfg.data.prompt_column, n=cfg.data.num_prompts,
                                     seed=cfg.train.seed)
        except (OSError, KeyError, ValueError, StopIteration) as err:  # StopIteration: an empty file
            why = str(err) or "it has no rows"  # an empty file: datasets raises a bare StopIteration
            raise ConfigError(f"data.dataset {cfg.data.dataset!r} cannot be used: {why}") from err
        too_small = check_rows(self.data, cfg.data.dataset, cfg.data.num_prompts, cfg.train.prompts_per_step)
        problems = ([too_small] if too_small else []) + prompt_problems(self.data, self._data_where())
        try:
            self.rewards = resolve_rewards(cfg.rewards, cfg.reward_weights, columns=list(self.data.column_names),
                                           load_models=False)
            check_row_values(self.rewards, self.data, cfg.data.dataset)
        except RewardError as err:
            problems.append(str(err))
        else:
            read = {"prompt"} | {c for r in self.rewards for c in r.required_columns + r.optional_columns + r.accepted}
            for column, why in value_changes(cfg.data.dataset, cfg.data.prompt_column).items():
                if column in read:  # a value a reward (or the model) would see changed
                    problems.append(why)
                elif self.main:
                    logging.getLogger("rollout_sleep.grpo.data").warning(
                        "%s (no reward names the column: only a reward reading it through **kwargs would see it)", why)
            for note in absent_optional_columns(self.rewards, list(self.data.column_names)) if self.main else ():
                logging.getLogger("rollout_sleep.grpo.rewards").warning(note)
        problem = temperature_problem(cfg.train.temperature, "train.temperature")  # vLLM's own bounds
        if problem:
            problems.append(problem)
        if problems:
            raise ConfigError(problems)
        self.reward_weights = [r.weight for r in self.rewards]
        self.dataset_record = {"dataset_rows": len(self.data), "dataset_fingerprint": rows_fingerprint(self.data),
                               "rewards_fingerprint": rewards_fingerprint(self.rewards)}
        output_dir.check_dataset(self.out, len(self.data), self.dataset_record["dataset_fingerprint"],
                                 cfg.data.dataset, cfg.resume and not cfg.overwrite)

    def _data_where(self) -> str:
        """The dataset and its prompt column, as messages about its rows name them."""
        d = self.cfg.data
        return f"data.dataset {d.dataset!r} (prompt column {d.prompt_column!r}, data.prompt_column)"

    def _claim_output_dir(self) -> None:
        """The main process locks ``output_dir`` (one run at a time in it), clears an earlier run when asked, opens
        the run's log and writes the run's config; every rank waits for it, then opens its own log."""
        cfg = self.cfg
        if self.main:
            with output_dir.writing(self.out, "write into output_dir"):
                self.lock = output_dir.lock(self.out)  # held until the process ends: one run at a time in output_dir
                if cfg.overwrite and not cfg.resume:
                    gone = output_dir.clear_run(self.out, cfg.to_dict())
                    if gone:
                        self.acc.print(f"overwrite=true: deleted {', '.join(gone)} of the earlier run in {self.out}")
                elif output_dir.drop_stale_model(self.out, cfg.to_dict()):
                    self.acc.print(f"deleted {self.out / 'model'}: built with other model settings; building it "
                                   "again")
                self.out.mkdir(parents=True, exist_ok=True)
                log.add_file(output_dir.log_file(self.out, 0))  # the run's log, and an error's traceback
                output_dir.write_run_config(self.out, cfg.to_dict(), dataset=self.dataset_record)
            if cfg.save_every or cfg.save_final:  # a checkpoints folder it cannot write: said now, not at a save
                output_dir.check_writable(self.out / "checkpoints")
        with self._collective("the start of the run"):
            self.acc.wait_for_everyone()
        if not self.main:
            log.add_file(output_dir.log_file(self.out, self.acc.process_index))

    @contextlib.contextmanager
    def _model_files(self):
        """A folder with the model's config and tokenizer, read before anything is written: ``model.path``, or for
        a built-in size, a temporary folder with the config and tokenizer its build writes."""
        cfg = self.cfg.model
        if cfg.path not in SHAPES:
            yield cfg.path
            return
        import tempfile

        with tempfile.TemporaryDirectory(prefix="rollout_sleep-model-") as folder:
            yield make_config_dir(folder, cfg.path, dtype=cfg.dtype, tie_word_embeddings=cfg.tie_word_embeddings)

    def _check_syncable(self, model_files: str) -> None:
        """Before anything is written: a model whose weights no sync can load into the running engine here is
        refused from its config, not at the first sync: a quantized checkpoint trained whole (the trainer trains
        float weights and the sync writes float tensors under the checkpoint's names), and a mixture of experts on
        vLLM CPU, trained whole."""
        config = json.loads(Path(model_files, "config.json").read_text())
        text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
        key, quant = next(((k, c[k]) for c in (config, text) for k in ("quantization_config", "compression_config")
                           if c.get(k)), (None, None))  # vLLM reads either as the quantization
        if quant and not self.cfg.model.lora.rank:  # LoRA trains an adapter beside the base (and syncs only it)
            method = quant.get("quant_method", "unnamed") if isinstance(quant, dict) else "unnamed"
            raise ConfigError([f"model.path={self.cfg.model.path}: a quantized checkpoint ({method}, config.json's "
                               f"{key}): the trainer trains float weights, and a sync writes them into "
                               "vLLM under the float checkpoint's names. Give the model's bf16 (or float32) "
                               "checkpoint"])
        if torch.cuda.is_available() or self.cfg.model.lora.rank:  # LoRA moves only the adapter
            return
        if memory_plan.experts_per_token(text or config):
            raise ConfigError([f"model.path={self.cfg.model.path}: {cpu_moe_problem()}"])

    def _prepare_prompts(self, model_files: str) -> None:
        """Prompts in their format (chat template when conversational), checked against the context, and the reward
        models against that format: every mistake here is reported before anything is written or vLLM starts."""
        cfg = self.cfg
        self.prompt_tokenizer = AutoTokenizer.from_pretrained(model_files)
        try:
            self.data = prepare_prompts(self.data, self.prompt_tokenizer, chat_template=cfg.data.chat_template,
                                        system_prompt=cfg.data.system_prompt)
            context, context_from = engine_context(model_files, cfg.engine.max_model_len)  # as vLLM will take it
            ids = check_prompts(self.data, self.prompt_tokenizer, context, cfg.train.max_tokens, context_from,
                                where=self._data_where())
            self.conversational = is_conversational(self.data)
            self._longest = max(len(i) for i in ids)  # sizes one step's KV cache
            self.dataset_record["prompts_fingerprint"] = prompts_fingerprint(ids)
            for r in self.rewards:  # a reward model reads the prompts in their format
                if hasattr(r.fn, "check_prompts"):
                    r.fn.check_prompts(self.conversational)
        except (RewardError, ValueError) as err:
            raise ConfigError(str(err)) from err

    def _start_engine(self, kv_bytes: int | None) -> None:
        """The vLLM engine, built from the config in one place (:mod:`rollout_sleep.run.factory`; its modes were
        checked by ``load_config``, :mod:`rollout_sleep.run.modes`)."""
        self.acc.print(f"starting the vLLM engine ({self.model_path})")
        self.engine = build_engine(self.cfg, self.model_path, rank=self.acc.process_index, kv_cache_bytes=kv_bytes)
        self.tokenizer = self.prompt_tokenizer
        if kv_bytes is not None and self.cfg.engine.kv_cache_bytes is None:  # sized to one step: did it fit?
            short = step_kv_cache_shortfall(getattr(self.engine, "llm", None), self._step_sequences(),
                                            self._longest, self.cfg.train.max_tokens)
            if short:
                logging.getLogger("rollout_sleep.engine.memory").warning(short)

    def _decide_one_copy(self, kv_bytes: int | None) -> None:
        """The one-copy decision once vLLM holds the weights, logged with its reason. ``model.share_weights=true``
        refuses to go on where the trainer cannot view them exactly; ``null`` takes two copies (and plans again)."""
        cfg = self.cfg
        if not self.one_copy.on:  # said before vLLM started
            return
        decided = one_copy.after_engine(self.one_copy, self.engine)
        if decided.on:
            self.one_copy = decided
            self.acc.print(decided.describe())
            return
        if cfg.model.share_weights is True or self.model_built_here:
            weights = "" if cfg.model.share_weights is True else \
                " (the model folder holds a config alone: its random weights exist only in vLLM's memory)"
            raise ConfigError(f"model.share_weights: {decided.why}{weights}. Fix: model.share_weights=false")
        self.one_copy = decided
        self.acc.print(decided.describe())
        self._check_copies()  # what one copy allowed and two copies may not, before the trainer is built
        if run_stochastic_rounding(cfg, True):  # bf16 weights now stepped without it (said before otherwise)
            self._note_low_precision_lr()
        self.plan = self._memory_plan(kv_bytes)  # planned with one copy: now two

    def _load_reward_models(self) -> None:
        for r in self.rewards:
            if hasattr(r.fn, "load"):
                r.fn.dtype = getattr(torch, self.cfg.model.dtype)
                r.fn.load(self.acc.device)

    def _build_trainer(self) -> None:
        """The policy and its optimizer (stepped one tensor at a time with ``train.step_per_tensor``, the state
        streamed from host memory with ``train.offload_optimizer=stream``), prepared by accelerate, with the
        non-finite guard, the update check and the optimizer offload on top (in that order)."""
        cfg = self.cfg
        model = self._build_model(getattr(torch, cfg.model.dtype))
        if cfg.train.compile:  # gradient checkpointing set; before accelerate wraps it (DDP, FSDP2's hooks after)
            self.acc.print(compiled.compile_model(model))
        # adamw: fused on GPU, one kernel for all parameters (TRL/transformers' default optimizer too); with
        # stochastic rounding (train.stochastic_rounding) torchao's kind of it
        rounding = run_stochastic_rounding(cfg, self.one_copy.on)
        optimizer = build_optimizer(cfg.train.optimizer, [p for p in model.parameters() if p.requires_grad],
                                    **hyperparameters(cfg.train), fused=torch.cuda.is_available() or None,
                                    model=model, stochastic_rounding=rounding)
        if rounding:
            kernel = cfg.train.optimizer == "adamw8bit" and fused_step_runs()
            self.acc.print(f"optimizer: torchao's {TORCHAO_CLASSES[cfg.train.optimizer]} with bf16 stochastic "
                           f"rounding{', its step one Triton kernel per tensor' if kernel else ''}")
        # per tensor (stream: with the state in host memory, moved one parameter's at a time); wrapped before
        # accelerate, so that the guard and the update check below hook the per-tensor step (once per step)
        where = state_in(cfg.train)
        per_tensor = PerTensorOptimizer(optimizer, where) if where is not None else None
        self.model, self.optimizer = self.acc.prepare(model, optimizer if per_tensor is None else per_tensor)
        # a trainer on views (one copy, a LoRA trainer's shared base) holds q/k/v in one storage: saved and loaded
        # whole, in place (accelerate's safetensors save kept one name per storage)
        one_copy.keep_views_in_checkpoints(self.acc)
        # a non-finite gradient stops the step before it applies (the step's clipping hands it its norm)
        self.guard = guard_optimizer(self.optimizer, self.model)
        # after the guard (a refused step is not measured): the share of sampled weights each checked step changes
        self.update_check = UpdateCheck(self.optimizer, every=cfg.train.update_check_every, seed=cfg.train.seed) \
            if cfg.train.update_check_every else None
        # after the guard: a refused step leaves the state where it was
        self.offload = per_tensor if where == "host" else \
            OptimizerOffload(self.optimizer) if cfg.train.offload_optimizer else None
        self.layout = {"processes": self.acc.num_processes, "distributed_type": self.acc.distributed_type.value,
                       "trainer_sharded": any(hasattr(p, "full_tensor") or hasattr(p, "ds_id")
                                              for p in self.model.parameters())}

    def _reference_model(self):
        """The frozen reference of the KL term (``None`` without one)."""
        if not self.loss.kl_coef > 0:
            return None
        if self.one_copy.on and self.model_built_here:  # the weights exist only as the trainer's views
            return one_copy.frozen_copy(self.model).to(self.acc.device)
        ref = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=getattr(torch, self.cfg.model.dtype))
        return ref.to(self.acc.device).eval().requires_grad_(False)

    def _rollout_manager(self) -> RolloutManager:
        """The rollout/sync cycle; with LoRA only the adapter moves, and the engine keeps its weights asleep."""
        adapter = AdapterSync(self.engine, self.model) if self.lora is not None else None
        keeps_weights = adapter is not None or self.one_copy.on  # the engine releases its KV cache only
        manager = RolloutManager(self.engine, self.model, verify_every=self.cfg.engine.verify_every,
                                 watchdog=self.watchdog, adapter=adapter, weights_shared=self.one_copy.on,
                                 sleep_level=0 if keeps_weights else self.cfg.engine.sleep_level)
        self.layout["weights_shared"] = self.one_copy.on
        if adapter is not None:
            self.layout["lora_base_shared"] = manager.base_shared
        if self.cfg.train.expandable_segments:
            if self.acc.device.type != "cuda":
                self.acc.print("train.expandable_segments: no GPU, nothing to change")
            elif not keeps_weights:  # refused before vLLM started or at the fallback (_check_copies); kept as a guard
                raise ConfigError(["train.expandable_segments=true needs an engine that sleeps at level 0, and this "
                                   "run takes two copies of the weights (see why above): set "
                                   "train.expandable_segments=false"])
            elif enable_expandable_segments():
                self.acc.print("train.expandable_segments: PyTorch's allocator grows its segments in place from now on")
        return manager

    def _open_tracker(self, continued: bool = True) -> None:
        """W&B, continuing the run a resume continues (every checkpoint of a run holds its W&B id; ``continued``:
        false for a new W&B run). Opened before vLLM starts: ``wandb.init`` fails only after retrying for a minute
        or more when its server cannot be reached, and that is said before the engine's start, not after it."""
        cfg = self.cfg
        _, state = output_dir.resume_point(self.out) if cfg.resume and continued else (None, {})
        self._wandb_id = state.get("wandb_id")  # kept through a resume that does not track (wandb.mode=disabled)
        try:
            self.tracker = make_tracker(cfg.wandb.mode, main_process=self.main, project=cfg.wandb.project,
                                        config=cfg.to_dict(), name=cfg.wandb.run_name, directory=self.out,
                                        resume_id=self._wandb_id)
        except Exception as err:  # noqa: BLE001 - wandb's own errors (no server, a refused key, a bad project)
            if not type(err).__module__.startswith("wandb"):
                raise
            raise ConfigError(f"wandb.mode={cfg.wandb.mode}: W&B could not start the run ({type(err).__name__}: "
                              f"{str(err).strip()}). Check the server (WANDB_BASE_URL) and the network, or set "
                              "wandb.mode=offline (sync later with `wandb sync`)") from err

    def _start_measuring(self) -> None:
        """The memory plan's tables (logged with the first step's metrics), and the per-phase peaks of the first
        steps."""
        if self.plan is not None:
            self.tracker.log_table("memory_plan", ["component", *memory_plan.PHASES], self.plan.rows())
            self.tracker.update_summary({f"memory_plan/{p}_gib": self.plan.total(p) / 2**30 for p in memory_plan.PHASES})
        # per-phase peaks over the first steps (the optimizer's state exists from step 1's update on), then the
        # comparison with the plan
        self.resident = memory_check.Resident()
        self.peaks = PhasePeaks(self.plan_base_free).start() \
            if self.plan is not None and self.step < memory_check.MEASURED_STEPS else None
        self.timeline: list[dict] = []

    def _build_model(self, dtype: torch.dtype):
        """The policy: the whole model, or (``model.lora``) a PEFT adapter on a frozen base. On CUDA with one
        engine per process the base is a view of the engine's weights (held once); elsewhere (CPU: vLLM
        repacks its linears) the trainer loads its own."""
        cfg = self.cfg
        checkpointing = cfg.train.gradient_checkpointing
        if self._shares_base():
            self.acc.print("LoRA: the trainer's base is a view of the engine's weights (one copy on the GPU)")
            return trainer_from_engine(self.engine, self.lora, gradient_checkpointing=checkpointing)
        if self.lora is not None and torch.cuda.is_available() and (unchecked := unchecked_problem(self.model_type)):
            self.acc.print(f"LoRA: the trainer loads its own base ({unchecked})")
        if self.one_copy.on:  # a size's random weights are drawn in place, into vLLM's memory
            return one_copy.trainer_on_engine(self.engine, gradient_checkpointing=checkpointing,
                                              init_seed=cfg.model.seed if self.model_built_here else None)
        model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=dtype)
        if checkpointing:
            model.gradient_checkpointing_enable()
            if self.lora is not None:
                model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still need a grad path
        if self.lora is None:
            return model
        from peft import get_peft_model

        return get_peft_model(model, self.lora.peft_config())

    def _shares_base(self) -> bool:
        """LoRA on CUDA with an engine per process, of a model type whose vLLM layout the tests check: the trainer's
        base will be a view of the engine's weights (elsewhere it loads its own, and the plan counts it)."""
        return bool(self.cfg.model.lora.rank) and torch.cuda.is_available() \
            and self.cfg.engine.tensor_parallel_size == 1 and unchecked_problem(self.model_type) is None

    def _note_low_precision_lr(self) -> None:
        """Before vLLM starts: a warning when the trainer steps bf16/fp16 weights in place (one process or DDP;
        FSDP and DeepSpeed may keep float32 master weights) with an lr under half the dtype's spacing near the
        checkpoint's typical |w|. The first optimizer step then measures it (:mod:`rollout_sleep.run.update_check`).
        None with stochastic rounding: the updates are kept in expectation."""
        t = self.cfg.train
        if not self.main or self.acc.distributed_type.value not in ("NO", "MULTI_GPU", "MULTI_CPU") \
                or run_stochastic_rounding(self.cfg, self.one_copy.on):
            return
        magnitude = checkpoint_magnitude(self.model_path) if self.cfg.model.dtype != "float32" else None
        note = lr_note(t.lr, getattr(torch, self.cfg.model.dtype), magnitude) if magnitude else None
        if note:
            logging.getLogger("rollout_sleep.run.update_check").warning(note)

    def _model_path(self) -> str:
        cfg = self.cfg.model
        self.model_built_here = cfg.path in SHAPES
        if cfg.path not in SHAPES:
            return cfg.path
        path = self.out / "model"
        if self.main:
            if self._shares_base() or self.one_copy.on:  # random weights drawn by vLLM (load_format="dummy"), viewed by the trainer:
                def build(folder):  # a 32B shape needs no 64 GB on disk
                    make_config_dir(folder, cfg.path, dtype=cfg.dtype, tie_word_embeddings=cfg.tie_word_embeddings)
            else:
                def build(folder):
                    make_checkpoint(folder, cfg.path, seed=cfg.seed, dtype=cfg.dtype,
                                    tie_word_embeddings=cfg.tie_word_embeddings)
            # whole or not at all: a build killed or out of space is never taken for the model at the next start
            redone = output_dir.build_model(path, build, f"the random-weight model of model.path={cfg.path}",
                                            needs_weights=not (self._shares_base() or self.one_copy.on))
            if redone:
                self.acc.print(f"rebuilt {path}: {redone}")
        with self._collective("the built model"):
            self.acc.wait_for_everyone()
        return str(path)

    def _kv_cache_bytes(self) -> int | None:
        """The engine's KV cache size: ``engine.kv_cache_bytes`` if set; on GPU with ``engine.kv_cache: step``,
        one step's sequences on this engine (:func:`step_kv_cache_bytes`: the longest prompt of the data +
        ``max_tokens`` each, plus ``engine.kv_cache_margin``), so a wake maps back only that; otherwise ``None``
        (vLLM's share of the GPU, or the engine's CPU default)."""
        cfg, t = self.cfg.engine, self.cfg.train
        if cfg.kv_cache_bytes is not None or cfg.kv_cache != "step" or not torch.cuda.is_available():
            return cfg.kv_cache_bytes
        context = engine_context(self.model_path, cfg.max_model_len)[0] or 0
        return step_kv_cache_bytes(self.model_path, self._step_sequences(), self._longest, t.max_tokens, context,
                                   cfg.kv_cache_margin, self.cfg.model.dtype, self.tp)

    def _step_sequences(self) -> int:
        """The sequences one step generates on this process's engine (all of a step's prompts with tensor
        parallelism, this rank's share otherwise), each ``train.generations`` times."""
        t = self.cfg.train
        prompts = t.prompts_per_step if self.tp > 1 else -(-t.prompts_per_step // self.acc.num_processes)
        return prompts * t.generations

    def _memory_plan(self, kv_bytes: int | None) -> memory_plan.MemoryPlan | None:
        """The per-phase memory plan (:mod:`rollout_sleep.run.memory_check`), printed and written to memory_plan.json;
        with ``train.memory_plan=refuse`` a phase that does not fit stops the run here, before vLLM starts. Made
        again once vLLM has started (one copy fell back to two), it keeps the free memory measured before vLLM."""
        before_engine = getattr(self, "plan_base_free", None)
        self.plan_base_free = None
        if self.cfg.train.memory_plan == "off":
            return None
        b = torch.empty((), dtype=getattr(torch, self.cfg.model.dtype)).element_size()
        reward_bytes = sum(memory_plan.checkpoint_params(r.fn.path) * b for r in self.rewards if hasattr(r.fn, "load"))
        stage = getattr(getattr(self.acc.state, "deepspeed_plugin", None), "zero_stage", 0) or 0
        shards = memory_check.trainer_shards(self.acc.num_processes, self.acc.distributed_type.value, stage)
        plan, self.plan_base_free = memory_check.plan_run(
            self.cfg, self.model_path, processes=self.acc.num_processes, shards=shards,
            longest_prompt=self._longest, kv_bytes=kv_bytes, reward_bytes=reward_bytes,
            base_shared=self._shares_base(), weights_shared=self.one_copy.on,
            distributed_type=self.acc.distributed_type.value, base_free=before_engine)
        self.acc.print(plan.table())
        if self.main:  # a resumed run keeps the comparison its first steps measured
            path = self.out / "memory_plan.json"
            earlier = output_dir.read_json(path, "the memory plan")
            with output_dir.writing(path, "write the memory plan to"):  # whole or not at all: read at every start
                output_dir.write_atomic(path, json.dumps({**earlier, "plan": plan.as_dict()}, indent=2))
        memory_check.enforce(plan, self.cfg.train.memory_plan, self.acc.print)
        return plan

    def _check_plan_with_engine(self) -> None:
        """The plan again with what vLLM took at its start measured: a misfit stops the run before the trainer's
        model loads, not by running out of memory in a step."""
        before, loaded = self.engine.memory_before_gib, self.engine.memory_loaded_gib
        if self.plan is None or self.plan_base_free is None or not self.engine.on_cuda or before is None:
            return
        self.engine_taken = int((before - loaded) * memory_plan.GIB)
        self.plan = memory_check.with_engine_measured(self.plan, self.engine_taken)
        memory_check.enforce(self.plan, self.cfg.train.memory_plan, self.acc.print,
                           "with the engine's memory measured at its start")

    def _resume(self) -> None:
        """Load the newest complete saved state (if resuming). Newer
        incomplete checkpoints, and one whose files changed since its save (checksums) or fail to load, are moved
        to ``checkpoints/incomplete`` (said in the log) and the one before is loaded; metrics lines of steps after
        the resumed one move to ``metrics.superseded.jsonl`` (those steps run again)."""
        ckpts = self.out / "checkpoints"
        if self.main:
            output_dir.clear_staging(ckpts)
        damaged = None  # a checkpoint that failed to load: the trainer's state is partly overwritten since
        while True:
            path = self._choose_checkpoint(ckpts) if self.cfg.resume else None
            if path is None:
                break
            state = json.loads((path / output_dir.STATE_FILE).read_text())
            self._check_saved_optimizer(path, state)  # the one-copy decision may have changed with vLLM's layout
            damaged = self._load_checkpoint(path)
            if damaged is None:
                break
            if self.main:
                moved = output_dir.set_aside(path, damaged)
                self.acc.print(f"skipping checkpoint {path.name}: {damaged} (moved to {moved}); loading the "
                               "previous complete checkpoint")
        if path is None and damaged is not None:  # the initial weights are gone: a rerun starts at step 0
            raise output_dir.RunDirError(
                f"no complete checkpoint is left in {ckpts} to resume from (the damaged one is kept in "
                f"{ckpts / 'incomplete'}), and its failed load overwrote part of the trainer's state: rerun the "
                "same command to start the run at step 0")
        state = json.loads((path / output_dir.STATE_FILE).read_text()) if path else {}
        self.step = int(state.get("step", 0))
        if self.main:
            moved = output_dir.supersede_metrics(self.out / "metrics.jsonl", self.step)
            if moved:
                self.acc.print(f"moved {moved} metrics line(s) of steps after step {self.step} to "
                               "metrics.superseded.jsonl: those steps run again")
        if path is None:
            if self._wandb_id is not None:  # every checkpoint was set aside: steps from 1 again, in a new W&B run
                self.tracker.finish()  # (W&B drops a step below its run's last: they would be lost, silently)
                self._open_tracker(continued=False)
            return
        # the restored optimizer holds the settings it was saved with: the config's win
        restored = set_hyperparameters(self.optimizer, hyperparameters(self.cfg.train))
        if self.manager.adapter is not None:
            self.manager.adapter.push()  # the engine must serve the restored adapter
        elif self.manager.shared is not None:  # restored in place, into vLLM's memory: its cached prefixes are stale
            self.engine.reset_prefix_cache()
        else:
            self.engine.load_weights(self.manager.stream)  # the engine must hold the restored weights
        self.acc.print(f"resumed from {path} (step {self.step})")
        self._say_applied(state.get("config") if isinstance(state.get("config"), dict) else self.trained_settings,
                          restored)

    def _choose_checkpoint(self, ckpts: Path) -> Path | None:
        """The main process picks the newest complete checkpoint, its files checked against the checksums recorded
        at its save (newer ones that are not are set aside, said); every rank gets its choice."""
        chosen = [None]
        if self.main:
            found, skipped = output_dir.newest_complete(ckpts, verify=True)
            for path, why in skipped:
                moved = output_dir.set_aside(path, why)
                self.acc.print(f"skipping checkpoint {path.name}: {why} (moved to {moved})")
            if skipped and found is None:
                self.acc.print("no complete checkpoint to resume from: starting at step 0")
            chosen = [str(found) if found else None]
        with self._collective("the choice of the checkpoint to resume from"):
            chosen = broadcast_object_list(chosen)
        return Path(chosen[0]) if chosen[0] else None

    def _load_checkpoint(self, path: Path) -> str | None:
        """Load the checkpoint at ``path`` into the trainer on every rank; returns what is damaged in it (a file
        that fails to load, or weights that load as NaN/Inf), as found by any rank, or ``None``. A load that fails
        with its files intact (out of memory, ...) raises as it is: the checkpoint is not to blame."""
        problem = None
        try:
            # with the optimizer state in host memory it is read to host memory (under DDP accelerate reads to each
            # rank's GPU), then loaded one parameter's state at a time (run/offload.py)
            self.acc.load_state(str(path), **({"map_location": "cpu"} if self.offload is not None else {}))
        except Exception as err:  # noqa: BLE001 - torch's RuntimeError, safetensors' own type, an OSError, ...
            problem = output_dir.damaged_file(path)
            if problem is None:
                raise
            problem += f" (loading it failed with {type(err).__name__}: {str(err).splitlines()[0][:200]})"
        else:
            bad = next((name for name, p in self.model.named_parameters()
                        if p.is_floating_point() and not bool(torch.isfinite(
                            p.to_local() if hasattr(p, "to_local") else p).all())), None)
            if bad is not None:  # never saved so (the non-finite guard stops the step first): damaged on disk
                problem = output_dir.damaged_file(path) or f"the weights it restored hold NaN or Inf ({bad})"
        with self._collective(f"the load of {path.name}"):
            found = [p for p in gather_object([problem]) if p]
        return found[0] if found else None

    def _say_applied(self, trained: dict | None, restored: list[tuple[str, float, float]]) -> None:
        """Name every training setting that differs from the one the resumed checkpoint was trained with (each
        takes effect from the next step), and the optimizer settings set back to the config's."""
        optimizer_keys = {f"train.{name}": (old, new) for name, old, new in restored}
        changes = output_dir.config_changes(trained, self.cfg.to_dict())["applied"] if isinstance(trained, dict) \
            else []
        said = []
        for key, old, new in changes:
            note = " (set in the optimizer)" if optimizer_keys.pop(key, None) else ""
            said.append(f"{key} {old!r} -> {new!r}{note}")
        said += [f"{key} {old!r} -> {new!r} (set in the optimizer, which the checkpoint restored with {old!r})"
                 for key, (old, new) in optimizer_keys.items()]
        if said:
            self.acc.print(f"resumed with changed settings, in effect from step {self.step + 1}: " + "; ".join(said))

    # ------------------------------------------------------------------ train
    def train(self) -> None:
        cfg, t = self.cfg, self.cfg.train
        world, rank = self.acc.num_processes, self.acc.process_index
        while self.step < t.steps:
            self.in_step = self.step + 1  # for the message if the step raises
            t0 = time.perf_counter()
            idx = step_rows(self.step, len(self.data), t.prompts_per_step, t.seed)  # a function of the step: resumable
            # an engine per rank: each rolls out its share of the prompts; one TP engine: all ranks submit the
            # same prompts (vLLM requires it) and each then trains on its share of the groups
            rows = idx[rank::world] if self.tp == 1 else idx  # dataset rows of this rank's prompts
            examples = [self.data[i] for i in rows]
            prompt_ids = prompt_token_ids(self.prompt_tokenizer, [ex["prompt"] for ex in examples])
            measuring = self.peaks is not None and self.step < memory_check.MEASURED_STEPS
            if measuring:
                self.resident.note(self.model, self.optimizer, self.acc.device.type)
            with self._peak("rollout"):
                comps = self.manager.rollout(prompt_ids, n=t.generations, max_tokens=t.max_tokens,
                                             temperature=t.temperature)
            if self.tp > 1:
                mine = set(range(rank, len(examples), world))
                comps = [c for c in comps if c.prompt_index in mine]
                order = sorted(mine)
                examples, prompt_ids = [examples[i] for i in order], [prompt_ids[i] for i in order]
                rows = [rows[i] for i in order]
                remap = {old: new for new, old in enumerate(order)}
                for c in comps:
                    c.prompt_index = remap[c.prompt_index]
            with self._stop_on_non_finite(), self.manager.training(), self._peak("training"):
                # rewards while the engine sleeps: a reward model's forward then uses memory vLLM released
                rewards, table, reward_s = self._score(examples, comps)
                # the step's completions on every rank decide (TRL's rule, over all processes): each rank stops,
                # or none does, and a rank whose share no reward scored trains with the others
                with self._collective(f"the reward gather of step {self.step + 1}"):
                    all_rewards = self.acc.gather(rewards.to(self.acc.device)).double().cpu()  # float64, as scored
                    all_table = self.acc.gather(table.to(self.acc.device)).double().cpu()
                    all_rows = self.acc.gather(torch.tensor([rows[c.prompt_index] for c in comps],
                                                            device=self.acc.device)).tolist()
                self._check_rewards(all_rewards, all_table, all_rows)
                checking = self.update_check is not None and self.update_check.arm(self.step + 1)
                stats = self.loss.step(self.model, self.optimizer, prompt_ids, comps, rewards, ref_model=self.ref_model,
                                       backward=self.acc.backward, autocast=self.acc.autocast,
                                       clip_grad_norm=self.guard.clipping(self.acc.clip_grad_norm_),
                                       no_sync=lambda: self.acc.no_sync(self.model))  # one all-reduce per step
                check_finite("loss and grad_norm", torch.tensor([stats["loss"], stats["grad_norm"]]))
                stats.update(self.sampling_check.observe(self.step + 1, stats, warn=self.main))
            if checking:  # every rank: the counts are summed over the ranks' shards
                with self._collective(f"the update check of step {self.step + 1}"):
                    stats.update(self.update_check.result(
                        # stochastic rounding changes few weights a step by design (the update is kept in
                        # expectation): the fraction is logged, not warned about
                        self.step + 1, stats["grad_norm"], warn=self.main and not run_stochastic_rounding(self.cfg, self.one_copy.on),
                        reduce=lambda c: self.acc.reduce(c.to(self.acc.device), "sum")))
            if measuring:  # the cache training left, before the wake decides whether to release it
                self.resident.note_before_wake()
            with self._peak("rollout"):  # the wake maps vLLM back beside the trainer's state
                self.manager.sync()
            self.step += 1
            phases = self.manager.end_step()
            if self.offload is not None:
                phases.update(self.offload.pop_timings())
            lengths = torch.tensor([len(c.token_ids) for c in comps], dtype=torch.float32)
            metrics = {"step": self.step, "first_prompt_index": idx[0],
                       **reward_summary(all_rewards, t.generations),  # reward, reward_std: TRL's names
                       "completion_len_mean": float(lengths.mean()), "rollouts": int(all_rewards.numel()),
                       "unscorable": int(torch.isnan(all_rewards).sum()),
                       **reward_metrics(self.rewards, all_table),
                       "reward_s": reward_s, **self.layout, **stats, **phases,
                       **memory_check.cuda_peak(self.peaks.run_allocated_peak if self.peaks else 0),
                       "step_s": time.perf_counter() - t0}
            if measuring and self.step in (memory_check.MEASURED_STEPS, t.steps):
                metrics.update(self._plan_vs_actual(phases))
            self.timeline.append({k: v for k, v in phases.items() if k.endswith("_s")})
            if self.main:
                with output_dir.writing(self.out / "metrics.jsonl", f"append the metrics of step {self.step} to",
                                        f"Step {self.step} is not saved; {self._rerun_note()} "):
                    with open(self.out / "metrics.jsonl", "a") as fh:
                        fh.write(json.dumps(metrics) + "\n")
                self.tracker.log(metrics, step=self.step)
                if self.sampling_check.message:  # the warning in W&B's summary too
                    self.tracker.update_summary({"warnings/sampling_correction": self.sampling_check.message})
                self.acc.print(f"step {self.step}/{t.steps} reward {metrics['reward']:.3f} "
                               f"loss {stats['loss']:.4f} step {metrics['step_s']:.2f}s")
            if (cfg.save_every and self.step % cfg.save_every == 0) or (cfg.save_final and self.step == t.steps):
                self.save()
        self.in_step = None

    def _peak(self, phase: str):
        return self.peaks.phase(phase) if self.peaks is not None else contextlib.nullcontext()

    def _plan_vs_actual(self, phases: dict) -> dict:
        """The plan against what the first steps measured (:func:`rollout_sleep.run.memory_check.measured_gib`), written
        to memory_plan.json and logged to W&B; returns the flat metrics for this step's line."""
        offloaded = self.offload is not None and self.offload.active
        measured = memory_check.measured_gib(
            self.model, self.optimizer, self.acc.device.type, self.resident,
            offloaded_gib=self.offload.step_state_bytes / memory_plan.GIB if offloaded else None, peaks=self.peaks,
            engine_taken=getattr(self, "engine_taken", None), engine_freed_gib=phases.get("memory_freed_gib"),
            activations=self.offload is None, weights_shared=self.one_copy.on)
        comparison = memory_plan.compare(self.plan, measured)
        flat = {f"memory/{ph}/{name}_{k}": v for ph, rows in comparison.items() for name, row in rows.items()
                for k, v in row.items()}
        if self.main:
            with output_dir.writing(self.out / "memory_plan.json", "write the memory plan to"):
                output_dir.write_atomic(self.out / "memory_plan.json", json.dumps(
                    {"plan": self.plan.as_dict(), "measured_gib": measured, "measured_at_step": self.step,
                     "comparison": comparison}, indent=2))
            self.tracker.log_table("memory_plan_vs_actual", ["phase", "component", "plan_gib", "measured_gib", "diff_gib"],
                                   [[ph, name, row["plan_gib"], row["measured_gib"], row["diff_gib"]]
                                    for ph, rows in comparison.items() for name, row in rows.items()])
            self.tracker.update_summary(flat)
            totals = [f"{ph} {rows['total']['plan_gib']:.2f} planned / {rows['total']['measured_gib']:.2f} measured"
                      for ph, rows in comparison.items() if "total" in rows]
            self.acc.print(f"memory plan vs measured (GiB, steps 1-{self.step}): "
                           + ("; ".join(totals) or "no device-wide figures off CUDA") + " (memory_plan.json)")
        return flat

    def _score(self, examples: list[dict], comps) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Every reward on this rank's completions, in the data's format (TRL's call): the weighted sum
        (NaN where no reward applied), the per-reward table, and the seconds it took."""
        t0 = time.perf_counter()
        rows = [examples[c.prompt_index] for c in comps]
        from transformers import TrainerState

        names = ", ".join(r.name for r in self.rewards)
        with self.watchdog.phase("reward", f"the rewards ({names}) to score the {len(comps)} completions of step "
                                           f"{self.step + 1}"):
            table = score_rewards(self.rewards, [ex["prompt"] for ex in rows],
                                  completions_for_rewards([c.text for c in comps], self.conversational), rows,
                                  completion_ids=[list(c.token_ids) for c in comps],
                                  trainer_state=TrainerState(global_step=self.step, max_steps=self.cfg.train.steps))
        return combine(table, self.reward_weights), table, time.perf_counter() - t0

    def save(self) -> None:
        """Every rank writes into a staging folder; the main process then records the step, the settings and the
        dataset it was trained with and every file's size and checksum, and renames it to ``step_N``: a ``step_N``
        folder is always complete."""
        path = self.out / "checkpoints" / f"step_{self.step}"
        staging = output_dir.stage(path)
        failed = None
        try:  # a save that cannot be written (full disk, read-only folder) stops the run on every rank, named
            with output_dir.saving(staging, path, self.step), \
                    self.watchdog.phase("save", f"accelerate to save the state of step {self.step} into {staging}"):
                self.acc.save_state(str(staging))
        except output_dir.WriteError as err:
            failed = err
        with self._collective(f"the end of the save of step {self.step}"):
            saved = self.acc.gather(torch.tensor([int(failed is None)], device=self.acc.device))
        if failed is not None:
            raise failed
        if not bool(saved.all()):
            failing = [i for i, ok in enumerate(saved.tolist()) if not ok]
            raise output_dir.WriteError(f"rank(s) {failing} could not write their part of the checkpoint of step "
                                        f"{self.step} (their message says why); {self._last_saved()}")
        if self.main:
            # the settings it was trained with, beside it: a resume compares them with its own
            state = {"step": self.step, "wandb_id": getattr(self.tracker, "id", None) or self._wandb_id,
                     "config": self.cfg.to_dict(),
                     "optimizer": self._optimizer_record(), **self.dataset_record}
            with output_dir.saving(staging, path, self.step), self.watchdog.phase("save", f"the commit of {path}"):
                output_dir.commit(staging, path, state)
            print(f"saved {path}", flush=True)
        with self._collective(f"the commit of {path.name}"):
            self.acc.wait_for_everyone()

    def _check_rewards(self, rewards: torch.Tensor, table: torch.Tensor, rows: list[int]) -> None:
        """TRL's rule: a reward's ``None`` or NaN means it does not apply to that completion; completions no reward
        scored (NaN total) are named in a warning, once per step, and get no advantage. An infinite reward, or a
        step where no completion could be scored at all, stops the run before anything is trained. Given the
        step's completions of every rank (gathered), so that every rank decides alike."""
        step = self.step + 1
        inf = torch.isinf(table)
        if bool(inf.any()):
            names = [r.name for j, r in enumerate(self.rewards) if bool(inf[:, j].any())]
            first = int(inf.any(dim=1).nonzero()[0])
            raise NonFiniteError(f"{int(inf.sum())} of {table.numel()} rewards of step {step} are infinite (from "
                                 f"{', '.join(names)}; the first for dataset row {rows[first]}): rewards must be finite "
                                 f"numbers, or None (or NaN) where they do not apply; nothing was trained at step {step}")
        over = torch.isinf(rewards)  # finite rewards whose weighted sum does not fit a float64
        if bool(over.any()):
            raise NonFiniteError(f"the weighted total of {int(over.sum())} of {rewards.numel()} completions of step "
                                 f"{step} overflows (each reward is finite, but the sum of reward x reward_weights "
                                 f"exceeds float64's range, ~1.8e308; the first for dataset row "
                                 f"{rows[int(over.nonzero()[0])]}): scale the rewards or reward_weights down; nothing "
                                 f"was trained at step {step}")
        if rewards.numel() and bool(torch.isnan(rewards).all()):
            raise NonFiniteError(f"no completion of step {step} could be scored: every reward in "
                                 f"{[r.name for r in self.rewards]} returned None or NaN for all {rewards.numel()} of "
                                 f"them; nothing was trained at step {step}")
        report = unscorable_report(table, self.rewards, rows) if self.main else None
        if report:
            logging.getLogger("rollout_sleep.grpo.rewards").warning("step %d: %s", step, report)
        for name in silent_rewards(table, self.rewards) if self.main else ():
            if name not in self._silent_said:  # once per reward: its metric (NaN) says the rest
                self._silent_said.add(name)
                logging.getLogger("rollout_sleep.grpo.rewards").warning(
                    "step %d: reward %r scored none of the %d completions (it returned None or NaN for each; the "
                    "other rewards scored them). Fine for a reward meant for other rows; otherwise check the columns "
                    "it reads and the format it expects (said once)", step, name, table.shape[0])

    @contextlib.contextmanager
    def _stop_on_non_finite(self):
        """A NaN/inf in the training step (the optimizer's guard, or the returned loss) stops the run with the
        step named, before the step's weights reach the engine or a checkpoint."""
        try:
            yield
        except NonFiniteError as err:
            raise NonFiniteError(f"step {self.step + 1}: {str(err).rstrip('.')}. The run stops before this step's weights reach the "
                                 f"engine or a checkpoint; {self._last_saved()}") from None

    def _last_saved(self) -> str:
        saved = output_dir.saved_steps(self.out / "checkpoints")
        return f"the newest checkpoint is {saved[-1]}" if saved else "no checkpoint was saved yet"

    def _rerun_note(self) -> str:
        """Where a rerun with the same output_dir goes on from, as a sentence."""
        saved = output_dir.saved_steps(self.out / "checkpoints")
        return f"the newest checkpoint is {saved[-1]} (a rerun with the same output_dir resumes from it)." if saved \
            else "no checkpoint was saved yet (a rerun starts at step 0)."

    # ---------------------------------------------------------------- cleanup
    def cleanup(self) -> None:
        if self.main and self.timeline:
            png = plot_timeline(self.timeline, self.out / "phase_timeline.png")
            if png is not None:
                self.tracker.log_image("phase_timeline", png, step=self.step)
        self.tracker.finish()
        self.watchdog.close()


# problems the recipe explains itself: their message says what and what to do
EXPLAINED = (ConfigError, output_dir.RunDirError, NonFiniteError, RewardError)


def failure_message(recipe: GRPORecipe | None, err: BaseException) -> str:
    """The one paragraph the console gets when ``err`` stops the run: what failed (the step, if one was running),
    where the run can go on from, and where the traceback is (the run's log file; the console only where no log
    file is open yet and the error is not one the recipe explains)."""
    if isinstance(err, KeyboardInterrupt):  # Ctrl-C (or code that raised it): said, not a raw traceback
        text = "interrupted (KeyboardInterrupt)"
    else:
        text = str(err).strip() if isinstance(err, EXPLAINED) else f"{type(err).__name__}: {err}"
    step = getattr(recipe, "in_step", None)
    if step is not None and not isinstance(err, (NonFiniteError, output_dir.WriteError)):  # those say it themselves
        text = f"step {step}: {text.rstrip('.')}. The run stopped; {recipe._rerun_note()}"
    where = log.log_traceback(err, text)
    if where is not None:
        text += f" The traceback is in {where}."
    elif not isinstance(err, (*EXPLAINED, KeyboardInterrupt)):
        import traceback

        traceback.print_exception(err, file=sys.stderr)  # nowhere else to keep it
    return text


def run(argv: list[str] | None = None) -> int:
    """One run from the command line (``argv``: the arguments after the script's name): its exit code. 0: trained
    (or nothing left to train); 2: the config or its inputs refused; 1: a failure; 130: an interrupt. Every error
    ends in one message on the console (a step's traceback in the run's log)."""
    args = build_parser().parse_args(argv)
    recipe = None
    try:
        recipe = GRPORecipe(load_config(args.config, args.overrides))
        recipe.setup()
        recipe.train()
        recipe.cleanup()
    except output_dir.NothingToTrain as done:
        print(done, flush=True)
    except (Exception, KeyboardInterrupt) as err:  # noqa: BLE001 - an interrupt too, with where a rerun goes on
        # from (exit code 130, as a shell's)
        print(f"error: {failure_message(recipe, err)}", file=sys.stderr, flush=True)
        code = 130 if isinstance(err, KeyboardInterrupt) else 2 if isinstance(err, ConfigError) else 1
        tracker = getattr(recipe, "tracker", None)
        if tracker is not None:  # main's os._exit skips wandb's own exit hook: what the run logged would be lost
            with contextlib.suppress(Exception):
                tracker.finish(exit_code=code)
        watchdog = getattr(recipe, "watchdog", None)
        if watchdog is not None:  # its thread and helper process end with the run, in a process that goes on too
            watchdog.close()
        return code
    return 0


def main() -> None:
    code = run()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # vLLM's in-process teardown is slow and would tear down accelerate's process group


if __name__ == "__main__":
    main()

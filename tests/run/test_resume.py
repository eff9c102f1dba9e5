"""A resume with a changed config: every key is classified (fixed / applied / free) in the schema; a fixed key that
changed is refused before vLLM starts, naming each key with its old and new value; an applied one takes effect
and is said (the restored optimizer gets the config's lr, not the checkpoint's); a finished run says so before
vLLM starts. A checkpoint that fails to load is named by its damaged file, set aside, and the one before it
resumed."""

from __future__ import annotations

import contextlib
import copy
import json
import shutil
from types import SimpleNamespace

import pytest
import torch

from rollout_sleep.run import output_dir
from rollout_sleep.run.schema import (APPLIED, FIXED, FREE, RESUME_CLASSES, RecipeConfig, _opt, describe,
                                      resume_classes)

from workers.recipe_cli import ENGINE_START, run


def test_every_config_key_has_exactly_one_resume_class():
    """A key added without a class cannot be declared (``resume`` is required), and every key of ``--help``
    has exactly one of the three."""
    classes = resume_classes()
    assert sorted(classes) == sorted(key for key, _, _ in describe())
    assert {key for key, klass in classes.items() if klass not in RESUME_CLASSES} == set()
    with pytest.raises(TypeError, match="resume"):
        _opt(1, "a new key")
    # the classes where a wrong one would be silently wrong (the optimizer's settings, what defines the state)
    assert {k: classes[k] for k in ("train.lr", "train.weight_decay", "train.max_grad_norm", "train.temperature")} \
        == dict.fromkeys(("train.lr", "train.weight_decay", "train.max_grad_norm", "train.temperature"), APPLIED)
    for key in ("model.path", "model.dtype", "model.lora.rank", "data.dataset", "train.seed", "train.optimizer",
                "train.generations", "train.prompts_per_step", "rewards", "reward_weights"):
        assert classes[key] == FIXED, key
    for key in ("train.steps", "save_every", "watchdog.train_s", "wandb.mode", "output_dir"):
        assert classes[key] == FREE, key


def _checkpoint(out, step: int, config: dict) -> None:
    """A complete checkpoint saved with its settings, as the recipe's save writes it."""
    staging = output_dir.stage(out / "checkpoints" / f"step_{step}")
    staging.mkdir(parents=True)
    torch.save({"state": {}}, staging / "optimizer.bin")
    output_dir.commit(staging, out / "checkpoints" / f"step_{step}", {"step": step, "config": config})


def test_fixed_changes_are_refused_against_the_checkpoints_own_settings(tmp_path):
    """The checkpoint was trained with AdamW and no LoRA; a later resume that crashed before its first save
    rewrote run_config.json with other settings. Resuming with those again must still be refused: the settings
    that count are those saved beside the checkpoint (the old code compared run_config.json, and did not
    look at the optimizer at all)."""
    cfg = RecipeConfig().to_dict()
    output_dir.write_run_config(tmp_path, cfg)
    _checkpoint(tmp_path, 4, cfg)
    later = copy.deepcopy(cfg)
    later["train"]["optimizer"], later["model"]["lora"]["rank"], later["model"]["dtype"] = "adamw8bit", 8, "bfloat16"
    output_dir.write_run_config(tmp_path, later)
    with pytest.raises(output_dir.RunDirError) as err:
        output_dir.check_output_dir(tmp_path, later, resume=True)
    msg = str(err.value)
    for said in ("model.dtype: 'float32' -> 'bfloat16'", "model.lora.rank: 0 -> 8",
                 "train.optimizer: 'adamw' -> 'adamw8bit'", "checkpoint step_4 was trained with",
                 "Use a new output_dir", "revert those settings"):
        assert said in msg, (said, msg)
    # applied and free keys may change: accepted, and classified
    ok = copy.deepcopy(cfg)
    ok["train"].update(lr=1e-4, clip_eps=0.3, steps=40)
    ok["watchdog"]["train_s"], ok["wandb"]["mode"] = 60.0, "disabled"
    output_dir.check_output_dir(tmp_path, ok, resume=True)
    changes = output_dir.config_changes(cfg, ok)
    assert changes["fixed"] == []
    assert changes["applied"] == [("train.lr", 3e-3, 1e-4), ("train.clip_eps", 0.2, 0.3)]
    assert sorted(k for k, _, _ in changes["free"]) == ["train.steps", "wandb.mode", "watchdog.train_s"]


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A real run of 2 steps (lr 0.003, a checkpoint at each step)."""
    out = tmp_path_factory.mktemp("resume") / "run"
    code, text = run(out, "train.steps=2", "save_every=1", "data.num_prompts=32", "train.prompts_per_step=4")
    assert code == 0, text[-3000:]
    # model.share_weights=null on CPU: two copies, the decision said with its reason
    assert "two copies of the weights (the trainer's and vLLM's, synced each step): vLLM's CPU build repacks its " \
           "linear weights" in text, text[-3000:]
    return out


def test_a_changed_lr_reaches_the_restored_optimizer_and_is_said(saved_run, tmp_path):
    """train.lr 0.003 -> 0.001 and weight decay 0 -> 0.01 on resume: the old code resumed the optimizer with
    the checkpoint's values (while run_config.json recorded the new ones) and said nothing."""
    out = tmp_path / "run"
    shutil.copytree(saved_run, out)  # the output folder moved: allowed (output_dir is free)
    code, text = run(out, "train.steps=3", "save_every=1", "data.num_prompts=32", "train.prompts_per_step=4",
                     "train.lr=0.001", "train.weight_decay=0.01", "train.clip_eps=0.3")
    assert code == 0, text[-3000:]
    assert "resumed with changed settings, in effect from step 3: train.lr 0.003 -> 0.001 (set in the optimizer); " \
           "train.weight_decay 0.0 -> 0.01 (set in the optimizer); train.clip_eps 0.2 -> 0.3" in text, text[-3000:]
    groups = torch.load(out / "checkpoints" / "step_3" / "optimizer.bin", weights_only=False)["param_groups"]
    assert {(g["lr"], g["weight_decay"]) for g in groups} == {(0.001, 0.01)}
    state = json.loads((out / "checkpoints" / "step_3" / output_dir.STATE_FILE).read_text())
    assert state["config"]["train"]["lr"] == 0.001  # saved beside it: the next resume compares with this


def test_fixed_changes_are_refused_before_the_engine_starts(saved_run):
    code, text = run(saved_run, "train.steps=4", "save_every=1", "data.num_prompts=32", "train.prompts_per_step=4",
                     "model.lora.rank=8", "train.seed=3", timeout=300)
    assert code == 1, text[-3000:]
    assert "holds a different run: model.lora.rank: 0 -> 8; train.seed: 0 -> 3 (its checkpoint step_2 was trained " \
           "with the first value of each)" in text, text[-3000:]
    assert ENGINE_START not in text and "Traceback" not in text
    assert sorted(p.name for p in (saved_run / "checkpoints").iterdir()) == ["step_1", "step_2"]  # untouched


def test_a_finished_run_says_so_before_the_engine_starts(saved_run):
    """The old code started vLLM (~40 s), loaded the state, and only then said there was nothing to train."""
    code, text = run(saved_run, "train.steps=2", "save_every=1", "data.num_prompts=32", "train.prompts_per_step=4",
                     timeout=300)
    assert code == 0, text[-3000:]
    assert f"the run in {saved_run} is already at step 2 (train.steps=2, checkpoint step_2): nothing to train. " \
           "Raise train.steps to continue it" in text, text[-3000:]
    assert ENGINE_START not in text



def test_a_checkpoint_saved_without_its_settings_still_has_its_applied_changes_said(saved_run, tmp_path):
    """A checkpoint from before settings were saved beside it: a resume compares with the run's settings
    (run_config.json, read before this start rewrites it). The old code checked the fixed keys against them but
    said no applied change but the optimizer's (a changed temperature or clip range went unsaid)."""
    out = tmp_path / "run"
    shutil.copytree(saved_run, out)
    for state_file in (out / "checkpoints").glob(f"step_*/{output_dir.STATE_FILE}"):
        state = json.loads(state_file.read_text())
        del state["config"]
        state_file.write_text(json.dumps(state))
    code, text = run(out, "train.steps=3", "save_every=1", "data.num_prompts=32", "train.prompts_per_step=4",
                     "train.temperature=0.7", "train.clip_eps=0.3")
    assert code == 0, text[-3000:]
    assert "resumed with changed settings, in effect from step 3: train.temperature 1.0 -> 0.7; " \
           "train.clip_eps 0.2 -> 0.3" in text, text[-3000:]


def test_a_checkpoint_of_another_optimizer_class_is_refused_before_the_engine_starts(tmp_path, monkeypatch):
    """``train.stochastic_rounding=null`` picks the optimizer from the one-copy decision, which a resume may change
    (``model.share_weights`` is free; another machine): a bf16 run trained with one copy saved torchao's _AdamW,
    and on the CPU (two copies) the resume builds PyTorch's AdamW. The old code loaded the state into the other
    class (silently, or failing at the first step: torchao refuses PyTorch's float lr, PyTorch's AdamW cannot
    step torchao's quantized moments). Now refused before vLLM starts, naming both and the fix; a checkpoint of
    the same class, or one saved before the class was recorded, resumes."""
    from helpers import load_recipe
    from rollout_sleep.run.optim import optimizer_record
    from workers.recipe_cli import CONFIG

    recipe = load_recipe()

    class Checked(Exception):
        pass

    def next_step(*args, **kwargs):  # the setup's step after the check (the data): no model is built
        raise Checked

    monkeypatch.setattr(recipe.GRPORecipe, "_load_data_and_rewards", next_step)
    for saved, refused in [(optimizer_record("adamw", stochastic_rounding=True, weights_shared=True), True),
                           (optimizer_record("adamw"), False), (None, False)]:
        out = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        cfg = recipe.load_config(str(CONFIG), [f"output_dir={out}", "model.dtype=bfloat16", "wandb.mode=disabled"])
        out.mkdir()
        output_dir.write_run_config(out, cfg.to_dict())
        staging = output_dir.stage(out / "checkpoints" / "step_1")
        staging.mkdir(parents=True)
        torch.save({"state": {}, "param_groups": []}, staging / "optimizer.bin")
        state = {"step": 1, "config": cfg.to_dict(), **({"optimizer": saved} if saved else {})}
        output_dir.commit(staging, out / "checkpoints" / "step_1", state)
        if not refused:
            with pytest.raises(Checked):
                recipe.GRPORecipe(cfg).setup()
            continue
        with pytest.raises(recipe.ConfigError) as err:
            recipe.GRPORecipe(cfg).setup()
        msg = str(err.value)
        for said in ("checkpoint step_1 holds the state of torchao's _AdamW with bf16 stochastic rounding (one copy "
                     "of the weights); this run builds PyTorch's AdamW (two copies of the weights)",
                     "model.share_weights=null or true, on a CUDA GPU", "a new output_dir"):
            assert said in msg, (said, msg)
        assert sorted(p.name for p in out.iterdir()) == ["checkpoints", output_dir.RUN_CONFIG]  # nothing written


def _damage(path, data: bytes, at: float = 0.5) -> None:
    with open(path, "r+b") as fh:
        fh.seek(int(path.stat().st_size * at))
        fh.write(data)


def test_a_checkpoint_that_fails_to_load_is_named_by_its_damaged_file(tmp_path):
    """The recipe's load of a checkpoint (accelerate's load_state: the weights, then the optimizer's state) whose
    file is damaged: zeros in optimizer.bin (the old code stopped with torch's bare "PytorchStreamReader failed
    reading file data/29"), 0xFF in model.safetensors (loads as NaN: the old code blamed "the trainer's weights
    diverged"). Each is named by its file, for the resume to set the checkpoint aside; a load that fails with
    its files intact (out of memory) is not blamed on the checkpoint."""
    from safetensors.torch import load_file, save_file

    from helpers import load_recipe

    recipe = load_recipe()
    model = torch.nn.Linear(8, 8)
    ckpt = tmp_path / "step_1"
    ckpt.mkdir()
    save_file(model.state_dict(), ckpt / "model.safetensors")
    torch.save({"state": {i: {"exp_avg": torch.ones(512)} for i in range(8)}, "param_groups": []},
               ckpt / "optimizer.bin")
    clean = {p.name: p.read_bytes() for p in ckpt.iterdir()}

    def load_state(path, **kwargs):
        model.load_state_dict(load_file(f"{path}/model.safetensors"))
        torch.load(f"{path}/optimizer.bin", weights_only=False)

    fake = SimpleNamespace(acc=SimpleNamespace(load_state=load_state), offload=None, model=model,
                           _collective=lambda what: contextlib.nullcontext())
    assert recipe.GRPORecipe._load_checkpoint(fake, ckpt) is None
    _damage(ckpt / "optimizer.bin", b"\0" * ((ckpt / "optimizer.bin").stat().st_size // 8))  # a record's header too
    said = recipe.GRPORecipe._load_checkpoint(fake, ckpt)
    assert said.startswith("optimizer.bin is damaged (its record ") and "fails its CRC check) (loading it failed " \
        "with RuntimeError: " in said, said
    (ckpt / "optimizer.bin").write_bytes(clean["optimizer.bin"])
    _damage(ckpt / "model.safetensors", b"\xff" * 64, at=0.6)
    assert recipe.GRPORecipe._load_checkpoint(fake, ckpt) == \
        "model.safetensors holds NaN or Inf in 'weight' (its bytes were damaged after the save)"
    (ckpt / "model.safetensors").write_bytes(clean["model.safetensors"])

    def out_of_memory(path, **kwargs):
        raise RuntimeError("CUDA out of memory")

    fake.acc.load_state = out_of_memory
    with pytest.raises(RuntimeError, match="out of memory"):
        recipe.GRPORecipe._load_checkpoint(fake, ckpt)


def test_a_damaged_checkpoint_is_set_aside_and_the_previous_one_resumed(saved_run, tmp_path):
    """step_2 saved before checksums existed, zeros written into its optimizer.bin, and run_config.json deleted: the
    old code refused the folder as "not a run of this recipe" and, with run_config.json there, stopped at every
    rerun with torch's "PytorchStreamReader failed reading file" while a good step_1 sat unused. Now the settings
    come from the checkpoint, step_2 (no checksums: its torch files' own CRCs are read) is named by its file, moved
    to checkpoints/incomplete/, and the run resumes from step_1 (its checksums verified); its new saves record
    their checksums and the dataset's fingerprint."""
    out = tmp_path / "run"
    shutil.copytree(saved_run, out)
    (out / output_dir.RUN_CONFIG).unlink()
    step_2 = out / "checkpoints" / "step_2"
    state = json.loads((step_2 / output_dir.STATE_FILE).read_text())
    del state["checksums"]
    (step_2 / output_dir.STATE_FILE).write_text(json.dumps(state))
    _damage(step_2 / "optimizer.bin", b"\0" * ((step_2 / "optimizer.bin").stat().st_size // 8))
    code, text = run(out, "train.steps=3", "save_every=1", "data.num_prompts=32", "train.prompts_per_step=4")
    assert code == 0, text[-3000:]
    for said in (f"run_config.json is missing or unreadable in {out}: the run's settings are read from its "
                 "checkpoint step_2", f"checkpoint {step_2} was saved before checksums were recorded",
                 "skipping checkpoint step_2: optimizer.bin is damaged (its record ",
                 f"fails its CRC check) (moved to {out / 'checkpoints' / 'incomplete' / 'step_2'})",
                 f"resumed from {out / 'checkpoints' / 'step_1'} (step 1)"):
        assert said in text, (said, text[-3000:])
    assert output_dir.logged_steps(out / "metrics.jsonl") == [1, 2, 3]
    assert (out / "checkpoints" / "incomplete" / "step_2" / "optimizer.bin").exists()  # kept, never deleted
    settings = json.loads((out / output_dir.RUN_CONFIG).read_text())
    saved = json.loads((out / "checkpoints" / "step_3" / output_dir.STATE_FILE).read_text())
    assert sorted(saved["checksums"]) == sorted(saved["files"])
    assert saved["dataset_fingerprint"] == settings["dataset_fingerprint"] and saved["dataset_rows"] == 32
    assert output_dir.newest_complete(out / "checkpoints", verify=True) == (out / "checkpoints" / "step_3", [])

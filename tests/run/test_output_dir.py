"""A run's output folder: who may write into it, what overwrite may delete, one run at a time, atomic
checkpoints, and resuming from the newest complete one."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from rollout_sleep.run import integrity, output_dir
from rollout_sleep.run.schema import RecipeConfig


def _save(final: Path, step: int, legacy: bool = False) -> Path:
    """A checkpoint as accelerate writes it (model.safetensors, optimizer.bin, random_states_0.pkl), made
    atomic by output_dir.stage/commit (``legacy``: the old way, recipe_state.json without a file list)."""
    target = final if legacy else output_dir.stage(final)
    target.mkdir(parents=True)
    model = torch.nn.Linear(16, 16)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, target / "model.safetensors")
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 16)).sum().backward()
    opt.step()
    torch.save(opt.state_dict(), target / "optimizer.bin")
    torch.save({"rng": torch.get_rng_state()}, target / "random_states_0.pkl")
    if legacy:
        (target / output_dir.STATE_FILE).write_text(json.dumps({"step": step}))
        return final
    return output_dir.commit(target, final, {"step": step, "wandb_id": None})


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_incomplete_checkpoints_are_named_and_skipped(tmp_path):
    ckpts = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4, 5):
        _save(ckpts / f"step_{step}", step)
    legacy = _save(ckpts / "step_6", 6, legacy=True)
    assert output_dir.checkpoint_problem(ckpts / "step_5") is None and output_dir.checkpoint_problem(legacy) is None
    assert json.loads((ckpts / "step_5" / output_dir.STATE_FILE).read_text())["files"]["model.safetensors"] > 0
    assert not list(ckpts.glob(output_dir.STAGING_PREFIX + "*"))  # the staging folders were renamed
    _truncate(ckpts / "step_2" / "model.safetensors")
    _truncate(ckpts / "step_3" / "optimizer.bin")
    (ckpts / "step_4" / output_dir.STATE_FILE).unlink()
    (ckpts / "step_5" / "random_states_0.pkl").write_bytes(b"")
    _truncate(legacy / "model.safetensors", 0.9)  # no file list: the safetensors header gives it away
    (ckpts / "step_7").mkdir()  # an empty folder
    (ckpts / "step_8").mkdir()
    (ckpts / "step_8" / output_dir.STATE_FILE).write_text("{")
    found, skipped = output_dir.newest_complete(ckpts)
    assert found == ckpts / "step_1"
    reasons = {p.name: why for p, why in skipped}
    assert reasons == {
        "step_8": "recipe_state.json is unreadable",
        "step_7": "no recipe_state.json (the save did not finish)",
        "step_6": reasons["step_6"], "step_5": reasons["step_5"],
        "step_4": "no recipe_state.json (the save did not finish)",
        "step_3": reasons["step_3"], "step_2": reasons["step_2"]}, reasons
    assert reasons["step_6"].startswith("model.safetensors is truncated")
    assert reasons["step_5"].startswith("random_states_0.pkl has 0 bytes")
    assert reasons["step_3"].startswith("optimizer.bin has") and reasons["step_2"].startswith("model.safetensors has")
    _truncate(ckpts / "step_3" / "optimizer.bin")  # also caught without a file list: torch's zip is cut
    assert integrity.zip_problem(ckpts / "step_3" / "optimizer.bin").startswith("optimizer.bin is truncated")
    moved = output_dir.set_aside(ckpts / "step_7", "empty")
    assert moved == ckpts / "incomplete" / "step_7" and moved.is_dir() and not (ckpts / "step_7").exists()
    # a save whose process died before the rename leaves only a staging folder: deleted, never resumed from
    (ckpts / (output_dir.STAGING_PREFIX + "step_9")).mkdir()
    assert output_dir.clear_staging(ckpts) == [ckpts / (output_dir.STAGING_PREFIX + "step_9")]
    assert [p.name for p in output_dir.saved_steps(ckpts)] == ["step_1", "step_2", "step_3", "step_4", "step_5",
                                                              "step_6", "step_8"]


def test_output_dir_policy_and_superseded_metrics(tmp_path):
    out = tmp_path / "run"
    cfg = {"model": {"path": "tiny", "seed": 0}, "data": {"dataset": "synthetic", "num_prompts": 64},
           "rewards": ["digits_format"], "train": {"seed": 0, "prompts_per_step": 8, "generations": 8, "steps": 8}}
    output_dir.check_output_dir(out, cfg, resume=False)  # nothing there: fine
    out.mkdir()
    output_dir.write_run_config(out, cfg)
    output_dir.check_output_dir(out, cfg, resume=False)  # settings alone are not a run
    (out / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 0.1}) + "\n" for s in (1, 2, 3, 4)))
    with pytest.raises(output_dir.RunDirError, match="already holds a run .metrics for steps 1-4.; resume=false"):
        output_dir.check_output_dir(out, cfg, resume=False)
    output_dir.check_output_dir(out, {**cfg, "train": {**cfg["train"], "steps": 20}}, resume=True)  # a longer run
    other = {**cfg, "model": {"path": "tiny", "seed": 1}}
    with pytest.raises(output_dir.RunDirError, match=r"holds a different run: model.seed: 0 -> 1 "):
        output_dir.check_output_dir(out, other, resume=True)
    assert output_dir.supersede_metrics(out / "metrics.jsonl", 2) == 2
    assert output_dir.logged_steps(out / "metrics.jsonl") == [1, 2]
    assert output_dir.logged_steps(out / "metrics.superseded.jsonl") == [3, 4]  # kept, not deleted
    (out / "model").mkdir()
    assert not output_dir.drop_stale_model(out, cfg) and (out / "model").is_dir()  # same model settings: reused
    assert output_dir.clear_run(out, other) == ["model", "metrics.jsonl", "metrics.superseded.jsonl",
                                             "run_config.json"]  # overwrite=true, said in the log


def test_overwrite_deletes_only_what_a_run_wrote(tmp_path):
    """overwrite=true pointed at a folder that is not a run (a home-like folder with its own ``checkpoints``
    and ``metrics.jsonl``) is refused and nothing is deleted; in a real run's folder, only the recipe's own
    entries of ``checkpoints`` go. (The old code deleted the whole ``checkpoints`` folder and the metrics.)"""
    home = tmp_path / "home"
    (home / "checkpoints").mkdir(parents=True)
    (home / "checkpoints" / "thesis.pdf").write_text("precious")
    (home / "metrics.jsonl").write_text('{"accuracy": 0.9}\n')
    cfg = RecipeConfig().to_dict()
    with pytest.raises(output_dir.RunDirError, match="not a run of this recipe .* so overwrite=true will not delete"):
        output_dir.check_output_dir(home, cfg, resume=False, overwrite=True)
    assert output_dir.clear_run(home, cfg) == []
    assert (home / "checkpoints" / "thesis.pdf").read_text() == "precious" and (home / "metrics.jsonl").exists()

    run = tmp_path / "run"
    for name in ("step_2", ".partial-step_4", "incomplete/step_3", "my_notes"):
        (run / "checkpoints" / name).mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    output_dir.write_run_config(run, cfg)
    output_dir.check_output_dir(run, cfg, resume=False, overwrite=True)
    assert output_dir.clear_run(run, cfg) == ["metrics.jsonl", "checkpoints", "run_config.json"]
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["my_notes"]


def test_a_model_the_run_did_not_build_is_never_deleted(tmp_path):
    """An earlier run trained the user's own checkpoint kept at ``<output_dir>/model``; a new run there with a
    built-in size must not delete it as a "stale built model" (the old code did)."""
    out = tmp_path / "run"
    (out / "model").mkdir(parents=True)
    (out / "model" / "config.json").write_text("{}")
    old = RecipeConfig()
    old.model.path = str(out / "model")
    output_dir.write_run_config(out, old.to_dict())
    new = RecipeConfig().to_dict()  # model.path: tiny
    assert not output_dir.drop_stale_model(out, new)
    assert output_dir.clear_run(out, new) == ["run_config.json"] and (out / "model" / "config.json").exists()


def test_one_run_at_a_time_in_an_output_dir(tmp_path):
    out = tmp_path / "run"
    held = output_dir.lock(out)
    with pytest.raises(output_dir.RunDirError, match=f"is in use by process {os.getpid()}"):
        output_dir.lock(out)
    held.close()  # (a process that ends, even killed, releases it)
    output_dir.lock(out).close()


def test_a_save_killed_between_its_last_write_and_its_rename_is_not_lost(tmp_path):
    """The save of step 4 wrote everything (its recipe_state.json too), set an earlier save of step 4 aside, and
    was killed before the rename: the staging folder is the only complete copy of step 4, so the next start
    renames it instead of deleting it (the old code deleted it and resumed from an older step). An incomplete
    staging folder is still deleted."""
    import torch
    from safetensors.torch import save_file

    ckpts = tmp_path / "checkpoints"
    for step in (2, 4):
        staging = output_dir.stage(ckpts / f"step_{step}")
        staging.mkdir(parents=True)
        save_file({"w": torch.ones(3)}, str(staging / "model.safetensors"))
        output_dir.commit(staging, ckpts / f"step_{step}", {"step": step})
    os.replace(ckpts / "step_4", output_dir.stage(ckpts / "step_4"))  # killed before the rename
    (ckpts / ".partial-step_6").mkdir()  # killed while writing
    (ckpts / ".partial-step_6" / "model.safetensors").write_bytes(b"\0" * 4)
    assert output_dir.clear_staging(ckpts) == [ckpts / ".partial-step_6"]
    assert output_dir.newest_complete(ckpts) == (ckpts / "step_4", [])


def test_a_resume_with_other_reward_weights_is_another_run(tmp_path):
    """The weights define the objective as much as the rewards do (the old code let a resume change them
    silently); writing out the default weights is not a change."""
    cfg = RecipeConfig().to_dict()
    output_dir.write_run_config(tmp_path, cfg)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    output_dir.check_output_dir(tmp_path, {**cfg, "reward_weights": [1.0, 1.0]}, resume=True)
    with pytest.raises(output_dir.RunDirError, match=r"holds a different run: reward_weights: \[1.0, 1.0\] -> \[1.0, 0.1\]"):
        output_dir.check_output_dir(tmp_path, {**cfg, "reward_weights": [1.0, 0.1]}, resume=True)


def test_resume_into_a_folder_that_is_not_a_run_is_refused(tmp_path):
    """resume=true (the default) into another tool's folder with ``metrics.jsonl`` and ``checkpoints/step_5``:
    the old code moved step_5 into checkpoints/incomplete, rewrote the metrics file and appended to it."""
    (tmp_path / "checkpoints" / "step_5").mkdir(parents=True)
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n')
    with pytest.raises(output_dir.RunDirError, match="not a run of this recipe .* so the run would move its checkpoints"):
        output_dir.check_output_dir(tmp_path, RecipeConfig().to_dict(), resume=True)


def test_the_log_files_belong_to_the_run(tmp_path):
    """overwrite=true deletes the earlier run's log files with its other files (a new run's log starts clean)."""
    output_dir.write_run_config(tmp_path, RecipeConfig().to_dict())
    for rank in (0, 1):
        output_dir.log_file(tmp_path, rank).write_text("an earlier run's log\n")
    (tmp_path / "notes.log").write_text("the user's own\n")
    assert output_dir.clear_run(tmp_path, RecipeConfig().to_dict()) == ["run_config.json", "run.log", "run.rank1.log"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.log"]


def _damage(path: Path, data: bytes | None = None, at: float = 0.5, share: float = 0.25) -> None:
    """Overwrite part of ``path`` in place (its size kept): ``share`` of it with zeros from ``at``, or ``data``."""
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.seek(int(size * at))
        fh.write(data if data is not None else b"\0" * int(size * share))


def test_a_checkpoint_whose_contents_changed_is_skipped_by_its_checksums(tmp_path, caplog):
    """The middle quarter of step_2's model.safetensors zeroed, its size kept: the old code compared sizes and
    headers only and resumed from it silently. Each file's checksum is recorded at the save and compared when a
    resume picks its checkpoint; a checkpoint saved before checksums existed is still resumed, said in the log."""
    ckpts = tmp_path / "checkpoints"
    for step in (1, 2):
        _save(ckpts / f"step_{step}", step)
    state = json.loads((ckpts / "step_2" / output_dir.STATE_FILE).read_text())
    assert sorted(state["checksums"]) == sorted(state["files"]) == ["model.safetensors", "optimizer.bin",
                                                                    "random_states_0.pkl"]
    assert state["checksums"]["model.safetensors"] == integrity.checksum(ckpts / "step_2" / "model.safetensors")
    _damage(ckpts / "step_2" / "model.safetensors")
    assert output_dir.checkpoint_problem(ckpts / "step_2") is None  # sizes and header: all as saved
    found, skipped = output_dir.newest_complete(ckpts, verify=True)
    assert found == ckpts / "step_1", skipped
    [(path, why)] = skipped
    assert path == ckpts / "step_2" and why.startswith("model.safetensors does not match the checksum recorded at "
                                                       "its save (crc32:"), why
    assert "its contents changed after the save" in why
    # a finished run whose last checkpoint changed is not "nothing to train": the resume trains that step again
    output_dir.check_steps_left(tmp_path, 3)
    with pytest.raises(output_dir.NothingToTrain):
        output_dir.check_steps_left(tmp_path, 1)
    output_dir.check_steps_left(tmp_path, 2)
    # saved before checksums existed: resumed, and the log says its contents are not verified
    legacy = ckpts / "step_3"
    _save(legacy, 3)
    state = json.loads((legacy / output_dir.STATE_FILE).read_text())
    del state["checksums"]
    (legacy / output_dir.STATE_FILE).write_text(json.dumps(state))
    with caplog.at_level("INFO", logger="rollout_sleep.run.output_dir"):
        assert output_dir.newest_complete(ckpts, verify=True) == (legacy, [])
    assert f"checkpoint {legacy} was saved before checksums were recorded" in caplog.text


def test_the_damaged_file_of_a_checkpoint_that_fails_to_load_is_named(tmp_path):
    """A checkpoint saved before checksums (or damaged before its save) that fails to load: the old code said
    torch's bare "PytorchStreamReader failed reading file data/29" for zeros in optimizer.bin, and blamed "the
    trainer's weights diverged" for 4 KiB of 0xFF in model.safetensors. A full read names the file."""
    ckpts = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        _save(ckpts / f"step_{step}", step)
    _damage(ckpts / "step_2" / "optimizer.bin", share=0.125)
    _damage(ckpts / "step_3" / "model.safetensors", data=b"\xff" * 64, at=0.6)
    assert output_dir.damaged_file(ckpts / "step_1") is None
    opt = output_dir.damaged_file(ckpts / "step_2")
    assert opt is not None and opt.startswith("optimizer.bin is damaged (its record ") and "fails its CRC" in opt
    assert output_dir.damaged_file(ckpts / "step_3") == \
        "model.safetensors holds NaN or Inf in 'weight' (its bytes were damaged after the save)"


def test_a_run_whose_run_config_was_deleted_is_recovered_from_its_checkpoint(tmp_path, caplog):
    """run_config.json deleted, the checkpoints intact: the old code refused the resume as "not a run of this
    recipe", though every checkpoint's recipe_state.json holds the settings. Now they stand in for it (said in
    the log), and every check still holds: a fixed change is refused, the dataset record is compared."""
    cfg = RecipeConfig().to_dict()
    dataset = {"dataset_rows": 64, "dataset_fingerprint": "abc"}
    output_dir.write_run_config(tmp_path, cfg, dataset=dataset)
    staging = output_dir.stage(tmp_path / "checkpoints" / "step_2")
    staging.mkdir(parents=True)
    torch.save({"state": {}}, staging / "optimizer.bin")
    output_dir.commit(staging, tmp_path / "checkpoints" / "step_2", {"step": 2, "config": cfg, **dataset})
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    (tmp_path / output_dir.RUN_CONFIG).unlink()
    with caplog.at_level("INFO", logger="rollout_sleep.run.output_dir"):
        output_dir.check_output_dir(tmp_path, cfg, resume=True)
    assert "run_config.json is missing or unreadable in" in caplog.text and "checkpoint step_2" in caplog.text
    with pytest.raises(output_dir.RunDirError, match=r"holds a different run: train.seed: 0 -> 1"):
        output_dir.check_output_dir(tmp_path, {**cfg, "train": {**cfg["train"], "seed": 1}}, resume=True)
    output_dir.check_dataset(tmp_path, 64, "abc", "synthetic", resume=True)
    with pytest.raises(output_dir.RunDirError, match="holds a run over other rows of data.dataset 'synthetic'"):
        output_dir.check_dataset(tmp_path, 64, "abd", "synthetic", resume=True)
    (tmp_path / output_dir.RUN_CONFIG).write_text("{")  # cut by a crash: the same
    output_dir.check_output_dir(tmp_path, cfg, resume=True)


def test_a_resume_over_rows_changed_in_place_is_refused(tmp_path):
    """The same number of rows, reversed and with other answers: the old code compared the row count only and
    resumed, training the remaining steps on other prompts. The run's fingerprint of its rows is compared."""
    cfg = RecipeConfig().to_dict()
    output_dir.write_run_config(tmp_path, cfg, dataset={"dataset_rows": 8, "dataset_fingerprint": "f1"})
    output_dir.check_dataset(tmp_path, 8, "f2", "data.jsonl", resume=True)  # nothing trained yet: no order to keep
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    output_dir.check_dataset(tmp_path, 8, "f1", "data.jsonl", resume=True)
    output_dir.check_dataset(tmp_path, 8, "f2", "data.jsonl", resume=False)
    with pytest.raises(output_dir.RunDirError) as err:
        output_dir.check_dataset(tmp_path, 8, "f2", "data.jsonl", resume=True)
    msg = str(err.value)
    for said in ("holds a run over other rows of data.dataset 'data.jsonl'", "fingerprint f1, now f2",
                 "restore the dataset as it was", "a new output_dir, or resume=false overwrite=true"):
        assert said in msg, (said, msg)
    with pytest.raises(output_dir.RunDirError, match="holds a run over 8 rows of data.dataset 'data.jsonl', which now "
                                                     "gives 9"):
        output_dir.check_dataset(tmp_path, 9, "f3", "data.jsonl", resume=True)
    output_dir.write_run_config(tmp_path, cfg, dataset={"dataset_rows": 8})  # a run from before fingerprints
    output_dir.check_dataset(tmp_path, 8, "f2", "data.jsonl", resume=True)


def test_a_resume_with_other_prompt_tokens_or_reward_code_is_refused(tmp_path):
    """A reward file edited between a run and its resume (``> 5`` made ``> 1000``: its mean went 0.94 -> 0.0 under
    the same metric name), or the model folder's chat template: the old code resumed without a word. The run's
    digests of its prompts' token ids and of each reward's code are compared; a reward the run did not record
    (added since: ``rewards`` is a fixed key, refused elsewhere) and a run from before the digests are not."""
    cfg = RecipeConfig().to_dict()
    run = {"dataset_rows": 8, "dataset_fingerprint": "f1", "prompts_fingerprint": "p1",
           "rewards_fingerprint": {"fmt": "r1", "exact": "e1"}}
    output_dir.write_run_config(tmp_path, cfg, dataset=run)
    changed = {**run, "prompts_fingerprint": "p2", "rewards_fingerprint": {"fmt": "r2", "exact": "e1"}}
    output_dir.check_inputs(tmp_path, changed, resume=True)  # nothing trained yet
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    output_dir.check_inputs(tmp_path, run, resume=True)
    output_dir.check_inputs(tmp_path, changed, resume=False)
    with pytest.raises(output_dir.RunDirError) as err:
        output_dir.check_inputs(tmp_path, changed, resume=True)
    msg = str(err.value)
    for said in ("holds a run trained with other inputs: the prompts' token ids", "code of reward 'fmt'",
                 "restore them as they were", "a new output_dir, or resume=false overwrite=true"):
        assert said in msg, (said, msg)
    assert "'exact'" not in msg
    with pytest.raises(output_dir.RunDirError, match="code of reward 'fmt'"):
        output_dir.check_inputs(tmp_path, {**run, "rewards_fingerprint": {"fmt": "r2"}}, resume=True)
    # a digest of another scheme (a run saved by a version that digested code otherwise) is not compared
    output_dir.check_inputs(tmp_path, {**run, "rewards_fingerprint": {"fmt": "code2:r1"}}, resume=True)
    output_dir.write_run_config(tmp_path, cfg, dataset={"dataset_rows": 8, "dataset_fingerprint": "f1"})
    output_dir.check_inputs(tmp_path, changed, resume=True)  # a run from before the digests


def test_reward_and_prompt_digests_follow_the_code_and_the_tokens(tmp_path):
    from rollout_sleep.grpo.data import prompts_fingerprint
    from rollout_sleep.grpo.rewards import resolve_rewards, rewards_fingerprint

    rw = tmp_path / "rw.py"
    rw.write_text("def fmt(completions, **kw):\n    return [float(len(c) > 5) for c in completions]\n")
    first = rewards_fingerprint(resolve_rewards([f"{rw}:fmt", "digits_format"], load_models=False))
    assert list(first) == ["fmt"]  # the library's built-ins are the library's
    import sys
    rw.write_text("# a comment\n\ndef other():\n    pass\n\n\ndef fmt(completions, **kw):  # the same code\n"
                  "    return [float(len(c) > 5) for c in completions]\n")
    sys.modules.pop("rollout_sleep_user_rewards.rw", None)
    assert rewards_fingerprint(resolve_rewards([f"{rw}:fmt"], load_models=False)) == first  # comments, other code
    rw.write_text("def fmt(completions, **kw):\n    return [float(len(c) > 1000) for c in completions]\n")
    sys.modules.pop("rollout_sleep_user_rewards.rw", None)
    assert rewards_fingerprint(resolve_rewards([f"{rw}:fmt"], load_models=False)) != first
    assert prompts_fingerprint([[1, 2], [3]]) == prompts_fingerprint([[1, 2], [3]])
    assert prompts_fingerprint([[1, 2], [3]]) != prompts_fingerprint([[1], [2, 3]])


def test_a_checkpoint_that_cannot_be_set_aside_is_explained(tmp_path, monkeypatch):
    """A damaged step folder that cannot be moved (immutable, or another user's): the old code stopped the run
    with a raw PermissionError from os.replace, after the engine started. Now the error names the folder, why it
    is set aside and the fix."""
    import errno as errno_

    ckpts = tmp_path / "checkpoints"
    _save(ckpts / "step_1", 1)

    def refuse(src, dst):
        raise PermissionError(errno_.EPERM, "Operation not permitted", str(src), str(dst))

    monkeypatch.setattr(output_dir.os, "replace", refuse)
    with pytest.raises(output_dir.WriteError) as err:
        output_dir.set_aside(ckpts / "step_1", "optimizer.bin is truncated")
    msg = str(err.value)
    for said in (f"cannot move checkpoint {ckpts / 'step_1'} to {ckpts / 'incomplete'}",
                 "operation not permitted (errno EPERM)", "set aside because optimizer.bin is truncated",
                 "Move it out of", "by hand", "writable for this user", "then rerun"):
        assert said in msg, (said, msg)
    assert (ckpts / "step_1").is_dir()


def test_checksums_of_files_the_save_did_not_list_are_damage(tmp_path):
    """An extra key in recipe_state.json's checksums: the old code summed every key and crashed the resume with
    FileNotFoundError (or read a file outside the checkpoint, for ``../..``). Only listed files are summed; an
    unlisted checksum is a mismatch, checksums that are not a map of names to checksums are damage."""
    ckpts = tmp_path / "checkpoints"
    _save(ckpts / "step_1", 1)
    state_file = ckpts / "step_1" / output_dir.STATE_FILE
    state = json.loads(state_file.read_text())
    (tmp_path / "run_config.json").write_text("{}")
    for extra in ("gone.bin", "../../run_config.json"):
        state_file.write_text(json.dumps({**state, "checksums": {**state["checksums"], extra: "crc32:00000000"}}))
        why = output_dir.checkpoint_problem(ckpts / "step_1", verify=True)
        assert why is not None and why.startswith(f"{extra} does not match the checksum recorded at its save "
                                                  "(crc32:00000000, now file missing"), why
    for bad in (None, ["crc32:00000000"], {"model.safetensors": 5}):
        state_file.write_text(json.dumps({**state, "checksums": bad}))
        assert output_dir.checkpoint_problem(ckpts / "step_1", verify=True) == \
            "recipe_state.json is unreadable (its 'checksums' is not a map of file names to checksums)"
    state_file.write_text(json.dumps({**state, "files": {**state["files"], "../../run_config.json": 2}}))
    assert output_dir.checkpoint_problem(ckpts / "step_1") == \
        "recipe_state.json lists '../../run_config.json', a file outside the checkpoint folder"


def test_a_torch_file_overwritten_with_zeros_is_damage_without_checksums(tmp_path, caplog):
    """random_states_0.pkl zeroed in a checkpoint saved before checksums: not a zip, so the old format check
    passed it and accelerate silently failed to restore the RNG. A torch-saved file that is no zip is damaged;
    the log says an old checkpoint's check is partial."""
    ckpts = tmp_path / "checkpoints"
    legacy = _save(ckpts / "step_1", 1, legacy=True)
    with caplog.at_level("INFO", logger="rollout_sleep.run.output_dir"):
        assert output_dir.checkpoint_problem(legacy, verify=True) is None
    assert "its check is partial (sizes and formats" in caplog.text and "no checksums)" in caplog.text
    rng = legacy / "random_states_0.pkl"
    rng.write_bytes(b"\0" * rng.stat().st_size)
    why = output_dir.checkpoint_problem(legacy)
    assert why is not None and why.startswith("random_states_0.pkl is not a zip archive (") and \
        "overwritten or damaged after the save" in why, why
    rng.write_bytes(b"")
    assert output_dir.checkpoint_problem(legacy).startswith("random_states_0.pkl is empty")


def test_tie_word_embeddings_of_a_checkpoint_path_is_not_compared_on_resume(tmp_path):
    """A run saved with model.tie_word_embeddings set and model.path a checkpoint folder: the config check now
    refuses the key for a checkpoint, and the resume comparison refused dropping it (True -> None). It never had
    an effect there, so it is not compared; for a size it still is."""
    cfg = RecipeConfig().to_dict()
    ckpt = {**cfg, "model": {**cfg["model"], "path": str(tmp_path / "ckpt"), "tie_word_embeddings": True}}
    output_dir.write_run_config(tmp_path, ckpt)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    output_dir.check_output_dir(tmp_path, {**ckpt, "model": {**ckpt["model"], "tie_word_embeddings": None}},
                                resume=True)
    size = {**cfg, "model": {**cfg["model"], "path": "tiny", "tie_word_embeddings": True}}
    output_dir.write_run_config(tmp_path, size)
    with pytest.raises(output_dir.RunDirError, match="model.tie_word_embeddings: True -> None"):
        output_dir.check_output_dir(tmp_path, {**size, "model": {**size["model"], "tie_word_embeddings": None}},
                                    resume=True)

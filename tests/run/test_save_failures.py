"""Saves that cannot be written: a full disk, a read-only or misplaced checkpoints folder. Each ends in one message
naming the path, the cause and the fix (no raw traceback on the console, the traceback in the run's log), leaves
the last complete checkpoint as the one a rerun resumes from, and never a partial save that looks complete."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

from rollout_sleep.run import output_dir
from rollout_sleep.run.schema import RecipeConfig

from helpers import run_until_engine
from workers.recipe_cli import CONFIG, ENGINE_START, command, env, run


def _save(final: Path, step: int) -> Path:
    staging = output_dir.stage(final)
    staging.mkdir(parents=True)
    torch.save({"w": torch.ones(256)}, staging / "optimizer.bin")
    return output_dir.commit(staging, final, {"step": step})


def test_a_torch_write_that_fails_without_an_errno_is_named_from_the_disk(tmp_path, monkeypatch):
    """torch's writer reports a full disk as ``RuntimeError: [enforce fail at inline_container.cc:672] .
    unexpected pos``, without errno or path: the disk (no free space left) tells the cause. The partial save is
    deleted; the message names the newest complete checkpoint."""
    ckpts = tmp_path / "checkpoints"
    _save(ckpts / "step_1", 1)
    final = ckpts / "step_2"
    staging = output_dir.stage(final)
    staging.mkdir()
    (staging / "model.safetensors").write_bytes(b"x" * 1000)  # what the save had written when the disk filled
    real_usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real_usage(p)._replace(free=0))  # the full disk
    with pytest.raises(output_dir.WriteError) as err:
        with output_dir.saving(staging, final, 2):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 498240 vs 498128")
    msg = str(err.value)
    assert msg.startswith(f"cannot save the checkpoint of step 2 to {final}: no space left on device (0.0 MiB free")
    assert "The partial save was deleted" in msg and f"the newest complete checkpoint is {ckpts / 'step_1'}" in msg
    assert "free space on that disk, or set output_dir to a disk with room" in msg
    assert not staging.exists() and output_dir.newest_complete(ckpts)[0] == ckpts / "step_1"


def test_an_os_error_in_the_commit_keeps_the_earlier_save_of_the_step(tmp_path, monkeypatch):
    """Saving a step again (after a resume from an older one) sets the earlier save aside before its rename: if
    the rename fails, the earlier save must be the checkpoint again, not lost in checkpoints/incomplete."""
    ckpts = tmp_path / "checkpoints"
    _save(ckpts / "step_1", 1)
    _save(ckpts / "step_2", 2)
    staging = output_dir.stage(ckpts / "step_2")
    staging.mkdir()
    torch.save({"w": torch.zeros(256)}, staging / "optimizer.bin")
    real_replace = os.replace

    def replace(src, dst):
        if Path(src) == staging:
            raise OSError(errno.EROFS, "Read-only file system", str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(output_dir.WriteError) as err:
        with output_dir.saving(staging, ckpts / "step_2", 2):
            output_dir.commit(staging, ckpts / "step_2", {"step": 2})
    msg = str(err.value)
    assert "read-only file system (errno EROFS)" in msg and "set output_dir to a writable folder" in msg, msg
    assert f"the newest complete checkpoint is {ckpts / 'step_2'}" in msg
    assert output_dir.checkpoint_problem(ckpts / "step_2") is None and not staging.exists()
    assert torch.load(ckpts / "step_2" / "optimizer.bin")["w"].sum() == 256  # the earlier save, intact


def test_a_write_into_a_path_under_a_file_is_named(tmp_path):
    """A real OSError: a file where the checkpoints folder should be."""
    (tmp_path / "checkpoints").write_text("not a folder")
    said = (r"cannot write into .*checkpoints: file exists \(errno EEXIST\)\. The run needs it for its checkpoints: "
            r"a file stands where a folder")
    with pytest.raises(output_dir.WriteError, match=said):
        output_dir.check_writable(tmp_path / "checkpoints")


def test_a_checkpoints_folder_that_cannot_be_written_is_refused_before_the_engine_starts(tmp_path, monkeypatch):
    """A run folder whose ``checkpoints`` is a file: the old code started vLLM, trained, and failed at the first
    save with a raw FileExistsError."""
    out = tmp_path / "run"
    out.mkdir()
    output_dir.write_run_config(out, RecipeConfig().to_dict())
    (out / "checkpoints").write_text("not a folder")
    code, text = run_until_engine(monkeypatch, CONFIG, f"output_dir={out}", "wandb.mode=disabled", "train.steps=2")
    assert code == 1, text[-3000:]
    assert f"error: cannot write into {out / 'checkpoints'}: file exists (errno EEXIST)" in text, text[-3000:]
    assert ENGINE_START not in text and "Traceback" not in text


def _mount_namespace() -> bool:
    """Whether this machine lets the tests mount a small tmpfs in a private mount namespace (root on Linux)."""
    if not shutil.which("unshare") or sys.platform != "linux":
        return False
    probe = Path("/tmp") / f"mount-probe-{uuid.uuid4().hex}"
    probe.mkdir()
    try:
        return subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                               f"mount -t tmpfs -o size=1m tmpfs {probe}"], capture_output=True).returncode == 0
    finally:
        probe.rmdir()


needs_mount = pytest.mark.skipif(not _mount_namespace(), reason="needs a private mount namespace (root, Linux)")


def _in_namespace(script: str, timeout: int = 900) -> str:
    """Run ``script`` (sh) in a private mount namespace: its mounts vanish with it."""
    proc = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout, env=env())
    return proc.stdout


@needs_mount
def test_a_full_disk_during_a_save_stops_cleanly_and_a_rerun_resumes_the_last_complete_checkpoint(tmp_path):
    """A real full disk: the run's folder on a 7 MiB tmpfs holds the model and step 1, and step 2's save runs out
    of space (torch's ``unexpected pos`` RuntimeError). The old message named neither the path nor the cause."""
    disk, out = tmp_path / "disk", tmp_path / "disk" / "run"
    disk.mkdir()
    args = ("train.steps=2", "save_every=1", "train.prompts_per_step=4", "data.num_prompts=32")
    first = " ".join(command(out, *args))
    again = " ".join(command(out, *args[1:], "train.steps=1"))  # the same run, already at the step it resumes
    check = (f"{sys.executable} -c \"from pathlib import Path; from rollout_sleep.run import output_dir; "
             f"print('newest:', output_dir.newest_complete(Path('{out}/checkpoints'))[0].name); "
             f"print('entries:', sorted(p.name for p in Path('{out}/checkpoints').iterdir()))\"")
    text = _in_namespace(f"mount -t tmpfs -o size=7m tmpfs {disk} && cd {tmp_path} && ({first}; echo first-exit=$?; "
                         f"{check}; {again}; echo second-exit=$?; echo log:; cat {out}/run.log)")
    console, log = text.split("\nlog:\n", 1) if "\nlog:\n" in text else (text, "")
    assert "first-exit=1" in console, console[-4000:]
    assert f"error: cannot save the checkpoint of step 2 to {out / 'checkpoints' / 'step_2'}: no space left on " \
           "device" in console, console[-4000:]
    assert f"the newest complete checkpoint is {out / 'checkpoints' / 'step_1'} (a rerun with the same output_dir " \
           "resumes from it)" in console and "free space on that disk" in console
    assert "Traceback" not in console and "[rank0]" not in console
    assert f"The traceback is in {out / 'run.log'}" in console
    assert "Traceback" in log and "unexpected pos" in log  # kept for whoever debugs it
    assert "newest: step_1" in console and "entries: ['step_1']" in console  # the partial save is gone
    assert "second-exit=0" in console and "is already at step 1 (train.steps=1, checkpoint step_1)" in console


@needs_mount
def test_a_read_only_checkpoints_folder_is_refused_before_the_engine_starts(tmp_path):
    """A real read-only file system mounted at ``checkpoints``: named (errno EROFS) before vLLM starts."""
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    output_dir.write_run_config(out, RecipeConfig().to_dict())
    cmd = " ".join(command(out, "train.steps=2"))
    text = _in_namespace(f"mount -t tmpfs -o size=1m tmpfs {out / 'checkpoints'} && mount -o remount,ro "
                         f"{out / 'checkpoints'} && cd {tmp_path} && ({cmd}; echo exit=$?)", timeout=300)
    assert "exit=1" in text, text[-3000:]
    assert f"error: cannot write into {out / 'checkpoints'}: read-only file system (errno EROFS)" in text, text[-3000:]
    assert ENGINE_START not in text and "Traceback" not in text


def test_a_rewritten_file_is_kept_whole_when_its_write_fails(tmp_path, monkeypatch, caplog):
    """The memory plan is rewritten at every start and after the first steps. The old code wrote it with
    ``Path.write_text``, which empties the file before writing: a full disk left it empty, and every later start
    of the run stopped with ``JSONDecodeError: Expecting value: line 1 column 1`` (no file named) until it was
    deleted by hand."""
    path = tmp_path / "memory_plan.json"
    output_dir.write_atomic(path, '{"plan": 1}')

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(output_dir.WriteError, match="no space left on device"):
        with output_dir.writing(path, "write the memory plan to"):
            output_dir.write_atomic(path, '{"plan": 2, "measured_gib": {}}')
    monkeypatch.undo()
    assert path.read_text() == '{"plan": 1}' and sorted(p.name for p in tmp_path.iterdir()) == ["memory_plan.json"]
    path.write_text("")  # what the old code's failed write left
    with caplog.at_level("WARNING", logger="rollout_sleep.run.output_dir"):
        assert output_dir.read_json(path, "the memory plan") == {}
    assert f"the memory plan {path} cannot be read" in caplog.text and "written anew" in caplog.text


def test_an_emptied_memory_plan_does_not_stop_the_next_run(tmp_path):
    """The real recipe over a run folder whose memory_plan.json a failed write emptied: it runs, and writes the
    plan anew (the old code stopped before the engine with a bare JSONDecodeError, at every start)."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "memory_plan.json").write_text("")
    code, text = run(out, "train.steps=1", "train.prompts_per_step=4", "data.num_prompts=8", timeout=600)
    assert code == 0, text[-3000:]
    assert "JSONDecodeError" not in text
    assert "plan" in json.loads((out / "memory_plan.json").read_text())
    assert f"the memory plan {out / 'memory_plan.json'} cannot be read" in (out / "run.log").read_text()


def test_a_model_build_that_fails_leaves_nothing_that_looks_built(tmp_path):
    """The random-weight model of a size is built in a staging folder and renamed once whole: a build that fails
    (a full disk) is named and leaves no ``model`` folder; one left by an older build that did not finish (its
    config written, its weights cut or its builder's mark missing) is found and built again."""
    from rollout_sleep.weights.checkpoints import make_checkpoint

    path = tmp_path / "model"

    def full(folder):
        folder.mkdir()
        (folder / "config.json").write_text("{}")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(output_dir.WriteError, match=r"cannot build the model in .*model: no space left on device "
                                                     r"\(errno ENOSPC\)\. The partial build was deleted\. Free space"):
        output_dir.build_model(path, full, "the model")
    assert list(tmp_path.iterdir()) == []
    assert output_dir.build_model(path, lambda f: make_checkpoint(f, "tiny", dtype="float32"), "the model") is None
    assert output_dir.model_problem(path) is None
    assert output_dir.build_model(path, full, "the model") is None  # whole: kept, not built again
    weights = path / "model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[:len(whole) // 2])  # a build killed while writing its weights
    assert "model.safetensors is truncated" in output_dir.model_problem(path)
    redone = output_dir.build_model(path, lambda f: make_checkpoint(f, "tiny", dtype="float32"), "the model")
    assert "model.safetensors is truncated" in redone and weights.read_bytes() == whole
    config = json.loads((path / "config.json").read_text())
    del config["rollout_sleep"]  # the builder's last step never came
    (path / "config.json").write_text(json.dumps(config))
    assert output_dir.model_problem(path) == "its config.json lacks the build's last step (the build did not finish)"


def test_a_model_folder_left_by_a_killed_build_is_built_again(tmp_path):
    """The real recipe over a run folder whose ``model`` a killed (or full-disk) build left with cut weights: the
    old code took it for built, and every start stopped with ``SafetensorError: Error while deserializing header:
    incomplete metadata`` (no file named) until it was deleted by hand."""
    from rollout_sleep.weights.checkpoints import make_checkpoint

    out = tmp_path / "run"
    make_checkpoint(out / "model", "tiny", dtype="float32")
    weights = out / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    code, text = run(out, "train.steps=1", "train.prompts_per_step=4", "data.num_prompts=8", timeout=600)
    assert code == 0, text[-3000:]
    assert f"rebuilt {out / 'model'}: the earlier build was incomplete (model.safetensors is truncated" in text, \
        text[-3000:]
    assert output_dir.model_problem(out / "model") is None and "SafetensorError" not in text


def test_a_model_folder_built_without_weights_is_built_again_where_the_trainer_needs_them(tmp_path):
    """A run whose trainer viewed vLLM's random weights (one copy, or a LoRA run's shared base, on CUDA) built
    ``out/model`` as a config alone; the same settings where the trainer loads its own copy (the CPU, or two
    copies) took that folder as built, started vLLM, and stopped with transformers' "no file named
    model.safetensors". Now the folder is built again with its weights, and the reason is returned; a run that
    views the engine's weights keeps it."""
    from rollout_sleep.weights.checkpoints import make_checkpoint, make_config_dir

    path = tmp_path / "model"
    make_config_dir(path, "tiny", dtype="float32")
    assert output_dir.model_problem(path) is None  # whole, for a run that views vLLM's weights
    build = lambda f: make_checkpoint(f, "tiny", dtype="float32")  # noqa: E731
    assert output_dir.build_model(path, build, "the model", needs_weights=False) is None
    assert not list(path.glob("*.safetensors"))
    redone = output_dir.build_model(path, build, "the model", needs_weights=True)
    assert redone == ("the earlier run built its config alone (its trainer viewed vLLM's random weights), and this "
                      "run's trainer loads its own copy")
    assert list(path.glob("*.safetensors")) and output_dir.model_problem(path) is None
    assert output_dir.build_model(path, build, "the model", needs_weights=True) is None  # built: kept

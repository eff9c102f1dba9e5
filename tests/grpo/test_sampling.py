"""Which prompts each step trains on: the whole dataset, epoch by epoch (a fresh seeded permutation each),
the same rows after a resume, and datasets too small for one step refused before vLLM starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest

from rollout_sleep.grpo.data import epoch_order, step_rows
from rollout_sleep.run import output_dir
from rollout_sleep.run.schema import RecipeConfig

from helpers import RECIPE, ROOT, overridden, run_until_engine


CONFIG = ROOT / "configs" / "tiny-cpu.yaml"
ENGINE_START = "starting the vLLM engine"


def test_steps_read_every_row_once_per_epoch_in_a_fresh_order():
    rows, per_step = 20, 8
    stream = [i for s in range(10) for i in step_rows(s, rows, per_step, seed=0)]  # 80 rows: 4 epochs
    epochs = [stream[e * rows:(e + 1) * rows] for e in range(4)]
    for e, epoch in enumerate(epochs):
        assert sorted(epoch) == list(range(rows))  # every row once per epoch
        assert epoch == list(epoch_order(e, rows, 0))
    assert len({tuple(e) for e in epochs}) == 4  # each epoch its own permutation
    # step 2 (rows 16-23 of the stream) crosses the first epoch's end: it continues into the second permutation
    assert step_rows(2, rows, per_step, 0) == list(epoch_order(0, rows, 0)[16:]) + list(epoch_order(1, rows, 0)[:4])
    assert step_rows(0, 1000, 8, seed=0) != step_rows(0, 1000, 8, seed=1)  # the seed decides the order
    assert max(i for s in range(2) for i in step_rows(s, 64, 8, seed=0)) >= 16  # not only the first 2 x 8 rows


def _write_task(tmp_path: Path, rows: int) -> tuple[Path, Path]:
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1=", "row_id": i}) + "\n" for i in range(rows)))
    rec = tmp_path / "rec.py"
    rec.write_text(textwrap.dedent("""
        import json, os

        def record(prompts, completions, row_id, **kwargs):
            with open(os.environ["RECORD_ROWS"], "a") as fh:
                fh.write(json.dumps(list(row_id)) + "\\n")
            return [float(len(c)) for c in completions]
    """))
    return data, rec


def _args(out: Path, data: Path, rec: Path, overrides) -> list[str]:
    return overridden([f"output_dir={out}", f"data.dataset={data}", f"rewards=[{rec}:record]", "train.generations=2",
                       "train.max_tokens=2", "engine.verify_every=0", "wandb.mode=disabled", "save_every=0",
                       "train.update_check_every=0", "train.memory_plan=off"], overrides)


def _run(out: Path, record: Path, data: Path, rec: Path, *overrides: str, timeout: int = 600):
    cmd = [sys.executable, str(RECIPE), "--config", str(CONFIG), *_args(out, data, rec, overrides)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "VLLM_LOGGING_LEVEL": "WARNING", "RECORD_ROWS": str(record)})


def _steps(record: Path) -> list[Counter]:
    return [Counter(json.loads(line)) for line in record.read_text().splitlines()]


def test_recipe_draws_from_the_whole_dataset_and_a_resume_draws_the_same_rows(tmp_path):
    """40 rows, 3 steps of 8 prompts, data.num_prompts unset (all rows): the old code drew only from rows 0-23
    (steps x prompts_per_step) and, resumed with more steps, from another set again. Steps 1-2 run in one go,
    step 3 after a resume that extends train.steps: together they draw the same rows as 3 steps in one go."""
    data, rec = _write_task(tmp_path, 40)
    expected = [Counter(step_rows(s, 40, 8, seed=0) * 2) for s in range(3)]  # 2 completions per prompt
    first = _run(tmp_path / "run", tmp_path / "first.rows", data, rec, "train.steps=2")
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    rest = _run(tmp_path / "run", tmp_path / "rest.rows", data, rec, "train.steps=3")
    assert rest.returncode == 0 and "(step 2)" in rest.stdout, rest.stdout[-2000:] + rest.stderr[-3000:]
    assert "data order" not in rest.stdout + rest.stderr  # extending the run no longer changes the order
    assert _steps(tmp_path / "first.rows") == expected[:2]  # uninterrupted: step by step as drawn up front
    assert _steps(tmp_path / "rest.rows") == expected[2:]
    assert len(set().union(*expected)) == 24 and max(set().union(*expected)) >= 24  # beyond rows 0-23


@pytest.mark.parametrize("overrides, message", [
    (["train.prompts_per_step=8"], "data.dataset {data!r} gives 5 rows, fewer than train.prompts_per_step (8): "
                                   "every step would repeat prompts within itself. Lower train.prompts_per_step "
                                   "to 5 or less"),
    (["train.prompts_per_step=4", "data.num_prompts=6"],
     "data.dataset {data!r} cannot be used: it has 5 rows, fewer than data.num_prompts=6"),
])
def test_a_dataset_too_small_is_refused_before_vllm_starts(tmp_path, monkeypatch, overrides, message):
    """The old code trained on it, each step holding some prompts two or three times (a row per position
    modulo the dataset), or took data.num_prompts larger than the dataset as all rows without a word."""
    data, rec = _write_task(tmp_path, 5)
    code, out = run_until_engine(monkeypatch, CONFIG, *_args(tmp_path / "run", data, rec, overrides))
    assert code == 2 and message.format(data=str(data)) in out, out[-3000:]
    assert ENGINE_START not in out and not (tmp_path / "run").exists()


def test_extending_train_steps_keeps_the_run_and_its_order(tmp_path, caplog):
    """``train.steps`` no longer sizes the prompt set: a resume with more steps is the same run, said nothing
    about a changed order (the old code warned that it changed, and it did)."""
    cfg = RecipeConfig().to_dict()
    output_dir.write_run_config(tmp_path, cfg)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    longer = json.loads(json.dumps(cfg))
    longer["train"]["steps"] = 20
    with caplog.at_level("WARNING", logger="rollout_sleep.run.output_dir"):
        output_dir.check_output_dir(tmp_path, longer, resume=True)
    assert caplog.text == ""
    longer["data"]["num_prompts"] = 96  # another prompt set: another run
    with pytest.raises(output_dir.RunDirError, match="holds a different run: data.num_prompts: None -> 96 "):
        output_dir.check_output_dir(tmp_path, longer, resume=True)


def test_a_resume_over_a_dataset_with_other_rows_is_refused_before_vllm(tmp_path):
    """Each step's rows are drawn from the dataset's row count: a dataset file that grew (or shrank) between a run
    and its resume gives every later step another order (rows of the current epoch trained twice, others never).
    The old code resumed without a word; the count is recorded with the run and a resume over another is refused,
    before vLLM starts, with both counts and the fix. So is a resume after the reward's code changed (its metric
    went 0.94 -> 0.0 under the same name, without a word)."""
    data, rec = _write_task(tmp_path, 8)
    first = _run(tmp_path / "run", tmp_path / "first.rows", data, rec, "train.steps=1", "train.prompts_per_step=4")
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    with open(data, "a") as fh:  # the user appended rows to the file
        fh.write("".join(json.dumps({"prompt": f"{i}+1=", "row_id": i}) + "\n" for i in range(8, 12)))
    rest = _run(tmp_path / "run", tmp_path / "rest.rows", data, rec, "train.steps=2", "train.prompts_per_step=4",
                timeout=300)
    out = rest.stdout + rest.stderr
    assert rest.returncode == 1, out[-3000:]
    assert (f"output_dir {str(tmp_path / 'run')!r} holds a run over 8 rows of data.dataset {str(data)!r}, which now "
            f"gives 12") in out, out[-3000:]
    assert "restore the dataset" in out and ENGINE_START not in out and "Traceback" not in out, out[-3000:]
    assert not (tmp_path / "rest.rows").exists()  # no step ran
    assert output_dir.logged_steps(tmp_path / "run" / "metrics.jsonl") == [1]
    assert json.loads((tmp_path / "run" / output_dir.RUN_CONFIG).read_text())["dataset_rows"] == 8
    # the rows restored, the reward's code edited (the same name, another objective): refused the same way
    data.write_text("".join(json.dumps({"prompt": f"{i}+1=", "row_id": i}) + "\n" for i in range(8)))
    rec.write_text(rec.read_text().replace("float(len(c))", "float(len(c) > 1000)"))
    rest = _run(tmp_path / "run", tmp_path / "rest.rows", data, rec, "train.steps=2", "train.prompts_per_step=4",
                timeout=300)
    out = rest.stdout + rest.stderr
    assert rest.returncode == 1 and "holds a run trained with other inputs: code of reward 'record'" in out, out[-3000:]
    assert ENGINE_START not in out and not (tmp_path / "rest.rows").exists(), out[-3000:]

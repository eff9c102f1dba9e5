"""Dataset files the recipe cannot read are named with the file, the line and the fix, before vLLM starts; prompts
too long for the context vLLM will use are refused even when ``engine.max_model_len`` is null (the model's own
context). The old code said "'utf-8' codec can't decode byte 0xff in position 0", or "An error occurred while
generating the dataset", or failed at step 1 inside vLLM."""

from __future__ import annotations

import json

import pytest

import rollout_sleep.grpo.files as files_module
from rollout_sleep.grpo.data import load_prompts, model_context, rows_fingerprint, synthetic_arithmetic

from helpers import ROOT, run_until_engine


CONFIG = ROOT / "configs" / "tiny-cpu.yaml"
ENGINE_START = "starting the vLLM engine"

GOOD = b'{"prompt": "1+1=", "answer": "2"}\n'
CASES = {
    "latin1.jsonl": (GOOD + b'{"prompt": "caf\xe9", "answer": "2"}\n',
                     "is not UTF-8 text: line 2 has byte 0xe9 at byte 16 of the line (invalid continuation byte). "
                     "Save the file as UTF-8"),
    "bom.jsonl": (b"\xff\xfe" + GOOD, "is UTF-16 text (it starts with a UTF-16 byte-order mark), not UTF-8"),
    # UTF-32 LE's mark begins with UTF-16 LE's: named for what it is
    "utf32.jsonl": (GOOD.decode().encode("utf-32"), "is UTF-32 text (it starts with a UTF-32 byte-order mark)"),
    "utf32be.jsonl": (b"\x00\x00\xfe\xff" + GOOD.decode().encode("utf-32-be"), "is UTF-32 text"),
    "latin1.csv": (b"prompt,answer\n1+1=,2\ncaf\xe9,3\n", "is not UTF-8 text: line 3 has byte 0xe9 at byte 4"),
    "comma.jsonl": (GOOD + b'{"prompt": "2+2=",}\n' + GOOD, "line 2 is not valid JSON (Expecting property name"),
    "list.jsonl": (GOOD + b'["2+2=", "4"]\n', "line 2 is a JSON list, not an object"),
    "broken.json": (b'[{"prompt": "1+1="},\n {"prompt": "2+2="]\n', "is not valid JSON: Expecting ',' delimiter at "
                                                                    "line 2, column 19"),
    "ragged.csv": (b"prompt,answer\n1+1=,2\n2+2=,4,5\n", "line 3 has 3 fields, the header has 2 (prompt, answer)"),
    "junk.parquet": (b"not parquet at all", "cannot be read: ArrowInvalid: Parquet magic bytes not found"),
    # a row short of fields: pandas fills the rest with null (or shifts the values left) without a word
    "short.csv": (b"prompt,answer,level\n1+1=,2,easy\n2+2=,easy\n3+3=,6,hard\n",
                  "line 3 has 2 fields, the header has 3 (prompt, answer, level)"),
    # a quoted field over two lines: the row after it starts on line 4 of the file, not 3
    "multiline.csv": (b'prompt,answer\n"two\nlines",2\n2+2=,4,5\n', "line 4 has 3 fields, the header has 2"),
}


@pytest.mark.parametrize("name", CASES)
def test_unreadable_files_are_named_with_the_line_and_the_fix(tmp_path, name):
    content, message = CASES[name]
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError) as err:
        load_prompts(str(path))
    assert str(err.value).startswith(f"dataset file {str(path)!r}") and message in str(err.value), str(err.value)


def test_a_suffix_in_capitals_is_the_same_format(tmp_path):
    """DATA.JSONL and data.CSV are JSON Lines and CSV (checked, then read), as their lower-case names are."""
    from rollout_sleep.run.config import load_config

    two = GOOD + b'{"prompt": "2+2=", "answer": "4"}\n'
    for name, content in (("DATA.JSONL", two), ("data.CSV", b"prompt,answer\n1+1=,2\n2+2=,4\n")):
        path = tmp_path / name
        path.write_bytes(content)
        assert list(load_prompts(str(path))["prompt"]) == ["1+1=", "2+2="]
        load_config(None, [f"data.dataset={path}"])
    bad = tmp_path / "BAD.JSONL"
    bad.write_bytes(GOOD + b'{"prompt": "\xe9"}\n')
    with pytest.raises(ValueError, match="is not UTF-8 text: line 2"):
        load_prompts(str(bad))


def test_a_folder_names_the_file_inside_it(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.jsonl").write_bytes(GOOD)
    (tmp_path / "data" / "b.jsonl").write_bytes(b'{"prompt": "\xff"}\n')
    with pytest.raises(ValueError, match=f"dataset file '{tmp_path / 'data' / 'b.jsonl'}' is not UTF-8 text: line 1"):
        load_prompts(str(tmp_path / "data"))


def test_the_encoding_check_reads_in_chunks_and_still_finds_the_line(tmp_path, monkeypatch):
    path = tmp_path / "d.jsonl"
    path.write_bytes(GOOD * 3 + '{"prompt": "\u00e9\u00e9'.encode() + b'\xe9"}\n')
    for chunk in (1, 2, 3, 7, 64):
        monkeypatch.setattr(files_module, "_CHUNK", chunk)
        with pytest.raises(ValueError, match="line 4 has byte 0xe9 at byte 17 of the line"):
            load_prompts(str(path))


def test_a_non_utf8_file_is_refused_by_the_recipe_before_vllm(tmp_path, monkeypatch):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(CASES["latin1.jsonl"][0])
    code, out = run_until_engine(monkeypatch, CONFIG, f"output_dir={tmp_path / 'run'}",
                                 f"data.dataset={path}", "wandb.mode=disabled")
    assert code == 2, out[-3000:]
    assert f"data.dataset {str(path)!r} cannot be used: dataset file {str(path)!r} is not UTF-8 text: line 2" in out
    assert ENGINE_START not in out and "Traceback" not in out, out[-3000:]


def test_the_fingerprint_follows_the_rows_not_the_file(tmp_path):
    """A resume compares the rows' fingerprint with the run's (rollout_sleep.run.output_dir.check_dataset): it must
    change when the rows do with their count kept (reversed, an answer changed) and stay when the file is only
    rewritten as it was (datasets' own ``_fingerprint`` follows the file's modification time)."""
    path = tmp_path / "rows.jsonl"
    rows = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    first = rows_fingerprint(load_prompts(str(path)))
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))  # rewritten as it was: a new mtime
    assert rows_fingerprint(load_prompts(str(path))) == first
    path.write_text("".join(json.dumps(r) + "\n" for r in reversed(rows)))
    assert rows_fingerprint(load_prompts(str(path))) != first
    path.write_text("".join(json.dumps({**r, "answer": "0"} if i == 3 else r) + "\n" for i, r in enumerate(rows)))
    assert rows_fingerprint(load_prompts(str(path))) != first
    assert rows_fingerprint(load_prompts(str(path), n=4)) != rows_fingerprint(load_prompts(str(path)))
    # the built-in task: the same rows from the same seed
    assert rows_fingerprint(synthetic_arithmetic(64, 0)) == rows_fingerprint(load_prompts("synthetic", n=64))


def test_the_context_rule_is_vllms(engine, ckpts):
    """With ``max_model_len`` unset, vLLM took the length :func:`model_context` predicts."""
    assert model_context(ckpts["tied0"]) == (engine.llm.llm_engine.model_config.max_model_len,
                                             "max_position_embeddings")


def test_a_prompt_longer_than_the_models_context_is_refused_before_vllm(tmp_path, monkeypatch):
    """``engine.max_model_len=null``: the context is the model's (1024 tokens for the tiny model); a longer prompt
    made vLLM refuse the request at step 1, after its start."""
    path = tmp_path / "long.jsonl"
    rows = [{"prompt": "1+1="}] * 7 + [{"prompt": "1+1= " * 400}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out = run_until_engine(monkeypatch, CONFIG, f"output_dir={tmp_path / 'run'}",
                                 f"data.dataset={path}", "engine.max_model_len=null", "rewards=[digits_format]",
                                 "wandb.mode=disabled")
    assert code == 2, out[-3000:]
    assert "1 prompt(s) have >= the model's max_position_embeddings (1024) tokens, leaving no room for a completion, " \
           "e.g. row 7: " in out, out[-3000:]
    assert ENGINE_START not in out, out[-3000:]
    # exit code 2: nothing written (the old code had locked the folder, written run_config.json and run.log, and
    # built model/ to read the tokenizer from: a built-in size's tokenizer is now read from a temporary folder)
    assert not (tmp_path / "run").exists(), sorted(p.name for p in (tmp_path / "run").iterdir())


ROPE = {  # rope parameters a config.json may hold, as transformers 5 writes them or as older configs do
    "linear": {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}},
    "dynamic": {"rope_parameters": {"rope_type": "dynamic", "factor": 3.0, "rope_theta": 1e6}},
    "yarn": {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256,
                                 "rope_theta": 1e6}},
    "llama3": {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 128,
                                   "rope_theta": 1e6}},
    "legacy_linear": {"rope_scaling": {"type": "linear", "factor": 2.0}},
}


@pytest.fixture(scope="module")
def rope_models(tmp_path_factory):
    import shutil

    from rollout_sleep.weights.checkpoints import make_checkpoint

    root = tmp_path_factory.mktemp("rope")
    base = make_checkpoint(root / "base", "tiny", dtype="float32")
    out = {}
    for name, keys in ROPE.items():
        path = shutil.copytree(base, root / name)
        config = json.loads((path / "config.json").read_text())
        config.update(keys)
        (path / "config.json").write_text(json.dumps(config))
        out[name] = str(path)
    return out


@pytest.mark.parametrize("name", ROPE)
def test_the_context_of_a_rope_scaled_model_is_the_one_vllm_derives(rope_models, name):
    """The old code gave up on any RoPE scaling (no check at all: every Llama 3.1/3.2 checkpoint has one), so a
    prompt too long for the context reached vLLM, which refused it at the first step. vLLM multiplies
    max_position_embeddings by the factor for linear/dynamic scaling, not for YaRN or Llama 3's, whose
    max_position_embeddings is already the scaled length."""
    from vllm.config import ModelConfig

    length, key = model_context(rope_models[name])
    assert length == ModelConfig(model=rope_models[name], dtype="float32").max_model_len
    assert key.startswith("max_position_embeddings")


def test_a_prompt_longer_than_a_rope_scaled_context_is_refused_before_vllm(tmp_path, rope_models, monkeypatch):
    path = tmp_path / "long.jsonl"
    rows = [{"prompt": "1+1="}] * 7 + [{"prompt": "1+1= " * 400}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out = run_until_engine(monkeypatch, CONFIG, f"output_dir={tmp_path / 'run'}",
                                 f"model.path={rope_models['yarn']}", f"data.dataset={path}",
                                 "engine.max_model_len=null", "rewards=[digits_format]", "wandb.mode=disabled")
    assert code == 2, out[-3000:]
    assert "1 prompt(s) have >= the model's max_position_embeddings (1024) tokens" in out, out[-3000:]
    assert ENGINE_START not in out, out[-3000:]


def test_a_csv_with_quoted_newlines_a_bom_and_blank_lines_loads(tmp_path):
    path = tmp_path / "ok.csv"
    path.write_bytes(b'\xef\xbb\xbfprompt,answer,note\n"two\nlines",2,\n\n"a, b",3,"x ""y"""\n')
    ds = load_prompts(str(path))
    assert ds["prompt"] == ["two\nlines", "a, b"] and ds["note"] == [None, 'x "y"']


def test_a_max_model_len_beyond_the_models_context_is_refused_before_vllm(tmp_path, monkeypatch):
    """engine.max_model_len=2048 for the tiny model (1024 positions): vLLM refuses to start with it, and the old
    code let it try (a pydantic ValidationError traceback after 'starting the vLLM engine')."""
    code, out = run_until_engine(monkeypatch, CONFIG, f"output_dir={tmp_path / 'run'}",
                                 "engine.max_model_len=2048", "wandb.mode=disabled")
    assert code == 2, out[-3000:]
    assert ("engine.max_model_len (2048) exceeds the model's context, its max_position_embeddings (1024): vLLM "
            "refuses to start with it") in out, out[-3000:]
    assert ENGINE_START not in out and "Traceback" not in out, out[-3000:]


def test_engine_context_is_the_setting_within_the_models(rope_models, monkeypatch):
    from rollout_sleep.grpo.data import engine_context

    assert engine_context(rope_models["linear"], None) == (2048, "the model's max_position_embeddings × its RoPE "
                                                                 "scaling factor 2")
    assert engine_context(rope_models["linear"], 2048) == (2048, "engine.max_model_len")
    with pytest.raises(ValueError, match=r"engine.max_model_len \(4096\) exceeds the model's context"):
        engine_context(rope_models["linear"], 4096)
    monkeypatch.setenv("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")  # vLLM's own way past it: allowed
    assert engine_context(rope_models["linear"], 4096) == (4096, "engine.max_model_len")


def test_a_column_of_text_and_numbers_is_refused_not_decoded(tmp_path):
    """datasets reads a column holding text in some rows and numbers in others as JSON and decodes "007" to 7
    (measured: the answers ["007", 7] came back as [7, 7]): a reward comparing answers scored changed values.
    Columns of lists or mappings (conversations) are not touched, and one type per column loads as before."""
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"prompt": "a", "answer": "007"}\n{"prompt": "b", "answer": 7}\n')
    with pytest.raises(ValueError, match=r"column 'answer' holds values of several types in the file .*\"007\" "
                                         r"becomes 7.* quote every value as text \(\"answer\": \"7\"\)"):
        load_prompts(str(mixed))
    (tmp_path / "text.jsonl").write_text('{"prompt": "a", "answer": "007"}\n{"prompt": "b", "answer": "7"}\n')
    assert list(load_prompts(str(tmp_path / "text.jsonl"))["answer"]) == ["007", "7"]
    chats = tmp_path / "chats.jsonl"  # messages whose keys differ from row to row stay a conversation
    chats.write_text('{"prompt": [{"role": "user", "content": "hi"}], "meta": {"a": 1}}\n'
                     '{"prompt": [{"role": "user", "content": "yo", "name": "x"}], "meta": {"b": "z"}}\n')
    assert len(load_prompts(str(chats))) == 2


CHANGED = {  # values datasets would hand a reward changed: named by file, row or line, and the fix
    "zip.csv": ("prompt,answer\nzip of Boston?,02108\n1+1=,2\n",
                "column 'answer', data row 1 holds '02108', which pandas reads as the number 2108"),
    "mixed.csv": ("prompt,answer\n3+9=,12\nhalf of 5=,2.5\n",
                  "column 'answer', data row 1 holds '12', which pandas reads as the number 12.0"),
    "na.csv": ("prompt,answer\n1+1=,NA\n2+2=,4\n", "column 'answer', data row 1 holds 'NA', which pandas reads as "
                                                    "missing"),
    "index.csv": (",prompt,answer\n0,q1,02108\n", "column 'answer', data row 1 holds '02108'"),  # pandas' to_csv
    "bool.csv": ("prompt,answer\nis 2 even?,TRUE\nis 3 even?,false\n",
                 "column 'answer', data row 1 holds 'TRUE', which pandas reads as the boolean True"),
    "mixed.jsonl": ('{"prompt": "3+9=", "answer": 12}\n{"prompt": "half of 5=", "answer": 2.5}\n',
                    "dataset column 'answer' holds whole numbers (12 in mixed.jsonl line 1) and fractional ones "
                    "(2.5 in mixed.jsonl line 2): datasets reads them all as floats, so 12 comes back as 12.0"),
    # nested: datasets types every field of a mapping, and a list's items, as it does a column
    "nested.jsonl": ('{"prompt": "q1", "answer": {"value": "007"}}\n{"prompt": "q2", "answer": {"value": 7}}\n',
                     "dataset column 'answer' (its field 'value') holds text that reads as JSON ('007' in "
                     "nested.jsonl line 1) beside numbers: datasets stores such a place as JSON and decodes that text, "
                     "so '007' comes back as 7"),
    "nan.jsonl": ('{"prompt": "q1", "answer": {"v": 1}}\n{"prompt": "q2", "answer": {"v": NaN}}\n',
                  "dataset column 'answer' (its field 'v') holds whole numbers (1 in nan.jsonl line 1)"),
    "quoted.jsonl": ('{"prompt": "q1", "answer": ["x"]}\n{"prompt": "q2", "answer": "\\"yes\\""}\n',
                     "so '\"yes\"' comes back as 'yes'"),
    "container.jsonl": ('{"prompt": "q1", "answer": ["x"]}\n{"prompt": "q2", "answer": "12"}\n',
                        "dataset column 'answer' holds text that reads as JSON ('12' in container.jsonl line 2) beside "
                        "lists or mappings"),
    "list.jsonl": ('{"prompt": "q1", "answer": [1, 2.5]}\n{"prompt": "q2", "answer": [3]}\n',
                   "dataset column 'answer' (its list's items) holds whole numbers (1 in list.jsonl line 1)"),
}


@pytest.mark.parametrize("name", CHANGED)
def test_values_datasets_would_change_are_named(tmp_path, name):
    """The built-in ``arithmetic_exact`` scored the correct completion "12" 0.0 against a JSON Lines answer 12 read
    back as 12.0 (a 2.5 elsewhere in the column), "02108" against a CSV cell read as 2108, and "NA" was read as no
    value, each without a word (the recipe refuses such a column where a reward reads it)."""
    from rollout_sleep.grpo.files import value_changes

    text, said = CHANGED[name]
    (tmp_path / name).write_text(text)
    assert said in value_changes(str(tmp_path / name))["answer"]
    load_prompts(str(tmp_path / name))  # loads: which columns matter is the recipe's to say


def test_values_that_come_back_as_written_are_not_named(tmp_path):
    """Ordinary floats, text, a single column with a whitespace-only line, an empty CSV, datasets' own metadata
    beside the data: nothing to say."""
    from rollout_sleep.grpo.files import value_changes

    (tmp_path / "f.csv").write_text("prompt,answer,price\nq1,a,1.50\nq2,b,.5\nq3,c,1e-5\nq4,d,100.00\n")
    (tmp_path / "w.csv").write_text("prompt\nhello\n   \n5x\n")
    (tmp_path / "h.csv").write_text("prompt,answer\n")
    (tmp_path / "ok.jsonl").write_text('{"prompt": "x", "answer": 1.0, "n": 1}\n{"prompt": "y", "answer": 2.5, "n": 2}\n')
    # nested places of several types that datasets stores as JSON and hands back as written
    (tmp_path / "nested.jsonl").write_text('{"prompt": "x", "m": {"v": "Paris", "b": true, "l": [1, "a"]}}\n'
                                           '{"prompt": "y", "m": {"v": 7, "b": 2, "l": [2.5]}, "k": [[1, 2], [3]]}\n'
                                           '{"prompt": "z", "j": {"v": {"x": 1}}}\n{"prompt": "w", "j": {"v": 5}}\n'
                                           '{"prompt": "u", "j": {"v": {"x": 2.5}}}\n')  # below a JSON place
    for name in ("f.csv", "w.csv", "h.csv", "ok.jsonl", "nested.jsonl"):
        assert value_changes(str(tmp_path / name)) == {}, name
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.jsonl").write_text('{"prompt": "1+0=", "answer": 1}\n')
    (folder / "b.jsonl").write_text('{"prompt": "James Bond?", "answer": "007"}\n')
    (folder / "dataset_info.json").write_text('{\n "description": ""\n}\n')
    assert "holds text ('007' in b.jsonl line 1) and numbers (1 in a.jsonl line 1)" in value_changes(str(folder))["answer"]
    (folder / "b.jsonl").write_text('{"prompt": "2+0=", "answer": true}\n')
    assert "holds booleans (True in b.jsonl line 1) and numbers" in value_changes(str(folder))["answer"]


def test_a_csv_chunk_typed_apart_is_named(tmp_path):
    """datasets reads a CSV 10,000 rows at a time and types each chunk: zero-padded numbers after 10,000 rows of
    text came back "0", "1", ... from "0000", "0001"."""
    from rollout_sleep.grpo.files import value_changes

    rows = [f"s{i},w{i}" for i in range(10_000)] + [f"c{i},{i:04d}" for i in range(3)]
    (tmp_path / "c.csv").write_text("prompt,answer\n" + "\n".join(rows) + "\n")
    assert "data row 10001 holds '0000', which pandas reads as the number 0" in value_changes(str(tmp_path / "c.csv"))["answer"]


def test_the_recipe_refuses_a_changed_column_a_reward_reads_and_warns_about_others(tmp_path, monkeypatch):
    from helpers import EngineReached, load_recipe, stop_at_engine

    data = tmp_path / "d.csv"
    data.write_text("prompt,answer,price\n" + "".join(f"{i}+1=,0{i + 1},{i}\n" for i in range(8)))
    recipe = load_recipe()
    stop_at_engine(monkeypatch, recipe)
    args = [f"output_dir={tmp_path / 'run'}", f"data.dataset={data}", "wandb.mode=disabled", "train.memory_plan=off"]
    with pytest.raises(recipe.ConfigError, match="column 'answer', data row 1 holds '01', which pandas reads as the "
                                                 "number 1"):
        recipe.GRPORecipe(recipe.load_config(str(CONFIG), args + ["rewards=[arithmetic_exact]"])).setup()
    import logging

    said = []  # the recipe's logging does not propagate to pytest's root handler: listen on the logger itself
    listener = logging.Handler(logging.WARNING)
    listener.emit = lambda record: said.append(record.getMessage())
    logger = logging.getLogger("rollout_sleep.grpo.data")
    logger.addHandler(listener)
    try:
        with pytest.raises(EngineReached):
            recipe.GRPORecipe(recipe.load_config(str(CONFIG), args + ["rewards=[digits_format]"])).setup()
    finally:
        logger.removeHandler(listener)
    assert any("column 'answer', data row 1 holds '01'" in m and "no reward names the column" in m for m in said), said


def test_unclear_dataset_mistakes_are_named_with_the_cause_and_the_fix(tmp_path):
    """Each raised before vLLM, but said as datasets' own words ("If using all scalar values, you must pass an
    index", "Unknown split "train"", "New column name prompt already in the dataset"), or not at all: a CSV cell
    holding a conversation written out as JSON was sent to the model as text, brackets and quotes included."""
    from rollout_sleep.grpo.data import prompt_problems

    (tmp_path / "k.jsonl").write_text('{"prompt": "1+1=", "answer": "2", "answer": "3"}\n')
    with pytest.raises(ValueError, match=r"k.jsonl': line 1 gives key\(s\) \['answer'\] more than once"):
        load_prompts(str(tmp_path / "k.jsonl"))
    (tmp_path / "dup.csv").write_text("prompt,answer,answer\n1+1=,2,3\n")
    with pytest.raises(ValueError, match=r"the header names column\(s\) \['answer'\] more than once"):
        load_prompts(str(tmp_path / "dup.csv"))
    (tmp_path / "q.jsonl").write_text('{"prompt": "x", "question": "1+1=", "answer": "2"}\n')
    with pytest.raises(ValueError, match="data.prompt_column='question' renames column 'question' to 'prompt'.*has a "
                                         "'prompt' column already"):
        load_prompts(str(tmp_path / "q.jsonl"), prompt_column="question")
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "data_eval.jsonl").write_text('{"prompt": "e"}\n')
    with pytest.raises(ValueError, match="has no train split: datasets splits a folder's files by their names.*Point "
                                         "data.dataset at the file to train on"):
        load_prompts(str(tmp_path / "f"))
    (tmp_path / "m.csv").write_text('prompt,answer\n"[{""role"": ""user"", ""content"": ""1+1=""}]",x\n'
                                    '"what is [1, 2] in role play?",y\n')
    (problem,) = prompt_problems(load_prompts(str(tmp_path / "m.csv")))
    assert "1 of 2 prompt(s) cannot be used" in problem and "row 0 is text holding a list of messages written out" \
        in problem and "in a JSON Lines or Parquet file" in problem, problem


def test_a_prompt_the_chat_template_refuses_is_named_by_row(tmp_path, ckpts):
    from transformers import AutoTokenizer

    from rollout_sleep.grpo.data import check_prompts
    import shutil

    model = tmp_path / "model"
    shutil.copytree(ckpts["tied0"], model)
    (model / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception("
        "'Conversation roles must alternate') }}{% endif %}{{ m['content'] }}{% endfor %}")
    rows = [[{"role": "user", "content": "hi"}]] * 3 + [[{"role": "user", "content": "a"}, {"role": "user",
                                                                                          "content": "b"}]]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"prompt": r}) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"row 3 of the dataset \(\[\{'role': 'user', 'content': 'a'\}.* cannot be "
                                         r"tokenized by the model's chat template \(model.path\): TemplateError: "
                                         r"Conversation roles must alternate"):
        check_prompts(load_prompts(str(tmp_path / "c.jsonl")), AutoTokenizer.from_pretrained(model), 1024, 8)
    with pytest.raises(ValueError, match=r"row 3 of the dataset .* cannot be tokenized"):  # no context known either
        check_prompts(load_prompts(str(tmp_path / "c.jsonl")), AutoTokenizer.from_pretrained(model), None, 8)
    ok = load_prompts(str(tmp_path / "c.jsonl")).select(range(3))
    assert check_prompts(ok, AutoTokenizer.from_pretrained(model), None, 8) == \
        check_prompts(ok, AutoTokenizer.from_pretrained(model), 1024, 8)  # the ids, whatever the context


def test_parquet_files_typed_apart_and_integers_beyond_64_bits_are_named(tmp_path):
    """Parquet shards with ``answer`` int64 in one and ``"007"`` in the next loaded as [7, 7]; a JSON integer
    beyond int64 came back as a float, its last digits lost."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rollout_sleep.grpo.files import value_changes

    pq.write_table(pa.table({"prompt": ["a"], "answer": [7]}), tmp_path / "train-0.parquet")
    pq.write_table(pa.table({"prompt": ["b"], "answer": ["007"]}), tmp_path / "train-1.parquet")
    assert value_changes(str(tmp_path))["answer"].startswith("dataset column 'answer' is int64 in train-0.parquet and "
                                                             "string in train-1.parquet")
    (tmp_path / "train-1.parquet").unlink()
    pq.write_table(pa.table({"prompt": ["b"], "answer": [8]}), tmp_path / "train-1.parquet")
    assert value_changes(str(tmp_path)) == {}
    (tmp_path / "h.jsonl").write_text('{"prompt": "x", "answer": 123456789012345678901}\n')
    assert "holds an integer beyond 64 bits (123456789012345678901 in h.jsonl line 1)" in \
        value_changes(str(tmp_path / "h.jsonl"))["answer"]

"""Recipe config: malformed input fails loudly with the key and what is allowed (pure logic)."""

from __future__ import annotations

import textwrap

import pytest

from rollout_sleep.run.config import ConfigError, check_processes, load_config, validate_rewards
from rollout_sleep.run.schema import RecipeConfig

from helpers import RECIPE


def test_engine_cache_settings_defaults_and_overrides():
    cfg = load_config(None)
    assert (cfg.engine.kv_cache, cfg.engine.keep_trainer_cache, cfg.save_final) == ("step", True, True)
    cfg = load_config(None, ["engine.kv_cache=gpu_share", "engine.keep_trainer_cache=false", "save_final=false"])
    assert (cfg.engine.kv_cache, cfg.engine.keep_trainer_cache, cfg.save_final) == ("gpu_share", False, False)


@pytest.mark.parametrize("override, message", [
    ("engine.kv_cache=all", "engine.kv_cache must be one of step, gpu_share, got 'all'"),
    ("engine.keep_trainer_cache=maybe", "engine.keep_trainer_cache must be true or false"),
    ("engine.kv_cache_bites=1", "unknown key 'engine.kv_cache_bites'; engine has: "),
    ("train.steps=many", "train.steps must be an integer"),
])
def test_malformed_overrides_name_the_problem(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_unreadable_and_non_mapping_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping of sections"):
        load_config(bad)


# Each of these reached the run on the old code (a raw error after vLLM started, or a silent no-op / NaN run).
@pytest.mark.parametrize("override, message", [
    ("engine.kv_cache_bytes=abc", "engine.kv_cache_bytes must be an integer or null, got 'abc'"),
    ("model.dtype=float64x", "model.dtype must be one of float32, bfloat16, float16, got 'float64x'"),
    ("train.steps=-1", "train.steps must be >= 1, got -1"),
    ("engine.load_method=bogus", "engine.load_method must be one of auto, reload, load_weights, direct"),
    ("rewards=[arithmetic_exact, nope]", r"unknown reward 'nope': not a built-in \(arithmetic_exact, digits_format"),
    ("train.generations=1", "train.generations must be >= 2, got 1: .* a group of one has none"),
    ("train.sampling_clip_min=abc", "train.sampling_clip_min must be a number or null, got 'abc'"),
    ("engine.max_model_len=0", "engine.max_model_len must be >= 1"),
    ("train.lr=nan", "train.lr must be > 0, got nan"),
    ("train.mixed_precision=fp8", "train.mixed_precision must be one of no, bf16, fp16"),
    ("engine.gpu_memory_utilization=1.5", r"engine.gpu_memory_utilization must be in \(0, 1\]"),
    ("data.dataset=no/such/file.jsonl", "data.dataset 'no/such/file.jsonl' not found"),
    ("model.path=./no-such-model", "model.path './no-such-model' is neither a size"),
    # a hub id: the engine loads a local folder only (it used to pass here and fail after the output folder)
    ("model.path=org/name", r"model.path 'org/name' is neither a size .*huggingface-cli download"),
    ("watchdog.generate_s=-5", "watchdog.generate_s must be >= 0"),
    ("train.update_check_every=-1", "train.update_check_every must be >= 0, got -1"),
    ("rewards=arithmetic_exact", "rewards must be a list of strings"),
])
def test_every_field_is_checked_up_front(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_a_removed_key_is_refused_naming_it_why_and_the_fix(tmp_path):
    """engine.quantization (FP8 rollouts: measured, then removed), from an override or a YAML section, any value."""
    cfg = tmp_path / "old.yaml"
    cfg.write_text("engine: {quantization: fp8, sleep_level: 1}\n")
    for path, args in ((None, ["engine.quantization=fp8"]), (None, ["engine.quantization=null"]), (cfg, [])):
        with pytest.raises(ConfigError) as err:
            load_config(path, args)
        (problem,) = err.value.problems
        assert problem.startswith("engine.quantization was removed: FP8 rollouts") and "Drop the key" in problem
    assert "quantization" not in load_config(None, []).engine.__dict__


def test_one_error_lists_every_problem(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("engine: {kv_cache_bytes: abc, load_method: bogus}\ntrain: {steps: 0}\n")
    with pytest.raises(ConfigError) as err:
        load_config(cfg, ["model.dtype=float64x", "train.stepz=3"])
    assert len(err.value.problems) == 5, err.value.problems
    assert str(err.value).startswith("5 problems in the config:\n  - ")


def test_optional_fields_take_values_and_null():
    cfg = load_config(None, ["engine.kv_cache_bytes=1e9", "data.num_prompts=null", "wandb.run_name=5",
                             "train.sampling_clip_min=0.5", "engine.max_model_len=null"])
    assert (cfg.engine.kv_cache_bytes, cfg.data.num_prompts, cfg.wandb.run_name) == (10**9, None, "5")
    assert (cfg.train.sampling_clip_min, cfg.engine.max_model_len) == (0.5, None)


def test_recipe_help_lists_every_config_key_with_its_default_and_meaning():
    """``recipes/grpo.py --help`` is generated from the config's dataclasses: every dotted key (walked here
    independently), its default and a meaning; fast (exits before torch and vLLM load)."""
    import dataclasses
    import json
    import subprocess
    import sys

    from rollout_sleep.run.schema import RecipeConfig

    def keys(obj, prefix=""):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                yield from keys(value, f"{prefix}{f.name}.")
            else:
                assert f.metadata.get("help"), f"config key {prefix}{f.name} has no help"
                yield f"{prefix}{f.name}", value

    recipe = RECIPE
    proc = subprocess.run([sys.executable, str(recipe), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    all_keys = list(keys(RecipeConfig()))
    assert len(all_keys) > 50
    for key, default in all_keys:
        assert f"  {key} (default: {json.dumps(default)})" in proc.stdout, key


def test_config_refuses_non_finite_weights_and_a_file_as_output_dir(tmp_path):
    afile = tmp_path / "notes.txt"
    afile.write_text("x")
    with pytest.raises(ConfigError) as err:
        load_config(None, ["reward_weights=[.nan, 1]", f"output_dir={afile}"])
    assert err.value.problems == [
        f"output_dir {str(afile)!r} is a file, not a folder: give a new or existing folder",
        "reward_weights must be finite numbers, got [nan, 1.0]: a NaN weight would zero every reward it scales "
        "(NaN rewards are skipped), an infinite one stops the first step"]
    with pytest.raises(ConfigError, match="reward_weights must be finite"):
        load_config(None, ["reward_weights=[1, .inf]"])
    load_config(None, ["reward_weights=[-1, 0.5]"])  # negative weights are fine (TRL's too)


def test_dataset_columns_named_like_trainer_arguments_are_refused(tmp_path, monkeypatch):
    """A dataset column ``completions`` (reference answers, say) would replace the generated completions that
    a TRL-style reward receives (the old code passed the column, silently); TRL itself fails at the first step."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        def same(prompts, completions, **kwargs):
            return [float(c == "4") for c in completions]
    """))
    assert validate_rewards(["my_rewards.py:same"], columns=["prompt", "answer"]) == []
    (problem,) = validate_rewards(["my_rewards.py:same"], columns=["prompt", "completions", "trainer_state"])
    assert problem.startswith("dataset column(s) ['completions', 'trainer_state'] have the names of arguments")
    assert validate_rewards(["digits_format"], columns=["prompt", "completions"]) == []  # per-example: no clash


def test_prompts_per_step_must_split_evenly_across_processes():
    cfg = RecipeConfig()
    assert check_processes(cfg, 1) == [] and check_processes(cfg, 4) == []
    cfg.train.prompts_per_step = 3
    cfg.engine.tensor_parallel_size = 4
    assert check_processes(cfg, 2) == [
        "engine.tensor_parallel_size must be 1 (an engine per rank) or the number of processes (2, one engine "
        "across ranks), got 4",
        "train.prompts_per_step (3) must be a multiple of the number of processes (2): each rank rolls out and "
        "trains an equal share"]


def test_overwrite_without_resume_false_is_refused():
    """overwrite=true alone (resume defaults to true) used to resume the earlier run, silently ignoring it."""
    with pytest.raises(ConfigError, match="pass resume=false with overwrite=true"):
        load_config(None, ["overwrite=true"])
    load_config(None, ["overwrite=true", "resume=false"])


def test_yaml_mistakes_are_named_in_full(tmp_path):
    """A key given twice in the YAML was silently dropped (PyYAML keeps the last: ``train: {steps: 3}`` then
    ``train: {lr: 1}`` ran 12 steps); a wrong value inside a section was named without its section."""
    twice = tmp_path / "twice.yaml"
    twice.write_text("train: {steps: 3}\nmodel: {path: tiny}\ntrain: {lr: 1.0}\n")
    with pytest.raises(ConfigError, match="key 'train' is given twice"):
        load_config(twice)
    nested = tmp_path / "nested.yaml"
    nested.write_text("train:\n  steps: [3]\n  stepz: 3\ndata: {system_prompt: 42}\n")
    with pytest.raises(ConfigError) as err:
        load_config(nested)
    assert err.value.problems[:2] == ["train.steps must be an integer, got [3]",
                                      "unknown key 'train.stepz'; train has: " + ", ".join(
                                          f.name for f in __import__("dataclasses").fields(RecipeConfig().train))]
    assert err.value.problems[2] == "data.system_prompt must be a string or null, got 42"


def test_a_quoted_true_or_false_in_the_yaml_is_named_with_the_fix(tmp_path):
    """``compile: "true"`` in a YAML file (a string: YAML reads quoted words as text) was refused as "train.compile
    must be true or false, got 'true'", which reads as a contradiction; numbers in quotes are taken. The message
    now says it is quoted text and to write the word without quotes, for the bool | str key too."""
    path = tmp_path / "quoted.yaml"
    path.write_text('train: {compile: "true", step_per_tensor: "false", offload_optimizer: "true"}\n'
                    'engine: {keep_trainer_cache: "no"}\n')
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert sorted(err.value.problems) == [
        "engine.keep_trainer_cache must be true or false, got 'no' (quoted text: write no without quotes)",
        "train.compile must be true or false, got 'true' (quoted text: write true without quotes)",
        "train.offload_optimizer must be one of false, true, stream, got 'true' (quoted text: write true without "
        "quotes)",
        "train.step_per_tensor must be true or false, got 'false' (quoted text: write false without quotes)"]


def test_a_key_given_twice_on_the_command_line_is_refused():
    """``train.lr=0.1 train.lr=0.2`` took the last value without a word (a key twice in the YAML was refused)."""
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.lr=0.1", "train.steps=2", "train.lr=0.2"])
    assert err.value.problems == ["train.lr is given twice on the command line (train.lr=0.1, then train.lr=0.2): "
                                  "give it once"]
    with pytest.raises(ConfigError, match=r"model.lora.rank is given twice on the command line \(model=\{lora: "
                                          r"\{rank: 8\}\}, then model.lora.rank=16\)"):
        load_config(None, ["model={lora: {rank: 8}}", "model.lora.rank=16"])
    assert load_config(None, ["train.lr=0.1", "train.lr=0.1"]).train.lr == 0.1  # the same override twice: one value
    cfg = load_config(None, ["train={lr: 0.1}", "train.steps=2", "data.system_prompt={a: 1}"])  # each key once
    assert (cfg.train.lr, cfg.train.steps, cfg.data.system_prompt) == (0.1, 2, "{a: 1}")


def test_tie_word_embeddings_is_refused_for_a_checkpoint(tmp_path):
    """The key ties or unties a size the recipe builds; with a checkpoint folder it was ignored (the model stayed as
    its config.json says) while run_config.json recorded the setting."""
    from safetensors.torch import save_file

    (tmp_path / "config.json").write_text('{"model_type": "gemma2", "tie_word_embeddings": true}')
    save_file({}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"model.path={tmp_path}", "model.tie_word_embeddings=false"])
    assert err.value.problems == [
        f"model.tie_word_embeddings=false applies only to a size this project builds (model.path one of tiny, "
        f"qwen3-0.6b, qwen3-4b, qwen3-8b, qwen3-14b, qwen3-32b); model.path {str(tmp_path)!r} is a checkpoint, tied "
        f"or not as its config.json says (tie_word_embeddings: true). Drop model.tie_word_embeddings (or set it to "
        f"null), or save a checkpoint tied the way you want"]
    assert load_config(None, [f"model.path={tmp_path}"]).model.tie_word_embeddings is None
    assert load_config(None, ["model.path=tiny", "model.tie_word_embeddings=false"]).model.tie_word_embeddings is False


def test_lora_on_the_embedding_is_refused_naming_the_target_and_the_fix():
    """LoRA on ``embed_tokens`` trained on log-probs ~6 off vLLM's from the second step while verify passed (the
    adapter's tensors are equal; vLLM's embedding adapter computes differently): refused before anything starts."""
    with pytest.raises(ConfigError, match=r"model.lora.targets: \['embed_tokens'\] adapt the embedding.*Target the "
                                          r"linear layers"):
        load_config(None, ["model.lora.rank=8", "model.lora.targets=[embed_tokens,q_proj]"])
    assert load_config(None, ["model.lora.rank=8", "model.lora.targets=[q_proj,v_proj]"]).model.lora.rank == 8


def test_a_wandb_project_w_and_b_would_refuse_is_refused_at_load(tmp_path):
    """``wandb.project=team/proj`` (the entity written into the project) passed the config, then failed in
    wandb.init after vLLM and the model had loaded; an ``output_dir/wandb`` that is a file failed there too, as a
    bare NotADirectoryError. Both said at load time; with W&B disabled neither matters."""
    from rollout_sleep.run.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"wandb.project must be a W&B project name .* got 'team/proj': the entity "
                                          r"\(team\) is not part of it; set it with WANDB_ENTITY"):
        load_config(None, ["wandb.project=team/proj", "wandb.mode=offline"])
    load_config(None, ["wandb.project=team/proj", "wandb.mode=disabled"])
    (tmp_path / "wandb").write_text("")
    with pytest.raises(ConfigError, match=r"wandb is a file: W&B writes its run there as a folder"):
        load_config(None, [f"output_dir={tmp_path}", "wandb.mode=offline"])

"""A reward-model folder whose checkpoint lacks weights (its score head, typically) is refused, before vLLM starts
in the recipe and at every load: the old code scored with a freshly drawn random head (other scores at every
load), transformers' report of the missing weights hidden by the quiet logging."""

from __future__ import annotations

from pathlib import Path

import pytest

from rollout_sleep.grpo.errors import RewardError
from rollout_sleep.grpo.reward_model import RewardModel
from rollout_sleep.weights.checkpoints import make_reward_checkpoint

from helpers import ROOT, run_until_engine


CONFIG = ROOT / "configs" / "tiny-cpu.yaml"


def _drop_score_head(path: Path) -> None:
    from safetensors.torch import load_file, save_file

    weights = load_file(path / "model.safetensors")
    del weights["score.weight"]
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})


@pytest.fixture()
def headless(tmp_path) -> Path:
    path = Path(make_reward_checkpoint(tmp_path / "rm", "tiny", seed=0, dtype="float32"))
    _drop_score_head(path)
    return path


def test_a_reward_model_without_its_score_head_is_refused_before_vllm(tmp_path, headless, monkeypatch):
    code, out = run_until_engine(monkeypatch, CONFIG, f"output_dir={tmp_path / 'run'}",
                                 f"rewards=[digits_format, {headless}]", "wandb.mode=disabled")
    assert code == 2, out[-3000:]
    assert f"reward model {str(headless)!r}: its checkpoint files have no weights for score.weight" in out, out[-3000:]
    assert "starting the vLLM engine" not in out and not (tmp_path / "run").exists()


def test_missing_weights_are_refused_when_the_reward_model_loads(tmp_path, headless):
    with pytest.raises(RewardError, match="its checkpoint files have no weights for score.weight"):
        RewardModel(str(headless), load=False)
    path = Path(make_reward_checkpoint(tmp_path / "later", "tiny", seed=0, dtype="float32"))
    model = RewardModel(str(path), load=False)  # checked whole; the head goes missing before the load
    _drop_score_head(path)
    with pytest.raises(RewardError, match="no weights for score.weight; loading it would draw them at random"):
        model.load()
    empty = tmp_path / "config_only"
    empty.mkdir()
    (empty / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(RewardError, match="its weights cannot be read"):
        RewardModel(str(empty), load=False)


def _copy(src: Path, dst: Path, skip=()) -> Path:
    import shutil

    shutil.copytree(src, dst, ignore=lambda _, names: [n for n in names if n in skip])
    return dst


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A complete tiny reward model, copied and then damaged by each test."""
    return Path(make_reward_checkpoint(tmp_path_factory.mktemp("rm") / "rm", "tiny", seed=0, dtype="float32"))


def test_a_score_head_of_another_size_is_refused_before_vllm(tmp_path, trained):
    """config.json says one label but the saved head has two rows (a two-label classifier whose config was edited,
    or one saved without its labels in the config): the old check passed it (transformers' size error was taken
    for a missing meta-device feature) and the load failed after vLLM had started, with transformers' words."""
    import torch
    from safetensors.torch import load_file, save_file

    from rollout_sleep.run.config import validate_rewards

    path = _copy(trained, tmp_path / "two_rows")
    weights = load_file(path / "model.safetensors")
    weights["score.weight"] = torch.cat([weights["score.weight"]] * 2)
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    (problem,) = validate_rewards([str(path)])
    assert problem.startswith(f"reward model {str(path)!r}: its checkpoint's score.weight has shape [2, 128], the "
                              f"model's is [1, 128]"), problem
    assert "one label" in problem


@pytest.mark.parametrize("damage", ["safetensors", "bin"])
def test_unreadable_weight_files_are_named_not_a_traceback(tmp_path, trained, damage):
    """A truncated or foreign weight file: the old check let safetensors' or torch's error escape as a traceback
    from the config's check (load_config)."""
    from rollout_sleep.run.config import load_config, ConfigError

    path = _copy(trained, tmp_path / damage, skip=("model.safetensors",))
    name = "model.safetensors" if damage == "safetensors" else "pytorch_model.bin"
    (path / name).write_bytes(b"not a weight file" * 8)
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"rewards=[{path}]"])
    assert f"reward model {str(path)!r}: its weights cannot be read: " in str(err.value), str(err.value)


def test_a_reward_model_folder_without_its_tokenizer_is_refused_before_vllm(tmp_path, trained):
    """Saved with model.save_pretrained only: transformers then builds an empty tokenizer from the config (every
    text becomes no tokens) and the old code failed at the first step, after vLLM had started, with 'cannot
    reshape tensor of 0 elements' reported as the reward's own error."""
    from rollout_sleep.run.config import validate_rewards

    path = _copy(trained, tmp_path / "no_tokenizer", skip=("tokenizer.json", "tokenizer_config.json",
                                                          "chat_template.jinja"))
    (problem,) = validate_rewards([str(path)])
    assert problem.startswith(f"reward model {str(path)!r}: its tokenizer ") and "tokenizer.save_pretrained" in problem, \
        problem
    assert validate_rewards([str(trained)]) == []  # the complete folder passes


def test_a_reward_model_without_a_chat_template_is_refused_for_conversations_before_vllm(tmp_path, trained,
                                                                                        monkeypatch):
    """Conversational prompts reach a reward model through its own chat template (TRL's rule): the old code found
    none at the first scoring, after vLLM had started. Plain-text prompts need none."""
    import json

    from helpers import load_recipe

    path = _copy(trained, tmp_path / "no_chat_template", skip=("chat_template.jinja",))
    config = json.loads((path / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    recipe = load_recipe()

    def no_engine(*args, **kwargs):
        raise AssertionError("the engine was built before the reward model was checked")

    monkeypatch.setattr(recipe, "build_engine", no_engine)
    cfg = recipe.load_config(str(CONFIG), [f"output_dir={tmp_path / 'run'}", "train.memory_plan=off",
                                           f"data.dataset={ROOT / 'examples' / 'gsm8k' / 'data.jsonl'}",
                                           "train.prompts_per_step=4", f"rewards=[digits_format, {path}]",
                                           "wandb.mode=disabled"])
    with pytest.raises(recipe.ConfigError, match=f"reward model {str(path)!r}: the prompts are conversations, which "
                                                 f"a reward model reads through its own chat template"):
        recipe.GRPORecipe(cfg).setup()
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps({"prompt": f"{i}+1="}) + "\n" for i in range(8)))
    cfg = recipe.load_config(str(CONFIG), [f"output_dir={tmp_path / 'run2'}", "train.memory_plan=off",
                                           f"data.dataset={plain}", f"rewards=[digits_format, {path}]",
                                           "wandb.mode=disabled"])
    with pytest.raises(AssertionError, match="the engine was built"):  # plain text: no template needed
        recipe.GRPORecipe(cfg).setup()

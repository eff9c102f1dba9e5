"""One copy of the weights (``model.share_weights``): where it applies and why not, the invariant from addresses, the
memory plan's one copy, and an engine whose weights a trainer views refusing the sleeps that would move them.
The views themselves are checked against vLLM's layout of every family in ``tests/weights/test_families.py``."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from rollout_sleep.engine.state import EngineStateError
from rollout_sleep.run import memory_plan, one_copy
from rollout_sleep.run.config import ConfigError, check_processes, load_config
from rollout_sleep.run.schema import RecipeConfig
from rollout_sleep.weights.views import coverage_problems, model_spans, span

from helpers import views_on_fused_layout, without_package


def _cfg(**overrides) -> RecipeConfig:
    cfg = RecipeConfig()
    for key, value in overrides.items():
        section, leaf = key.rsplit("__", 1) if "__" in key else ("model", key)
        obj = cfg
        for part in section.split("__"):
            obj = getattr(obj, part)
        setattr(obj, leaf, value)
    return cfg


@pytest.mark.parametrize("overrides, device, processes, on, why", [
    ({}, "cuda", 1, True, "CUDA, one process"),
    ({"share_weights": True}, "cuda", 1, True, "CUDA"),
    ({"share_weights": False}, "cuda", 1, False, "model.share_weights=false"),
    ({}, "cpu", 1, False, "repacks its linear weights"),
    ({"model__lora__rank": 16}, "cuda", 1, False, "model.lora trains an adapter"),
    ({"engine__tensor_parallel_size": 2}, "cuda", 2, False, "tensor-parallel"),
    ({}, "cuda", 2, False, "2 processes"),
    # one process under FSDP or DeepSpeed (e.g. ZeRO's optimizer offload on one GPU): the parameters are replaced
    # by FSDP's DTensors / ZeRO's flat buffers (the old decision took one copy, and the run stopped at setup on the
    # broken invariant)
    ({}, "cuda", 1, False, "accelerate runs the trainer with DEEPSPEED, which replaces its parameters"),
    ({}, "cuda", 1, False, "accelerate runs the trainer with FSDP"),
    # a model type whose vLLM layout no test checked: vLLM's loader may reorder a tensor under its name and shape
    ({}, "cuda", 1, False, "vLLM's layout of model type 'falcon' is not one this project checked"),
    ({}, "cuda", 1, True, "CUDA, one process"),  # a type not known before vLLM reads it: vLLM's decides (after)
])
def test_where_one_copy_applies_before_the_engine_starts(overrides, device, processes, on, why):
    distributed = next((d for d in ("DEEPSPEED", "FSDP") if d in why), "NO")
    model_type = "falcon" if "falcon" in why else None if on and not overrides else "qwen3"
    decision = one_copy.before_engine(_cfg(**overrides), device, processes, distributed, model_type)
    assert decision.on is on and why in decision.why, decision
    assert ("one copy" if on else "two copies") in decision.describe()


def test_the_checked_layouts_are_the_families_the_tests_check():
    """One copy and the ``direct`` route trust vLLM's layout name by name only for the model types whose every
    view tests/weights/test_families.py compares with what vLLM's loader holds: the model factory's families."""
    from rollout_sleep.weights.checkpoints import FAMILIES
    from rollout_sleep.weights.layout import CHECKED_MODEL_TYPES, unchecked_problem

    assert CHECKED_MODEL_TYPES == {f.model_type for f in FAMILIES.values()}
    assert all(unchecked_problem(t) is None for t in CHECKED_MODEL_TYPES)
    assert "'bloom'" in unchecked_problem("bloom") and "query_key_value" in unchecked_problem("bloom")
    assert unchecked_problem(None)


def test_after_the_engine_starts_an_exact_view_is_required():
    """The engine's own answer decides: no exact view (e.g. stacked MoE experts), or no sleep allocator, and the
    run takes two copies with the engine's reason; a decision that was off stays off."""
    on = one_copy.Decision(True, "CUDA, one process, one engine")

    def engine(why, sleep_mode=True):
        return SimpleNamespace(loader=SimpleNamespace(why_not_direct=lambda: why), sleep_mode=sleep_mode)

    assert one_copy.after_engine(on, engine(None)) == on
    moe = one_copy.after_engine(on, engine("12 stacked MoE expert tensor(s)"))
    assert not moe.on and "cannot view vLLM's weights exactly: 12 stacked MoE" in moe.why
    assert "sleep allocator" in one_copy.after_engine(on, engine(None, sleep_mode=False)).why
    off = one_copy.Decision(False, "model.share_weights=false")
    assert one_copy.after_engine(off, engine(None)) is off


def test_share_weights_true_is_refused_where_it_cannot_be(tmp_path):
    """At config time (every problem at once, naming the key and the fix), and at launch for several processes;
    null is never refused (it takes two copies)."""
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.share_weights=true", "model.lora.rank=16"], device="cpu")
    text = "\n".join(err.value.problems)
    assert "model.share_weights=true on CPU" in text and "model.share_weights=true with model.lora.rank=16" in text
    assert "Fix: model.share_weights=null" in text
    load_config(None, ["model.share_weights=true"], device="cuda")
    load_config(None, ["model.share_weights=null", "model.lora.rank=16"], device="cpu")
    cfg = load_config(None, ["model.share_weights=true", "train.prompts_per_step=8"], device="cuda")
    assert any("needs one process" in p for p in check_processes(cfg, 2))
    assert check_processes(load_config(None, ["train.prompts_per_step=8"], device="cuda"), 2) == []
    (zero,) = check_processes(cfg, 1, "DEEPSPEED")
    assert zero.startswith("model.share_weights=true with accelerate's DEEPSPEED: DeepSpeed ZeRO flattens them") \
        and zero.endswith("or set model.share_weights=null")
    assert check_processes(cfg, 1, "NO") == [] and check_processes(cfg, 1) == []
    # a config alone (no weights) starts only where the trainer views the engine's weights
    from rollout_sleep.weights.checkpoints import make_config_dir

    folder = make_config_dir(tmp_path / "cfg", "tiny")
    load_config(None, [f"model.path={folder}", "model.share_weights=true"], device="cuda")
    with pytest.raises(ConfigError, match="holds no weights"):
        load_config(None, [f"model.path={folder}"], device="cuda")


def test_the_invariant_names_a_second_copy_an_overlap_and_stale_bytes():
    """From addresses alone: a trainer parameter outside the engine's memory, two writing the same bytes, and
    bytes of an engine parameter no trainer parameter covers are each named."""
    engine = {"qkv": torch.zeros(12, 4), "norm": torch.zeros(4)}
    spans = {n: span(t) for n, t in engine.items()}
    filled = {"qkv": 12 * 16, "norm": 16}
    q, k, v = engine["qkv"][:4], engine["qkv"][4:8], engine["qkv"][8:]
    trainer = {"q": span(q), "k": span(k), "v": span(v), "norm": span(engine["norm"])}
    assert coverage_problems(spans, trainer, filled) == []
    second = coverage_problems(spans, {**trainer, "k": span(k.clone())}, filled)
    assert any("k is not inside vLLM's weights" in p for p in second)
    assert any("qkv: the trainer covers 128 of its 192 bytes" in p for p in second)  # k's rows left stale
    overlap = coverage_problems(spans, {**trainer, "k": span(engine["qkv"][3:7])}, filled)
    assert any("overlaps" in p and "written twice" in p for p in overlap), overlap
    # the padding rows of an embedding need no cover
    assert coverage_problems(spans, {k_: s for k_, s in trainer.items() if k_ != "v"}, {**filled, "qkv": 8 * 16}) == []


def test_the_invariant_checks_where_the_bytes_are_not_only_how_many():
    """An embedding padded to 16 rows holds 10 real ones: a trainer view of rows 6..16 covers as many bytes as the
    real rows but trains padding and leaves rows 0..6 stale (the old check counted bytes and passed it). An overlap
    names the bytes written twice (each overlapping parameter, not only neighbours in address order); an
    empty parameter holds nothing (no second copy); a tensor starting right at an engine tensor's end is
    outside it."""
    embed, other = torch.zeros(16, 4), torch.zeros(8, 4)
    spans = {"embed": span(embed), "other": span(other)}
    filled = {"embed": 10 * 16, "other": 8 * 16}
    ok = {"e": span(embed[:10]), "o": span(other)}
    assert coverage_problems(spans, ok, filled) == []
    shifted = coverage_problems(spans, {**ok, "e": span(embed[6:])}, filled)
    assert shifted == ["e lies past the 160 bytes of embed the checkpoint fills (bytes 160..256 are padding vLLM "
                       "never reads)"]
    nested = {"o": span(other), "o1": span(other[1:2]), "o2": span(other[3:4]), "e": span(embed[:10])}
    problems = coverage_problems(spans, nested, filled)
    assert "o1 overlaps o (bytes 16..32 of other are written twice)" in problems
    assert "o2 overlaps o (bytes 48..64 of other are written twice)" in problems
    assert any("other: the trainer covers 160 bytes of it, the checkpoint fills 128" in p for p in problems)
    assert coverage_problems(spans, {**ok, "empty": span(torch.zeros(0))}, filled) == []
    at_end = (span(embed)[1], span(embed)[1] + 16)  # a second copy right at the end of an engine tensor
    assert coverage_problems({"embed": span(embed)}, {"e": span(embed[:10]), "x": at_end}, {"embed": 160}) == \
        ["x is not inside vLLM's weights (a second copy: the engine never sees its updates)"]


def test_model_spans_count_a_tied_head_once():
    from torch import nn

    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "head": head})
    assert list(model_spans(model)) == ["emb.weight"]


def test_the_memory_plan_holds_the_weights_once():
    """One copy: no trainer weights, the engine's weights stay through training (level 0: the KV cache only)."""
    shape = memory_plan.ModelShape.from_config(_tiny_config())
    two = memory_plan.plan_memory(memory_plan.PlanInputs(shape, kv_cache_bytes=1 << 20))
    one = memory_plan.plan_memory(memory_plan.PlanInputs(shape, kv_cache_bytes=1 << 20, weights_shared=True))
    assert two.phases["rollout"]["trainer_weights"] > 0 and one.phases["rollout"]["trainer_weights"] == 0
    assert one.phases["training"]["engine_weights"] == two.phases["rollout"]["engine_weights"]
    assert "engine_asleep" in two.phases["training"] and "engine_asleep" not in one.phases["training"]
    assert "kv_cache" not in one.phases["training"]
    assert one.total("rollout") < two.total("rollout")
    assert "one copy of the weights" in one.table()


def _tiny_config():
    from transformers import AutoConfig

    from rollout_sleep.weights.checkpoints import make_config_dir

    import tempfile

    return AutoConfig.from_pretrained(make_config_dir(tempfile.mkdtemp(), "tiny"))


def test_an_engine_whose_weights_a_trainer_views_sleeps_at_level_0_only(engine):
    """Levels 1 and 2 would move or discard the memory under the trainer: refused naming why and level 0;
    level 0 (the KV cache only) runs and the engine generates after it."""
    engine.pin_weights("the trainer's parameters are views of them (model.share_weights)")
    try:
        for level in (1, 2):
            with pytest.raises(EngineStateError, match=rf"cannot sleep at level {level}: the trainer's parameters"
                                                        r".*Sleep at level 0"):
                engine.sleep(level=level)
        assert not engine.is_asleep
        engine.sleep(level=0)
        engine.wake_up()
        assert engine.generate([[1, 2, 3]], max_tokens=4, temperature=0.0)
    finally:
        engine.pinned = None


@pytest.mark.parametrize("family", ["qwen3", "qwen2.5"])  # tied head, no biases / untied head, q/k/v biases
def test_a_checkpoint_of_views_holds_every_tensor_and_loads_back_in_place(family, tmp_path):
    """accelerate's save_state (safetensors) keeps one name per storage: of the q/k/v views of one fused tensor it
    wrote q_proj alone (k_proj, v_proj and up_proj were dropped with a warning), and load_state refused the model
    (safetensors: 'None is covering the entire storage'), so a one-copy run's checkpoints could not be resumed
    and lacked most of the weights. With keep_views_in_checkpoints every tensor is saved, and loading copies
    them back into the views: the invariant holds and the weights are the saved ones."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from safetensors.torch import load_file

    tensors, model, problems = views_on_fused_layout(family)
    acc = Accelerator(cpu=True)
    try:
        one_copy.keep_views_in_checkpoints(acc)
        model, optimizer = acc.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
        ids = torch.randint(0, 200, (2, 6), generator=torch.Generator().manual_seed(1))
        acc.backward(model(ids, labels=ids).loss)
        optimizer.step()
        saved = {n: t.detach().clone() for n, t in model.state_dict().items()}
        acc.save_state(str(tmp_path / "ckpt"))
        on_disk = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
        tied = model.config.tie_word_embeddings
        assert sorted(on_disk) == sorted(n for n in saved if not (tied and n == "lm_head.weight"))
        assert all(torch.equal(on_disk[n], saved[n]) for n in on_disk)
        with torch.no_grad():
            for t in tensors.values():
                t.add_(1.0)  # the engine's memory moves on (another step, a fresh engine)
        acc.load_state(str(tmp_path / "ckpt"))
        assert problems(model) == []  # still the engine's memory, once
        assert all(torch.equal(t, saved[n]) for n, t in model.state_dict().items())
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def test_the_recipe_falls_back_to_two_copies_when_vllm_holds_no_exact_view(tmp_path, ckpts, monkeypatch, capsys):
    """Where the launch says one copy applies (here: told the device is CUDA) but vLLM's weights have no exact view
    (its CPU build repacks its linears), ``null`` takes two copies once the engine is up, says why, and plans memory
    again; with a size (the weights would exist only in vLLM's memory) the run stops before training instead."""
    from helpers import ROOT, load_recipe

    recipe = load_recipe()
    monkeypatch.setattr(recipe, "detect_device", lambda: "cuda")
    config = str(ROOT / "configs" / "tiny-cpu.yaml")
    common = ["wandb.mode=disabled", "train.steps=1", "engine.verify_every=0"]
    run = recipe.GRPORecipe(recipe.load_config(config, [f"output_dir={tmp_path / 'a'}", f"model.path={ckpts['tied0']}",
                                                        *common]))
    try:
        run.setup()
        assert not run.one_copy.on and "cannot view vLLM's weights exactly" in run.one_copy.why
        assert run.manager.shared is None and run.manager.sleep_level == 2 and not run.engine.pinned
        assert "two copies of the weights" in capsys.readouterr().out
    finally:
        run.engine.close()
    # the fallback turns stochastic rounding (torchao) off: the two-copy optimizer's package is checked again
    without_package(monkeypatch, "bitsandbytes")
    bf16 = recipe.GRPORecipe(recipe.load_config(config, [f"output_dir={tmp_path / 'c'}", f"model.path={ckpts['tied0']}",
                                                         "model.dtype=bfloat16", "train.optimizer=adamw8bit", *common],
                                                 device="cuda"))  # as on CUDA: one copy foreseen, torchao's rounding
    try:
        with pytest.raises(ConfigError, match="needs bitsandbytes.*two copies of the weights.*cannot view"):
            bf16.setup()
        assert getattr(bf16, "model", None) is None  # before the trainer is built
    finally:
        if getattr(bf16, "engine", None) is not None:
            bf16.engine.close()
    monkeypatch.undo()
    monkeypatch.setattr(recipe, "detect_device", lambda: "cuda")
    sized = recipe.GRPORecipe(recipe.load_config(config, [f"output_dir={tmp_path / 'b'}", *common]))
    with pytest.raises(ConfigError, match="the model folder holds a config alone.*Fix: model.share_weights=false"):
        try:
            sized.setup()
        finally:
            if getattr(sized, "engine", None) is not None:
                sized.engine.close()


def _falcon(path) -> str:
    """A tiny Falcon checkpoint (transformers' own class): vLLM's loader regroups its fused query_key_value's
    per-head interleaved rows into q, k, v, under the same name and shape."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from rollout_sleep.weights.checkpoints import build_tokenizer

    tok = build_tokenizer()
    cfg = AutoConfig.for_model("falcon", vocab_size=-(-len(tok) // 64) * 64, hidden_size=128, num_hidden_layers=2,
                               num_attention_heads=4, new_decoder_architecture=False, multi_query=False, alibi=False,
                               parallel_attn=True, bias=False, tie_word_embeddings=False,
                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_a_model_type_whose_layout_is_unchecked_takes_vllms_loader_and_says_so(tmp_path, monkeypatch, capsys):
    """Falcon's fused query_key_value is held by vLLM reordered under its checkpoint name and shape: a view of it
    (one copy, the ``direct`` route) would train or write the wrong rows while every name and shape check and
    ``verify`` passed. Its type is not among the checked layouts: one copy is off before vLLM starts (said before
    the plan and the engine), ``direct`` is not taken, and a verify mismatch says it may be the comparison."""
    from helpers import ROOT, load_recipe
    from transformers import AutoModelForCausalLM

    from rollout_sleep.weights.verify import verify

    path = _falcon(tmp_path / "falcon")
    recipe = load_recipe()
    monkeypatch.setattr(recipe, "detect_device", lambda: "cuda")  # where one copy would otherwise apply
    run = recipe.GRPORecipe(recipe.load_config(str(ROOT / "configs" / "tiny-cpu.yaml"), [
        f"output_dir={tmp_path / 'out'}", f"model.path={path}", "wandb.mode=disabled", "train.steps=1",
        "engine.verify_every=0"]))
    try:
        run.setup()
        out = capsys.readouterr().out
        assert not run.one_copy.on and "model type 'falcon'" in run.one_copy.why
        said = out.index("two copies of the weights")
        assert said < out.index("starting the vLLM engine") and out.count("two copies of the weights") == 1
        why = run.engine.loader.why_not_direct()
        assert "model type 'falcon'" in why and run.engine.loader.resolve_method("auto", strict=True) != "direct"
        report = verify(run.engine, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32))
        assert not report.ok and any("query_key_value" in n for n in report.mismatched)
        assert "model type 'falcon'" in report.note and "turn verify off" in report.note
        with pytest.raises(AssertionError, match="This comparison may be wrong rather than the weights"):
            report.raise_if_failed()
    finally:
        run.engine.close()
    # with verify on, the comparison that cannot read this layout is found before any step (both sides hold the
    # checkpoint), and the run is refused naming the fix
    run = recipe.GRPORecipe(recipe.load_config(str(ROOT / "configs" / "tiny-cpu.yaml"), [
        f"output_dir={tmp_path / 'verified'}", f"model.path={path}", "wandb.mode=disabled", "engine.verify_every=1"]))
    try:
        with pytest.raises(ConfigError, match=r"engine.verify_every=1: before any step.*query_key_value.*model type "
                                              r"'falcon'.*Fix: engine.verify_every=0"):
            run.setup()
        assert getattr(run, "step", 0) == 0
    finally:
        if getattr(run, "engine", None) is not None:
            run.engine.close()
    # what two copies cannot take is refused before vLLM starts, with the decision's reason, and so is a one copy
    # asked for
    for extra, said in ((["model.share_weights=true"], "model.share_weights=true: "),
                        (["train.expandable_segments=true"], "train.expandable_segments=true needs an engine"),
                        (["model.dtype=bfloat16", "train.optimizer=adamw8bit"], "needs bitsandbytes")):
        run = recipe.GRPORecipe(recipe.load_config(str(ROOT / "configs" / "tiny-cpu.yaml"), [
            f"output_dir={tmp_path / 'refused'}", f"model.path={path}", "wandb.mode=disabled", *extra], device="cuda"))
        without_package(monkeypatch, "bitsandbytes")
        with pytest.raises(ConfigError, match=rf"{said}.*model type 'falcon'"):
            run.setup()
        assert getattr(run, "engine", None) is None and not (tmp_path / "refused").exists()


def test_one_copy_needs_torchao_not_bitsandbytes_for_its_8bit_optimizer(monkeypatch):
    """With one copy (null on CUDA) adamw8bit rounds stochastically through torchao: a missing bitsandbytes is not a
    problem there (the 8B config was refused for it on the H100), and is named where two copies take it."""
    from helpers import ROOT

    without_package(monkeypatch, "bitsandbytes")
    config = str(ROOT / "configs" / "qwen3-8b.yaml")
    load_config(config, [], device="cuda")
    with pytest.raises(ConfigError, match="train.optimizer=adamw8bit needs bitsandbytes"):
        load_config(config, ["model.share_weights=false"], device="cuda")
    with pytest.raises(ConfigError, match="needs bitsandbytes"):
        load_config(config, [], device="cpu")  # two copies on CPU


def test_the_plan_refuses_14b_where_the_h100_ran_out_of_memory_and_passes_8b(tmp_path):
    """The plan against the H100's free memory at the 14B run's start (78.15 GiB; its KV cache 3.61 GiB): with
    torchao's step buffers (25 bytes per element of the embedding at 4 bits) the 14B config with its optimizer state on
    the GPU does not fit, as measured (out of memory at its first optimizer step: results/h100/one_copy/), nor
    does it with the state offloaded between steps (the step brings all of it back beside all the gradients);
    streamed (train.offload_optimizer=stream, the config's setting) it fits: the step holds three tensors' state, and
    the largest tensors step last, when the other gradients are freed. The 8B config, which ran, fits. Planned here
    without a GPU: the budget makes it the GPU's plan, the configured setting included."""
    from helpers import ROOT
    from rollout_sleep.run import memory_check
    from rollout_sleep.run.memory_plan import GIB
    from rollout_sleep.run.optim import optimizer_state_bytes
    from rollout_sleep.weights.checkpoints import make_config_dir

    plans = {}
    for size, setting in (("qwen3-14b", "false"), ("qwen3-14b", "true"), ("qwen3-14b", None), ("qwen3-8b", None)):
        path = make_config_dir(tmp_path / size, size, dtype="bfloat16")
        overrides = ["train.memory_budget_gib=78.15"] + ([f"train.offload_optimizer={setting}"] if setting else [])
        cfg = load_config(str(ROOT / "configs" / f"{size}.yaml"), overrides, device="cuda")
        # planned here without a GPU: a budget makes it a preview of the GPU's plan, the setting included
        plans[size, setting], _ = memory_check.plan_run(cfg, path, processes=1, shards=(1, 1, 1), longest_prompt=4,
                                                        kv_bytes=int(3.61 * 2**30), reward_bytes=0,
                                                        base_shared=False, weights_shared=True)
    on_gpu, between, streamed = plans["qwen3-14b", "false"], plans["qwen3-14b", "true"], plans["qwen3-14b", None]
    embedding = 151936 * 5120
    # the embedding's 4-bit step: two float32 moments, two int64 code indices, two packed codes per element
    assert on_gpu.phases["training"]["optimizer_step"] == 25 * embedding
    assert on_gpu.over("training") > 0 and not on_gpu.fits()
    assert between.over("training") == on_gpu.over("training") and not between.fits()
    assert streamed.inputs.offload_optimizer == "stream" and streamed.fits()
    assert streamed.phases["rollout"]["optimizer_state"] == 0
    # smallest tensor first: the embedding and the (as large, untied) head step last, beside only their own
    # gradients (2.9 GiB), so their 18 GiB of step temporaries never meet all the gradients (27.5 GiB); the step's
    # peak is at its first, smallest tensor, and training's peak is the gradients with the activations
    training = streamed.phases["training"]
    largest = optimizer_state_bytes("adamw4bit", [(embedding, 2)], stochastic_rounding=True)
    assert training["optimizer_state"] < largest
    assert training["gradients_at_step"] + training["optimizer_state"] + training["optimizer_step"] \
        < training["gradients"] + training["activations"]
    assert streamed.total("training") == sum(v for k, v in training.items()
                                             if k not in ("gradients_at_step", "optimizer_state", "optimizer_step"))
    assert streamed.over("training") <= -2 * GIB  # 2 GiB to spare beyond the headroom
    assert "train.offload_optimizer=stream -> " in " ".join(memory_check.memory_plan.problems(on_gpu))
    assert plans["qwen3-8b", None].fits()


def test_expandable_segments_needs_an_engine_that_sleeps_at_level_0():
    """``train.expandable_segments`` is refused before anything starts where the run takes two copies (vLLM's
    level-2 wake allocates in its sleep pool, which expandable segments break); with one copy or LoRA it is taken,
    and the allocator's other settings survive it."""
    from rollout_sleep.engine.memory import with_expandable_segments

    for two_copies, why in [(["model.share_weights=false"], "model.share_weights=false"),
                            (["engine.tensor_parallel_size=2"], "each tensor-parallel rank holds a shard")]:
        with pytest.raises(ConfigError, match=rf"train.expandable_segments=true needs an engine that sleeps at level "
                                              rf"0 .*this run takes two copies \({why}"):
            load_config(None, ["train.expandable_segments=true", *two_copies], device="cuda")
    with pytest.raises(ConfigError, match=r"set train.expandable_segments=false"):  # the fix is named
        load_config(None, ["train.expandable_segments=true", "model.share_weights=false"], device="cuda")
    for ok in (["model.share_weights=null"], ["model.share_weights=false", "model.lora.rank=8"]):
        assert load_config(None, ["train.expandable_segments=true", *ok], device="cuda").train.expandable_segments
    # on CPU nothing changes (the recipe says so): not refused
    assert load_config(None, ["train.expandable_segments=true", "model.share_weights=false"]).train.expandable_segments
    cfg = load_config(None, ["train.expandable_segments=true"], device="cuda")
    (problem,) = check_processes(cfg, 2)
    assert problem.startswith("train.expandable_segments=true needs an engine that sleeps at level 0, and with 2")
    for launch in ("FSDP", "DEEPSPEED"):  # one process, whose parameters the launch replaces: two copies too
        (problem,) = check_processes(cfg, 1, launch)
        assert f"under accelerate's {launch} the run takes two copies" in problem
    assert check_processes(cfg, 1) == []
    assert with_expandable_segments("") == "expandable_segments:True"
    assert with_expandable_segments("garbage_collection_threshold:0.6, expandable_segments:False") == \
        "garbage_collection_threshold:0.6,expandable_segments:True"


def test_a_one_copy_trainer_of_a_size_draws_the_weights_its_checkpoint_would_hold(tmp_path):
    """Pure logic (no GPU here: the engine's weight tensors are faked by zeros on the host). One copy of a size
    (CUDA only: vLLM draws placeholder weights from a config alone) draws its weights in place as
    ``make_checkpoint`` of that size and seed writes them: ``tiny``'s wider init (std 0.3) included, so a tiny run
    starts from the same model with one copy or two."""
    from pathlib import Path

    from safetensors.torch import load_file

    from rollout_sleep.weights.checkpoints import make_checkpoint, make_config_dir

    saved = {}
    checkpoint = make_checkpoint(tmp_path / "ckpt", "tiny", seed=3, dtype="float32", device="cpu")
    for f in Path(checkpoint).glob("*.safetensors"):
        saved.update(load_file(f))
    targets = {name: torch.zeros_like(t) for name, t in saved.items()}
    engine = SimpleNamespace(model_path=make_config_dir(tmp_path / "config", "tiny", dtype="float32"),
                             loader=SimpleNamespace(direct_targets=lambda: targets), dtype=torch.float32,
                             pin_weights=lambda why: None)
    model = one_copy.trainer_on_engine(engine, init_seed=3)
    assert [n for n, p in model.named_parameters() if not torch.equal(p.detach(), saved[n])] == []


def test_a_lora_base_is_viewed_only_where_the_layout_is_checked_and_a_resume_names_the_optimizer_that_fits(
        monkeypatch):
    """A LoRA trainer built on views of vLLM's weights (no value compared) takes them only for a checked model type;
    elsewhere it loads its own base (two copies of the base, planned), as on CPU, instead of stopping after vLLM
    started. A resume refused because the one-copy decision changed (here: the model's type) names the fix that
    keeps the saved optimizer."""
    from helpers import load_recipe

    from rollout_sleep.run.optim import optimizer_mismatch, optimizer_record

    recipe = load_recipe()
    run = recipe.GRPORecipe.__new__(recipe.GRPORecipe)
    run.cfg = load_config(None, ["model.lora.rank=8"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for kind, shares in (("llama", True), ("qwen3", True), ("granite", False), ("falcon", False), (None, False)):
        run.model_type = kind
        assert run._shares_base() is shares, kind
    saved = optimizer_record("adamw", True, True)  # one copy, torchao's rounding
    problem = optimizer_mismatch(saved, optimizer_record("adamw", False, False), "step_2")
    assert "keep its optimizer with train.stochastic_rounding=true" in problem

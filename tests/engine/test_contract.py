"""The engine contract (:mod:`rollout_sleep.engine.contract`), one suite run on every implementation against
real vLLM: ``Engine`` (the session's engine) and ``RemoteEngine`` (the session's real ``vllm serve`` on loopback,
serving the untied tiny model: on CPU a path reload of a tied model keeps a stale LM head). Every method,
every state transition and refusal, the prompt forms, close, and two threads calling one engine."""

from __future__ import annotations

import inspect
import threading
from pathlib import Path

import pytest
import torch

from helpers import PROMPTS, hf_greedy, hf_model, hf_scores
from rollout_sleep.engine.contract import EngineClosedError, RolloutEngine, UnsupportedOperation, as_prompts
from rollout_sleep.engine.engine import Engine
from rollout_sleep.engine.state import EngineStateError
from rollout_sleep.serve.remote import RemoteEngine
from rollout_sleep.weights.stream import WeightStream
from rollout_sleep.weights.verify import verify

IMPLEMENTATIONS = ("engine", "remote")
N = 6  # greedy tokens compared with transformers' (fp32: the first 8 are identical, see helpers.assert_follows)
P = PROMPTS[:3]
LONG = [[(11 * j) % 240 + 3 for j in range(300)]]  # full KV blocks (128 tokens each on CPU): the prefix cache keeps them
CONTRACT = ("generate", "score", "sleep", "wake_up", "load_weights", "reset_prefix_cache", "verify_weights", "close")


@pytest.fixture(scope="module")
def reference(ckpts):
    """transformers' greedy tokens of ``prompts`` under checkpoint ``name`` (each computed once)."""
    cache = {}

    def ref(name: str, prompts=P) -> list[list[int]]:
        key = (name, str(prompts))
        if key not in cache:
            cache[key] = hf_greedy(hf_model(ckpts[name]), prompts, N)
        return cache[key]

    return ref


class Case:
    """One implementation under test: the engine, the checkpoints it starts from (``a``) and is given (``b``),
    the calls its work goes through (``(object, attribute)``: a test pauses one mid-operation), a way to load
    weights behind its back (``behind(path)``: no prefix-cache reset), and a closable engine of its kind."""

    def __init__(self, kind, engine, a, b, ckpts, inside_generate, inside_load, behind, closable):
        self.kind, self.engine, self.a, self.b, self.behind = kind, engine, a, b, behind
        self.path = {a: ckpts[a], b: ckpts[b]}
        self.inside_generate, self.inside_load, self.closable = inside_generate, inside_load, closable


@pytest.fixture(params=IMPLEMENTATIONS)
def case(request, ckpts):
    if request.param == "remote":
        server = request.getfixturevalue("server")
        eng = RemoteEngine(server.client(timeout=180), ckpts["untied0"])
        yield Case("remote", eng, "untied0", "untied1", ckpts, (eng.client, "completions"),
                   (eng.client, "reload_weights"), eng.client.reload_weights,
                   lambda: RemoteEngine(server.client(), ckpts["untied0"]))
        if eng.is_asleep:  # back to the original weights, awake, whatever the test did
            eng.wake_up(reload_checkpoint=True)
        elif not eng.closed:
            eng.load_weights(ckpts["untied0"])
        return
    engine = request.getfixturevalue("engine")  # conftest puts it back awake with its original weights

    def closable():  # a wrapper of the session's vLLM: closing it leaves that vLLM running
        return Engine.attach(engine.llm, engine.model_path)

    yield Case(request.param, engine, "tied0", "tied1", ckpts, (engine.llm, "generate"), (engine.loader, "load"),
               lambda path: engine.load_weights(path, reset_prefix_cache=False), closable)


def greedy(engine, prompts=P) -> list[list[int]]:
    return [c.token_ids for c in engine.generate(prompts, max_tokens=N, min_tokens=N, temperature=0.0)]


# ------------------------------------------------------------------------------------------ the surface
def test_every_implementation_is_a_rollout_engine_with_the_contracts_signatures(case):
    e = case.engine
    assert isinstance(e, RolloutEngine)
    assert Path(e.model_path).resolve() == Path(case.path[case.a]).resolve()
    assert e.dtype == torch.float32 and e.on_cuda is torch.cuda.is_available()
    measured = case.kind != "remote"  # a server's memory is not visible to its client
    for figure in (e.memory_before_gib, e.memory_loaded_gib):
        assert isinstance(figure, float) if measured else figure is None
    assert (e.state, e.is_asleep, e.sleep_level, e.closed) == ("awake", False, None, False)
    assert {1, 2} <= set(e.levels)
    for name in CONTRACT:  # every parameter of the contract's method, of the same kind (keyword-only or not)
        want = inspect.signature(getattr(RolloutEngine, name)).parameters
        have = inspect.signature(getattr(type(e), name)).parameters
        for p in want.values():
            if p.kind is p.VAR_KEYWORD:
                assert any(q.kind is q.VAR_KEYWORD for q in have.values()), (type(e).__name__, name, p)
                continue
            assert p.name in have and have[p.name].kind == p.kind, (type(e).__name__, name, p.name)


def test_prompt_forms_a_string_is_one_prompt(case, ckpts):
    """#27: ``generate("1+1=")`` generated for the four prompts '1', '+', '1', '='."""
    from transformers import AutoTokenizer

    e = case.engine
    ids = AutoTokenizer.from_pretrained(ckpts[case.a])("1+1=").input_ids
    one = e.generate("1+1=", max_tokens=3, min_tokens=3, temperature=0.0)
    assert [(c.prompt_index, c.prompt_token_ids) for c in one] == [(0, ids)]
    assert [c.token_ids for c in e.generate(ids, max_tokens=3, min_tokens=3, temperature=0.0)] == [one[0].token_ids]
    many = e.generate(["1+1=", "2+2="], max_tokens=2, temperature=0.0)
    assert [c.prompt_index for c in many] == [0, 1]
    tokenized = e.generate([ids, ids[:2], ids[:3]], max_tokens=2, temperature=0.0)
    assert [c.prompt_token_ids for c in tokenized] == [ids, ids[:2], ids[:3]]
    assert [c.prompt_index for c in e.generate("1+1=", n=2, max_tokens=2, temperature=1.0)] == [0, 0]
    assert e.generate([], max_tokens=2) == []


def test_prompt_forms_vllm_prompt_dicts_arrays_and_what_would_be_read_wrong(case, ckpts):
    """A vLLM prompt dict was iterated as a list of prompts: ``{"prompt_token_ids": ids}`` generated for the text
    'prompt_token_ids'; bytes passed for token ids (their ASCII codes). Now a prompt dict is its prompt, arrays of
    ids are token ids, and bytes, sets and other dicts are refused before anything is sent."""
    import numpy as np
    from transformers import AutoTokenizer

    e = case.engine
    ids = AutoTokenizer.from_pretrained(ckpts[case.a])("1+1=").input_ids

    def run(prompts):
        return [(c.prompt_index, c.prompt_token_ids, c.token_ids)
                for c in e.generate(prompts, max_tokens=3, min_tokens=3, temperature=0.0)]

    want = run(ids)
    assert [p for _, p, _ in want] == [ids]
    for same in ({"prompt_token_ids": ids}, {"prompt": "1+1="}, np.array(ids), torch.tensor(ids),
                 [{"prompt_token_ids": ids}], [{"prompt": "1+1="}], (ids,)):
        assert run(same) == want, same
    assert run(np.array([ids, ids])) == [want[0], (1, *want[0][1:])]
    for wrong, match in [(b"1+1=", "bytes: its items are ints"), ([b"1+1="], "prompt 0 is bytes"),
                         ({"1+1=", "2+2="}, "has no order"), ({"prompt": "1+1=", "multi_modal_data": {}}, "alone"),
                         (torch.tensor([1.0, 2.0]), "list of token ids")]:
        with pytest.raises(TypeError, match=match):
            e.generate(wrong, max_tokens=2)
    assert e.state == "awake" and run(ids) == want


def test_prompt_forms_a_list_mixing_text_and_token_ids(case, ckpts):
    """The contract's "a list of those": ``Engine`` took a list mixing strings and token-id lists, ``RemoteEngine``
    refused it with a ``TypeError``. Both now give each prompt's completions, in prompt order."""
    from transformers import AutoTokenizer

    e = case.engine
    tok = AutoTokenizer.from_pretrained(ckpts[case.a])
    texts = ["1+1=", "2+2=", "3+3="]
    mixed = [texts[0], tok(texts[1]).input_ids, texts[2], P[0]]
    alone = [e.generate(p, max_tokens=3, min_tokens=3, temperature=0.0)[0] for p in mixed]
    got = e.generate(mixed, max_tokens=3, min_tokens=3, temperature=0.0)
    assert [(c.prompt_index, c.prompt_token_ids, c.token_ids) for c in got] == \
        [(i, c.prompt_token_ids, c.token_ids) for i, c in enumerate(alone)]
    assert [c.prompt_index for c in e.generate(mixed, n=2, max_tokens=2, temperature=1.0)] == [0, 0, 1, 1, 2, 2, 3, 3]


# ------------------------------------------------------------------------------------ state transitions
def test_level2_cycle_takes_new_weights_and_refuses_what_vllm_would_get_wrong(case, reference):
    e = case.engine
    assert greedy(e) == reference(case.a)
    report = e.sleep(level=2)
    assert (e.state, e.is_asleep, e.sleep_level) == ("asleep(level=2)", True, 2) and "sleep" in report.seconds
    refused = [(lambda: e.generate(P, max_tokens=2), "cannot generate: the .* is asleep"),
               (lambda: e.sleep(level=2), "already asleep"),
               (lambda: e.sleep(level=1), "already asleep"),
               (lambda: e.wake_up(), "level 2"),
               (lambda: e.load_weights(case.path[case.b]), r"use wake_up\(weights=...\)"),
               (lambda: e.reset_prefix_cache(), "cannot reset the prefix cache")]
    if case.kind != "remote":
        refused.append((lambda: e.verify_weights([]), "cannot verify weights"))
    for call, match in refused:
        with pytest.raises(EngineStateError, match=match):
            call()
        assert e.state == "asleep(level=2)"
    for call, error, match in [(lambda: e.wake_up(weights=case.path[case.b], reload_checkpoint=True), ValueError,
                                "not both"), (lambda: e.sleep(level=3), ValueError, "unknown sleep level 3"),
                               (lambda: e.wake_up(weights=Path(case.path[case.b]) / "missing"), FileNotFoundError,
                                "not a checkpoint directory")]:
        with pytest.raises(error, match=match):
            call()
        assert e.state == "asleep(level=2)"
    report = e.wake_up(weights=case.path[case.b])
    assert {"wake_weights", "load", "wake_kv_cache", "reset"} <= set(report.seconds)
    assert e.state == "awake" and greedy(e) == reference(case.b)
    with pytest.raises(EngineStateError, match="already awake"):
        e.wake_up(weights=case.path[case.a])
    e.load_weights(case.path[case.a])
    assert greedy(e) == reference(case.a)


def test_level1_wakes_without_weights_and_level2_reloads_the_checkpoint_on_request(case, reference):
    e = case.engine
    e.sleep(level=1)
    assert e.state == "asleep(level=1)"
    assert "load" not in e.wake_up().seconds
    assert greedy(e) == reference(case.a)
    e.load_weights(case.path[case.b])
    e.sleep(level=2)
    e.wake_up(reload_checkpoint=True)  # explicit: the original checkpoint, not the trained weights
    assert greedy(e) == reference(case.a)


def test_loads_and_resets_leave_no_stale_prefix(case, reference):
    """Every load resets the prefix cache; ``reset_prefix_cache`` alone does too (a load behind the
    engine's back, here, leaves cached prefixes computed with the old weights)."""
    e = case.engine
    greedy(e, LONG)  # its prefix is now cached
    e.load_weights(case.path[case.b])
    assert greedy(e, LONG) == reference(case.b, LONG)
    greedy(e, LONG)
    case.behind(case.path[case.a])  # the cache still holds the prefix computed with b
    assert greedy(e, LONG) != reference(case.a, LONG)  # stale: the test can tell
    assert e.reset_prefix_cache() is None
    assert greedy(e, LONG) == reference(case.a, LONG)


def test_a_load_interrupted_by_ctrl_c_refuses_requests_until_a_complete_load(case, reference, monkeypatch):
    """A Ctrl-C inside a load may leave a mix of old and new weights (a half-reloaded server dies at its next
    request). ``Engine`` refused to generate then; ``RemoteEngine`` went on generating from whatever the server
    held. Both now raise ``IncompleteWeightsError`` until a complete load, awake or waking from level 2."""
    from rollout_sleep.engine.state import IncompleteWeightsError

    e = case.engine
    target = (e.client, "reload_weights") if case.kind == "remote" else (e.llm, "collective_rpc")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    for interrupt in (lambda: e.load_weights(case.path[case.b]),
                      lambda: (e.sleep(level=2), e.wake_up(weights=case.path[case.b]))):
        monkeypatch.setattr(*target, interrupted)
        with pytest.raises(KeyboardInterrupt):
            interrupt()
        monkeypatch.undo()
        assert e.state == "awake"
        for call in (lambda: e.generate(P, max_tokens=2), e.reset_prefix_cache):
            with pytest.raises(IncompleteWeightsError, match="cannot .*: the last .*(load|reload).* complete"):
                call()
        e.load_weights(case.path[case.b])
        assert greedy(e) == reference(case.b)
        e.load_weights(case.path[case.a])


def test_score_is_teacher_forced_on_both(case, ckpts):
    """``score`` (the teacher-forced comparison verify's refusal points a server's user to) was ``Engine``'s alone:
    ``RemoteEngine.score`` raised ``AttributeError``. Both now give transformers' log-probs of every token."""
    seqs = [P[0] + [9, 8, 7], P[1]]
    got, want = case.engine.score(seqs), hf_scores(hf_model(ckpts[case.a]), seqs)
    assert [len(g) for g in got] == [len(s) - 1 for s in seqs]
    assert max(abs(a - b) for g, w in zip(got, want) for a, b in zip(g, w)) < 1e-3
    assert case.engine.score([]) == []
    case.engine.sleep(level=1)
    with pytest.raises(EngineStateError, match="cannot score: the .* is asleep"):
        case.engine.score(seqs)
    case.engine.wake_up()


# ---------------------------------------------------------------------------- in-memory weights, verify
def test_in_memory_weights_and_verify_or_their_named_refusal(case, reference, ckpts):
    e = case.engine
    model = hf_model(ckpts[case.b])
    e.sleep(level=2)
    if case.kind == "remote":
        with pytest.raises(UnsupportedOperation, match=r"RemoteEngine.wake_up\(weights=<WeightStream>\): a vllm "
                                                        r"serve takes new weights only as a checkpoint directory"):
            e.wake_up(weights=WeightStream(model, dtype=e.dtype))
        assert e.state == "asleep(level=2)"  # refused before anything was touched
        e.wake_up(weights=case.path[case.b])
        for call in (lambda: e.verify_weights(model), lambda: verify(e, model)):
            with pytest.raises(UnsupportedOperation, match=r"RemoteEngine.verify_weights: .* Instead: verify an "
                                                            "in-process Engine"):
                call()
        return
    e.wake_up(weights=WeightStream(model, dtype=e.dtype))
    assert greedy(e) == reference(case.b)
    assert e.verify_weights(model).ok and verify(e, model).ok
    with torch.no_grad():
        model.model.norm.weight.add_(1.0)
    report = verify(e, model)
    assert not report.ok and any(k.endswith("model.norm.weight") for k in report.mismatched), report


def test_what_an_implementation_cannot_do_is_refused_by_name(case):
    """Never an ``AttributeError``: every contract method exists; a mode one class cannot offer raises
    ``UnsupportedOperation`` (a ``NotImplementedError``) naming the class, the method and what to use instead."""
    from vllm import SamplingParams

    e = case.engine
    for name in CONTRACT:
        assert callable(getattr(e, name))
    refusals = {"remote": [(lambda: e.generate(P, SamplingParams(max_tokens=2)), r"generate\(sampling=...\)"),
                           (lambda: e.load_weights(case.path[case.b], method="direct"), r"load_weights\(method="),
                           (lambda: e.load_weights(case.path[case.b], strict=False), r"load_weights\(strict=False\)"),
                           (lambda: e.load_weights({"w": torch.zeros(1)}), r"load_weights\(weights=<dict>\)"),
                           (lambda: e.run_on_model(lambda m: 0), r"run_on_model"),
                           (lambda: e.push(case.path[case.b]), r"push")]}
    for call, match in refusals.get(case.kind, []):
        with pytest.raises(UnsupportedOperation, match=rf"{type(e).__name__}\.{match}.*Instead: ") as err:
            call()
        assert isinstance(err.value, NotImplementedError) and err.value.engine_class == type(e).__name__
    assert e.state == "awake" and greedy(e)  # nothing was touched


# ------------------------------------------------------------------------------------------------ close
def test_a_closed_engine_refuses_every_call_and_says_closed(case, reference):
    """#27: after ``close()`` calls failed with ``AttributeError`` on ``None`` and the state said awake."""
    closed = case.closable()
    closed.close()
    assert (closed.state, closed.closed, closed.is_asleep) == ("closed", True, False)
    for call in (lambda: closed.generate(P, max_tokens=2), lambda: closed.sleep(level=2), lambda: closed.wake_up(),
                 lambda: closed.load_weights(case.path[case.a]), lambda: closed.reset_prefix_cache(),
                 lambda: closed.verify_weights([]), lambda: closed.score([P[0]])):
        with pytest.raises(EngineClosedError, match=rf"cannot .*: this {type(closed).__name__} is closed"):
            call()
    closed.close()  # twice: nothing to do
    assert closed.state == "closed"
    assert greedy(case.engine) == reference(case.a)  # what it wrapped runs on


# ---------------------------------------------------------------------------------------------- threads
def pause_once(monkeypatch, target):
    """Make the next call of ``target`` (``(object, attribute)``) wait, once it has started, until released:
    the engine operation that makes it is then in flight for as long as the test likes."""
    obj, name = target
    real = getattr(obj, name)
    entered, release, used = threading.Event(), threading.Event(), []

    def paused(*args, **kwargs):
        if not used:
            used.append(True)
            entered.set()
            release.wait(120)
        return real(*args, **kwargs)

    monkeypatch.setattr(obj, name, paused)
    return entered, release


def in_thread(fn):
    out: dict = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as err:  # noqa: BLE001  (checked by the test)
            out["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def test_sleep_waits_for_a_running_generate(case, reference, monkeypatch):
    """#27: ``sleep()`` while another thread's ``generate`` ran returned at once, and that generate never
    returned (vLLM's paused scheduler). Now the sleep waits its turn: the generate finishes, then it sleeps."""
    e = case.engine
    entered, release = pause_once(monkeypatch, case.inside_generate)
    gen_thread, gen = in_thread(lambda: greedy(e))
    try:
        assert entered.wait(60)
        sleep_thread, slept = in_thread(lambda: e.sleep(level=2))
        sleep_thread.join(1.0)
        assert sleep_thread.is_alive(), "sleep() returned while a generate was running"
    finally:
        release.set()
    gen_thread.join(120)
    sleep_thread.join(120)
    assert gen.get("value") == reference(case.a), gen
    assert "error" not in slept and e.state == "asleep(level=2)"


def test_a_load_waits_for_a_running_generate_and_a_generate_for_a_running_load(case, reference, monkeypatch):
    """#27: a load during a generate changed the weights under it. Both orders now run one after the other:
    the generate sees the weights it started with, a generate behind a load sees the new ones."""
    e = case.engine
    entered, release = pause_once(monkeypatch, case.inside_generate)
    gen_thread, gen = in_thread(lambda: greedy(e))
    try:
        assert entered.wait(60)
        load_thread, loaded = in_thread(lambda: e.load_weights(case.path[case.b]))
        load_thread.join(1.0)
        assert load_thread.is_alive(), "load_weights() ran while a generate was running"
    finally:
        release.set()
    gen_thread.join(120)
    load_thread.join(120)
    assert gen.get("value") == reference(case.a) and "error" not in loaded, (gen, loaded)
    assert greedy(e) == reference(case.b)

    entered, release = pause_once(monkeypatch, case.inside_load)
    load_thread, loaded = in_thread(lambda: e.load_weights(case.path[case.a]))
    try:
        assert entered.wait(60)
        gen_thread, gen = in_thread(lambda: greedy(e))
        gen_thread.join(1.0)
        assert gen_thread.is_alive(), "generate() ran while a load was running"
    finally:
        release.set()
    load_thread.join(120)
    gen_thread.join(120)
    assert "error" not in loaded and gen.get("value") == reference(case.a), (gen, loaded)


# ----------------------------------------------------------------------------------------- pure logic
@pytest.mark.parametrize("prompts, want", [
    ("1+1=", ["1+1="]), (["a", "b"], ["a", "b"]), ([1, 2, 3], [[1, 2, 3]]), ([[1], [2, 3]], [[1], [2, 3]]),
    ((x for x in ["a"]), ["a"]), ([], []), (torch.tensor([4, 5]), [[4, 5]]), (["a", [7]], ["a", [7]]),
    ({"prompt_token_ids": [4, 5]}, [[4, 5]]), ({"prompt": "a"}, ["a"]), ([{"prompt": "a"}, [7]], ["a", [7]]),
    (torch.tensor([[1, 2], [3, 4]]), [[1, 2], [3, 4]]), ([range(2)], [[0, 1]]),
])
def test_as_prompts(prompts, want):
    assert as_prompts(prompts) == want


@pytest.mark.parametrize("prompts", [5, [1.5], [["a"]], [None], b"12", bytearray(b"1"), ["a", b"1"], {"a", "b"},
                                     {"prompt_token_ids": [1], "cache_salt": "x"}, {"a": 1}, [{"prompt": 3}],
                                     torch.tensor([1.5]), [True, False], torch.tensor(3)])
def test_as_prompts_refuses_what_is_not_a_prompt(prompts):
    with pytest.raises(TypeError, match="prompt"):
        as_prompts(prompts)


@pytest.mark.parametrize("info", [
    {"model_config": {"dtype": "torch.bfloat16"}, "device_config": {"device": "cuda"}},
    "ModelConfig(model='/m', dtype=torch.bfloat16, seed=0), device_config=cuda, load_config=LoadConfig()",
])
def test_a_remote_engine_reads_the_served_dtype_and_device(info):
    """From ``/server_info``: JSON where vLLM gives it, its text form otherwise (a stand-in client)."""
    class Client:
        base_url = "http://stand-in"

        def models(self):
            return ["m"]

        def is_sleeping(self):
            return False

        def server_info(self):
            return info

    engine = RemoteEngine(Client())
    assert (engine.dtype, engine.on_cuda, engine.memory_before_gib) == (torch.bfloat16, True, None)

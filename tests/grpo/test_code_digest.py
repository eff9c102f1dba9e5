"""The digest of a reward's code (what a resume compares): it changes with what computes the reward, wherever the
user wrote it (a helper, a constant, a class, a module beside the reward file), and with nothing else (comments,
unrelated code, the process, the folder)."""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import pytest

from rollout_sleep.grpo.code_digest import code_digest
from rollout_sleep.grpo.rewards import resolve_rewards

HELPERS = "task_helpers_cd"  # a module beside the reward file, imported by name


def _digest(folder, text: str, helpers: str | None = None, name: str = "reward") -> str:
    (folder / "rw.py").write_text(text)
    if helpers is not None:
        (folder / f"{HELPERS}.py").write_text(helpers)
    for m in [m for m in sys.modules if m.startswith("rollout_sleep_user_rewards") or m.startswith(HELPERS)]:
        sys.modules.pop(m)
    (reward,) = resolve_rewards([f"{folder / 'rw.py'}:{name}"], load_models=False)
    return code_digest(reward.fn)


BASE = """import re
PATTERN = re.compile(r'[0-9]+')
LIMIT = 5


def _count(c):
    return len(PATTERN.findall(c))


def reward(completions, **kw):
    return [float(_count(c) > LIMIT) for c in completions]
"""
EDITS = {  # each changes what computes the reward
    "constant": ("LIMIT = 5", "LIMIT = 6"), "pattern": ("[0-9]+", "[0-9]"),
    "helper": ("return len(", "return 1 + len("),
}


@pytest.mark.parametrize("edit", EDITS)
def test_an_edit_of_what_computes_the_reward_changes_its_digest(tmp_path, edit):
    first = _digest(tmp_path, BASE)
    assert _digest(tmp_path, "# a comment\n" + BASE + "\n\ndef unrelated():\n    return 1\n") == first
    assert _digest(tmp_path, BASE.replace(*EDITS[edit])) != first


SHAPES = {  # code shapes that reach the user's own code: (reward file, whether the helpers' unused code counts)
    "from-import": (f"from {HELPERS} import helper\n\n\ndef reward(completions, **kw):\n"
                    "    return [float(helper(c)) for c in completions]\n", False),
    "module attribute": (f"import {HELPERS}\n\n\ndef reward(completions, **kw):\n"
                         f"    return [float({HELPERS}.helper(c)) for c in completions]\n", False),
    "star import": (f"from {HELPERS} import *\n\n\ndef reward(completions, **kw):\n"
                    "    return [float(helper(c)) for c in completions]\n", False),
    "dispatch table": (f"from {HELPERS} import helper\nCHECKS = {{'len': helper}}\n\n\n"
                       "def reward(completions, **kw):\n    return [float(CHECKS['len'](c)) for c in completions]\n", False),
    "cached helper": ("import functools\n\n\n@functools.lru_cache\ndef cached(c):\n"
                      f"    from {HELPERS} import helper\n    return helper(c)\n\n\n"
                      "def reward(completions, **kw):\n    return [float(cached(c)) for c in completions]\n", True),
}
HELPER = "def helper(c):\n    return len(c) > 3\n\n\ndef other():\n    return 0\n"


@pytest.mark.parametrize("shape", SHAPES)
def test_a_module_beside_the_reward_is_followed_to_what_the_reward_uses(tmp_path, shape):
    text, whole = SHAPES[shape]  # whole: imported inside a function that has not run yet, so read as a file
    first = _digest(tmp_path, text, HELPER)
    assert _digest(tmp_path, text, HELPER + "\n# a comment\n") == first
    assert (_digest(tmp_path, text, HELPER.replace("return 0", "return 1")) == first) != whole  # unused code
    assert _digest(tmp_path, text, HELPER.replace("> 3", "> 4")) != first


HELD = {  # a reward whose template's {} is what it holds: (template, one value, another)
    "closure": ("def make(n):\n    def reward(completions, **kw):\n        return [float(len(c) > n) for c in completions]\n"
                "    return reward\n\n\nreward = make({})\n", 3, 4),
    "object": ("class Score:\n    def __init__(self, n):\n        self.n = n\n\n    def __call__(self, completions, **kw):\n"
               "        return [float(len(c) > self.n) for c in completions]\n\n\nreward = Score({})\n", 3, 4),
    "bound method": ("class Score:\n    T = {}\n\n    def _inner(self, c):\n        return len(c) > self.T\n\n"
                     "    def score(self, completions, **kw):\n        return [float(self._inner(c)) for c in completions]\n"
                     "\n\nreward = Score().score\n", 3, 4),
    "partial of a function": ("import functools\n\n\ndef check(c):\n    return len(c) > {}\n\n\n"
                              "def base(completions, scorer, stop, **kw):\n    return [float(scorer(c)) for c in completions]\n"
                              "\n\nreward = functools.partial(base, scorer=check, stop=frozenset({{'a', 'b', 'c', 'd'}}))\n", 3, 4),
    "compiled pattern": ("import functools\nimport re\n\n\ndef base(completions, pattern, **kw):\n"
                         "    return [float(bool(pattern.search(c))) for c in completions]\n\n\n"
                         "reward = functools.partial(base, pattern=re.compile({}))\n", "r'[0-9]+'", "r'[0-9]'"),
    "wrapper's closure": ("import functools\n\n\ndef scale(k):\n    def deco(fn):\n        @functools.wraps(fn)\n"
                          "        def wrapper(completions, **kw):\n            return [k * r for r in fn(completions)]\n"
                          "        return wrapper\n    return deco\n\n\ndef base(completions, **kw):\n"
                          "    return [1.0 for c in completions]\n\n\nreward = scale({})(base)\n", 2.0, 3.0),
    # cycles, an int of 6000 digits, 20^16 paths through a dict graph: no hang, no crash
    "cyclic values": ("import functools\n\n\ndef base(completions, table, **kw):\n    return [0.0 for c in completions]\n"
                      "\n\na = [1, 2**20000]\na.append(a)\ng = {{i: {{}} for i in range(20)}}\nfor i in g:\n    for j in g:\n"
                      "        g[i][j] = g[j]\nreward = functools.partial(base, table=({}, a, g))\n", 1, 2),
}


@pytest.mark.parametrize("held", HELD)
def test_objects_closures_and_partials_are_digested_by_what_they_hold(tmp_path, held):
    """A callable object's attributes, a closure's cells, a partial's arguments (functions by their code, sets in
    order, a compiled pattern by what pickling keeps), a bound method's class, a decorator's closure: each changes
    the digest when what it holds changes, and the same code gives the same digest."""
    template, one, another = HELD[held]
    first = _digest(tmp_path, template.format(one))
    assert _digest(tmp_path, template.format(one)) == first and _digest(tmp_path, template.format(another)) != first


def test_a_builtin_or_a_module_getattr_is_no_failure(tmp_path):
    assert code_digest(functools.partial(len)) is None  # a builtin: nothing to read
    lazy = ("import task_lazy_cd\n\n\ndef reward(completions, **kw):\n    try:\n"
            "        t = task_lazy_cd.threshold\n    except KeyError:\n        t = 3\n"
            "    return [float(len(c) > t) for c in completions]\n")
    (tmp_path / "task_lazy_cd.py").write_text("_T = {}\n\n\ndef __getattr__(name):\n    return _T[name]\n")
    sys.modules.pop("task_lazy_cd", None)
    assert _digest(tmp_path, lazy).startswith("code2:")  # a module-level __getattr__ that raises is not run


def test_a_digest_is_the_same_in_another_process_and_another_folder(tmp_path):
    """Sets of strings (their order changes with PYTHONHASHSEED), a path computed at import, deep code (a long
    elif chain: a syntax tree's dump would exhaust the recursion limit), helper chains longer than it."""
    text = ("import functools\nimport os\nHERE = os.path.dirname(os.path.abspath(__file__))\n"
            "STOP = frozenset({'alpha', 'beta', 'gamma', 'delta', 'epsilon'})\n\n\nclass Rule:\n"
            "    def __init__(self, word):\n        self.word = word\n\n\n"
            "RULES = {Rule('a'), Rule('b'), Rule('c'), frozenset({'yes', 'y', 'ok'})}\n\n\n"
            "def deep(c):\n    if c == '0':\n        return 0\n"
            + "".join(f"    elif c == '{i}':\n        return {i}\n" for i in range(1, 400))
            + "    return -1\n\n\n"
            + "".join(f"def h{i}(c):\n    return h{i + 1}(c)\n\n\n" for i in range(1200))
            + "def h1200(c):\n    return deep(c)\n\n\n"
            "def scored(completions, rules, **kw):\n    return [float(h0(c) > 0 and c not in STOP) for c in completions]\n"
            "\n\nreward = functools.partial(scored, rules=RULES)\n")
    digests = set()
    for seed, folder in (("1", "a"), ("2", "b")):
        where = tmp_path / folder
        where.mkdir()
        (where / "rw.py").write_text(text)
        code = ("import sys\nfrom rollout_sleep.grpo.code_digest import code_digest\n"
                "from rollout_sleep.grpo.rewards import resolve_rewards\n"
                f"print(code_digest(resolve_rewards([{str(where / 'rw.py') + ':reward'!r}], load_models=False)[0].fn))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                             env={**os.environ, "PYTHONHASHSEED": seed})
        assert out.returncode == 0, out.stderr[-2000:]
        digests.add(out.stdout.strip())
    assert len(digests) == 1, digests

"""A digest of the code that computes a reward, for a resume to compare with the run's: the function's tokens, then,
following the names it reads, the statements of the user's own code it uses (helpers, classes, constants and the
statements that build them, modules imported from the reward's own folder), each once.

Tokens, not text or syntax trees: comments and blank lines do not count, the digest is the same on every Python
version, and deep code cannot exhaust the recursion limit. Only statements are digested, never values: a value
computed at import (a path, a host name, a set's order) would differ between two processes running the same code.
Code outside the reward's folder (installed packages, the standard library) is not followed."""

from __future__ import annotations

import ast
import collections
import functools
import hashlib
import inspect
import io
import sys
import textwrap
import tokenize
from pathlib import Path
from types import ModuleType

_SKIPPED_TOKENS = (tokenize.COMMENT, tokenize.NL, tokenize.ENCODING)
_LIBRARY_DIRS = ("site-packages", "dist-packages")
_DEPTH = 4  # how deep a partial's arguments and an object's attributes are followed
_LONG = 100_000  # characters: a statement longer is digested by its text
SCHEME = "code2"  # a digest's prefix: a resume compares digests of one scheme only (a run saved by an older version)


def code_digest(fn) -> str | None:
    """The digest of what computes ``fn`` (a function, a method, a ``functools.partial``, a callable object), or
    ``None`` where its source cannot be read (a builtin, code made by ``exec``) and for this library's own rewards
    (the library's version stands for them)."""
    digest = _Digest()
    return f"{SCHEME}:{digest.hexdigest()}" if digest.add_callable(fn) else None


def _tokens(text: str) -> bytes:
    """``text``'s tokens, without comments and blank lines (its text where it does not tokenize alone, or where it
    is too long to tokenize quickly: a literal table of a megabyte)."""
    if len(text) > _LONG:
        return text.encode()
    try:
        toks = tokenize.generate_tokens(io.StringIO(textwrap.dedent(text)).readline)
        return "\x00".join(t.string for t in toks if t.type not in _SKIPPED_TOKENS).encode()
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return text.encode()


def _closure(fn) -> list:
    """What a function made inside another holds from it (``make(3)``'s 3; a decorator's wrapped function)."""
    cells = getattr(fn, "__closure__", None) or ()
    out = []
    for cell in cells:
        try:
            out.append(cell.cell_contents)
        except ValueError:  # an empty cell
            pass
    return out


def _used(node: ast.AST) -> tuple[set[str], set[tuple[str, ...]]]:
    """The names ``node`` reads and its attribute chains (``utils.scoring.helper`` -> ``("utils", "scoring",
    "helper")``), found without recursion."""
    names, chains = set(), set()
    for n in ast.walk(node):
        if isinstance(n, ast.Name):
            names.add(n.id)
        elif isinstance(n, ast.Attribute):
            chain, base = [n.attr], n.value
            while isinstance(base, ast.Attribute):
                chain.append(base.attr)
                base = base.value
            if isinstance(base, ast.Name):
                chains.add((base.id, *reversed(chain)))
    return names, chains


class _Module:
    """A module of the user's: its source lines and, for each name its top level binds, the statements that bind it
    (a ``def``, a ``class``, an assignment, an import; inside a top-level ``if`` / ``try`` / ``with`` too), plus the
    top-level calls that change a name in place (``WORDS.extend(...)``) and its star imports."""

    def __init__(self, module: ModuleType, tree: ast.Module, lines: list[str]):
        self.module, self.lines = module, lines
        self.bindings: dict[str, list[ast.stmt]] = {}
        self.star: list[ast.ImportFrom] = []
        todo = list(tree.body)
        while todo:
            stmt = todo.pop(0)
            if isinstance(stmt, (ast.If, ast.Try, ast.With, ast.For, ast.While)) or \
                    type(stmt).__name__ == "TryStar":
                todo[:0] = [s for part in ("body", "orelse", "finalbody") for s in getattr(stmt, part, [])] + \
                    [s for h in getattr(stmt, "handlers", []) for s in h.body]
                continue
            for name in self._bound(stmt):
                self.bindings.setdefault(name, []).append(stmt)

    def _bound(self, stmt: ast.stmt) -> set[str]:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            return {stmt.name}
        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
            if any(a.name == "*" for a in stmt.names):
                self.star.append(stmt)
                return set()
            return {(a.asname or a.name).split(".")[0] for a in stmt.names}
        targets = stmt.targets if isinstance(stmt, ast.Assign) else \
            [stmt.target] if isinstance(stmt, (ast.AnnAssign, ast.AugAssign)) else []
        if isinstance(stmt, ast.Expr):  # a call at the top level: WORDS.extend([...]), register(fn)
            return _used(stmt)[0]
        return {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}

    def text(self, stmt: ast.stmt) -> str:
        first = min([stmt.lineno, *(d.lineno for d in getattr(stmt, "decorator_list", []))])
        return "".join(self.lines[first - 1:stmt.end_lineno])


class _Digest:
    def __init__(self):
        self._hash = hashlib.blake2b(digest_size=16)
        self._root: Path | None = None  # the folder whose modules are followed
        self._modules: dict[str, _Module | None] = {}
        self._seen: set = set()
        self._todo: collections.deque = collections.deque()  # what is left to follow: breadth first, no recursion

    def hexdigest(self) -> str:
        return self._hash.hexdigest()

    def add_callable(self, fn) -> bool:
        values = []  # a partial's arguments, a method's or a callable object's attributes
        while isinstance(fn, functools.partial):
            values += [fn.args, dict(fn.keywords)]
            fn = fn.func
        if inspect.ismethod(fn):  # a bound method: its object's attributes and its class
            values.append(fn.__self__)
            fn = fn.__func__
        if not (inspect.isfunction(fn) or inspect.isclass(fn)):  # a callable object: its attributes and class
            values.append(vars(fn) if hasattr(fn, "__dict__") else None)
            fn = type(fn)
        fn = inspect.unwrap(fn) if inspect.isfunction(fn) else fn
        if (getattr(fn, "__module__", None) or "").startswith("rollout_sleep."):
            return False
        try:
            file = Path(inspect.getsourcefile(fn) or "")
            source = inspect.getsource(fn)
        except (OSError, TypeError):
            return False
        if not any(part in _LIBRARY_DIRS for part in file.parts):  # an installed reward: its own code only
            self._root = file.resolve().parent
        self._hash.update(_tokens(source))
        for value in values + _closure(fn):
            self._add_value(value, 0)
        module = sys.modules.get(getattr(fn, "__module__", None) or "")
        try:
            tree = ast.parse(textwrap.dedent(source))
        except SyntaxError:
            return True
        if module is not None:
            for stmt in tree.body:
                self._follow_used(module, stmt)
        while self._todo:
            follow, *args = self._todo.popleft()
            follow(*args)
        return True

    def _module(self, module: ModuleType) -> _Module | None:
        """The module parsed, if it is the user's: its file in the reward's folder (or below), not a package's."""
        name = module.__name__
        if name not in self._modules:
            self._modules[name] = None
            file = getattr(module, "__file__", None)
            if file and self._root is not None and file.endswith(".py"):
                path = Path(file).resolve()
                if path.is_relative_to(self._root) and not any(p in _LIBRARY_DIRS for p in path.parts):
                    try:
                        text = path.read_text(encoding="utf-8")
                        self._modules[name] = _Module(module, ast.parse(text), text.splitlines(keepends=True))
                    except (OSError, SyntaxError, ValueError):
                        pass
        return self._modules[name]

    def _follow_used(self, module: ModuleType, node: ast.AST) -> None:
        names, chains = _used(node)
        self._todo.extend((self._follow, module, name) for name in sorted(names))
        self._todo.extend((self._follow_chain, module, chain) for chain in sorted(chains))
        for n in ast.walk(node):  # imports inside a function: what they name, in the module they name
            if isinstance(n, ast.ImportFrom):
                target = self._imported(module, n, n.module)
                if target is None and not n.level:  # not imported yet (the function never ran): the file
                    self._add_file(n.module)
                for alias in n.names if target is not None else ():
                    value = getattr(target, alias.name, None)
                    self._todo.append((self._follow_module, value) if isinstance(value, ModuleType) else
                                      (self._follow, target, alias.name))
            elif isinstance(n, ast.Import):
                for alias in n.names:
                    if alias.name in sys.modules:
                        self._todo.append((self._follow_module, sys.modules[alias.name]))
                    else:
                        self._add_file(alias.name)

    def _add_file(self, name: str | None) -> None:
        """A module of the reward's folder that is not imported yet, by its file's tokens, whole."""
        if not name or self._root is None or ("file", name) in self._seen:
            return
        self._seen.add(("file", name))
        base = self._root.joinpath(*name.split("."))
        for file in (base.with_suffix(".py"), base / "__init__.py"):
            if file.is_file():
                try:
                    self._hash.update(_tokens(file.read_text(encoding="utf-8")))
                except (OSError, ValueError):
                    pass
                return

    def _follow(self, module: ModuleType, name: str) -> None:
        """Digest the statements of ``module`` that bind ``name``, then what they read, each once."""
        key = (module.__name__, name)
        if key in self._seen:
            return
        self._seen.add(key)
        info = self._module(module)
        if info is None:
            return
        stmts = info.bindings.get(name)
        if not stmts:
            for star in info.star:  # from helpers import *
                target = self._imported(module, star, star.module)
                if target is not None:
                    self._todo.append((self._follow, target, name))
            return
        for stmt in stmts:
            self._hash.update(_tokens(info.text(stmt)))
            if isinstance(stmt, ast.ImportFrom):
                for alias in stmt.names:
                    if (alias.asname or alias.name) != name:
                        continue
                    target = self._imported(module, stmt, stmt.module)
                    if target is None:
                        continue
                    value = getattr(target, alias.name, None)
                    if isinstance(value, ModuleType):  # from package import submodule
                        self._todo.append((self._follow_module, value))
                    else:
                        self._todo.append((self._follow, target, alias.name))
            elif isinstance(stmt, ast.Import):
                for alias in stmt.names:
                    if alias.asname == name:  # import package.sub as name
                        target = sys.modules.get(alias.name)
                        if target is not None:
                            self._todo.append((self._follow_module, target))
            else:
                self._follow_used(module, stmt)

    def _follow_chain(self, module: ModuleType, chain: tuple[str, ...]) -> None:
        """``utils.scoring.helper``: through the modules of the chain to the first name that is not one."""
        obj = vars(module).get(chain[0])
        for attr in chain[1:]:
            if not isinstance(obj, ModuleType):
                return
            nxt = getattr(obj, attr, None)
            if not isinstance(nxt, ModuleType):
                self._todo.append((self._follow, obj, attr))
                return
            obj = nxt
        if isinstance(obj, ModuleType) and len(chain) > 1:
            self._todo.append((self._follow_module, obj))

    def _follow_module(self, module: ModuleType) -> None:
        """A module used as a whole (``from package import submodule``): its top level, each name once."""
        info = self._module(module)
        if info is None or ("module", module.__name__) in self._seen:
            return
        self._seen.add(("module", module.__name__))
        for name in sorted(info.bindings):
            self._todo.append((self._follow, module, name))

    def _imported(self, module: ModuleType, stmt: ast.ImportFrom, target: str | None) -> ModuleType | None:
        """The module ``from target import ...`` in ``module`` names (relative imports resolved)."""
        if stmt.level:
            base = module.__name__ if hasattr(module, "__path__") else module.__name__.rpartition(".")[0]
            for _ in range(stmt.level - 1):
                base = base.rpartition(".")[0]
            target = f"{base}.{target}" if target else base
        return sys.modules.get(target or "")

    def _add_value(self, value, depth: int) -> None:
        """A partial's argument or an object's attribute, by what it is, never by its ``repr`` (it can hold an
        address) or its order where it has none (a set)."""
        if depth > 4 * _DEPTH:  # a deeply nested structure: its type at this depth
            self._hash.update(type(value).__qualname__.encode())
        elif isinstance(value, (str, bytes, int, float, complex, bool, type(None))):
            self._hash.update(repr(value).encode())
        elif isinstance(value, (list, tuple)):
            self._hash.update(f"{type(value).__name__}[{len(value)}]".encode())
            for v in value:
                self._add_value(v, depth + 1)
        elif isinstance(value, (set, frozenset)):
            self._hash.update(f"set[{len(value)}]".encode())
            for v in sorted(value, key=repr):
                self._add_value(v, depth + 1)
        elif isinstance(value, dict):
            self._hash.update(f"dict[{len(value)}]".encode())
            for k in sorted(value, key=repr):
                self._add_value(k, depth + 1)
                self._add_value(value[k], depth + 1)
        elif isinstance(value, ModuleType):
            self._hash.update(f"module {value.__name__}".encode())
        elif inspect.isfunction(value) or inspect.isclass(value) or inspect.ismethod(value):
            fn = inspect.unwrap(value.__func__ if inspect.ismethod(value) else value) \
                if not inspect.isclass(value) else value
            self._hash.update(f"code {getattr(fn, '__qualname__', '')}".encode())
            module = sys.modules.get(getattr(fn, "__module__", None) or "")
            if module is None or self._module(module) is None:
                return  # not the user's: its name is enough
            if "." not in fn.__qualname__:  # defined at the top level: its statement and what it reads
                self._todo.append((self._follow, module, fn.__name__))
                return
            try:  # a nested function or class: its own code
                self._hash.update(_tokens(inspect.getsource(fn)))
            except (OSError, TypeError):
                pass
        elif depth < _DEPTH and hasattr(value, "__dict__"):
            cls = type(value)
            self._hash.update(f"object {cls.__module__}.{cls.__qualname__}".encode())
            self._add_value(cls, depth + 1)
            self._add_value(vars(value), depth + 1)
        else:
            self._hash.update(f"object {type(value).__qualname__}".encode())

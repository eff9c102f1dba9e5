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
import collections.abc
import copyreg
import functools
import hashlib
import inspect
import io
import itertools
import sys
import textwrap
import tokenize
from pathlib import Path
from types import ModuleType

_SKIPPED_TOKENS = (tokenize.COMMENT, tokenize.NL, tokenize.ENCODING)
_LIBRARY_DIRS = ("site-packages", "dist-packages")
_DEPTH = 4  # how deep a partial's arguments and an object's attributes are followed
_LONG = 100_000  # characters: a statement longer is digested by its text
_VALUES = 100_000  # values digested for one reward's arguments and attributes; past it, their types and sizes
_ITEMS = 10_000  # items of one container digested; past it, its size
_STATEMENTS = 20_000  # statements followed for one reward; past it, nothing more
SCHEME = "code2"  # a digest's prefix: a resume compares digests of one scheme only (a run saved by an older version)


def code_digest(fn) -> str | None:
    """The digest of what computes ``fn`` (a function, a method, a ``functools.partial``, a callable object), or
    ``None`` where its source cannot be read (a builtin, code made by ``exec``) and for this library's own rewards
    (the library's version stands for them)."""
    digest = _Digest()
    try:
        return f"{SCHEME}:{digest.hexdigest()}" if digest.add_callable(fn) else None
    except Exception:  # noqa: BLE001 - user code can raise anything when looked at: the function's own code then
        try:
            return f"{SCHEME}:own:{hashlib.blake2b(_tokens(inspect.getsource(inspect.unwrap(fn))), digest_size=16).hexdigest()}"
        except Exception:  # noqa: BLE001
            return None


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


@functools.lru_cache(maxsize=1)
def _python_dirs() -> tuple[Path, ...]:
    """Python's own folders (its standard library, an environment's prefix): never the user's code, even below the
    reward's folder (a reward file in a home folder holding a Python installation)."""
    import sysconfig

    dirs = {sys.prefix, sys.base_prefix, sys.exec_prefix, *(sysconfig.get_paths().get(k) for k in
                                                             ("stdlib", "platstdlib", "purelib", "platlib"))}
    return tuple(Path(d).resolve() for d in dirs if d)


def _attribute(module: ModuleType, name: str):
    """``module.name`` as the module holds it, or its submodule if imported, without running a module-level
    ``__getattr__`` (a lazy import, a lookup that raises)."""
    found = vars(module).get(name)
    return found if found is not None else sys.modules.get(f"{module.__name__}.{name}")


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


def _is_main_block(stmt: ast.stmt) -> bool:
    """``if __name__ == "__main__":``"""
    test = stmt.test if isinstance(stmt, ast.If) else None
    return isinstance(test, ast.Compare) and isinstance(test.left, ast.Name) and test.left.id == "__name__"


class _Module:
    """A module of the user's: its source lines and, for each name its top level binds, the statements that bind it
    (a ``def``, a ``class``, an assignment, an import; inside a top-level ``if`` / ``try`` / ``with`` too), plus the
    top-level calls that change a name in place (``WORDS.extend(...)``) and its star imports."""

    def __init__(self, module: ModuleType, tree: ast.Module, lines: list[str]):
        self.module, self.lines = module, lines
        self.bindings: dict[str, list[ast.stmt]] = {}
        self.star: list[ast.ImportFrom] = []
        self.within: dict[int, list[ast.stmt]] = {}  # id(statement) -> the compound statements around it
        todo = [(stmt, []) for stmt in tree.body]
        while todo:
            stmt, around = todo.pop(0)
            if _is_main_block(stmt):  # a script's own code, never the reward's
                continue
            if isinstance(stmt, (ast.If, ast.Try, ast.With, ast.For, ast.While)) or \
                    type(stmt).__name__ == "TryStar":
                inner = [s for part in ("body", "orelse", "finalbody") for s in getattr(stmt, part, [])] + \
                    [s for h in getattr(stmt, "handlers", []) for s in h.body]
                todo[:0] = [(s, [*around, stmt]) for s in inner]
                continue
            if around:
                self.within[id(stmt)] = around
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
        if isinstance(stmt, ast.Expr):  # a method call at the top level changes its receiver: WORDS.extend([...])
            func = stmt.value.func if isinstance(stmt.value, ast.Call) else None
            while isinstance(func, ast.Attribute):
                func = func.value
                if isinstance(func, ast.Name):
                    return {func.id}
            return set()
        return {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}

    def headers(self, stmt: ast.stmt) -> list[tuple[str, ast.AST]]:
        """The headers of the compound statements around ``stmt`` (``if STRICT:``, ``for w in WORDS:``): their text
        and the expression they read."""
        out = []
        for outer in self.within.get(id(stmt), []):
            body = outer.body[0].lineno if outer.body else outer.lineno + 1
            expr = getattr(outer, "test", None) or getattr(outer, "iter", None) or \
                ast.Tuple(elts=[i.context_expr for i in getattr(outer, "items", [])], ctx=ast.Load())
            out.append(("".join(self.lines[outer.lineno - 1:max(body - 1, outer.lineno)]), expr))
        return out

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
        self._values = 0  # values digested so far (_VALUES)
        self._statements = 0  # statements followed so far (_STATEMENTS)

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
            values.append(fn)
            fn = type(fn)
        while inspect.isfunction(fn) and hasattr(fn, "__wrapped__"):  # a decorator's wrapper: its code, its closure
            values.append(_closure(fn))
            try:  # its code object: getsource would unwrap the function itself
                values.append(_tokens(inspect.getsource(fn.__code__)))
            except (OSError, TypeError):
                pass
            fn = fn.__wrapped__
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
                if path.is_relative_to(self._root) and not any(p in _LIBRARY_DIRS for p in path.parts) and \
                        not any(path.is_relative_to(d) for d in _python_dirs()):
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
        for n in ast.walk(node):
            # imports inside a function: the files they name, whole, whether imported yet or not (the digest must
            # not depend on what else the process imported)
            if isinstance(n, ast.ImportFrom) and not n.level:
                self._add_file(n.module)
            elif isinstance(n, ast.Import):
                for alias in n.names:
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
                    text = file.read_text(encoding="utf-8")
                    tree = ast.parse(text)
                except (OSError, ValueError, SyntaxError):
                    return
                self._hash.update(_tokens(text))
                package = name if file.name == "__init__.py" else name.rpartition(".")[0]
                for n in ast.walk(tree):  # and the files of the folder it imports
                    if isinstance(n, ast.ImportFrom):
                        target = n.module or ""
                        if n.level:
                            parts = package.split(".") if package else []
                            target = ".".join([*parts[:max(len(parts) - n.level + 1, 0)], *([target] if target else [])])
                        self._add_file(target)
                    elif isinstance(n, ast.Import):
                        for alias in n.names:
                            self._add_file(alias.name)
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
            self._statements += 1
            if self._statements > _STATEMENTS:  # a reward reaching that far: what it reached so far counts
                return
            self._hash.update(_tokens(info.text(stmt)))
            for header, expr in info.headers(stmt):  # if STRICT: T = 5 / else: T = 3
                self._hash.update(_tokens(header + " pass"))
                self._follow_used(module, expr)
            if isinstance(stmt, ast.ImportFrom):
                for alias in stmt.names:
                    if (alias.asname or alias.name) != name:
                        continue
                    target = self._imported(module, stmt, stmt.module)
                    if target is None:
                        continue
                    value = _attribute(target, alias.name)
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
            nxt = _attribute(obj, attr)
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
        self._hash.update(self._value(value, depth, set()))

    def _value(self, value, depth: int, path: set[int]) -> bytes:
        """A partial's argument or an object's attribute, digested by what it is, never by its ``repr`` (it can hold
        an address) or its order where it has none (a set's items sorted by their own digests); a container met
        again on its own path is a back reference, and past a budget of values only sizes count."""
        self._values += 1
        h = hashlib.blake2b(digest_size=16)
        if self._values > _VALUES or depth > 4 * _DEPTH:
            h.update(f"{type(value).__qualname__} ...".encode())
        elif isinstance(value, (bytes, bytearray)):
            h.update(bytes(value))
        elif isinstance(value, (bool, type(None), float, complex, str)):
            h.update(repr(value).encode())
        elif isinstance(value, int):
            h.update(hex(value).encode())  # repr refuses ints of more than 4300 digits
        elif id(value) in path:
            h.update(b"back reference")
        elif isinstance(value, (list, tuple, set, frozenset, dict)):
            inner = path | {id(value)}
            items = list(value.items()) if isinstance(value, dict) else list(value)
            h.update(f"{type(value).__name__}[{len(items)}]".encode())
            unordered = isinstance(value, (set, frozenset, dict))
            if unordered and len(items) > _ITEMS:  # which items come first depends on the process: its size only
                items = []
            parts = [self._value(v, depth + 1, inner) for v in items[:_ITEMS]]
            if unordered:
                parts.sort()
            for part in parts:
                h.update(part)
        elif isinstance(value, functools.partial):
            h.update(b"partial")
            for part in (value.func, value.args, dict(value.keywords)):
                h.update(self._value(part, depth + 1, path | {id(value)}))
        elif inspect.ismethod(value):
            h.update(self._value(value.__self__, depth + 1, path | {id(value)}))
            h.update(self._value(value.__func__, depth + 1, path | {id(value)}))
        elif isinstance(value, ModuleType):
            h.update(f"module {value.__name__}".encode())
        elif inspect.isfunction(value) or inspect.isclass(value):
            h.update(self._code(value, depth, path))
        elif depth < _DEPTH and hasattr(value, "__dict__"):
            cls = type(value)
            h.update(f"object {cls.__module__}.{cls.__qualname__}".encode())
            h.update(self._value(cls, depth + 1, path))
            h.update(self._value(vars(value), depth + 1, path | {id(value)}))
        else:  # a compiled pattern, a range, a path, a number type, an array: what pickling would keep of it
            h.update(f"object {type(value).__module__}.{type(value).__qualname__}".encode())
            try:
                reduce = copyreg.dispatch_table.get(type(value))  # re.Pattern's, registered by re
                reduced = reduce(value) if reduce is not None else value.__reduce_ex__(4)
            except Exception:  # noqa: BLE001 - not picklable: its type is all there is
                reduced = None
            if isinstance(reduced, tuple) and depth < _DEPTH:  # a deque's items come as an iterator
                reduced = tuple(list(itertools.islice(x, _ITEMS)) if isinstance(x, collections.abc.Iterator) else x
                                for x in reduced[1:])
                h.update(self._value(reduced, depth + 1, path | {id(value)}))
        return h.digest()

    def _code(self, fn, depth: int, path: set[int]) -> bytes:
        """A function or class given as a value: its name; the user's own by its code (a top-level one through its
        statement, followed; a nested one or a lambda by its tokens and the names it reads) and what its closure
        holds."""
        h = hashlib.blake2b(f"code {getattr(fn, '__qualname__', '')}".encode(), digest_size=16)
        if inspect.isfunction(fn):
            for cell in _closure(fn):  # a decorator's wrapped function, a factory's arguments
                h.update(self._value(cell, depth + 1, path | {id(fn)}))
            fn = inspect.unwrap(fn)
        module = sys.modules.get(getattr(fn, "__module__", None) or "")
        if module is None or self._module(module) is None:
            return h.digest()  # not the user's: its name is enough
        if "." not in fn.__qualname__ and "<" not in fn.__qualname__:  # a top-level def or class
            self._todo.append((self._follow, module, fn.__name__))
            return h.digest()
        try:
            source = inspect.getsource(fn)
            h.update(_tokens(source))
            tree = ast.parse(textwrap.dedent(source))
        except (OSError, TypeError, SyntaxError, ValueError):
            return h.digest()
        for stmt in tree.body:
            self._follow_used(module, stmt)
        return h.digest()

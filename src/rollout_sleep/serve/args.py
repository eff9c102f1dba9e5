"""What a managed ``vllm serve`` may be given: the loopback / API-key guard over ``extra_args`` (flags read as
vLLM's parser reads them: ``_`` for ``-``, unambiguous prefixes, a ``--config`` YAML) and the eager / compile
flags among them."""

from __future__ import annotations

import ipaddress
from pathlib import Path

LOOPBACK = "127.0.0.1"
GUARDED_ARGS = ("--host", "--port", "--api-key", "--model")  # set through ServerProcess's own arguments


def check_extra_args(extra_args: list[str]) -> None:
    """Refuse ``vllm serve`` arguments that would bypass the loopback/API-key guard or contradict the
    managed process's own settings (``--host``, ``--port``, ``--api-key``, ``--model``, also inside a
    ``--config`` YAML file)."""
    for i, arg in enumerate(extra_args):
        flag = guarded_flag(arg.split("=", 1)[0])
        if flag in GUARDED_ARGS:
            raise ValueError(f"{flag} is not allowed in extra_args: pass it as ServerProcess({flag[2:].replace('-', '_')}=...) "
                             "so the loopback guard sees it (another host needs allow_remote=True and an api_key)")
        if flag == "--config":
            path = arg.split("=", 1)[1] if "=" in arg else (extra_args[i + 1] if i + 1 < len(extra_args) else "")
            try:
                import yaml

                cfg = yaml.safe_load(Path(path).read_text()) or {}
            except Exception as err:
                raise ValueError(f"cannot read the --config file {path!r} to check it for host/api-key: {err}") from None
            keys = {k.replace("_", "-") for k in cfg} if isinstance(cfg, dict) else set()
            bad = sorted(keys & {a[2:] for a in GUARDED_ARGS})
            if bad:
                raise ValueError(f"the --config file {path!r} sets {', '.join(bad)}: pass these as ServerProcess "
                                 "arguments instead, so the loopback guard sees them")


def guarded_flag(flag: str) -> str:
    """The guarded flag (or ``--config``) that vLLM's parser would read ``flag`` as: it turns ``_`` into ``-``
    and argparse takes any unambiguous prefix (``--hos 0.0.0.0`` is ``--host``); other flags unchanged."""
    if not flag.startswith("--") or len(flag) < 3:
        return flag
    name = flag.replace("_", "-")
    for guarded in (*GUARDED_ARGS, "--config"):
        if guarded.startswith(name):
            return guarded
    return flag


def compile_args(extra_args: list[str]) -> tuple[list[str], list[str]]:
    """The ``extra_args`` that set eager mode (``--enforce-eager`` / ``--no-enforce-eager``, as vLLM's parser reads
    them: ``_`` for ``-``, a prefix) and those that set compilation (``-O``, ``--optimization-level``,
    ``--compilation-config`` / ``-cc``, dotted keys included), each as vLLM reads it."""
    eager, compile_ = [], []
    for arg in extra_args:
        name = arg.split("=", 1)[0]
        if name.startswith("--"):
            name = name.replace("_", "-")
        head = name.split(".", 1)[0]
        for flag in ("--enforce-eager", "--no-enforce-eager"):
            if len(name) >= len(flag) - len("-eager") and flag.startswith(name):
                eager.append(flag)
        if head in ("-O", "--optimization-level", "--compilation-config", "-cc") or \
                (name.startswith("-O") and not name.startswith("--")):
            compile_.append(head)
    return eager, compile_


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False

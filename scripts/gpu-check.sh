#!/usr/bin/env bash
# The GPU check, for a machine with a CUDA device: the tests marked `gpu`, then trainer steps on random-initialised
# Qwen3-0.6B-shaped student and Qwen3-1.7B-shaped teacher (bf16 and float32; tokens/s, peak GPU memory), then the
# peak memory of chunked vs whole-batch logits at Qwen's vocabulary. Results go to $OUT (default: gpu-check/).
# Usage: scripts/gpu-check.sh   (with the project installed, or with wheels in .whl/ installed to .site/ first)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-check}
mkdir -p "$out"
python=${PYTHON:-python3}
if [ -d .whl ] && ! "$python" -c "import pydantic, fastapi, datasets" 2>/dev/null; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --target .site .whl/*.whl
  export PYTHONPATH=$PWD/.site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}
"$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')" | tee "$out/device.txt"
"$python" -m pytest -m gpu -q -p no:cacheprovider --durations=10 tests/test_gpu.py tests/test_sample.py \
  tests/test_student.py 2>&1 | tee "$out/pytest.log"
"$python" scripts/gpu_bench.py --out "$out/bench" 2>"$out/bench.log" | tee "$out/bench.json"
"$python" -m trainer.bench.memory --device cuda | tee "$out/memory.json"

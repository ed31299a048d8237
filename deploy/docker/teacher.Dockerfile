# syntax=docker/dockerfile:1
# The teacher scoring service on NVIDIA GPUs: vLLM's CUDA build (the `gpu` extra of pyproject.toml).
#   docker build -f deploy/docker/teacher.Dockerfile -t tropd-teacher:0.1.0 .
# The CUDA libraries come with the torch and vLLM wheels; the host needs an NVIDIA driver for CUDA 13
# and the NVIDIA container toolkit (`docker run --gpus all`, or `deploy.resources` in compose).
FROM python:3.11.9-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# gcc/g++: triton and torch.compile (inductor) compile kernels and their launchers when the engine starts
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc=4:12.2.0-3 g++=4:12.2.0-3 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin tropd \
 && mkdir -p /data /runs \
 && chown tropd:tropd /data /runs

WORKDIR /app

# Dependencies first (a layer that changes only with pyproject.toml or the pins), then the source
COPY pyproject.toml README.md deploy/docker/constraints-gpu.txt ./
RUN python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" \
    > /tmp/requirements.txt \
 && pip install --no-cache-dir -c constraints-gpu.txt "vllm==0.32.0" -r /tmp/requirements.txt \
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
CMD ["tropd", "teacher", "serve", "--model", "/data/toy/teacher", "--engine", "vllm", "--host", "0.0.0.0", \
     "--port", "8000", "--api-key-env", "TROPD_API_KEY"]

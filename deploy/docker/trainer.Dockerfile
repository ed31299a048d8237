# syntax=docker/dockerfile:1
# The student trainer (`tropd train`, `tropd toy build`, `torchrun -m tropd train`); no vLLM.
#   docker build -f deploy/docker/trainer.Dockerfile -t tropd-trainer:0.1.0 .
# The student computes on the CPU (torch's CPU build, DDP over gloo under torchrun): the toy world, Compose and
# the k8s cpu-demo. Students on GPUs (the k8s gpu overlay) train in the teacher image, which has CUDA torch.
# This image also fills the models volume (`tropd models fetch`) and builds the toy world.
FROM python:3.11.9-slim-bookworm

# the default is the CPU build of torch, which PyTorch's CPU index serves
ARG TORCH_VERSION=2.13.0+cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin tropd \
 && mkdir -p /data /runs \
 && chown tropd:tropd /data /runs

WORKDIR /app

# Dependencies first (a layer that changes only with pyproject.toml or the pins), then the source
COPY pyproject.toml README.md deploy/docker/constraints.txt ./
RUN python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" \
    > /tmp/requirements.txt \
 && pip install --no-cache-dir --extra-index-url "$TORCH_INDEX_URL" -c constraints.txt "torch==$TORCH_VERSION" \
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
HEALTHCHECK NONE
CMD ["tropd", "train", "--help"]

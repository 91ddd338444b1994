# syntax=docker/dockerfile:1
# kvserve with SmolLM2-135M-Instruct built in. Two targets:
#   docker build -t kvserve .                       CUDA (the default, last stage): torch's CUDA build from PyPI
#   docker build --target cpu -t kvserve:cpu .      CPU only: torch's CPU build, a much smaller image
# Run: docker run --gpus all -p 8000:8000 kvserve   (or the cpu image without --gpus); settings are
# KVSERVE_* variables (-e KVSERVE_MAX_NUM_SEQS=32) or flags after the image name (kvserve --max-num-seqs 32).
# Give it time to drain on stop: docker stop -t 45 (KVSERVE_DRAIN_TIMEOUT is 30 s).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: a virtual environment in /opt/venv, by the same script as `make install` ----
FROM scratch AS source
COPY pyproject.toml README.md /src/
COPY model/ /src/model/
COPY service/ /src/service/
COPY clients/ /src/clients/

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# g++ compiles the native CPU kernels into the venv (model/kernels/native.py); the runtime image needs none,
# unless it runs on a CPU with other vector units than the build machine's (then torch's kernels run).
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
WORKDIR /src
COPY deploy/install.sh deploy/install.sh

# torch and the model come first, in their own layer, so that a source change does not reinstall them.
FROM build AS build-cuda
RUN sh deploy/install.sh /opt/venv/bin/python
COPY --from=source /src/ ./
RUN sh deploy/install.sh /opt/venv/bin/python .

FROM build AS build-cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN sh deploy/install.sh /opt/venv/bin/python
COPY --from=source /src/ ./
RUN sh deploy/install.sh /opt/venv/bin/python .

# ---- runtime: the venv only, a non-root user, settings as KVSERVE_* variables ----
FROM ${PYTHON_IMAGE} AS runtime
RUN useradd --create-home --uid 10001 --user-group --shell /usr/sbin/nologin kvserve
# tests/deploy/test_entrypoint.py starts the server with exactly these variables and the ENTRYPOINT below.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    KVSERVE_HOST=0.0.0.0 \
    KVSERVE_PORT=8000 \
    KVSERVE_MODEL=smollm2 \
    KVSERVE_DRAIN_TIMEOUT=30
WORKDIR /home/kvserve
USER 10001:10001
EXPOSE 8000
# The port opens once the model has loaded (a failed load exits 1); /health is 503 while draining and if the engine
# died. The start period covers the load.
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('KVSERVE_PORT', '8000'), timeout=4)"]
# Exec form: kvserve is PID 1 and gets SIGTERM itself, then stops admitting and drains in-flight requests.
ENTRYPOINT ["kvserve", "serve"]

FROM runtime AS cpu
COPY --from=build-cpu /opt/venv /opt/venv

FROM runtime AS cuda
COPY --from=build-cuda /opt/venv /opt/venv
# Read by the NVIDIA container toolkit; the CUDA libraries come with torch's wheels, the driver from the host.
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

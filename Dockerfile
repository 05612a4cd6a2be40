# syntax=docker/dockerfile:1
# The pipeline image: `pipeline up` on /etc/pipeline/pipeline.yaml, as an unprivileged user.
# Multi-arch (amd64, arm64): docker buildx build --platform linux/amd64,linux/arm64 -t REGISTRY/edge-pipeline:TAG --push .
# Two stages: wheels are built in `builder` (which has compilers, for any dependency without a wheel for the
# target platform); the final stage installs those wheels only, so it holds no compiler and no build files.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY setup.cfg pyproject.toml README.md ./
COPY pipeline ./pipeline
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
# tini as PID 1: forwards SIGTERM to `pipeline up` and reaps orphans (it is not a compiler: a 30 kB binary)
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 pipeline \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/pipeline --no-create-home pipeline \
 && mkdir -p /var/lib/pipeline /etc/pipeline \
 && chown 10001:10001 /var/lib/pipeline
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels edge-pipeline
# the example configuration and models; mount your own over /etc/pipeline/pipeline.yaml (and models)
COPY deploy/pipeline.yaml /etc/pipeline/pipeline.yaml
COPY models /etc/pipeline/models
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIPELINE_DATA_DIR=/var/lib/pipeline
# the outbox (outbox.sqlite3) and the model cache: must outlive the container
VOLUME ["/var/lib/pipeline"]
USER 10001:10001
WORKDIR /var/lib/pipeline
# control API: /healthz, /readyz, /stages, /metrics (control.listen in the config: 0.0.0.0:5888)
EXPOSE 5888
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5888/readyz', timeout=4)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["tini", "--", "pipeline", "up", "-c", "/etc/pipeline/pipeline.yaml"]

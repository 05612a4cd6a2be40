# Minimal image for the pipeline stack (the deployment issue hardens it: multi-arch, healthcheck, volumes).
FROM python:3.11-slim
RUN useradd --create-home --uid 10001 pipeline
WORKDIR /app
COPY setup.cfg pyproject.toml README.md ./
COPY pipeline ./pipeline
RUN pip install --no-cache-dir .
USER pipeline
ENTRYPOINT ["pipeline", "up", "-c", "/etc/pipeline/pipeline.yaml"]

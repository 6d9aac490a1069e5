# One image for every Outbox process: worker, beat, flower and the migration job
# (docker-compose.yml, Procfile). Configuration comes only from OUTBOX_* variables.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Only the package: never .venv, .git or var/ (a developer's var/secret.key).
# README.m[d]: copied when present, no error when not.
COPY pyproject.toml README.m[d] /src/
COPY config /src/config
COPY tasks /src/tasks
COPY worker /src/worker
RUN pip install /src && rm -rf /src

RUN useradd --create-home --uid 10001 --user-group outbox \
    && mkdir -p /app/var \
    && chown outbox:outbox /app/var
WORKDIR /app
USER outbox

# Flower, when this image runs `outbox flower --address 0.0.0.0`.
EXPOSE 5555
# SIGTERM (docker stop) gives the worker a warm shutdown: running tasks finish.
CMD ["outbox", "worker"]

# Image for the sync-to-device server side (sync-worker, syncctl) and the sample
# device agent (sync-agent). See docker-compose.yml.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first, from pyproject.toml alone, so code edits reuse this layer.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY . .
RUN pip install --no-cache-dir . \
    && useradd --system --uid 10001 --home-dir /app --no-create-home app \
    && mkdir -p /data \
    && chown app /data

# /data is owned by app, so a fresh named volume mounted there is writable too.
USER app
CMD ["sync-worker"]

# Image for the sync-to-device server side (sync-worker, syncctl) and the sample
# device agent (sync-agent). See docker-compose.yml.
#
# The project goes in as a built wheel, as a user would install it from a registry: no
# source tree in the image, nothing imported from a checkout.

FROM python:3.11-slim AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /src

# Wheels of the dependencies first, from pyproject.toml alone, so code edits reuse this
# layer.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > requirements.txt \
    && pip wheel --wheel-dir /wheels -r requirements.txt

COPY . .
RUN pip wheel --no-deps --wheel-dir /wheels .


FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SYNC_MODEL=/etc/sync-to-device/model.yaml

COPY --from=build /wheels /tmp/wheels
# --no-index: exactly the wheels built above. The three --help calls import every
# program's modules, so a subpackage missing from the wheel fails the build, not the
# first job.
RUN pip install --no-cache-dir --no-index --find-links /tmp/wheels /tmp/wheels/*.whl \
    && rm -rf /tmp/wheels \
    && syncctl --help > /dev/null \
    && sync-worker --help > /dev/null \
    && sync-agent --help > /dev/null

# The example model that ships inside the package, at the path SYNC_MODEL names. Users
# mount their own model file over it (docker-compose.yml shows how).
RUN mkdir -p /etc/sync-to-device \
    && syncctl model example > /etc/sync-to-device/model.yaml

# Non-root. /data (agent databases) and /secrets (device secrets, written 0600) belong to
# app, so fresh named volumes mounted there are writable by it too: Docker copies the
# directory's owner and mode into an empty volume.
RUN useradd --system --uid 10001 --home-dir /app --create-home app \
    && mkdir -p /data /secrets \
    && chown app /data /secrets \
    && chmod 0700 /secrets

USER app
WORKDIR /app
CMD ["sync-worker"]

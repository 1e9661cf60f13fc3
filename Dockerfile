# syntax=docker/dockerfile:1
# The Hokusai Registry image: `hokusai serve` by default; deploy/compose.yaml and deploy/kubernetes/ also run
# `hokusai db upgrade` and `mlflow server` from it (mlflow comes with the `server` extra).
#   docker build -t hokusai:local .
#   docker build -t hokusai:local --build-arg GIT_COMMIT=$(git rev-parse --short=12 HEAD) \
#     --build-arg BUILD_DATE=$(date -u +%F) .

# Python 3.11 on Debian 12: the interpreter and C library the test suite runs on, so the image installs the same
# wheels the tests ran against (every pinned dependency has one: no compiler needed).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/hokusai
WORKDIR /src
# The dependencies first, from pyproject.toml alone (an empty package stands in for src/): this 1.3 GB layer is
# rebuilt when a pinned version changes, not at every change of the code.
COPY pyproject.toml README.md ./
RUN mkdir -p src/hokusai && touch src/hokusai/__init__.py \
    && /opt/hokusai/bin/pip install '.[server]'
COPY src ./src
# Then the package itself; not editable: the image holds the code, not a link to a checkout it does not have.
RUN /opt/hokusai/bin/pip install --no-deps --force-reinstall .

FROM ${PYTHON_IMAGE}
ARG GIT_COMMIT=""
ARG BUILD_DATE=""
LABEL org.opencontainers.image.title="Hokusai Registry" \
      org.opencontainers.image.revision="${GIT_COMMIT}" \
      org.opencontainers.image.created="${BUILD_DATE}"

# A fixed uid, so Kubernetes' runAsUser/fsGroup and volume ownership can name it.
RUN groupadd --system --gid 10001 hokusai \
    && useradd --system --uid 10001 --gid hokusai --home-dir /home/hokusai --create-home --shell /usr/sbin/nologin hokusai \
    && mkdir -p /var/lib/hokusai /mlflow/artifacts \
    && chown hokusai:hokusai /var/lib/hokusai /mlflow/artifacts

COPY --from=build /opt/hokusai /opt/hokusai

# HOKUSAI_GIT_COMMIT/BUILD_DATE answer /version (empty: "unknown"). GIT_PYTHON_REFRESH: MLflow's client asks
# GitPython for a commit when it creates runs (evaluations); there is no git in the image and that is fine.
ENV PATH=/opt/hokusai/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    GIT_PYTHON_REFRESH=quiet \
    HOKUSAI_HOME=/var/lib/hokusai \
    HOKUSAI_GIT_COMMIT=${GIT_COMMIT} \
    HOKUSAI_BUILD_DATE=${BUILD_DATE}

# HOME: the model cache, evaluation datasets and (without HOKUSAI_BOOTSTRAP_ADMIN_KEY) the first admin key.
VOLUME ["/var/lib/hokusai"]
WORKDIR /var/lib/hokusai
# Numeric, so Kubernetes can check runAsNonRoot without reading the image's /etc/passwd.
USER 10001:10001
EXPOSE 8001

# /live answers while the event loop runs, whatever MLflow and the database do: a container is restarted for
# being stuck, never for a dependency being down (/ready says that). No curl in a slim image: Python's urllib.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8001/live', timeout=4)"]

CMD ["hokusai", "serve", "--host", "0.0.0.0", "--port", "8001"]

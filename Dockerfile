# syntax=docker/dockerfile:1
# graphiti-bridge: build a virtualenv from the lock, then copy it into a slim runtime that
# runs as a non-root user. Configure with BRIDGE_* variables; listening beyond loopback
# needs a token: BRIDGE_TOKEN, or BRIDGE_TOKEN_FILE=/run/secrets/bridge_token.
#
# BASE_IMAGE is any Debian bookworm image with Python 3.11 and its venv module: the official
# slim image by default (python at /usr/local/bin), or Debian's own python3 (/usr/bin).
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/bridge
WORKDIR /src
# Dependencies (with the graphiti extra) pinned by hash; this layer changes only with the lock.
COPY requirements.lock ./
RUN /opt/bridge/bin/pip install --no-cache-dir --require-hashes -r requirements.lock
COPY pyproject.toml README.md ./
COPY bridge ./bridge
# The bridge itself, then out with the installers: nothing at run time installs anything.
RUN /opt/bridge/bin/pip install --no-cache-dir --no-deps . \
    && /opt/bridge/bin/pip uninstall --yes pip setuptools

FROM ${BASE_IMAGE}
# The embedded FalkorDB (graphiti backend) links libgomp, which slim images leave out.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1=12.2.0-14+deb12u1 \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 bridge \
    && mkdir /data \
    && chown bridge:bridge /data
COPY --from=build /opt/bridge /opt/bridge
ENV PATH=/opt/bridge/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    BRIDGE_HOST=0.0.0.0 \
    BRIDGE_PORT=8765 \
    BRIDGE_DATA_DIR=/data
USER 10001:10001
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8765
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8765/readyz', timeout=2).status != 200)"]
ENTRYPOINT ["graphiti-bridge", "serve"]

# cachegate: HTTP caching reverse proxy, built from this checkout.
#   docker build -t cachegate .
#   docker run --stop-timeout 30 -p 8080:8080 -p 127.0.0.1:8081:8081 \
#     -e CACHEGATE_ADMIN_TOKEN=$(openssl rand -hex 16) --ulimit nofile=65536:65536 \
#     -v cachegate-cache:/var/cache/cachegate cachegate
#   (--stop-timeout above shutdown_grace's 20 s, Docker's default being 10 s; the admin port
#   on the host's loopback only)
#
# Config: /etc/cachegate/cachegate.yaml (deploy/cachegate.yaml), rules beside it in
# /etc/cachegate/rules; mount your own over them. The cache lives in the volume.
#
# Open files: besides client and upstream connections, the body files of disk-tier hits stay
# open for sendfile (up to a twentieth of the disk budget's worth of bodies), so raise the
# limit: docker run --ulimit nofile=65536:65536, compose "ulimits: {nofile: 65536}", systemd
# LimitNOFILE=65536. process_open_fds and process_max_fds in /metrics show how close it is.

# -- build: the project and its dependencies into a virtualenv -----------------------------
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
# The cluster extra (Redis's client) too: cluster mode is a config section away.
RUN python -m venv /opt/cachegate && /opt/cachegate/bin/pip install ".[cluster]"

# -- run: the virtualenv, the config and rules, a user without privileges -------------------
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PATH=/opt/cachegate/bin:$PATH
COPY --from=build /opt/cachegate /opt/cachegate
COPY deploy/cachegate.yaml /etc/cachegate/cachegate.yaml
COPY rules /etc/cachegate/rules
# A numeric user, so that Kubernetes' runAsNonRoot can check it is not root.
RUN groupadd --system --gid 10001 cachegate \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/cache/cachegate --shell /usr/sbin/nologin cachegate \
    && mkdir -p /var/cache/cachegate \
    && chown cachegate:cachegate /var/cache/cachegate
VOLUME ["/var/cache/cachegate"]
USER 10001:10001
WORKDIR /var/cache/cachegate

# 8080: clients; 8081: the admin API (/metrics, /healthz, purges; a token is required).
EXPOSE 8080 8081
# SIGTERM: stop accepting, finish in-flight requests within shutdown_grace, flush, exit 0.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=5s --start-period=15s --retries=3 \
    CMD ["cachegate", "health", "--config", "/etc/cachegate/cachegate.yaml"]
ENTRYPOINT ["cachegate"]
# One worker per CPU this container may use (its CPU quota and cpuset, not the host's CPUs).
CMD ["run", "--config", "/etc/cachegate/cachegate.yaml", "--workers", "auto"]

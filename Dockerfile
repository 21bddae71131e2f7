# cachegate: HTTP caching reverse proxy.
#   docker build -t cachegate .
#   docker run -p 8080:8080 -e CACHEGATE_ADMIN_TOKEN=... -v cachegate-cache:/var/cache/cachegate cachegate
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
# The cluster extra (Redis's client) too: cluster mode is a config section away.
RUN pip install ".[cluster]" && rm -rf /src

COPY deploy/cachegate.yaml /etc/cachegate/cachegate.yaml
COPY rules /etc/cachegate/rules

RUN useradd --system --home-dir /var/cache/cachegate --shell /usr/sbin/nologin cachegate \
    && mkdir -p /var/cache/cachegate \
    && chown cachegate:cachegate /var/cache/cachegate
VOLUME ["/var/cache/cachegate"]
USER cachegate
WORKDIR /var/cache/cachegate

EXPOSE 8080 8081
STOPSIGNAL SIGTERM
# One worker per CPU: the hit path is CPU-bound, and workers share the disk tier.
CMD ["cachegate", "run", "--config", "/etc/cachegate/cachegate.yaml", "--workers", "auto"]

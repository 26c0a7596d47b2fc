# Slim, non-root image of the relay. TLS terminates in front (a proxy or load balancer).
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY rescue ./rescue
COPY supervisor ./supervisor
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
COPY --from=build /install /usr/local
RUN useradd --system --uid 10001 --home-dir /var/lib/beach-rescue --create-home rescue
USER rescue
ENV BEACH_RESCUE_HOST=0.0.0.0 \
    BEACH_RESCUE_STATE_DIR=/var/lib/beach-rescue \
    BEACH_RESCUE_TOKEN_KEYS=/etc/beach-rescue/keys
EXPOSE 9443
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:9443/healthz', timeout=2).status != 200)"
ENTRYPOINT ["beach-rescue", "serve"]

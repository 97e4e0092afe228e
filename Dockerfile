# syntax=docker/dockerfile:1
#
# walcast in a container.
#
#   docker build -t walcast .
#   docker run --rm -p 4000:4000 \
#     -e DATABASE_URL='postgres://walcast:secret@db.internal:5432/app?sslmode=prefer' \
#     -v "$PWD/walcast.toml:/etc/walcast/walcast.toml:ro" \
#     walcast
#
# It listens on 0.0.0.0:4000, which walcast serves only with an auth mode: set
# WALCAST_AUTH_MODE=jwt and WALCAST_JWT_SECRET (or [auth] in the config file), or
# WALCAST_AUTH_MODE=none to serve without auth on purpose.
# Configuration: environment variables (DATABASE_URL, WALCAST_LOG, …) and the
# file /etc/walcast/walcast.toml, mounted read-only (WALCAST_CONFIG points at
# it). The server listens on 0.0.0.0:4000: WebSocket, /metrics, /health, /ready.

# --- build -------------------------------------------------------------------
FROM rust:1-slim-bookworm AS builder
WORKDIR /src
COPY . .
# The registry and target caches survive between builds (BuildKit); the binary
# is copied out of the cached target dir so the next stage can see it.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin walcast \
 && install -m 0755 target/release/walcast /usr/local/bin/walcast

# --- run ---------------------------------------------------------------------
FROM debian:bookworm-slim
# ca-certificates: TLS to PostgreSQL; curl: the health check.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system walcast \
 && useradd --system --gid walcast --home-dir /var/lib/walcast --create-home \
        --shell /usr/sbin/nologin walcast \
 && mkdir -p /etc/walcast

COPY --from=builder /usr/local/bin/walcast /usr/local/bin/walcast

ENV WALCAST_CONFIG=/etc/walcast/walcast.toml \
    WALCAST_LISTEN=0.0.0.0:4000 \
    WALCAST_LOG=info

USER walcast
WORKDIR /var/lib/walcast
EXPOSE 4000
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD curl -fsS http://127.0.0.1:4000/health || exit 1
# SIGTERM (Docker's default stop signal) makes walcast stop gracefully.
ENTRYPOINT ["walcast"]
CMD ["serve"]

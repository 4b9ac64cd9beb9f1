# cellar: a self-hosted Nix binary cache server.
#
# Build:
#   docker build -t cellar .
#
# Run. Everything in the config file can also be set with environment variables:
# CELLAR_<KEY>, with `__` between nested keys (see config/cellar.toml). Example with an S3 bucket:
#   docker run -d --name cellar -p 127.0.0.1:8080:8080 --stop-timeout 30 \
#     --ulimit nofile=65536:65536 \
#     -v cellar-state:/var/lib/cellar \
#     -e CELLAR_STORE__KIND=s3 -e CELLAR_STORE__BUCKET=nix-cache \
#     -e CELLAR_STORE__ENDPOINT=http://minio.internal:9000 -e CELLAR_STORE__REGION=us-east-1 \
#     -e AWS_ACCESS_KEY_ID=... -e AWS_SECRET_ACCESS_KEY=... \
#     -e CELLAR_SIGNING__GENERATED_KEY_NAME=cache.example.org-1 \
#     cellar
#   docker logs cellar 2>&1 | grep trusted-public-keys
#
# Or with a config file mounted read-only:
#   docker run -d --name cellar -p 127.0.0.1:8080:8080 --stop-timeout 30 \
#     --ulimit nofile=65536:65536 \
#     -v cellar-state:/var/lib/cellar \
#     -v ./cellar.toml:/etc/cellar/cellar.toml:ro \
#     cellar serve --config /etc/cellar/cellar.toml
# Environment variables override the file, so CELLAR_LISTEN below wins over `listen` in it.
#
# The working directory is /var/lib/cellar (a volume, owned by uid 10001), so the defaults
# ./cellar-data (local store), ./cellar-key.sec (signing key generated on first start) and, with
# an S3 store, ./cellar-nar-cache (the NAR disk cache) land there. A named volume inherits that ownership; a bind mount must be writable by uid 10001
# (`chown 10001:10001 DIR`). Key files you made yourself (`cellar keygen`) must be readable by
# uid 10001; mount them read-only and list them in CELLAR_SIGNING__KEY_FILES.
#
# A signing key:
#   docker run --rm -v cellar-state:/var/lib/cellar cellar \
#     keygen cache.example.org-1 --out /var/lib/cellar/cache.sec

# ---- builder ---------------------------------------------------------------------------------
FROM rust:1.95.0-slim-bookworm AS builder
# C toolchain bits for the -sys crates (ring, zstd, liblzma, bzip2).
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc g++ make perl pkg-config \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /build

# rust-toolchain.toml is not copied: it asks for rustfmt and clippy, which the image lacks and a
# release build does not need; the image's 1.95.0 is the pinned toolchain.

# Dependencies first, against a dummy crate, so this layer is reused until Cargo.toml or
# Cargo.lock change.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src

# The real sources. COPY keeps the files' mtimes, which may be older than the dummy build:
# touch the crate roots so cargo rebuilds cellar itself instead of keeping the dummy.
COPY src ./src
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked \
    && install -D -m 0755 target/release/cellar /out/cellar

# ---- runtime ---------------------------------------------------------------------------------
FROM debian:bookworm-slim

# ca-certificates: https S3 endpoints. curl: the HEALTHCHECK below.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 cellar \
    && useradd --system --uid 10001 --gid cellar --home-dir /var/lib/cellar \
        --shell /usr/sbin/nologin cellar \
    && mkdir -p /var/lib/cellar /etc/cellar \
    && chown cellar:cellar /var/lib/cellar

COPY --from=builder /out/cellar /usr/local/bin/cellar
# Every key with its default and a comment: a starting point for /etc/cellar/cellar.toml.
COPY config/cellar.toml /etc/cellar/cellar.toml.example

# By number, not name: Kubernetes' `runAsNonRoot` can only verify a numeric user.
USER 10001:10001
WORKDIR /var/lib/cellar
VOLUME /var/lib/cellar

# The default `listen` is 127.0.0.1:8080, unreachable from outside the container.
ENV CELLAR_LISTEN=0.0.0.0:8080
EXPOSE 8080

# /healthz does no I/O: it says the process answers. If you change the port in CELLAR_LISTEN,
# change it here too (or override with `docker run --health-cmd`).
HEALTHCHECK --interval=30s --timeout=3s --start-period=5s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8080/healthz || exit 1

# cellar finishes in-flight requests on SIGTERM (`docker stop`) for up to shutdown_timeout_secs.
ENTRYPOINT ["cellar"]
CMD ["serve"]

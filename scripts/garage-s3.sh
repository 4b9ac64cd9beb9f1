#!/usr/bin/env bash
# A throwaway single-node Garage S3 server on 127.0.0.1, for tests and benchmarks.
#
#   scripts/garage-s3.sh start DIR   start (installing garage if missing) with state in DIR;
#                                    prints `export VAR=value` lines (S3_ENDPOINT, AWS_*, ...)
#   scripts/garage-s3.sh stop DIR    stop it and delete DIR
#
# Ports are picked free at start. Knobs: S3_BUCKET (nix-cache), GARAGE_VERSION (2.5.0),
# GARAGE_DB_ENGINE (lmdb, Garage's default and recommended metadata engine; sqlite took about
# twice as long per PUT and GET here: 1.3-1.5 against 0.7-0.8 ms p50 for a small PUT),
# GARAGE_WEB=1: also serve the bucket without signatures on Garage's website endpoint (port
# S3 port + 2), as a bucket opened with `mc anonymous set download` would be, and print
# S3_WEB_ENDPOINT (http://BUCKET.web.localhost:PORT, for curl and nix) and S3_WEB_ADDR
# (127.0.0.1:PORT) with S3_WEB_HOST (the Host header) for clients that resolve through the system.
# Garage's website endpoint picks the bucket from the Host header: BUCKET + root_domain
# (".web.localhost" here). libcurl, and so Nix, resolves every *.localhost name to 127.0.0.1
# itself (RFC 6761), so the URL needs no DNS or /etc/hosts entry.
set -euo pipefail
cmd=${1:?usage: garage-s3.sh start|stop DIR}; DIR=${2:?usage: garage-s3.sh start|stop DIR}
BUCKET=${S3_BUCKET:-nix-cache}; REGION=us-east-1; VERSION=${GARAGE_VERSION:-2.5.0}
DB_ENGINE=${GARAGE_DB_ENGINE:-lmdb}
log() { echo "garage-s3: $*" >&2; }

garage_bin() {
  if command -v garage >/dev/null 2>&1; then command -v garage; return; fi
  local b="${CARGO_HOME:-$HOME/.cargo}/bin/garage"
  if [ ! -x "$b" ]; then
    log "installing garage $VERSION with cargo (7-8 min on 2 cores)"
    cargo install garage --version "$VERSION" --locked >&2
  fi
  echo "$b"
}

free_port() {  # a port where nothing listens, and nothing on the two above it either
  local p
  while :; do
    p=$(( (RANDOM % 12000) + 20000 ))  # below Linux's ephemeral range (32768+), where outgoing connections take theirs
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null \
       && ! (exec 3<>"/dev/tcp/127.0.0.1/$((p+1))") 2>/dev/null \
       && ! (exec 3<>"/dev/tcp/127.0.0.1/$((p+2))") 2>/dev/null; then echo "$p"; return; fi
  done
}

case "$cmd" in
start)
  G=$(garage_bin)
  mkdir -p "$DIR/meta" "$DIR/data"; chmod 700 "$DIR"
  PORT=$(free_port); RPC=$((PORT + 1)); WEB=$((PORT + 2))
  KEY_ID="GK$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')"
  SECRET=$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')
  cat > "$DIR/garage.toml" <<TOML
metadata_dir = "$DIR/meta"
data_dir = "$DIR/data"
db_engine = "$DB_ENGINE"
replication_factor = 1
compression_level = "none"
rpc_bind_addr = "127.0.0.1:$RPC"
rpc_public_addr = "127.0.0.1:$RPC"
rpc_secret = "$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')"

[s3_api]
s3_region = "$REGION"
api_bind_addr = "127.0.0.1:$PORT"
TOML
  if [ "${GARAGE_WEB:-}" = 1 ]; then
    cat >> "$DIR/garage.toml" <<TOML

[s3_web]
bind_addr = "127.0.0.1:$WEB"
root_domain = ".web.localhost"
TOML
  fi
  # --single-node lays out a one-node cluster; --default-bucket creates the key and the bucket.
  GARAGE_DEFAULT_ACCESS_KEY="$KEY_ID" GARAGE_DEFAULT_SECRET_KEY="$SECRET" GARAGE_DEFAULT_BUCKET="$BUCKET" \
  RUST_LOG=garage=warn nohup "$G" -c "$DIR/garage.toml" server --single-node --default-bucket \
    > "$DIR/garage.log" 2>&1 < /dev/null &
  echo $! > "$DIR/garage.pid"
  ok=0
  for _ in $(seq 1 300); do
    code=$(curl -s -o /dev/null -w '%{http_code}' --aws-sigv4 "aws:amz:$REGION:s3" --user "$KEY_ID:$SECRET" \
      -H "x-amz-content-sha256: e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855" \
      "http://127.0.0.1:$PORT/$BUCKET?list-type=2&max-keys=1" || true)
    if [ "$code" = 200 ]; then ok=1; break; fi
    kill -0 "$(cat "$DIR/garage.pid")" 2>/dev/null || break
    sleep 0.1
  done
  if [ $ok != 1 ]; then log "garage did not come up:"; tail -n 20 "$DIR/garage.log" >&2; exit 1; fi
  if [ "${GARAGE_WEB:-}" = 1 ]; then
    "$G" -c "$DIR/garage.toml" bucket website --allow "$BUCKET" > "$DIR/website.log" 2>&1 \
      || { log "garage bucket website --allow $BUCKET failed:"; cat "$DIR/website.log" >&2; exit 1; }
  fi
  cat > "$DIR/env" <<ENV
export S3_ENDPOINT=http://127.0.0.1:$PORT
export S3_BUCKET=$BUCKET
export AWS_ACCESS_KEY_ID=$KEY_ID
export AWS_SECRET_ACCESS_KEY=$SECRET
export AWS_REGION=$REGION
export AWS_DEFAULT_REGION=$REGION
export AWS_REQUEST_CHECKSUM_CALCULATION=WHEN_REQUIRED
export GARAGE_DIR=$DIR
ENV
  if [ "${GARAGE_WEB:-}" = 1 ]; then
    cat >> "$DIR/env" <<ENV
export S3_WEB_ENDPOINT=http://$BUCKET.web.localhost:$WEB
export S3_WEB_ADDR=127.0.0.1:$WEB
export S3_WEB_HOST=$BUCKET.web.localhost
ENV
  fi
  log "ready on 127.0.0.1:$PORT (state in $DIR)"
  cat "$DIR/env"
  ;;
stop)
  if [ -f "$DIR/garage.pid" ]; then
    pid=$(cat "$DIR/garage.pid")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -rf "$DIR"
  ;;
*) echo "usage: garage-s3.sh start|stop DIR" >&2; exit 2 ;;
esac

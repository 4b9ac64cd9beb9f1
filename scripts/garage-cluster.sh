#!/usr/bin/env bash
# A throwaway 3-node Garage cluster (replication factor 3) on 127.0.0.1, for tests of what
# happens when one storage node dies: with 2 of 3 nodes up, S3 stays readable and writable.
#
#   scripts/garage-cluster.sh start DIR     start 3 nodes with state in DIR (installing garage if
#                                           missing); prints shell-quoted env lines on stdout
#   scripts/garage-cluster.sh kill DIR I    SIGKILL node I (0..2)
#   scripts/garage-cluster.sh stop DIR      stop every node and delete DIR
#
# Ports are picked free at start. Env printed: S3_ENDPOINTS (the three S3 endpoints, node 0
# first, comma-separated), S3_BUCKET, AWS_* credentials, GARAGE_PIDS (comma-separated).
# Knobs: S3_BUCKET (nix-cache), GARAGE_VERSION (2.5.0).
set -euo pipefail
cmd=${1:?usage: garage-cluster.sh start|kill|stop DIR [NODE]}
DIR=${2:?usage: garage-cluster.sh start|kill|stop DIR [NODE]}
BUCKET=${S3_BUCKET:-nix-cache}; REGION=us-east-1; VERSION=${GARAGE_VERSION:-2.5.0}
log() { echo "garage-cluster: $*" >&2; }

garage_bin() {
  if command -v garage >/dev/null 2>&1; then command -v garage; return; fi
  local b="${CARGO_HOME:-$HOME/.cargo}/bin/garage"
  if [ ! -x "$b" ]; then
    log "installing garage $VERSION with cargo (7-8 min on 2 cores)"
    cargo install garage --version "$VERSION" --locked >&2
  fi
  echo "$b"
}

taken=" "
# Sets `port` to a port where nothing listens, nor on the one above it, not handed out before.
# Not called in a subshell (`$(free_port)`): `taken` must outlive the call, or two nodes may be
# handed overlapping ports (one's RPC port not bound yet when the next is probed).
free_port() {
  local p
  while :; do
    p=$(( (RANDOM % 12000) + 20000 ))  # below Linux's ephemeral range (32768+), where outgoing connections take theirs
    case "$taken" in *" $p "*|*" $((p+1)) "*|*" $((p-1)) "*) continue ;; esac
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null \
       && ! (exec 3<>"/dev/tcp/127.0.0.1/$((p+1))") 2>/dev/null; then
      taken="$taken$p $((p+1)) "; port=$p; return
    fi
  done
}

hex() { od -An -N"$1" -tx1 /dev/urandom | tr -d ' \n'; }

healthy() {  # $1: S3 port. A signed ListObjectsV2 of the bucket answers 200.
  [ "$(curl -s -m 3 -o /dev/null -w '%{http_code}' --aws-sigv4 "aws:amz:$REGION:s3" \
      --user "$KEY_ID:$SECRET" \
      -H "x-amz-content-sha256: e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855" \
      "http://127.0.0.1:$1/$BUCKET?list-type=2&max-keys=1" || true)" = 200 ]
}

case "$cmd" in
start)
  # A start that fails part-way leaves no node running (the caller has no PIDs to stop).
  started_ok=0
  abandon() {
    [ "$started_ok" = 1 ] && return
    for i in 0 1 2; do [ -f "$DIR/n$i.pid" ] && kill -9 "$(cat "$DIR/n$i.pid")" 2>/dev/null; done
    for i in 0 1 2; do
      [ -s "$DIR/n$i.log" ] && { log "node $i's log (start failed):"; tail -n 15 "$DIR/n$i.log" >&2; }
    done
    return 0
  }
  trap abandon EXIT
  G=$(garage_bin)
  mkdir -p "$DIR"; chmod 700 "$DIR"
  KEY_ID="GK$(hex 12)"; SECRET=$(hex 32); RPC_SECRET=$(hex 32)
  ports=()
  for i in 0 1 2; do
    free_port; s3=$port; rpc=$((s3 + 1)); ports+=("$s3")
    mkdir -p "$DIR/n$i/meta" "$DIR/n$i/data"
    cat > "$DIR/node$i.toml" <<TOML
metadata_dir = "$DIR/n$i/meta"
data_dir = "$DIR/n$i/data"
db_engine = "sqlite"
replication_factor = 3
compression_level = "none"
rpc_bind_addr = "127.0.0.1:$rpc"
rpc_public_addr = "127.0.0.1:$rpc"
rpc_secret = "$RPC_SECRET"

[s3_api]
s3_region = "$REGION"
api_bind_addr = "127.0.0.1:$s3"
TOML
    RUST_LOG=garage=warn nohup "$G" -c "$DIR/node$i.toml" server \
      > "$DIR/n$i.log" 2>&1 < /dev/null &
    echo $! > "$DIR/n$i.pid"
  done
  g() { "$G" -c "$DIR/node$1.toml" "${@:2}"; }
  # Each node answers its admin RPC once it is up.
  for i in 0 1 2; do
    for _ in $(seq 1 300); do g "$i" node id -q >/dev/null 2>&1 && break; sleep 0.1; done
  done
  ids=(); for i in 0 1 2; do ids+=("$(g "$i" node id -q)"); done
  # Every pair connected, not only node 0 to the others: nodes 1 and 2 would find each
  # other through node 0 a second or two later, and a test that kills node 0 before then
  # leaves them without a quorum.
  g 0 node connect "${ids[1]}" >/dev/null
  g 0 node connect "${ids[2]}" >/dev/null
  g 1 node connect "${ids[2]}" >/dev/null
  # One node per zone, so every object has a copy on each of the three nodes.
  for i in 0 1 2; do g 0 layout assign -z "dc$i" -c 1G "${ids[$i]%@*}" >/dev/null; done
  g 0 layout apply --version 1 >/dev/null
  g 0 key import --yes -n cellar "$KEY_ID" "$SECRET" >/dev/null
  g 0 bucket create "$BUCKET" >/dev/null
  g 0 bucket allow --read --write --owner "$BUCKET" --key "$KEY_ID" >/dev/null
  for i in 0 1 2; do
    ok=0
    for _ in $(seq 1 300); do
      if healthy "${ports[$i]}"; then ok=1; break; fi
      kill -0 "$(cat "$DIR/n$i.pid")" 2>/dev/null || break
      sleep 0.1
    done
    if [ $ok != 1 ]; then log "node $i did not come up:"; tail -n 20 "$DIR/n$i.log" >&2; exit 1; fi
  done
  # Each node sees both others as healthy (a killed node leaves the other two a quorum).
  for i in 0 1 2; do
    ok=0
    for _ in $(seq 1 300); do
      if [ "$(g "$i" status 2>/dev/null | grep -c 'FAILED NODES')" = 0 ]; then ok=1; break; fi
      sleep 0.1
    done
    if [ $ok != 1 ]; then log "node $i does not see the other two:"; g "$i" status >&2 || true; exit 1; fi
  done
  log "3 nodes ready on S3 ports ${ports[*]} (state in $DIR)"
  cat <<ENV
S3_ENDPOINTS=http://127.0.0.1:${ports[0]},http://127.0.0.1:${ports[1]},http://127.0.0.1:${ports[2]}
S3_BUCKET=$BUCKET
AWS_ACCESS_KEY_ID=$KEY_ID
AWS_SECRET_ACCESS_KEY=$SECRET
AWS_REGION=$REGION
GARAGE_PIDS=$(cat "$DIR/n0.pid"),$(cat "$DIR/n1.pid"),$(cat "$DIR/n2.pid")
ENV
  started_ok=1
  ;;
kill)
  i=${3:?usage: garage-cluster.sh kill DIR NODE}
  kill -9 "$(cat "$DIR/n$i.pid")"
  log "node $i killed"
  ;;
stop)
  pids=()
  for i in 0 1 2; do [ -f "$DIR/n$i.pid" ] && pids+=("$(cat "$DIR/n$i.pid")"); done
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do
    for _ in $(seq 1 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null || true
  done
  rm -rf "$DIR"
  ;;
*) echo "usage: garage-cluster.sh start|kill|stop DIR [NODE]" >&2; exit 2 ;;
esac

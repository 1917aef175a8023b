#!/usr/bin/env bash
# A whole kvstream cluster on this machine: etcd (loopback, a temporary data dir), one
# kvs-coordinator on it, and N CPU kvs-workers (or one per GPU with --gpus) registered with
# it and sharing one --data-dir (so a down worker's sessions can be adopted by another).
# Prints the endpoints; Ctrl-C (or SIGTERM) stops everything and removes the temporary
# directories (a --data-dir you give is kept).
#
#   deploy/local-cluster.sh [-n N | --gpus] [--model PATH] [--cells N] [--threads N]
#                           [--bin DIR] [--data-dir DIR] [--port P] [--embedded]
#
# Ports: etcd on two free loopback ports, the coordinator on P (default 7700), workers on
# P+10, P+11, ... (docs/PROTOCOL.md §1). Logs in the run directory it prints.
set -uo pipefail

usage() {
    cat <<EOF
usage: $0 [options]
  -n N             CPU workers (default 2)
  --gpus           one worker per GPU (nvidia-smi -L), --device cuda:I, instead of -n
  --model PATH     GGUF model (default: \$KVSTREAM_MODEL, else
                   ~/.cache/kvstream/models/SmolLM2-135M-Instruct.Q4_1.gguf)
  --cells N        KV cells per worker (default: the model's context)
  --threads N      CPU threads per worker (default: cores / workers)
  --bin DIR        where kvs-coordinator and kvs-worker are (default: next to this
                   script's ../build, else \$PATH)
  --data-dir DIR   the workers' shared data root (default: in the run directory)
  --port P         coordinator port (default 7700; workers P+10...)
  --embedded       no etcd: the coordinator's embedded store (a file in the run directory)
  --etcd PATH      the etcd binary (default /usr/bin/etcd)
  -h, --help
EOF
}

N=2
GPUS=0
MODEL=${KVSTREAM_MODEL:-$HOME/.cache/kvstream/models/SmolLM2-135M-Instruct.Q4_1.gguf}
CELLS=
THREADS=
BIN=
DATA=
PORT=7700
EMBEDDED=0
ETCD=/usr/bin/etcd
while [ $# -gt 0 ]; do
    case "$1" in
    -n) N=${2:?-n needs a number}; shift 2 ;;
    --gpus) GPUS=1; shift ;;
    --model) MODEL=${2:?}; shift 2 ;;
    --cells) CELLS=${2:?}; shift 2 ;;
    --threads) THREADS=${2:?}; shift 2 ;;
    --bin) BIN=${2:?}; shift 2 ;;
    --data-dir) DATA=${2:?}; shift 2 ;;
    --port) PORT=${2:?}; shift 2 ;;
    --embedded) EMBEDDED=1; shift ;;
    --etcd) ETCD=${2:?}; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "local-cluster: unknown option '$1'" >&2; usage >&2; exit 2 ;;
    esac
done
die() { echo "local-cluster: $*" >&2; exit 1; }
case "$N$PORT" in *[!0-9]*) die "-n and --port must be numbers" ;; esac
[ "$N" -ge 1 ] && [ "$N" -le 64 ] || die "-n must be 1..64"

# the binaries
if [ -z "$BIN" ]; then
    HERE=$(cd "$(dirname "$0")" && pwd)
    if [ -x "$HERE/../build/kvs-coordinator" ]; then
        BIN=$HERE/../build
    else
        BIN=$(dirname "$(command -v kvs-coordinator 2>/dev/null || echo /usr/local/bin/x)")
    fi
fi
for b in kvs-coordinator kvs-worker; do
    [ -x "$BIN/$b" ] || die "$BIN/$b not found (build it, or pass --bin DIR)"
done
[ -f "$MODEL" ] || die "model $MODEL not found (scripts/setup.sh fetches the default; or --model)"
if [ "$EMBEDDED" -eq 0 ] && [ ! -x "$ETCD" ]; then
    die "$ETCD not found: apt-get install etcd-server, or run with --embedded"
fi

# the devices
DEVICES=()
if [ "$GPUS" -eq 1 ]; then
    command -v nvidia-smi >/dev/null || die "--gpus: nvidia-smi not found"
    NG=$(nvidia-smi -L | grep -c '^GPU ')
    [ "$NG" -ge 1 ] || die "--gpus: no GPU listed by nvidia-smi -L"
    for i in $(seq 0 $((NG - 1))); do DEVICES+=("cuda:$i"); done
else
    for _ in $(seq 1 "$N"); do DEVICES+=("cpu"); done
fi
if [ -z "$THREADS" ]; then
    THREADS=$(($(nproc) / ${#DEVICES[@]}))
    [ "$THREADS" -ge 1 ] || THREADS=1
fi

RUN=$(mktemp -d /tmp/kvs-cluster-XXXXXX)
[ -n "$DATA" ] || DATA=$RUN/data
PIDS=()
stop_all() {
    trap - INT TERM EXIT
    echo
    echo "local-cluster: stopping"
    # workers first (they flush their logs), then the coordinator, then etcd
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        kill -TERM "${PIDS[$i]}" 2>/dev/null
        wait "${PIDS[$i]}" 2>/dev/null
    done
    case "$DATA" in "$RUN"/*) rm -rf "$RUN" ;; *) rm -rf "$RUN/etcd" ;; esac
    exit 0
}
trap stop_all INT TERM EXIT

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
# wait_for FILE PREFIX PID: the line FILE gets when the process is ready; prints its endpoint
wait_for() {
    for _ in $(seq 1 1200); do
        if grep -q "^$2" "$1" 2>/dev/null; then
            sed -n "s/^$2//p" "$1"
            return 0
        fi
        kill -0 "$3" 2>/dev/null || { echo "local-cluster: $(basename "$1" .out) exited:" >&2; tail -5 "${1%.out}.err" >&2; return 1; }
        sleep 0.1
    done
    echo "local-cluster: $1: not ready in 120 s" >&2
    return 1
}

# etcd
if [ "$EMBEDDED" -eq 1 ]; then
    STORE=file:$RUN/cluster.json
else
    CP=$(free_port)
    PP=$(free_port)
    while [ "$PP" = "$CP" ]; do PP=$(free_port); done
    STORE=http://127.0.0.1:$CP
    "$ETCD" --name kvs --data-dir "$RUN/etcd" --listen-client-urls "$STORE" \
        --advertise-client-urls "$STORE" --listen-peer-urls "http://127.0.0.1:$PP" \
        --initial-advertise-peer-urls "http://127.0.0.1:$PP" \
        --initial-cluster "kvs=http://127.0.0.1:$PP" >"$RUN/etcd.log" 2>&1 &
    PIDS+=($!)
    for i in $(seq 1 150); do
        python3 -c 'import sys,urllib.request; urllib.request.urlopen(sys.argv[1]+"/health", timeout=1)' \
            "$STORE" 2>/dev/null && break
        [ "$i" -eq 150 ] && die "etcd did not come up (see $RUN/etcd.log)"
        sleep 0.1
    done
fi

# the coordinator
"$BIN/kvs-coordinator" --listen "tcp://127.0.0.1:$PORT" --store "$STORE" \
    >"$RUN/coordinator.out" 2>"$RUN/coordinator.err" &
PIDS+=($!)
COORD=$(wait_for "$RUN/coordinator.out" "kvs-coordinator: listening on " $!) || exit 1

# the workers
EPS=()
for i in "${!DEVICES[@]}"; do
    W=w$i
    ARGS=(-m "$MODEL" --listen "tcp://127.0.0.1:$((PORT + 10 + i))" --device "${DEVICES[$i]}"
        -t "$THREADS" --data-dir "$DATA" --coordinator "$COORD" --worker-id "$W")
    [ -n "$CELLS" ] && ARGS+=(--cells "$CELLS")
    "$BIN/kvs-worker" "${ARGS[@]}" >"$RUN/$W.out" 2>"$RUN/$W.err" &
    PIDS+=($!)
    EPS+=("$W ${DEVICES[$i]} $!")
done
echo "local-cluster: run directory $RUN (logs: *.err)"
[ "$EMBEDDED" -eq 1 ] && echo "  store        $STORE (embedded)" || echo "  etcd         $STORE"
echo "  coordinator  $COORD"
for e in "${EPS[@]}"; do
    set -- $e
    EP=$(wait_for "$RUN/$1.out" "kvs-worker: listening on " "$3") || exit 1
    echo "  worker $1   $EP ($2)"
done
echo "  data root    $DATA"
echo
echo "export KVSTREAM_ENDPOINT=$COORD"
echo "kvstream admin workers      # or: kvstream admin top"
echo "Ctrl-C stops the cluster."
while :; do
    for p in "${PIDS[@]}"; do
        kill -0 "$p" 2>/dev/null || { echo "local-cluster: process $p exited (see $RUN)"; stop_all; }
    done
    sleep 1
done

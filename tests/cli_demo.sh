#!/usr/bin/env bash
# The demo end to end through a real cluster: `kvstream demo` starts `kvstream up` (a real
# kvs-coordinator and kvs-worker on free loopback ports) as its child, streams the feed into
# four sessions over libkvstream and prints a table row per session and round and a summary
# (appends, flash hit rate, question TTFT, the stateless baseline with the same answer, the
# worker's scheduler metrics); it stops the cluster at the end and on SIGINT, leaving no
# process and no temporary directory behind; a worker that dies under it or never comes up
# is a one-line error (exit 1). --endpoint uses a running cluster and leaves it running. Bad
# options are one-line errors with exit 2, and --endpoint to a dead endpoint fails with one
# line and exit 3 within the connect timeout.
# Usage: cli_demo.sh /path/to/kvstream
set -uo pipefail
KVS=${1:?usage: cli_demo.sh KVSTREAM}
TMP=$(mktemp -d)
DEMO_PID=
EP_UP_PID=
cleanup() {
    [ -n "$DEMO_PID" ] && kill -TERM "$DEMO_PID" 2>/dev/null && wait "$DEMO_PID" 2>/dev/null
    [ -n "$EP_UP_PID" ] && kill -TERM "$EP_UP_PID" 2>/dev/null && wait "$EP_UP_PID" 2>/dev/null
    rm -rf "$TMP"
}
trap cleanup EXIT
fail() { echo "cli_demo: FAIL: $*" >&2; exit 1; }

MODEL_DIR=${KVS_MODEL_DIR:-$HOME/.cache/kvstream/models}
MODEL=${KVSTREAM_MODEL:-$MODEL_DIR/SmolLM2-135M-Instruct.Q4_1.gguf}
if [ ! -f "$MODEL" ]; then
    echo "cli_demo: the default model $MODEL is missing (scripts/setup.sh fetches it): skipped"
    exit 77
fi

# gone PID: the process has exited (or is a zombie nobody reaps: not ours then)
gone() { ! kill -0 "$1" 2>/dev/null; }
# no process mentions PATTERN in its command line (the demo's worker carries its data dir)
none_with() { ! pgrep -f -- "$1" >/dev/null; }

WORKER=$(dirname "$KVS")/kvs-worker
[ -x "$WORKER" ] || fail "no kvs-worker next to $KVS"
# a worker that takes 4 s to start (the demo prints progress meanwhile), one that never does
printf '#!/bin/sh\nsleep 4\nexec "%s" "$@"\n' "$WORKER" >"$TMP/slow-worker"
printf '#!/bin/sh\necho $$ >"%s"\nexec sleep 300\n' "$TMP/stuck.pid" >"$TMP/stuck-worker"
chmod +x "$TMP/slow-worker" "$TMP/stuck-worker"

# ---- a short run with the defaults' shape: 4 sessions, 3 rounds ----
export TMPDIR="$TMP" # the demo's temporary data dir goes here, so we can see it removed
KVS_WORKER="$TMP/slow-worker" "$KVS" demo --ticks 24 --rate 1 --ask-every 8 -t 2 \
    >"$TMP/out" 2>"$TMP/err"
rc=$?
[ "$rc" -eq 0 ] || fail "demo exited $rc: $(cat "$TMP/err") / $(tail -5 "$TMP/out")"
[ ! -s "$TMP/err" ] || fail "demo wrote to stderr: $(cat "$TMP/err")"
UP_PID=$(sed -n 's/.*(kvstream up, pid \([0-9]*\), data dir .*/\1/p' "$TMP/out")
DATA_DIR=$(sed -n 's/.*(kvstream up, pid [0-9]*, data dir \(.*\))$/\1/p' "$TMP/out")
[ -n "$UP_PID" ] && [ -n "$DATA_DIR" ] || fail "no 'cluster up' line: $(head -5 "$TMP/out")"
case "$DATA_DIR" in "$TMP"/kvstream-demo.*) ;; *) fail "data dir $DATA_DIR not under TMPDIR" ;; esac
gone "$UP_PID" || fail "kvstream up (pid $UP_PID) still runs after the demo"
none_with "$DATA_DIR" || fail "a process of $DATA_DIR is left: $(pgrep -af -- "$DATA_DIR")"
[ ! -e "$(dirname "$DATA_DIR")" ] || fail "the temporary dir $(dirname "$DATA_DIR") is left"
grep -q "^kvstream demo: done$" "$TMP/out" || fail "no 'done' line"
grep -qE "^kvstream demo: waiting for the worker to load the model \([0-9]+ s\)$" "$TMP/out" \
    || fail "no progress line while the worker started: $(head -4 "$TMP/out")"

# 3 rounds (ticks 8, 16, 24) x 4 sessions, each with context, latencies and answers
ROW='^ +(8|16|24)  (aapl|msft|nvda|goog) +[0-9]+ +[0-9.]+  [0-2]/2 +[0-9.]+ +[0-9.]+  '
ROWS=$(grep -cE "$ROW" "$TMP/out")
[ "$ROWS" -eq 12 ] || fail "expected 12 table rows, got $ROWS: $(cat "$TMP/out")"
# the context grows: the last row of aapl has more tokens than its first
FIRST=$(awk '$2 == "aapl" { print $3; exit }' "$TMP/out")
LAST=$(awk '$2 == "aapl" { v = $3 } END { print v }' "$TMP/out")
[ "$LAST" -gt "$FIRST" ] || fail "aapl's context did not grow: $FIRST -> $LAST"

grep -qE '^  appends      24 into 4 sessions, latency mean [0-9.]+ ms, p99 [0-9.]+ ms' "$TMP/out" \
    || fail "appends line: $(grep appends "$TMP/out")"
FLASH=$(grep -E '^  flash gets   24, [0-9]+ fresh when asked: hit rate [0-9]+%, latency mean' \
    "$TMP/out") || fail "flash gets line: $(grep 'flash gets' "$TMP/out")"
HITS=$(echo "$FLASH" | sed 's/.*24, \([0-9]*\) fresh.*/\1/')
# A tick reaches each session every 4 s on average, and the worker re-answers its flash
# queries within about a second on an idle 2-core machine (several on a busy one): at
# least a quarter of the reads must find the answer ready.
[ "$HITS" -ge 6 ] || fail "flash hit rate too low ($HITS/24): $FLASH"
grep -qE '^  flash watch  aapl: [1-9][0-9]* answers pushed' "$TMP/out" \
    || fail "flash watch line: $(grep 'flash watch' "$TMP/out")"
grep -qE '^  questions    12, TTFT mean [0-9.]+ ms, p50 [0-9.]+ ms, p99 [0-9.]+ ms$' "$TMP/out" \
    || fail "questions line: $(grep questions "$TMP/out")"
# stateful and stateless (re-prefill) give the same greedy answer; the ratio is printed
BASELINE='^  baseline     [a-z]+ at [0-9]+ context tokens: stateful TTFT [0-9.]+ ms, '
BASELINE+='stateless \(re-prefill\) TTFT [0-9.]+ ms: [0-9]+x, same answer$'
grep -qE "$BASELINE" "$TMP/out" || fail "baseline line: $(grep baseline "$TMP/out")"
SCHED='^  scheduler    [1-9][0-9]* steps, [0-9.]+ rows per step; batch occupancy [0-9.]+, '
SCHED+='[0-9.]+ sequences per step .*; 1 worker$'
grep -qE "$SCHED" "$TMP/out" || fail "scheduler line: $(grep -A2 scheduler "$TMP/out")"
CLASSES='^  rows         decode [1-9][0-9]*, question [1-9][0-9]*, append [1-9][0-9]*, '
CLASSES+='flash [1-9][0-9]*$'
grep -qE "$CLASSES" "$TMP/out" || fail "rows line: $(grep '^  rows' "$TMP/out")"
grep -qE '^  flash evals  [1-9][0-9]* computed, [0-9]+ wasted' "$TMP/out" \
    || fail "flash evals line: $(grep 'flash evals' "$TMP/out")"
# the rows carry the feed's values next to the model's answers
grep -qE '^ +8  aapl .*\[1[0-9][0-9]\.[0-9][0-9] [+-][0-9]\.[0-9][0-9]\]$' "$TMP/out" \
    || fail "no feed value in aapl's first row: $(grep -m1 ' aapl ' "$TMP/out")"

# ---- SIGINT: the demo stops its cluster, closes its sessions and exits 130 ----
"$KVS" demo --ticks 400 --rate 4 -t 2 --data-dir "$TMP/sig" >"$TMP/sig.out" 2>"$TMP/sig.err" &
DEMO_PID=$!
for _ in $(seq 1 600); do
    grep -q "^ *tick  session" "$TMP/sig.out" && break
    gone "$DEMO_PID" && fail "demo exited early: $(cat "$TMP/sig.err")"
    sleep 0.1
done
grep -q "^ *tick  session" "$TMP/sig.out" || fail "no table header within 60 s"
sleep 2
UP_PID=$(sed -n 's/.*(kvstream up, pid \([0-9]*\), data dir .*/\1/p' "$TMP/sig.out")
kill -INT "$DEMO_PID"
START=$SECONDS
wait "$DEMO_PID"
rc=$?
DEMO_PID=
[ "$rc" -eq 130 ] || fail "after SIGINT the demo exited $rc, not 130: $(cat "$TMP/sig.err")"
[ $((SECONDS - START)) -le 30 ] || fail "the demo took $((SECONDS - START)) s to stop"
gone "$UP_PID" || fail "kvstream up (pid $UP_PID) still runs after SIGINT"
none_with "$TMP/sig" || fail "a process of $TMP/sig is left: $(pgrep -af -- "$TMP/sig")"
LEFT=$(find "$TMP/sig" -name 'aapl*' -o -name 'msft*' -o -name 'nvda*' -o -name 'goog*')
[ -z "$LEFT" ] || fail "sessions left in the data dir: $LEFT"
grep -q "stopping" "$TMP/sig.err" || fail "no stopping line: $(cat "$TMP/sig.err")"

# ---- --endpoint: a cluster that runs already; the demo leaves it running, sessions closed ----
"$KVS" up --listen tcp://127.0.0.1:0 --data-dir "$TMP/ep" -t 2 --fsync no \
    >"$TMP/up.out" 2>"$TMP/up.err" &
EP_UP_PID=$!
for _ in $(seq 1 600); do
    grep -q "^kvstream up: listening on " "$TMP/up.out" && break
    gone "$EP_UP_PID" && fail "kvstream up exited: $(cat "$TMP/up.err")"
    sleep 0.1
done
EP=$(sed -n 's/^kvstream up: listening on \([^ ]*\).*/\1/p' "$TMP/up.out")
[ -n "$EP" ] || fail "kvstream up did not print its endpoint in 60 s"
"$KVS" demo --endpoint "$EP" --ticks 8 --rate 4 --ask-every 8 >"$TMP/ep.out" 2>"$TMP/ep.err"
rc=$?
[ "$rc" -eq 0 ] || fail "demo --endpoint exited $rc: $(cat "$TMP/ep.err")"
! grep -q "starting a single-node cluster" "$TMP/ep.out" || fail "--endpoint started a cluster"
[ "$(grep -cE '^ +8  (aapl|msft|nvda|goog) ' "$TMP/ep.out")" -eq 4 ] \
    || fail "--endpoint: expected 4 rows: $(cat "$TMP/ep.out")"
gone "$EP_UP_PID" && fail "the demo stopped a cluster it did not start"
"$KVS" session list --endpoint "$EP" >"$TMP/list" || fail "session list failed"
[ ! -s "$TMP/list" ] || fail "the demo left sessions: $(cat "$TMP/list")"
# a session of the demo's names that exists already is not touched: one line, exit 5
"$KVS" session create msft --cells 64 --endpoint "$EP" >/dev/null || fail "session create msft"
"$KVS" demo --endpoint "$EP" --ticks 8 >"$TMP/ep.out" 2>"$TMP/ep.err"
rc=$?
[ "$rc" -eq 5 ] || fail "an existing session: exited $rc, not 5: $(cat "$TMP/ep.err")"
[ "$(wc -l <"$TMP/ep.err")" -eq 1 ] || fail "an existing session: $(cat "$TMP/ep.err")"
"$KVS" session list --endpoint "$EP" >"$TMP/list" || fail "session list failed"
[ "$(cat "$TMP/list")" = "msft" ] || fail "sessions after the refused demo: $(cat "$TMP/list")"
kill -TERM "$EP_UP_PID"
wait "$EP_UP_PID" || fail "kvstream up exited $? after SIGTERM"

# ---- the worker dies under the demo: one line, exit 1, nothing left ----
"$KVS" demo --ticks 400 --rate 4 -t 2 --data-dir "$TMP/die" >"$TMP/die.out" 2>"$TMP/die.err" &
DEMO_PID=$!
for _ in $(seq 1 600); do
    grep -q "^ *tick  session" "$TMP/die.out" && break
    gone "$DEMO_PID" && fail "demo exited early: $(cat "$TMP/die.err")"
    sleep 0.1
done
WORKER_PID=$(pgrep -f -- "kvs-worker .*--data-dir $TMP/die")
[ -n "$WORKER_PID" ] || fail "no kvs-worker of $TMP/die"
kill -KILL "$WORKER_PID"
START=$SECONDS
wait "$DEMO_PID"
rc=$?
DEMO_PID=
[ "$rc" -eq 1 ] || fail "after its worker died the demo exited $rc, not 1: $(cat "$TMP/die.err")"
[ $((SECONDS - START)) -le 30 ] || fail "the demo took $((SECONDS - START)) s to notice"
[ "$(wc -l <"$TMP/die.err")" -eq 1 ] || fail "worker died: not one line: $(cat "$TMP/die.err")"
grep -q "exited under us" "$TMP/die.err" || fail "worker died: $(cat "$TMP/die.err")"
none_with "$TMP/die" || fail "a process of $TMP/die is left: $(pgrep -af -- "$TMP/die")"

# ---- a worker that never comes up: one line after --start-timeout, exit 1, nothing left ----
START=$SECONDS
KVS_WORKER="$TMP/stuck-worker" "$KVS" demo --start-timeout 2 >"$TMP/stuck.out" 2>"$TMP/stuck.err"
rc=$?
[ "$rc" -eq 1 ] || fail "a stuck worker: exited $rc, not 1: $(cat "$TMP/stuck.err")"
[ $((SECONDS - START)) -le 20 ] || fail "a stuck worker: took $((SECONDS - START)) s"
[ "$(wc -l <"$TMP/stuck.err")" -eq 1 ] || fail "a stuck worker: $(cat "$TMP/stuck.err")"
grep -q "did not come up within 2 s" "$TMP/stuck.err" || fail "stuck: $(cat "$TMP/stuck.err")"
gone "$(cat "$TMP/stuck.pid")" || fail "the stuck worker (pid $(cat "$TMP/stuck.pid")) is left"
[ -z "$(ls "$TMP" | grep '^kvstream-demo\.')" ] || fail "temporary dirs left: $(ls "$TMP")"

# ---- bad command lines: one line on stderr, exit 2, nothing started ----
bad() {
    "$KVS" demo "$@" >"$TMP/bad.out" 2>"$TMP/bad.err"
    local rc=$?
    [ "$rc" -eq 2 ] || fail "'demo $*' exited $rc, not 2"
    [ "$(wc -l <"$TMP/bad.err")" -eq 1 ] || fail "'demo $*': not one line: $(cat "$TMP/bad.err")"
    [ ! -s "$TMP/bad.out" ] || fail "'demo $*' printed: $(cat "$TMP/bad.out")"
}
bad --ticks 0
bad --ticks many
bad --rate 0
bad --ask-every -1
bad --start-timeout 0
bad -t 0
bad --device tpu
bad --nope
bad --ticks
bad extra
bad --endpoint tcp://127.0.0.1:7700 -m "$MODEL"

# ---- --endpoint where nothing listens: one line, exit 3, within the connect timeout ----
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])')
START=$SECONDS
timeout 30 "$KVS" demo --endpoint "tcp://127.0.0.1:$PORT" >"$TMP/dead.out" 2>"$TMP/dead.err"
rc=$?
[ "$rc" -eq 3 ] || fail "--endpoint to a dead port exited $rc, not 3: $(cat "$TMP/dead.err")"
[ $((SECONDS - START)) -le 15 ] || fail "--endpoint to a dead port took $((SECONDS - START)) s"
[ "$(wc -l <"$TMP/dead.err")" -eq 1 ] || fail "dead endpoint: not one line: $(cat "$TMP/dead.err")"
grep -q "tcp://127.0.0.1:$PORT" "$TMP/dead.err" || fail "the error does not name the endpoint"
echo "cli_demo: ok"

#!/usr/bin/env bash
# CLI test of the client commands against `kvstream up` (a real kvs-coordinator on an
# ephemeral loopback port in front of a real kvs-worker that registered with it; the commands
# go through the coordinator to the worker): session create/info/list/close, append (an
# argument, and '-' streaming standard input line by line), query (stateful answer ==
# --stateless answer), flash register/list/get/watch/unregister, -o json keys, exit codes of
# failures, the coordinator's view (admin workers/sessions), SIGINT to `up` (clean exit 0), a
# restart that restores the sessions from the data dir (the worker registered again at its
# new port), a worker killed under `up` (up stops the cluster and exits with its status).
# Usage: cli_session.sh /path/to/kvstream
set -uo pipefail
KVS=${1:?usage: cli_session.sh KVSTREAM}
SRC=${KVS_SOURCE_DIR:-$(cd "$(dirname "$0")/.." && pwd)}
TMP=$(mktemp -d)
UP_PID=
cleanup() {
    [ -n "$UP_PID" ] && kill -TERM "$UP_PID" 2>/dev/null && wait "$UP_PID" 2>/dev/null
    rm -rf "$TMP"
}
trap cleanup EXIT
fail() { echo "cli_session: FAIL: $*" >&2; exit 1; }

MODEL_DIR=${KVS_MODEL_DIR:-$HOME/.cache/kvstream/models}
MODEL=${KVSTREAM_MODEL:-$MODEL_DIR/SmolLM2-135M-Instruct.Q4_1.gguf}
if [ ! -f "$MODEL" ]; then
    echo "cli_session: the default model $MODEL is missing (scripts/setup.sh fetches it): skipped"
    exit 77
fi

# start_up: `kvstream up` in the background on a free port; sets UP_PID and KVSTREAM_ENDPOINT
start_up() {
    : >"$TMP/up.out"
    "$KVS" up -m "$MODEL" --listen tcp://127.0.0.1:0 --data-dir "$TMP/data" -t 1 --cells 4096 \
        --fsync no >"$TMP/up.out" 2>"$TMP/up.err" &
    UP_PID=$!
    for _ in $(seq 1 600); do
        if grep -q "^kvstream up: listening on " "$TMP/up.out"; then
            KVSTREAM_ENDPOINT=$(sed -n 's/^kvstream up: listening on \([^ ]*\).*/\1/p' \
                "$TMP/up.out")
            export KVSTREAM_ENDPOINT
            WORKER_ENDPOINT=$(sed -n 's/^kvstream up: worker cpu0 (cpu) at \(.*\)$/\1/p' \
                "$TMP/up.out")
            [ -n "$WORKER_ENDPOINT" ] || fail "kvstream up printed no worker: $(cat "$TMP/up.out")"
            return 0
        fi
        kill -0 "$UP_PID" 2>/dev/null || fail "kvstream up exited: $(cat "$TMP/up.err")"
        sleep 0.1
    done
    fail "kvstream up did not print its endpoint in 60 s"
}

# stop_up SIGNAL: the worker shuts down cleanly and `up` exits 0
stop_up() {
    kill "-$1" "$UP_PID"
    wait "$UP_PID"
    local rc=$?
    UP_PID=
    [ "$rc" -eq 0 ] || fail "kvstream up exited $rc after SIG$1 ($(tail -3 "$TMP/up.err"))"
}

# run ARGS...: run kvstream, stdout in $TMP/out, stderr in $TMP/err; fail unless it exits 0
run() {
    "$KVS" "$@" >"$TMP/out" 2>"$TMP/err" </dev/null
    local rc=$?
    [ "$rc" -eq 0 ] || fail "'$*' exited $rc: $(cat "$TMP/err")"
}

# expect_error CODE SUBSTRING -- ARGS...: exit code CODE, one line on stderr containing SUBSTRING
expect_error() {
    local code=$1 want=$2; shift 3
    "$KVS" "$@" >"$TMP/out" 2>"$TMP/err" </dev/null
    local rc=$?
    [ "$rc" -eq "$code" ] || fail "'$*' exited $rc, wanted $code ($(cat "$TMP/err"))"
    [ "$(wc -l <"$TMP/err")" -eq 1 ] || fail "'$*' printed $(wc -l <"$TMP/err") lines on stderr"
    grep -q -- "$want" "$TMP/err" || fail "'$*': stderr lacks '$want': $(cat "$TMP/err")"
}

# jq_check FILE PYTHON-EXPR: every JSON line of FILE is bound to `o` (the last) / `all`
jq_check() {
    python3 - "$1" "$2" <<'PY' || fail "json check '$2' on $(cat "$1")"
import json, sys
all = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
o = all[-1]
ok = eval(sys.argv[2])
sys.exit(0 if ok else 1)
PY
}

# `up` needs kvs-coordinator next to it (or $KVS_COORDINATOR)
KVS_COORDINATOR=$TMP/nothing "$KVS" up --listen tcp://127.0.0.1:0 --data-dir "$TMP/data" \
    >"$TMP/out" 2>"$TMP/err"
[ $? -eq 1 ] || fail "up without a coordinator program did not exit 1"
grep -q "no executable kvs-coordinator" "$TMP/err" || fail "up without coordinator: $(cat "$TMP/err")"
# a worker that cannot start: up stops the coordinator too and exits 1
"$KVS" up -m "$TMP/no-such-model.gguf" --listen tcp://127.0.0.1:0 --data-dir "$TMP/bad" \
    >"$TMP/out" 2>"$TMP/err"
[ $? -eq 1 ] || fail "up with a missing model did not exit 1"
grep -q "kvs-worker cpu0 exited before it was ready" "$TMP/err" || fail "up: $(cat "$TMP/err")"
pgrep -f "$TMP/bad/cluster.store" >/dev/null && fail "the coordinator outlived a failed up"

start_up
echo "cli_session: kvstream up at $KVSTREAM_ENDPOINT (worker $WORKER_ENDPOINT)"
[ "$KVSTREAM_ENDPOINT" != "$WORKER_ENDPOINT" ] || fail "up printed the worker as its endpoint"
# the endpoint is the coordinator, and the worker registered with it
run admin workers -o json
jq_check "$TMP/out" 'len(o["workers"]) == 1 and o["workers"][0]["worker"] == "cpu0"'
jq_check "$TMP/out" "o['workers'][0]['endpoint'] == '$WORKER_ENDPOINT' and o['workers'][0]['state'] == 'ready'"

# --help of each command, and usage errors
for c in up session append query flash; do
    "$KVS" $c --help >"$TMP/out" 2>&1 || fail "kvstream $c --help exited $?"
    grep -q "^usage: kvstream $c" "$TMP/out" || fail "kvstream $c --help: $(head -1 "$TMP/out")"
done
"$KVS" --help | grep -q "^exit codes:" || fail "kvstream --help lacks the exit codes"
expect_error 2 "needs a session NAME" -- session create
expect_error 2 "unknown subcommand" -- session frobnicate
expect_error 2 "-o must be text or json" -- session list -o xml
expect_error 2 "needs a session NAME and a QUESTION" -- query s1
expect_error 2 "--max-tokens" -- query s1 "q?" -n 0
expect_error 2 "does not apply" -- flash get s1 q1 --every-tokens 3
expect_error 2 "--policy must be" -- session create s1 --policy sometimes
# a port nobody listens on: bound for a moment, then released
FREE_PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])')
NOBODY=tcp://127.0.0.1:$FREE_PORT
expect_error 3 "no answer from $NOBODY" -- session list -e "$NOBODY" --timeout 300
expect_error 1 "INVALID_ARGUMENT" -- session create "bad name"

# sessions
run session create s1 --cells 2048 -o json
jq_check "$TMP/out" 'o == {"session": "s1", "version": 0, "cells_used": 0, "cells_budget": 2048}'
expect_error 5 "ALREADY_EXISTS" -- session create s1
run session create s2 --prefix "Market ticks:" --chat --policy slide --cells 1024
run session info s2 -o json
jq_check "$TMP/out" 'o["format"] == "chat" and o["policy"] == "slide" and o["prefix_tokens"] > 0'
run session list -o json
jq_check "$TMP/out" 'sorted(o["sessions"]) == ["s1", "s2"]'
run session list
[ "$(sort "$TMP/out" | tr '\n' ' ')" = "s1 s2 " ] || fail "session list: $(cat "$TMP/out")"
# placed by the coordinator, held by the worker (asked directly)
run admin sessions -o json
jq_check "$TMP/out" 'sorted((x["session"], x["worker"], x["cells"]) for x in o["sessions"]) == [("s1", "cpu0", 2048), ("s2", "cpu0", 1024)]'
run session list -e "$WORKER_ENDPOINT" -o json
jq_check "$TMP/out" 'sorted(o["sessions"]) == ["s1", "s2"]'

# append: an argument, then standard input
run append s1 "AAPL 189.20" -o json
jq_check "$TMP/out" 'o["version"] == 1 and o["n_tokens"] > 0 and o["duplicate"] is False'
printf 'MSFT 401.50\nAAPL 190.10\n\nGOOG 140.00\n' |
    "$KVS" append s1 - -o json >"$TMP/out" 2>"$TMP/err" ||
    fail "append - exited $?: $(cat "$TMP/err")"
jq_check "$TMP/out" '[x["version"] for x in all] == [2, 3, 4]'
jq_check "$TMP/out" 'len({x["client_id"] for x in all}) == 1'
run append s1 "MSFT 402.00"
grep -q "^s1 version 5 +" "$TMP/out" || fail "append text output: $(cat "$TMP/out")"

# '-' streams: each line is acknowledged while the writer is still open
mkfifo "$TMP/feed"
"$KVS" append s1 - -o json <"$TMP/feed" >"$TMP/stream.out" 2>"$TMP/stream.err" &
APP_PID=$!
exec 3>"$TMP/feed"
echo "AAPL 191.00" >&3
for _ in $(seq 1 100); do
    [ -s "$TMP/stream.out" ] && break
    sleep 0.1
done
jq_check "$TMP/stream.out" 'len(all) == 1 and o["version"] == 6'
run session info s1 -o json
jq_check "$TMP/out" 'o["version"] == 6'
echo "AAPL 191.50" >&3
exec 3>&-
wait "$APP_PID" || fail "streaming append exited $?: $(cat "$TMP/stream.err")"
jq_check "$TMP/stream.out" '[x["version"] for x in all] == [6, 7]'

# two processes never share a client id; an explicit one continues with --after-seq
run append s1 "IBM 180.00" --client-id 4242 -o json
jq_check "$TMP/out" 'o["client_id"] == 4242 and o["duplicate"] is False and o["version"] == 8'
run append s1 "IBM 180.00" --client-id 4242 -o json
jq_check "$TMP/out" 'o["duplicate"] is True and o["version"] == 8'  # seq 1 again: applied once
run append s1 "IBM 181.00" --client-id 4242 --after-seq 1 -o json
jq_check "$TMP/out" 'o["duplicate"] is False and o["version"] == 9'
expect_error 1 "OUT_OF_ORDER" -- append s1 "IBM 182.00" --client-id 4242 --after-seq 7

run session info s1 -o json
jq_check "$TMP/out" 'o["version"] == 9 and o["appends"] == 9 and o["flash_queries"] == 0'
jq_check "$TMP/out" 'o["data_tokens"] == o["cells_used"] > 0 and o["cells_budget"] == 2048'
run session info s1
grep -q "^appends  *9$" "$TMP/out" || fail "session info text: $(cat "$TMP/out")"

# query: stateful == stateless, text output == json answer
run query s1 "Last AAPL price:" -n 12 -o json
cp "$TMP/out" "$TMP/q.json"
ANSWER_KEYS='{"answer", "token_ids", "version", "context_tokens", "ttft_ms", "total_ms"}'
jq_check "$TMP/q.json" "set(o) >= $ANSWER_KEYS and o['version'] == 9"
jq_check "$TMP/q.json" '0 < len(o["token_ids"]) <= 12 and o["total_ms"] >= o["ttft_ms"] > 0'
run query s1 "Last AAPL price:" -n 12 --stateless -o json
cp "$TMP/out" "$TMP/qs.json"
python3 - "$TMP/q.json" "$TMP/qs.json" <<'PY' || fail "stateful and stateless answers differ"
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:])
assert a["answer"] == b["answer"] and a["token_ids"] == b["token_ids"], (a, b)
assert a["context_tokens"] == b["context_tokens"]
PY
run query s1 "Last AAPL price:" -n 12
python3 - "$TMP/q.json" "$TMP/out" <<'PY' || fail "text answer differs from the json one"
import json, sys
want = json.load(open(sys.argv[1]))["answer"] + "\n"
got = open(sys.argv[2]).read()
assert got == want, (got, want)
PY
grep -q "ttft" "$TMP/err" || fail "query: no timing line on stderr"
expect_error 4 "NOT_FOUND" -- query nope "q?"

# flash queries
run flash register s1 last "Last AAPL price:" -n 8 --every-tokens 1 -o json
jq_check "$TMP/out" 'o == {"session": "s1", "name": "last", "registered": True}'
expect_error 5 "ALREADY_EXISTS" -- flash register s1 last "Again?"
run flash list s1 -o json
jq_check "$TMP/out" 'o["names"] == ["last"]'
run flash get s1 last -o json
cp "$TMP/out" "$TMP/f1.json"
jq_check "$TMP/f1.json" "set(o) >= $ANSWER_KEYS | {'fresh'}"
jq_check "$TMP/f1.json" 'o["fresh"] is True and o["version"] == 9'
run query s1 "Last AAPL price:" -n 8 -o json
python3 - "$TMP/f1.json" "$TMP/out" <<'PY' || fail "flash answer differs from the query's"
import json, sys
f, q = (json.load(open(p)) for p in sys.argv[1:])
assert f["token_ids"] == q["token_ids"], (f, q)
PY
run session info s1 -o json
jq_check "$TMP/out" 'o["flash_queries"] == 1'
# watch: the current answer (replayed from version 0), then the one a new append causes
"$KVS" flash watch s1 --after-version 0 --count 2 -o json >"$TMP/watch.out" 2>"$TMP/watch.err" &
WATCH_PID=$!
for _ in $(seq 1 100); do
    [ -s "$TMP/watch.out" ] && break
    sleep 0.1
done
run append s1 "AAPL 192.00"
for _ in $(seq 1 300); do
    kill -0 "$WATCH_PID" 2>/dev/null || break
    sleep 0.1
done
if kill -0 "$WATCH_PID" 2>/dev/null; then
    kill "$WATCH_PID"
    fail "flash watch did not get 2 answers: $(cat "$TMP/watch.out")"
fi
wait "$WATCH_PID" || fail "flash watch exited $?: $(cat "$TMP/watch.err")"
jq_check "$TMP/watch.out" '[x["version"] for x in all] == [9, 10] and all[0]["name"] == "last"'
run flash get s1 last -o json
jq_check "$TMP/out" 'o["version"] == 10 and o["fresh"] is True'
# a watch stopped by SIGINT exits 0
"$KVS" flash watch s1 >"$TMP/watch.out" 2>"$TMP/watch.err" &
WATCH_PID=$!
sleep 1
kill -INT "$WATCH_PID"
wait "$WATCH_PID" || fail "flash watch exited $? after SIGINT: $(cat "$TMP/watch.err")"
run flash unregister s1 last -o json
jq_check "$TMP/out" 'o["unregistered"] is True'
expect_error 4 "NOT_FOUND" -- flash get s1 last
expect_error 4 "NOT_FOUND" -- flash unregister s1 last
run flash list s1 -o json
jq_check "$TMP/out" 'o["names"] == []'

# SIGINT: a clean stop; the restart restores s1 and s2 from the data dir
stop_up INT
OLD_WORKER=$WORKER_ENDPOINT
start_up
[ "$WORKER_ENDPOINT" != "$OLD_WORKER" ] || fail "the worker came back on the same port"
run admin workers -o json
jq_check "$TMP/out" "len(o['workers']) == 1 and o['workers'][0]['endpoint'] == '$WORKER_ENDPOINT'"
run session info s1 -o json
jq_check "$TMP/out" 'o["version"] == 10 and o["appends"] == 10'
run session list -o json
jq_check "$TMP/out" 'sorted(o["sessions"]) == ["s1", "s2"]'

# close
run session close s1 -o json
jq_check "$TMP/out" 'o == {"session": "s1", "closed": True}'
expect_error 4 "NOT_FOUND" -- session info s1
expect_error 4 "NOT_FOUND" -- session close s1
run session close s2
run session list -o json
jq_check "$TMP/out" 'o["sessions"] == []'

# a worker that dies under `up`: the cluster is stopped, `up` exits with its status
run session create s3 --cells 64
WORKER_PID=$(pgrep -f -P "$UP_PID" kvs-worker)
[ -n "$WORKER_PID" ] || fail "no kvs-worker child of up ($UP_PID)"
kill -KILL "$WORKER_PID"
wait "$UP_PID"
rc=$?
UP_PID=
[ "$rc" -eq 137 ] || fail "up exited $rc after its worker was SIGKILLed, wanted 137"
grep -q "kvs-worker cpu0 exited" "$TMP/up.err" || fail "up did not say why: $(cat "$TMP/up.err")"
pgrep -f "$TMP/data/cluster.store" >/dev/null && fail "the coordinator outlived up"
# the next start finds s3 again
start_up
run session info s3 -o json
jq_check "$TMP/out" 'o["cells_budget"] == 64'
run session close s3

stop_up TERM
echo "cli_session: ok"

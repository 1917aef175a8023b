#!/usr/bin/env bash
# CLI test of a real cluster on one machine: etcd (Debian's /usr/bin/etcd on ephemeral loopback
# ports, a temporary data dir), a kvs-coordinator on it and three CPU kvs-workers started with
# --coordinator and a shared --data-dir. Checks: `kvstream admin workers -o json` lists the
# workers with their cells; sessions created through the coordinator land where it says;
# a cordoned worker gets no new session; a worker appended to (fsync always) and SIGKILLed is
# reported down after its lease TTL, and another worker adopts its session (session.adopt)
# with every acknowledged append in order, a retried append answered as a duplicate; a worker
# SIGSTOPped past its lease has stopped serving when resumed (UNAVAILABLE) and is reported down.
# Usage: cli_cluster.sh /path/to/kvstream   (kvs-worker and kvs-coordinator next to it)
set -uo pipefail
KVS=${1:?usage: cli_cluster.sh KVSTREAM}
BIN=$(cd "$(dirname "$KVS")" && pwd)
TMP=$(mktemp -d)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do
        kill -CONT "$p" 2>/dev/null
        kill -KILL "$p" 2>/dev/null
    done
    wait 2>/dev/null
    rm -rf "$TMP"
}
trap cleanup EXIT
fail() {
    echo "cli_cluster: FAIL: $*" >&2
    for f in "$TMP"/*.err; do echo "--- $f" >&2; tail -5 "$f" >&2; done
    exit 1
}
T0=$(date +%s)

ETCD=/usr/bin/etcd
if [ ! -x "$ETCD" ]; then
    echo "cli_cluster: $ETCD is missing (apt-get install etcd-server): skipped"
    exit 77
fi
MODEL_DIR=${KVS_MODEL_DIR:-$HOME/.cache/kvstream/models}
MODEL=${KVSTREAM_MODEL:-$MODEL_DIR/SmolLM2-135M-Instruct.Q4_1.gguf}
if [ ! -f "$MODEL" ]; then
    echo "cli_cluster: the default model $MODEL is missing (scripts/setup.sh fetches it): skipped"
    exit 77
fi
PY=/usr/bin/python3
if ! "$PY" -c 'import zmq, msgpack' 2>/dev/null; then
    echo "cli_cluster: $PY lacks zmq/msgpack (apt-get install python3-zmq python3-msgpack): skipped"
    exit 77
fi
for b in kvs-worker kvs-coordinator; do
    [ -x "$BIN/$b" ] || fail "$BIN/$b is missing: build it (cmake --build ... --target $b)"
done

# rpc EP JSON: one request to a coordinator or worker; the reply as one JSON line on stdout
cat >"$TMP/rpc.py" <<'PY'
import json, sys, zmq, msgpack
s = zmq.Context().socket(zmq.DEALER)
s.setsockopt(zmq.LINGER, 0)
s.connect(sys.argv[1])
rq = json.loads(sys.argv[2])
rq["id"] = 1
s.send_multipart([b"", msgpack.packb(rq)])
if not s.poll(10000):
    sys.exit("rpc: no answer from %s to %s" % (sys.argv[1], rq["op"]))
print(json.dumps(msgpack.unpackb(s.recv_multipart()[1])))
PY
rpc() { "$PY" "$TMP/rpc.py" "$@"; }
# check JSON PYTHON-EXPR: the JSON (bound to `o`) satisfies the expression
check() {
    "$PY" -c 'import json,sys; o=json.loads(sys.argv[1]); sys.exit(0 if eval(sys.argv[2]) else 1)' \
        "$1" "$2" || fail "check '$2' on $1"
}
free_port() {
    "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
# wait_line FILE PATTERN: until FILE has a line starting with PATTERN (60 s)
wait_line() {
    for _ in $(seq 1 600); do
        grep -q "^$2" "$1" && return 0
        sleep 0.1
    done
    fail "no '$2' in $1 after 60 s"
}

# ---- etcd, the coordinator, three workers ----
CPORT=$(free_port)
PPORT=$(free_port)
while [ "$PPORT" = "$CPORT" ]; do PPORT=$(free_port); done
ETCD_URL=http://127.0.0.1:$CPORT
"$ETCD" --name kvs --data-dir "$TMP/etcd" --listen-client-urls "$ETCD_URL" \
    --advertise-client-urls "$ETCD_URL" --listen-peer-urls "http://127.0.0.1:$PPORT" \
    --initial-advertise-peer-urls "http://127.0.0.1:$PPORT" \
    --initial-cluster "kvs=http://127.0.0.1:$PPORT" --heartbeat-interval 50 \
    --election-timeout 500 >"$TMP/etcd.log" 2>&1 &
PIDS+=($!)
for i in $(seq 1 150); do
    "$PY" -c 'import sys,urllib.request; urllib.request.urlopen(sys.argv[1]+"/health", timeout=1)' \
        "$ETCD_URL" 2>/dev/null && break
    [ "$i" -eq 150 ] && fail "etcd did not answer at $ETCD_URL in 15 s ($(tail -3 "$TMP/etcd.log"))"
    sleep 0.1
done

TTL=3
"$BIN/kvs-coordinator" --listen tcp://127.0.0.1:0 --store "$ETCD_URL" --cluster clitest \
    --leader-ttl 2 --worker-ttl $TTL --heartbeat-ms 250 >"$TMP/coord.out" 2>"$TMP/coord.err" &
PIDS+=($!)
wait_line "$TMP/coord.out" "kvs-coordinator: listening on "
COORD=$(sed -n 's/^kvs-coordinator: listening on //p' "$TMP/coord.out")
export KVSTREAM_ENDPOINT=$COORD

declare -A WPID WEP
for w in w1 w2 w3; do
    "$BIN/kvs-worker" -m "$MODEL" --listen tcp://127.0.0.1:0 -t 1 --cells 2048 \
        --data-dir "$TMP/data" --fsync always --coordinator "$COORD" --worker-id $w \
        >"$TMP/$w.out" 2>"$TMP/$w.err" &
    WPID[$w]=$!
    PIDS+=($!)
done
for w in w1 w2 w3; do
    wait_line "$TMP/$w.out" "kvs-worker: listening on "
    WEP[$w]=$(sed -n 's/^kvs-worker: listening on //p' "$TMP/$w.out")
done

# ---- admin workers: all three, ready, with their cells ----
for i in $(seq 1 50); do
    J=$("$KVS" admin workers -o json 2>"$TMP/admin.err") || fail "admin workers: $(cat "$TMP/admin.err")"
    "$PY" -c 'import json,sys; o=json.loads(sys.argv[1]); sys.exit(0 if sum(w["state"]=="ready" for w in o["workers"])==3 else 1)' "$J" && break
    [ "$i" -eq 50 ] && fail "three ready workers not listed in 10 s: $J"
    sleep 0.2
done
check "$J" 'sorted(w["worker"] for w in o["workers"]) == ["w1","w2","w3"]'
check "$J" 'all(w["cells_total"] == 2048 and w["cells_free"] == 2048 and w["device"] == "cpu" for w in o["workers"])'
check "$J" "{w['worker']: w['endpoint'] for w in o['workers']} == {'w1': '${WEP[w1]}', 'w2': '${WEP[w2]}', 'w3': '${WEP[w3]}'}"
SHA=$("$PY" -c 'import json,sys; print(json.loads(sys.argv[1])["workers"][0]["model"])' "$J")
"$KVS" admin workers >"$TMP/table" || fail "admin workers (table)"
grep -q "^w1 .* ready .*2048" "$TMP/table" || fail "table lacks w1: $(cat "$TMP/table")"

# create NAME: placed by the coordinator, then created on the worker it names; prints the worker
create() {
    local r
    r=$(rpc "$COORD" "{\"op\":\"session.create\",\"session\":\"$1\",\"model\":\"$SHA\",\"cells\":256}") || fail "$r"
    check "$r" '"worker" in o and "endpoint" in o'
    local w ep
    w=$("$PY" -c 'import json,sys; print(json.loads(sys.argv[1])["worker"])' "$r")
    ep=$("$PY" -c 'import json,sys; print(json.loads(sys.argv[1])["endpoint"])' "$r")
    r=$(rpc "$ep" "{\"op\":\"session.create\",\"session\":\"$1\",\"cells\":256}")
    check "$r" "o.get('cells_budget') == 256"
    echo "$w"
}

# ---- sessions through the coordinator; then cordon the fullest worker ----
for s in s1 s2 s3; do
    W=$(create $s) || exit 1
    echo "$s $W" >>"$TMP/placed"
done
J=$("$KVS" admin sessions -o json) || fail "admin sessions"
check "$J" 'sorted(x["session"] for x in o["sessions"]) == ["s1","s2","s3"]'
while read -r s w; do
    check "$J" "[x['worker'] for x in o['sessions'] if x['session'] == '$s'] == ['$w']"
    L=$(rpc "${WEP[$w]}" '{"op":"session.list"}')
    check "$L" "'$s' in o['sessions']"
done <"$TMP/placed"
FULL=$(sort -k2 "$TMP/placed" | awk '{print $2}' | uniq -c | sort -rn | awk 'NR==1{print $2}')
"$KVS" admin cordon "$FULL" >"$TMP/out" || fail "admin cordon $FULL"
grep -q "cordoned" "$TMP/out" || fail "cordon printed $(cat "$TMP/out")"
for s in c1 c2 c3 c4; do
    W=$(create $s) || exit 1
    [ "$W" != "$FULL" ] || fail "session $s was placed on the cordoned worker $FULL"
done
J=$("$KVS" admin describe "$FULL" -o json) || fail "admin describe $FULL"
check "$J" "o['worker']['state'] == 'cordoned' and all(x['worker'] == '$FULL' for x in o['sessions'])"
"$KVS" admin uncordon "$FULL" >/dev/null || fail "admin uncordon $FULL"
"$KVS" admin describe no-such-thing >/dev/null 2>&1
[ $? -eq 4 ] || fail "admin describe of an unknown name should exit 4"
"$KVS" admin drain "$FULL" >/dev/null 2>"$TMP/err"
rc=$?
if grep -q UNSUPPORTED "$TMP/err"; then
    [ $rc -eq 1 ] || fail "drain UNSUPPORTED exited $rc"
fi

# ---- SIGKILL a worker after acknowledged appends; another adopts its session ----
VICTIM=$(awk '$1=="s1"{print $2}' "$TMP/placed")
for i in 1 2 3 4 5; do
    r=$(rpc "${WEP[$VICTIM]}" "{\"op\":\"session.append\",\"session\":\"s1\",\"text\":\"tick $i\",\"client_id\":7,\"client_seq\":$i}")
    check "$r" "o.get('duplicate') is False"
done
kill -KILL "${WPID[$VICTIM]}"
wait "${WPID[$VICTIM]}" 2>/dev/null
T_KILL=$(date +%s.%N)
for i in $(seq 1 100); do
    J=$("$KVS" admin workers -o json) || fail "admin workers"
    "$PY" -c 'import json,sys; o=json.loads(sys.argv[1]); sys.exit(0 if [w["state"] for w in o["workers"] if w["worker"]==sys.argv[2]]==["down"] else 1)' "$J" "$VICTIM" && break
    [ "$i" -eq 100 ] && fail "$VICTIM not reported down 20 s after SIGKILL: $J"
    sleep 0.2
done
DOWN_S=$("$PY" -c "import time; print(round(time.time() - $T_KILL, 1))")
echo "cli_cluster: $VICTIM reported down ${DOWN_S} s after SIGKILL (lease TTL $TTL s)"
"$PY" -c "import sys; sys.exit(0 if $TTL - 1 <= $DOWN_S <= $TTL + 5 else 1)" ||
    fail "down after $DOWN_S s, expected about the lease TTL ($TTL s)"
r=$(rpc "$COORD" '{"op":"session.locate","session":"s1"}')
check "$r" "o['error']['code'] == 'UNAVAILABLE'"
HEIR=$(for w in w1 w2 w3; do [ "$w" != "$VICTIM" ] && echo $w; done | head -1)
r=$(rpc "${WEP[$HEIR]}" "{\"op\":\"session.adopt\",\"session\":\"s1\",\"from\":\"$VICTIM\"}")
check "$r" "o.get('appends') == 5 and o.get('cells_budget') == 256"
[ -f "$TMP/data/$HEIR/s1.log" ] && [ ! -f "$TMP/data/$VICTIM/s1.log" ] ||
    fail "s1.log was not moved from $VICTIM's directory to $HEIR's"
r=$(rpc "${WEP[$HEIR]}" '{"op":"session.dump","session":"s1"}')
check "$r" "o['text'] == ''.join('tick %d\n' % i for i in range(1, 6))"
r=$(rpc "${WEP[$HEIR]}" '{"op":"session.append","session":"s1","text":"tick 5","client_id":7,"client_seq":5}')
check "$r" "o.get('duplicate') is True"
r=$(rpc "${WEP[$HEIR]}" '{"op":"session.append","session":"s1","text":"tick 6","client_id":7,"client_seq":6}')
check "$r" "o.get('duplicate') is False"
r=$(rpc "${WEP[$HEIR]}" '{"op":"session.dump","session":"s1"}')
check "$r" "o['text'] == ''.join('tick %d\n' % i for i in range(1, 7))"
r=$(rpc "${WEP[$HEIR]}" "{\"op\":\"session.adopt\",\"session\":\"s1\",\"from\":\"$VICTIM\"}")
check "$r" "o['error']['code'] == 'ALREADY_EXISTS'"
r=$(rpc "${WEP[$HEIR]}" "{\"op\":\"session.adopt\",\"session\":\"nope\",\"from\":\"$VICTIM\"}")
check "$r" "o['error']['code'] == 'NOT_FOUND'"

# ---- SIGSTOP a worker past its lease: resumed, it has stopped serving ----
PAUSED=$(for w in w1 w2 w3; do [ "$w" != "$VICTIM" ] && [ "$w" != "$HEIR" ] && echo $w; done)
kill -STOP "${WPID[$PAUSED]}"
sleep $((TTL + 2))
kill -CONT "${WPID[$PAUSED]}"
r=$(rpc "${WEP[$PAUSED]}" '{"op":"session.list"}')
check "$r" "o['error']['code'] == 'UNAVAILABLE' and 'stopped serving' in o['error']['message']"
r=$(rpc "${WEP[$PAUSED]}" '{"op":"ping"}')
check "$r" "o.get('pong') is True"
sleep 1
J=$("$KVS" admin workers -o json) || fail "admin workers"
check "$J" "[w['state'] for w in o['workers'] if w['worker'] == '$PAUSED'] == ['down']"
grep -q "stopped serving" "$TMP/$PAUSED.err" || fail "$PAUSED did not log why it stopped serving"

echo "cli_cluster: ok ($(($(date +%s) - T0)) s)"

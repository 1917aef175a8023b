#!/usr/bin/env bash
# The demo runs end to end on the default model: a table row per question, flash answers
# ready when asked (every append re-evaluates them, so every ask is a hit), a summary with
# the stateless baseline, exit 0; and bad options are one-line errors.
# Usage: cli_demo.sh /path/to/kvstream
set -uo pipefail
KVS=${1:?usage: cli_demo.sh KVSTREAM}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
fail() { echo "cli_demo: FAIL: $*" >&2; exit 1; }

"$KVS" demo --ticks 40 -t 2 >"$TMP/out" 2>"$TMP/err" || fail "demo exited $? ($(cat "$TMP/err"))"
[ "$(grep -c '^20 \|^40 ' "$TMP/out")" -eq 4 ] || fail "expected 4 table rows: $(cat "$TMP/out")"
grep -q "flash answers ready when asked: 4/4 (100%" "$TMP/out" || fail "hit rate: $(grep summary "$TMP/out")"
grep -Eq "stateless \(re-prefill\) TTFT [0-9.]+ ms: [0-9]+x" "$TMP/out" || fail "no baseline line"
"$KVS" demo --ticks 0 >/dev/null 2>"$TMP/err"; [ $? -eq 2 ] || fail "--ticks 0 accepted"
[ "$(wc -l <"$TMP/err")" -eq 1 ] || fail "--ticks 0: not one line"
"$KVS" demo --nope >/dev/null 2>"$TMP/err"; [ $? -eq 2 ] || fail "unknown option accepted"
echo "cli_demo: ok"

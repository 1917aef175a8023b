#!/usr/bin/env bash
# kvstream inspect: text and JSON output for the default model, one-line refusals (exit 1),
# usage errors (exit 2). Usage: tests/cli_inspect.sh PATH/TO/kvstream
set -u
kvs=${1:?usage: cli_inspect.sh KVSTREAM}
src=${KVS_SOURCE_DIR:-$(cd "$(dirname "$0")/.." && pwd)}
fail=0
check() { # check NAME CONDITION...
    local name=$1
    shift
    if "$@"; then echo "ok   $name"; else echo "FAIL $name"; fail=1; fi
}

out=$("$kvs" inspect)
check "text exit 0" test $? -eq 0
check "text arch" grep -q '^architecture: *llama$' <<<"$out"
check "text layers" grep -q '^layers: *30$' <<<"$out"
check "text template" grep -q '^chat template: *chatml$' <<<"$out"

json=$("$kvs" inspect -o json)
check "json exit 0" test $? -eq 0
check "json fields" python3 -c '
import json, sys
j = json.loads(sys.argv[1])
assert j["architecture"] == "llama" and j["n_layer"] == 30 and j["n_embd"] == 576
assert j["n_head"] == 9 and j["n_head_kv"] == 3 and j["n_ff"] == 1536 and j["n_vocab"] == 49152
assert j["tensors"]["count"] == 272 and j["tokenizer"]["pre"] == "smollm"
assert j["chat_template"] == "chatml"
' "$json"

err=$("$kvs" inspect -m "$src/tests/fuzz/seeds/gguf/version1.gguf" 2>&1 >/dev/null)
check "refused exit 1" test $? -eq 1
check "refused one line" test "$(wc -l <<<"$err")" -eq 1
check "refused reason" grep -q '^kvstream inspect: .*version1.gguf: GGUF version 1 is not supported' <<<"$err"

"$kvs" inspect -m /nonexistent.gguf 2>/dev/null
check "missing file exit 1" test $? -eq 1
"$kvs" inspect --bogus 2>/dev/null
check "unknown flag exit 2" test $? -eq 2
"$kvs" inspect -m 2>/dev/null
check "missing -m argument exit 2" test $? -eq 2
"$kvs" inspect --help | grep -q '^usage: kvstream inspect'
check "help exit 0" test "${PIPESTATUS[0]}" -eq 0
exit $fail

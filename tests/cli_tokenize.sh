#!/usr/bin/env bash
# CLI test for `kvstream tokenize`: ids match the llama.cpp goldens for the default model
# (plain and --special), the metadata's BOS/EOS only with --add-special, and the error paths
# (bad JSON line -> exit 1 naming the line; unknown flag -> exit 2; --help -> exit 0).
# Usage: cli_tokenize.sh /path/to/kvstream
set -euo pipefail
KVS=${1:?usage: cli_tokenize.sh KVSTREAM}
SRC=${KVS_SOURCE_DIR:-$(cd "$(dirname "$0")/.." && pwd)}
GOLD=$SRC/tests/data/tokenizer/golden-smollm.jsonl
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
fail() { echo "cli_tokenize: FAIL: $*" >&2; exit 1; }

# Split the goldens into input lines and expected id arrays, per special flag.
python3 - "$GOLD" "$TMP" <<'PY'
import json, sys
gold, tmp = sys.argv[1], sys.argv[2]
files = {sp: (open(f"{tmp}/in-{sp}", "w"), open(f"{tmp}/want-{sp}", "w")) for sp in (0, 1)}
for line in open(gold, encoding="utf-8"):
    r = json.loads(line)
    if "text" not in r:
        continue
    fin, fwant = files[int(r["special"])]
    fin.write(json.dumps(r["text"], ensure_ascii=False) + "\n")
    fwant.write(json.dumps(r["ids"], separators=(",", ":")) + "\n")
PY

"$KVS" tokenize <"$TMP/in-0" >"$TMP/have-0" || fail "plain run exited $?"
cmp -s "$TMP/want-0" "$TMP/have-0" || { diff "$TMP/want-0" "$TMP/have-0" | head -5 >&2; fail "plain ids differ"; }
"$KVS" tokenize --special <"$TMP/in-1" >"$TMP/have-1" || fail "--special run exited $?"
cmp -s "$TMP/want-1" "$TMP/have-1" || { diff "$TMP/want-1" "$TMP/have-1" | head -5 >&2; fail "--special ids differ"; }
echo "cli_tokenize: $(wc -l <"$TMP/in-0") plain + $(wc -l <"$TMP/in-1") special lines match"

# -m with an explicit path gives the same ids
MODEL=${KVSTREAM_MODEL:-${KVS_MODEL_DIR:-$HOME/.cache/kvstream/models}/SmolLM2-135M-Instruct.Q4_1.gguf}
[ "$(echo '"Hello world"' | "$KVS" tokenize -m "$MODEL")" = "$(echo '"Hello world"' | "$KVS" tokenize)" ] \
    || fail "-m differs from the default model"

# special text is only parsed with --special
plain=$(echo '"<|im_start|>"' | "$KVS" tokenize)
special=$(echo '"<|im_start|>"' | "$KVS" tokenize --special)
[ "$special" = "[1]" ] || fail "--special gave $special"
[ "$plain" != "[1]" ] || fail "special text parsed without --special"

# --add-special adds exactly what the metadata asks (SmolLM2: nothing)
a=$(echo '"hi"' | "$KVS" tokenize)
b=$(echo '"hi"' | "$KVS" tokenize --add-special)
[ "$a" = "$b" ] || fail "--add-special changed SmolLM2 ids: $a vs $b"
# Llama 3 vocab adds BOS 128000
VOCAB=${KVS_VOCAB_DIR:-$HOME/.cache/kvstream/vocab}
c=$(echo '"hi"' | "$KVS" tokenize -m "$VOCAB/ggml-vocab-llama-bpe.gguf" --add-special)
case "$c" in "[128000,"*) ;; *) fail "--add-special with Llama 3 gave $c" ;; esac

# empty input: no output, success
[ -z "$("$KVS" tokenize </dev/null)" ] || fail "empty input printed something"

# a line that is not a JSON string: exit 1, one line naming the line number
set +e
printf '"ok"\n{"a":1}\n"never"\n' | "$KVS" tokenize >"$TMP/out" 2>"$TMP/err"
rc=$?
set -e
[ $rc -eq 1 ] || fail "bad line exited $rc"
grep -q "line 2" "$TMP/err" || fail "error does not name line 2: $(cat "$TMP/err")"
[ "$(wc -l <"$TMP/err")" -eq 1 ] || fail "error is not one line"
[ "$(cat "$TMP/out")" = "$(echo '"ok"' | "$KVS" tokenize)" ] || fail "lines before the bad one not printed"
set +e
printf 'not json\n' | "$KVS" tokenize >/dev/null 2>"$TMP/err"; rc=$?
set -e
[ $rc -eq 1 ] && grep -q "line 1" "$TMP/err" || fail "invalid JSON: rc $rc, $(cat "$TMP/err")"

# usage errors: exit 2 with one line; --help exit 0
set +e
"$KVS" tokenize --no-such-flag </dev/null >/dev/null 2>"$TMP/err"; rc=$?
set -e
[ $rc -eq 2 ] || fail "unknown flag exited $rc"
[ "$(wc -l <"$TMP/err")" -eq 1 ] || fail "unknown flag: not one line"
"$KVS" tokenize --help | grep -q "usage: kvstream tokenize" || fail "--help"
set +e
"$KVS" tokenize -m /no/such/model.gguf </dev/null 2>"$TMP/err"; rc=$?
set -e
[ $rc -eq 1 ] || fail "missing model exited $rc"
echo "cli_tokenize: error paths ok"

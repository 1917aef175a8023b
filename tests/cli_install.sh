#!/usr/bin/env bash
# The installed tree works: `cmake --install` into a temporary prefix, `PREFIX/bin/kvstream up`
# finds the kvs-worker installed next to it and serves, and the README's C example compiles
# against the installed header and libkvstream.so and talks to it.
# Usage: cli_install.sh /path/to/build/kvstream
set -uo pipefail
KVS=${1:?usage: cli_install.sh KVSTREAM}
SRC=${KVS_SOURCE_DIR:-$(cd "$(dirname "$0")/.." && pwd)}
BUILD=$(cd "$(dirname "$KVS")" && pwd)
TMP=$(mktemp -d)
UP_PID=
cleanup() {
    [ -n "$UP_PID" ] && kill -TERM "$UP_PID" 2>/dev/null && wait "$UP_PID" 2>/dev/null
    rm -rf "$TMP"
}
trap cleanup EXIT
fail() { echo "cli_install: FAIL: $*" >&2; exit 1; }

MODEL_DIR=${KVS_MODEL_DIR:-$HOME/.cache/kvstream/models}
MODEL=${KVSTREAM_MODEL:-$MODEL_DIR/SmolLM2-135M-Instruct.Q4_1.gguf}
if [ ! -f "$MODEL" ]; then
    echo "cli_install: the default model $MODEL is missing (scripts/setup.sh fetches it): skipped"
    exit 77
fi
for t in kvstream kvs-worker libkvstream.so libkvstream.a; do
    [ -e "$BUILD/$t" ] || fail "$BUILD/$t is not built (build all targets first)"
done

PREFIX=$TMP/prefix
cmake --install "$BUILD" --prefix "$PREFIX" >"$TMP/install.log" 2>&1 ||
    fail "cmake --install: $(tail -3 "$TMP/install.log")"
for f in bin/kvstream bin/kvs-worker include/kvstream/kvstream.h \
    include/kvstream/common/status.h; do
    [ -e "$PREFIX/$f" ] || fail "not installed: $f"
done
LIBDIR=$(dirname "$(find "$PREFIX" -name 'libkvstream.so' | head -1)")
[ -n "$LIBDIR" ] || fail "libkvstream.so not installed"

# the installed kvstream runs the installed kvs-worker (no build tree, no $KVS_WORKER)
env -u KVS_WORKER "$PREFIX/bin/kvstream" up -m "$MODEL" --listen tcp://127.0.0.1:0 \
    --data-dir "$TMP/data" -t 1 --cells 4096 --fsync no >"$TMP/up.out" 2>"$TMP/up.err" &
UP_PID=$!
EP=
for _ in $(seq 1 600); do
    EP=$(sed -n 's/^kvstream up: listening on \([^ ]*\).*/\1/p' "$TMP/up.out")
    [ -n "$EP" ] && break
    kill -0 "$UP_PID" 2>/dev/null || fail "installed kvstream up exited: $(cat "$TMP/up.err")"
    sleep 0.1
done
[ -n "$EP" ] || fail "installed kvstream up did not print its endpoint"

# the README's C example, built against the installed header and shared library
python3 - "$SRC/README.md" "$TMP/example.c" <<'PY' || fail "no C example in README.md"
import sys
text = open(sys.argv[1]).read()
body = text[text.index("## The C client (libkvstream)"):].split("```c\n", 1)[1].split("```", 1)[0]
body = body.replace('"tcp://127.0.0.1:7700"', 'getenv("EP")')
open(sys.argv[2], "w").write("#include <kvstream/kvstream.h>\n#include <stdio.h>\n"
                             "#include <stdlib.h>\n\nint main(void)\n{\n" + body
                             + "    return rc < 0;\n}\n")
PY
# a sanitizer build's library needs the program linked with the same runtimes
SAN=()
if ldd "$LIBDIR/libkvstream.so" 2>/dev/null | grep -q libasan; then
    SAN=(-fsanitize=address,undefined)
fi
cc -std=c11 -Wall -Wextra -Werror "${SAN[@]}" -I"$PREFIX/include" -o "$TMP/example" \
    "$TMP/example.c" -L"$LIBDIR" -lkvstream -Wl,-rpath,"$LIBDIR" 2>"$TMP/cc.err" ||
    fail "the README example does not build against the install: $(cat "$TMP/cc.err")"
EP=$EP "$TMP/example" >"$TMP/example.out" 2>"$TMP/example.err" ||
    fail "the README example failed: $(cat "$TMP/example.err")"
grep -q "(version 1)" "$TMP/example.out" || fail "README example printed: $(cat "$TMP/example.out")"
# only the public API is exported
EXTRA=$(nm -D --defined-only "$LIBDIR/libkvstream.so" | awk '{print $3}' |
    grep -v -E '^(kvs_client_|kvs_status_name$|kvs_status_message$)' | tr '\n' ' ')
[ -z "$EXTRA" ] || fail "libkvstream.so exports more than the API: $EXTRA"
"$PREFIX/bin/kvstream" session info ticks -e "$EP" -o json >"$TMP/info" ||
    fail "session info after the example"
grep -q '"appends":1' "$TMP/info" || fail "session info: $(cat "$TMP/info")"

kill -TERM "$UP_PID"
wait "$UP_PID"
rc=$?
UP_PID=
[ "$rc" -eq 0 ] || fail "installed kvstream up exited $rc after SIGTERM"
echo "cli_install: ok"

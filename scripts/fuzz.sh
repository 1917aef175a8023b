#!/usr/bin/env bash
# Build a libFuzzer target with clang + ASan + UBSan into build-fuzz and run it for a bounded
# time over a scratch copy of its seeds and regression inputs.
#
#   scripts/fuzz.sh TARGET SECONDS      e.g. scripts/fuzz.sh gguf 600
#
# TARGET names tests/fuzz/fuzz_TARGET.c (with tests/fuzz/TARGET.dict as its dictionary when
# present); seeds come from tests/fuzz/seeds/TARGET and
# tests/fuzz/regressions/TARGET. The working corpus is build-fuzz/corpus-TARGET (kept between
# runs); crashes land in build-fuzz/artifacts-TARGET/. Exits non-zero if the fuzzer found one.
set -euo pipefail

target=${1:?usage: scripts/fuzz.sh TARGET SECONDS}
seconds=${2:?usage: scripts/fuzz.sh TARGET SECONDS}
root=$(cd "$(dirname "$0")/.." && pwd)
build="$root/build-fuzz"

CC=clang cmake -S "$root" -B "$build" -DKVS_FUZZ=ON -DKVS_CUDA=OFF \
    -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DCMAKE_C_FLAGS="-fsanitize=fuzzer-no-link,address,undefined -fno-sanitize-recover=undefined" \
    >/dev/null
cmake --build "$build" --target "fuzz_$target" -j"$(nproc)"

corpus="$build/corpus-$target"
artifacts="$build/artifacts-$target"
mkdir -p "$corpus" "$artifacts"
for d in "$root/tests/fuzz/seeds/$target" "$root/tests/fuzz/regressions/$target"; do
    if [ -d "$d" ]; then
        cp -n "$d"/* "$corpus"/ 2>/dev/null || true
    fi
done

dict=()
if [ -f "$root/tests/fuzz/$target.dict" ]; then
    dict=(-dict="$root/tests/fuzz/$target.dict")
fi

log="$build/fuzz-$target.log"
set +e
"$build/fuzz_$target" "$corpus" -max_total_time="$seconds" -rss_limit_mb=2048 \
    -malloc_limit_mb=1024 -max_len=65536 -timeout=10 -print_final_stats=1 \
    -artifact_prefix="$artifacts/" "${dict[@]}" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
echo "---- coverage at the end ----"
grep -E "^#[0-9]+" "$log" | tail -1 || true
ls "$artifacts"
exit "$rc"

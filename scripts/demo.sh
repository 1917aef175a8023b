#!/usr/bin/env bash
# The main job: set up (idempotent), build, and run kvstream on the default model.
# Today this is one-shot generation with `kvstream generate` (chat mode, greedy); the
# streaming demo (sessions, appends, flash queries) replaces it as those land.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
if [ ! -f build/CMakeCache.txt ]; then
    cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo >build-configure.log 2>&1 \
        || { cat build-configure.log; exit 1; }
fi
cmake --build build -j"$(nproc)" --target kvstream >build.log 2>&1 \
    || { grep -E "error|Error" build.log | head -40; exit 1; }
echo "demo: kvstream generate --chat on SmolLM2-135M-Instruct (Q4_1), greedy, 96 tokens"
./build/kvstream generate --chat -n 96 \
    -p "Three ticks arrived: AAPL 189.23, AAPL 189.31, AAPL 189.10. In one sentence, which way did AAPL move?"

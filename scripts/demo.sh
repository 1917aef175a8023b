#!/usr/bin/env bash
# The main job: set up (idempotent), build, and run the streaming demo on the default model:
# a synthetic market feed streams into sessions, flash queries stay fresh, questions are
# asked as the context grows (`kvstream demo`, in-process; the server-based demo replaces it
# when the worker daemon lands).
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
exec ./build/kvstream demo "$@"

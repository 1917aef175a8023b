#!/usr/bin/env bash
# The main job: set up (idempotent), build, and run the streaming demo on the default model.
# `kvstream demo` starts a single-node cluster (`kvstream up`: a kvs-coordinator and a
# kvs-worker on free loopback ports) as its child and talks to it over the wire with
# libkvstream, as an application would:
# a synthetic market feed streams into four sessions, flash queries are kept fresh by the
# worker, questions are asked while the context grows, a live table and a summary (with the
# stateless baseline and the scheduler's metrics) are printed, and the cluster is stopped.
# Arguments go to `kvstream demo` (e.g. --ticks N, --rate R, --endpoint EP; see --help).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
if [ ! -f build/CMakeCache.txt ]; then
    cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo >build-configure.log 2>&1 \
        || { cat build-configure.log; exit 1; }
fi
# the CLI and the daemons it starts (`kvstream up` runs the ones next to it)
cmake --build build -j"$(nproc)" --target kvstream kvs-worker kvs-coordinator >build.log 2>&1 \
    || { grep -E "error|Error" build.log | head -40; exit 1; }
exec ./build/kvstream demo "$@"

#!/usr/bin/env bash
# Where the time of one forward goes, kernel by kernel, on the GPU machine (Nsight Compute,
# clocks left alone as METHOD.md asks):
#   KVS_PREBUILT=build-h200 bench/cuda/profile_h200.sh
# 1. every kernel of the last 2048-row chunk of the stateless 32K fill and of one decode step
#    at 1K (bench_cuda --profile chunk|decode): duration per kernel, summed by name;
# 2. the full section set for one flash-attention launch of that chunk (layer 16).
# ncu serializes kernels: the sums are the kernels' own times, without overlap or launch gaps.
# NCU_CACHE=all flushes the caches before each kernel (ncu's default, session 3's sums); the
# default here, none, leaves them warm as in a real forward.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/bench-out}
mkdir -p "$OUT"
B=${KVS_PREBUILT:-build-h200}
[ -d "$B/lib" ] && export LD_LIBRARY_PATH="$PWD/$B/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
NCU=${NCU:-ncu}
for what in ${KVS_PROFILE_WHAT:-chunk0 chunk decode}; do
  timeout 280 "$NCU" --clock-control none --cache-control "${NCU_CACHE:-none}" \
    --profile-from-start off \
    --metrics gpu__time_duration.sum --csv --print-units base \
    "$B"/bench_cuda --profile "$what" >"$OUT/ncu-$what.csv" 2>"$OUT/ncu-$what.err"
  echo "ncu $what rc=$?"
  python3 bench/cuda/ncu_sum.py "$OUT/ncu-$what.csv" | tee "$OUT/ncu-$what.txt"
done
if [ "${KVS_PROFILE_FULL:-1}" = 1 ]; then
  timeout 200 "$NCU" --clock-control none --profile-from-start off --set full \
    --kernel-name regex:attn_ --launch-skip 16 --launch-count 1 \
    "$B"/bench_cuda --profile chunk >"$OUT/ncu-attn-full.txt" 2>&1
  echo "ncu attention full rc=$?"
  grep -E "Duration|Throughput|Pipe|Shared|Bank|Registers|Occupancy|Warp Cycles|Issued|Eligible|Stall" \
    "$OUT/ncu-attn-full.txt" | head -60
fi

#!/usr/bin/env bash
# One command on the GPU machine: build for sm_90, run the CUDA tests, then time.
#   bench/cuda/run_h200.sh [build-dir]
# Writes logs under $OUT (or ./bench-out) and prints a short table last.
# KVS_PREBUILT=dir: use binaries built elsewhere (test_cuda, test_cuda_parity, bench_cuda
# and a lib/ folder of the non-CUDA shared libraries) instead of building here: the device
# image has CUDA and CMake but not Check, Jansson or libsodium.
# KVS_SANITIZE_GPU=1: also run the op tests under compute-sanitizer memcheck.
# Then HF transformers on the same shape (bench/cuda/hf_baseline.py; KVS_SKIP_HF=1 skips it)
# and the JSON of the run ($OUT/results.json, bench/cuda/results_json.py).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/bench-out}
mkdir -p "$OUT"
B=${KVS_PREBUILT:-${1:-build-h200}}
export KVS_SOURCE_DIR=$PWD
if [ -z "${KVS_PREBUILT:-}" ]; then
  cmake -S . -B "$B" -DCMAKE_BUILD_TYPE=Release -DKVS_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
    >"$OUT/cmake.log" 2>&1 && cmake --build "$B" -j"$(nproc)" --target test_cuda test_cuda_parity \
    >>"$OUT/cmake.log" 2>&1 || { tail -20 "$OUT/cmake.log"; exit 1; }
  cc -O2 -std=c11 -D_GNU_SOURCE -DKVS_HAVE_CUDA=1 -I. -I/usr/local/cuda/include \
    bench/cuda/bench_cuda.c "$B"/libkvs_engine.a "$B"/libkvs_kernels.a "$B"/libkvs_cuda.a "$B"/libkvs_cuda_sm90a.a \
    "$B"/libkvs_common.a -L/usr/local/cuda/lib64 -lcublas -lcublasLt -lcudart -lstdc++ \
    -ljansson -lsodium -lm -lpthread -o "$B"/bench_cuda || exit 1
fi
[ -d "$B/lib" ] && export LD_LIBRARY_PATH="$PWD/$B/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.used --format=csv \
  >"$OUT/gpu.txt" 2>&1
# the device copy's git may lag the working tree: KVS_COMMIT names the commit built
echo "${KVS_COMMIT:-$(git rev-parse HEAD 2>/dev/null)}" >"$OUT/commit.txt"

"$B"/test_cuda 2>&1 | tee "$OUT/test_cuda.log"; rc1=${PIPESTATUS[0]}
"$B"/test_cuda_parity 2>&1 | tee "$OUT/test_cuda_parity.log"; rc2=${PIPESTATUS[0]}
# the previous attention kernels (kept for comparison: KVS_CUDA_ATTN=old) on the op checks
KVS_CUDA_ATTN=old CK_RUN_CASE=ops "$B"/test_cuda_parity >"$OUT/test_cuda_parity_old.log" 2>&1
rc2o=$?
# the Hopper wgmma attention kernel on every op check it can take: 128-vector tiles forced
# (KVS_CUDA_FA_WARPS=8), with 128-cell (default) and 64-cell KV tiles, and with a block
# barrier a tile instead of the mbarrier pipeline (KVS_CUDA_WG_MB=0)
KVS_CUDA_FA_WARPS=8 CK_RUN_CASE=ops "$B"/test_cuda_parity >"$OUT/test_cuda_parity_wg.log" 2>&1
rc2w=$?
KVS_CUDA_FA_WARPS=8 KVS_CUDA_WGMMA=64 CK_RUN_CASE=ops "$B"/test_cuda_parity \
  >"$OUT/test_cuda_parity_wg64.log" 2>&1
rc2w64=$?
KVS_CUDA_FA_WARPS=8 KVS_CUDA_WG_MB=0 CK_RUN_CASE=ops "$B"/test_cuda_parity \
  >"$OUT/test_cuda_parity_wgbar.log" 2>&1
rc2w64=$((rc2w64 + $?))
# K/V tiles by cp.async instead of TMA (KVS_CUDA_WG_TMA=0), and by TMA from warp 0 instead of
# the producer warp (=1)
for t in 0 1; do
  KVS_CUDA_FA_WARPS=8 KVS_CUDA_WG_TMA=$t CK_RUN_CASE=ops "$B"/test_cuda_parity \
    >"$OUT/test_cuda_parity_wgtma$t.log" 2>&1
  rc2w64=$((rc2w64 + $?))
done
timeout 300 "$B"/bench_cuda ${KVS_BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"; rc3=${PIPESTATUS[0]}
# HF transformers on the same shape, same GPU, same run (after bench_cuda has freed the GPU)
rc5=skipped
if [ "${KVS_SKIP_HF:-0}" != 1 ]; then
  PYTHONUNBUFFERED=1 timeout 400 python3 bench/cuda/hf_baseline.py -o "$OUT/hf.json" \
    >"$OUT/hf.log" 2>&1; rc5=$?
  tail -2 "$OUT/hf.log"
fi
python3 bench/cuda/results_json.py "$OUT" >"$OUT/results.json" && cat "$OUT/results.json"
rc4=skipped
if [ "${KVS_SANITIZE_GPU:-0}" = 1 ]; then
  # KVS_SANITIZE_CASE: the parity case to run under memcheck ("ops"; "all" for every case,
  # the forwards included, which go through graphs, fusion and early launch)
  case_=${KVS_SANITIZE_CASE:-ops}
  if [ "$case_" = all ]; then
    timeout 300 compute-sanitizer --tool memcheck --leak-check no \
      "$B"/test_cuda_parity >"$OUT/memcheck.log" 2>&1; rc4=$?
  else
    CK_RUN_CASE=$case_ timeout 120 compute-sanitizer --tool memcheck --leak-check no \
      "$B"/test_cuda_parity >"$OUT/memcheck.log" 2>&1; rc4=$?
  fi
  tail -3 "$OUT/memcheck.log"
fi
echo
echo "==== summary ($(head -1 "$OUT/gpu.txt" >/dev/null; sed -n 2p "$OUT/gpu.txt"))"
echo "test_cuda rc=$rc1  test_cuda_parity rc=$rc2 (ops: old attention $rc2o, wgmma $rc2w, wgmma 64 $rc2w64)  bench rc=$rc3  hf rc=$rc5  memcheck rc=$rc4"
grep -E "^(forward|worst|[0-9]+%)|Checks|FAIL|Failure" "$OUT/test_cuda_parity.log" | head -20
grep -E "Checks|Failure" "$OUT/test_cuda_parity_old.log" "$OUT/test_cuda_parity_wg.log" \
  "$OUT/test_cuda_parity_wg64.log" "$OUT/test_cuda_parity_wgbar.log" \
  "$OUT/test_cuda_parity_wgtma0.log" "$OUT/test_cuda_parity_wgtma1.log" | head -16
grep -E "^(ceiling|decode|append|TTFT|RESULT|filled|model|sessions|stateless|graphs|matmuls)" "$OUT/bench.log"

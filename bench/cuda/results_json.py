#!/usr/bin/env python3
"""The figures of one run_h200.sh run as bench/results/h200-YYYY-MM-DD.json (issue 6's keys).

    python3 bench/cuda/results_json.py OUT_DIR > h200.json

Reads OUT_DIR/bench.log (bench_cuda's RESULT and ceiling lines), OUT_DIR/hf.json
(hf_baseline.py, same run; its keys are null when it did not run), OUT_DIR/commit.txt and
OUT_DIR/gpu.txt. Exits 1 with a message when a figure of bench_cuda is missing.
"""
import json
import os
import re
import sys


def main():
    out = sys.argv[1]
    log = open(os.path.join(out, "bench.log")).read()
    kv = {}
    for line in log.splitlines():
        if line.startswith("RESULT"):
            for k, v in re.findall(r"(\S+)=([-0-9.eE+]+)", line):
                kv[k] = float(v)
    dev = re.search(r"^device: (.*)$", log, re.M)
    need = ["decode1k_ms", "decode32k_ms", "append_tok_s", "1024", "8192", "32768", "65536",
            "stateless32k_ms", "sessions64_ctx8k_tps", "gemm_tflops", "copy_gbs"]
    missing = [k for k in need if k not in kv]
    if missing:
        sys.exit(f"results_json: bench.log lacks {missing}")
    hf = {}
    try:
        hf = json.load(open(os.path.join(out, "hf.json")))
    except (OSError, ValueError):
        pass
    commit = open(os.path.join(out, "commit.txt")).read().strip()[:7]
    smi = open(os.path.join(out, "gpu.txt")).read().splitlines()
    driver = smi[1].split(",")[1].strip() if len(smi) > 1 else "?"
    res = {
        "commit": commit,
        "gpu": f"{dev.group(1) if dev else '?'}, driver {driver}",
        "gemm_tflops": round(kv["gemm_tflops"]),
        "copy_tbps": round(kv["copy_gbs"] / 1000, 3),
        "decode_ms_b1_ctx1k": round(kv["decode1k_ms"], 3),
        "decode_ms_b1_ctx32k": round(kv["decode32k_ms"], 3),
        "prefill_tps_chunk2k_at2k": round(kv["append_tok_s"]),
        "ttft_ms": {k: round(kv[k], 3) for k in ["1024", "8192", "32768", "65536"]},
        "stateless_ttft_ms_32k": round(kv["stateless32k_ms"], 1),
        "hf_stateful_ttft_ms_32k": round(hf["hf_stateful_ttft_ms_32k"], 1)
        if "hf_stateful_ttft_ms_32k" in hf else None,
        "hf_stateless_ttft_ms_32k": round(hf["hf_stateless_ttft_ms_32k"], 1)
        if "hf_stateless_ttft_ms_32k" in hf else None,
        "sessions64_ctx8k_decode_tps": round(kv["sessions64_ctx8k_tps"]),
        "hf_decode_ms_b1_ctx1k": round(hf["hf_decode_ms_b1_ctx1k"], 2)
        if "hf_decode_ms_b1_ctx1k" in hf else None,
        "hf_decode_ms_b1_ctx32k": round(hf["hf_decode_ms_b1_ctx32k"], 2)
        if "hf_decode_ms_b1_ctx32k" in hf else None,
        "hf_versions": f"transformers {hf.get('transformers')}, torch {hf.get('torch')}"
        if hf else None,
    }
    json.dump(res, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()

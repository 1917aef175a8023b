#!/usr/bin/env python3
"""CPU speed, side by side in one run: kvstream vs llama.cpp (llama-cpp-python).

Same model file, same thread count, same prompt (512 tokens) and 128 greedy tokens
(end-of-generation ignored). Alternates the two engines for --reps runs each and reports
medians of prefill and decode tokens/s, then writes a Markdown table to bench/results/.

    /opt/refvenv/bin/python bench/bench_cpu.py [--kvstream build/kvstream] [--threads 2]

llama-cpp-python is a benchmark baseline only (pip install llama-cpp-python); kvstream
never needs it.
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import time

import llama_cpp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = ("Market data streams into long-lived sessions whose cache advances as the data "
        "arrives. AAPL 189.23 +0.42 vol=1200. MSFT 411.10 -1.05 vol=800. GOOG 141.77 +0.12. "
        "The quick brown fox jumps over the lazy dog while the order book keeps moving. ")


def prompt_of(llm, n):
    text = TEXT
    while len(llm.tokenize(text.encode(), add_bos=False, special=False)) < n + 8:
        text += TEXT
    ids = llm.tokenize(text.encode(), add_bos=False, special=False)[:n]
    return llm.detokenize(ids).decode()


def run_llamacpp(llm, text, n_gen):
    ids = llm.tokenize(text.encode(), add_bos=True, special=False)
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    t1 = time.perf_counter()
    import numpy as np
    n_vocab = llm.n_vocab()

    def last_logits():  # the last row llama.cpp computed (logits_all is off, as in serving)
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))

    tok = int(np.argmax(last_logits()))
    for _ in range(n_gen - 1):
        llm.eval([tok])
        tok = int(np.argmax(last_logits()))
    t2 = time.perf_counter()
    return len(ids), len(ids) / (t1 - t0), (n_gen - 1) / (t2 - t1)


def run_kvstream(exe, model, text, n_gen, threads):
    out = subprocess.run([exe, "generate", "-m", model, "-t", str(threads), "-n", str(n_gen),
                          "--ignore-eos", "-o", "json", "-p", text],
                         capture_output=True, text=True, check=True)
    j = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(j["token_ids"]) == n_gen, len(j["token_ids"])
    return len(j["prompt_ids"]), j["prefill_tps"], j["decode_tps"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kvstream", default=os.path.join(ROOT, "build", "kvstream"))
    ap.add_argument("--model", default=os.path.expanduser(
        "~/.cache/kvstream/models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    args = ap.parse_args()
    llm = llama_cpp.Llama(model_path=args.model, n_ctx=2048, n_batch=512,
                          n_threads=args.threads, n_threads_batch=args.threads,
                          logits_all=False, verbose=False)
    text = prompt_of(llm, args.prompt_tokens)
    rows = {"kvstream": [], "llama.cpp": []}
    for rep in range(args.reps):
        rows["llama.cpp"].append(run_llamacpp(llm, text, args.gen))
        rows["kvstream"].append(run_kvstream(args.kvstream, args.model, text, args.gen,
                                             args.threads))
        print("rep", rep, {k: v[-1] for k, v in rows.items()}, flush=True)
    med = {k: (v[0][0], statistics.median(x[1] for x in v), statistics.median(x[2] for x in v))
           for k, v in rows.items()}
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                if l.startswith("model name")), platform.processor())
    date = datetime.date.today().isoformat()
    lines = [f"# CPU generation speed, {date}", "",
             f"machine: {cpu}, {os.cpu_count()} cores; threads: {args.threads}; commit {commit}; "
             f"llama-cpp-python {llama_cpp.__version__}; model SmolLM2-135M-Instruct Q4_1; "
             f"prompt {med['kvstream'][0]} tokens, {args.gen} generated (greedy, EOS ignored); "
             f"median of {args.reps} alternating runs", "",
             "| engine | prompt tokens | prefill tok/s | decode tok/s |", "|---|---|---|---|"]
    for k in ("kvstream", "llama.cpp"):
        lines.append(f"| {k} | {med[k][0]} | {med[k][1]:.1f} | {med[k][2]:.1f} |")
    r_pre = med["kvstream"][1] / med["llama.cpp"][1]
    r_dec = med["kvstream"][2] / med["llama.cpp"][2]
    lines += ["", f"ratio kvstream / llama.cpp: prefill {r_pre:.2f}x, decode {r_dec:.2f}x", ""]
    print("\n".join(lines))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"cpu-generate-{date}.md"), "w") as f:
        f.write("\n".join(lines))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Reference outputs of llama.cpp (through llama-cpp-python) on the default model.

For each prompt: the prompt ids llama.cpp feeds (BOS as the GGUF metadata says), the top-K
log-probabilities of every position under teacher forcing (K = 64, with the log of the
mass left outside them), a greedy continuation of 64 tokens decoded token by token
("greedy"), and the greedy continuation with each step evaluated as one batch over the whole
sequence ("greedy_batch": llama.cpp's prompt kernels, whose sums are ordered differently
from its one-token kernels). tests/test_parity_llamacpp.c
compares kvstream with these: top-1 agreement, KL(llama.cpp || kvstream) per position
(computed over the K tokens plus one bucket for the rest, a lower bound on the full KL
that is within the tail mass of it), and the greedy continuations.

    /opt/refvenv/bin/python tests/tools/gen_llamacpp_goldens.py [--model PATH] [-o FILE]

Settings recorded in the output: n_ctx 1024, n_batch 512, n_threads 2, KV cache f16
(llama.cpp's default), flash attention off, logits for all positions.
"""
import argparse
import hashlib
import json
import os

import llama_cpp
import numpy as np

PROMPTS = [
    "The history of the printing press begins in the fifteenth century, when Johannes "
    "Gutenberg combined movable metal type, oil-based inks and a wooden screw press into a "
    "system that could reproduce text quickly and cheaply. Before that, books were copied by "
    "hand, usually by monks working in scriptoria, and a single volume could take months. "
    "The new technology spread across Europe within a few decades, and by 1500 printing "
    "shops operated in more than two hundred cities. The consequences for science, religion "
    "and politics were enormous, and historians still argue about them. Many argue that",
    "AAPL 189.23 +0.42 vol=1200\nMSFT 411.10 -1.05 vol=800\nGOOG 141.77 +0.12 vol=450\n"
    "AAPL 189.31 +0.08 vol=300\nNVDA 875.02 +5.40 vol=2100\nMSFT 410.95 -0.15 vol=150\n"
    "AAPL 189.10 -0.21 vol=900\nGOOG 141.80 +0.03 vol=220\nNVDA 876.50 +1.48 vol=1300\n"
    "AAPL 188.95 -0.15 vol=640\nMSFT 411.40 +0.45 vol=510\nNVDA 874.90 -1.60 vol=990\n"
    "Question: what was the last price of AAPL? Answer:",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    if n < 2:\n"
    "        return n\n    a, b = 0, 1\n    for _ in range(n - 1):\n        a, b = b, a + b\n"
    "    return b\n\n\ndef is_prime(n):\n    if n < 2:\n        return False\n"
    "    for d in range(2, int(n ** 0.5) + 1):\n        if n % d == 0:\n"
    "            return False\n    return True\n\n\ndef main():\n",
    "2026-11-30T04:12:01Z INFO  api request id=7f3a path=/v1/orders status=200 latency_ms=12\n"
    "2026-11-30T04:12:02Z WARN  db slow query table=orders duration_ms=842\n"
    "2026-11-30T04:12:02Z INFO  api request id=7f3b path=/v1/orders status=200 latency_ms=15\n"
    "2026-11-30T04:12:03Z ERROR api request id=7f3c path=/v1/payments status=500 "
    "error=\"upstream timeout\"\n2026-11-30T04:12:04Z INFO  api request id=7f3d "
    "path=/v1/orders status=200 latency_ms=11\nSummary of the errors above:",
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n<|im_start|>user\nExplain in a few sentences why the sky is blue during "
    "the day and red or orange at sunset. Mention Rayleigh scattering, the length of the "
    "path that sunlight takes through the atmosphere, and what happens to shorter "
    "wavelengths. Then compare this with why clouds look white or grey, why the ocean "
    "looks blue, and what the sky would look like from the surface of Mars.<|im_end|>\n"
    "<|im_start|>assistant\n",
]
TOPK = 64
N_GEN = 64


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-batch", type=int, default=512,
                    help="llama.cpp batch (and ubatch) size for the teacher-forced pass")
    ap.add_argument("--model", default=os.path.expanduser(
        "~/.cache/kvstream/models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("-o", "--out", default=os.path.join(os.path.dirname(__file__), "..", "data",
                                                        "llamacpp", "smollm2-q4_1.json"))
    args = ap.parse_args()
    sha = hashlib.sha256(open(args.model, "rb").read()).hexdigest()
    llm = llama_cpp.Llama(model_path=args.model, n_ctx=1024, n_batch=args.n_batch,
                          n_ubatch=args.n_batch, n_threads=2, logits_all=True, verbose=False,
                          flash_attn=False)
    # the batch-path greedy needs only each step's last row of logits
    llm_last = llama_cpp.Llama(model_path=args.model, n_ctx=1024, n_batch=args.n_batch,
                               n_ubatch=args.n_batch, n_threads=2, logits_all=False,
                               verbose=False, flash_attn=False)
    add_bos = llm._model.add_bos_token() if hasattr(llm._model, "add_bos_token") else None
    out = {"llama_cpp_python": llama_cpp.__version__, "model_sha256": sha,
           "settings": {"n_ctx": 1024, "n_batch": args.n_batch, "n_ubatch": args.n_batch,
                        "n_threads": 2, "kv_type": "f16",
                        "flash_attn": False, "add_bos": bool(add_bos), "topk": TOPK,
                        "n_gen": N_GEN, "special": True},
           "prompts": []}
    for text in PROMPTS:
        ids = llm.tokenize(text.encode(), add_bos=True, special=True)
        assert len(ids) >= 100, (len(ids), text[:40])
        llm.reset()
        llm.eval(ids)
        scores = np.array(llm.scores[: len(ids)], dtype=np.float64)
        positions = []
        for row in scores:
            m = row.max()
            lse = m + np.log(np.exp(row - m).sum())
            lp = row - lse
            top = np.argsort(-lp, kind="stable")[:TOPK]
            rest = 1.0 - np.exp(lp[top]).sum()
            positions.append({"ids": top.tolist(), "lp": [round(float(x), 6) for x in lp[top]],
                              "rest": float(rest)})
        gen = []
        for _ in range(N_GEN):
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            if tok == llm.token_eos():
                break
            gen.append(tok)
            llm.eval([tok])
        # The same greedy continuation with every step's logits from one batch over the whole
        # sequence: llama.cpp's prompt kernels (llamafile f16 GEMM for K.q and P.V) instead of
        # its one-token ones (ggml_vec_dot_f16, another summation order), which is the path
        # the teacher-forced positions above take.
        gen_batch = []
        for _ in range(N_GEN):
            llm_last.reset()
            llm_last.eval(ids + gen_batch)
            last = np.ctypeslib.as_array(llm_last._ctx.get_logits(), shape=(llm_last.n_vocab(),))
            tok = int(np.argmax(last))
            if tok == llm.token_eos():
                break
            gen_batch.append(tok)
        out["prompts"].append({"text": text, "ids": ids, "positions": positions, "greedy": gen,
                               "greedy_text": llm.detokenize(gen).decode("utf-8", "replace"),
                               "greedy_batch": gen_batch})
        print(len(ids), "tokens;", repr(out["prompts"][-1]["greedy_text"][:60]),
              "; batch-path greedy", "same" if gen_batch == gen else "differs", flush=True)
    with open(args.out, "w") as f:
        json.dump(out, f, separators=(",", ":"))


if __name__ == "__main__":
    main()

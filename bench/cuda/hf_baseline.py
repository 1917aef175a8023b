#!/usr/bin/env python3
"""HF transformers baseline on the GPU machine, same shape as synthetic:llama3-8b.

Random bf16 weights (no checkpoint), sdpa attention. Prints JSON with:
  hf_stateful_ttft_ms_32k   32-token question after a cached 32K context (past_key_values)
  hf_stateless_ttft_ms_32k  the same question re-prefilled with the whole 32K context
  hf_decode_ms_b1_ctx1k / ctx32k  one decode step at batch 1
Median of 3 (after a warm-up), CUDA-synchronized wall time.

    python3 bench/cuda/hf_baseline.py [--ctx 32768] [-o FILE]
"""
import argparse
import json
import statistics
import time

import torch
import transformers


def timed(fn, reps=3):
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ctx", type=int, default=32768)
    ap.add_argument("-o", "--out")
    a = ap.parse_args()
    cfg = transformers.LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
        rms_norm_eps=1e-5, tie_word_embeddings=False, attn_implementation="sdpa",
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                             low_freq_factor=1.0, high_freq_factor=4.0,
                             original_max_position_embeddings=8192))
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    print(f"model built in {time.perf_counter() - t0:.1f} s", flush=True)
    ctx = torch.randint(0, cfg.vocab_size, (1, a.ctx), device="cuda")
    q = torch.randint(0, cfg.vocab_size, (1, 32), device="cuda")
    res = {"transformers": transformers.__version__, "torch": torch.__version__,
           "gpu": torch.cuda.get_device_name(0), "ctx": a.ctx}
    with torch.no_grad():
        out = model(ctx, use_cache=True, logits_to_keep=1)
        cache = out.past_key_values

        def stateful():  # the question on the cached context; crop restores the cache after
            model(q, past_key_values=cache, use_cache=True, logits_to_keep=1)
            cache.crop(a.ctx)

        res["hf_stateful_ttft_ms_32k"] = timed(stateful)
        full = torch.cat([ctx, q], dim=1)
        res["hf_stateless_ttft_ms_32k"] = timed(lambda: model(full, use_cache=False, logits_to_keep=1), reps=2)
        one = q[:, :1]

        def decode():
            model(one, past_key_values=cache, use_cache=True, logits_to_keep=1)
            cache.crop(a.ctx)

        res["hf_decode_ms_b1_ctx32k"] = timed(decode)
        del cache, out
        torch.cuda.empty_cache()
        out = model(ctx[:, :1024], use_cache=True, logits_to_keep=1)
        c1k = out.past_key_values

        def decode1k():
            model(one, past_key_values=c1k, use_cache=True, logits_to_keep=1)
            c1k.crop(1024)

        res["hf_decode_ms_b1_ctx1k"] = timed(decode1k)
    print(json.dumps(res), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f)


if __name__ == "__main__":
    main()

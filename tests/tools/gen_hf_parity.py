#!/usr/bin/env python3
"""Write small random-weight F32 GGUF models and reference logits from HF transformers.

For each architecture (llama with Llama-3 rope scaling, qwen2 with q/k/v biases) this builds
a seeded random transformers model, exports it to GGUF exactly as llama.cpp's converter lays
it out (Q and K rows permuted for llama's interleaved rope; qwen2 keeps neox order), runs a
few random-token prompts through transformers in float32, and writes:

    tests/data/parity/<arch>.gguf           the model (F32, < 1 MB)
    tests/data/parity/<arch>.logits.bin     f32 logits, every position of every prompt
    tests/data/parity/<arch>.json           prompts (token ids), shapes, versions

tests/test_parity_hf.c compares kvstream's CPU forward pass with these (max |diff| <= 1e-4).
Needs torch + transformers (run it on the GPU machine, or anywhere with a CPU torch):
    python3 tests/tools/gen_hf_parity.py [-o tests/data/parity]
CI never runs this; the outputs are committed.
"""
import argparse
import json
import os
import struct

import numpy as np
import torch
import transformers

GGUF_MAGIC = 0x46554747
T_U32, T_F32, T_BOOL, T_STR, T_ARR = 4, 6, 7, 8, 9


class GGUFWriter:
    def __init__(self):
        self.kv = []
        self.tensors = []

    def add(self, key, vtype, value):
        self.kv.append((key, vtype, value))

    def tensor(self, name, arr):
        self.tensors.append((name, np.ascontiguousarray(arr, dtype=np.float32)))

    @staticmethod
    def _str(s):
        b = s.encode()
        return struct.pack("<Q", len(b)) + b

    def _val(self, vtype, v):
        if vtype == T_U32:
            return struct.pack("<I", v)
        if vtype == T_F32:
            return struct.pack("<f", v)
        if vtype == T_BOOL:
            return struct.pack("<B", 1 if v else 0)
        if vtype == T_STR:
            return self._str(v)
        if vtype == T_ARR:
            etype, items = v
            out = struct.pack("<IQ", etype, len(items))
            for it in items:
                out += self._val(etype, it)
            return out
        raise ValueError(vtype)

    def write(self, path, align=32):
        head = struct.pack("<IIQQ", GGUF_MAGIC, 3, len(self.tensors), len(self.kv))
        for k, t, v in self.kv:
            head += self._str(k) + struct.pack("<I", t) + self._val(t, v)
        offset = 0
        infos = b""
        for name, arr in self.tensors:
            dims = list(reversed(arr.shape))  # ggml order: innermost first
            infos += self._str(name) + struct.pack("<I", len(dims))
            infos += b"".join(struct.pack("<Q", d) for d in dims)
            infos += struct.pack("<IQ", 0, offset)  # type F32
            offset += (arr.nbytes + align - 1) // align * align
        blob = head + infos
        blob += b"\0" * ((-len(blob)) % align)
        with open(path, "wb") as f:
            f.write(blob)
            for _, arr in self.tensors:
                data = arr.tobytes()
                f.write(data + b"\0" * ((-len(data)) % align))


def permute_qk(w, n_head):
    # HF rotates halves (neox order); llama.cpp's llama layout interleaves pairs.
    out, inp = w.shape
    return w.reshape(n_head, 2, out // n_head // 2, inp).swapaxes(1, 2).reshape(out, inp)


def llama3_factors(base, dim, factor, low, high, orig):
    fs = []
    for i in range(0, dim, 2):
        freq = base ** (-i / dim)
        wavelen = 2 * np.pi / freq
        if wavelen < orig / high:
            fs.append(1.0)
        elif wavelen > orig / low:
            fs.append(factor)
        else:
            smooth = (orig / wavelen - low) / (high - low)
            fs.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.array(fs, dtype=np.float32)


def build(arch, seed):
    torch.manual_seed(seed)
    common = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                  max_position_embeddings=256, tie_word_embeddings=False)
    v5 = int(transformers.__version__.split(".")[0]) >= 5
    if arch == "llama":
        theta = 10000.0
        rope = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=32)
        if v5:
            cfg = transformers.LlamaConfig(rope_parameters=dict(rope, rope_theta=theta), **common)
        else:
            cfg = transformers.LlamaConfig(rope_theta=theta, rope_scaling=rope, **common)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        theta = 1000000.0
        if v5:
            cfg = transformers.Qwen2Config(
                rope_parameters=dict(rope_type="default", rope_theta=theta), **common)
        else:
            cfg = transformers.Qwen2Config(rope_theta=theta, **common)
        model = transformers.Qwen2ForCausalLM(cfg)
    cfg.kvs_theta = theta
    model = model.float().eval()
    with torch.no_grad():  # larger random weights than the default init: logits that matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    return cfg, model


def export(arch, cfg, model, path):
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w = GGUFWriter()
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = cfg.hidden_size // n_head
    w.add("general.architecture", T_STR, arch)
    w.add("general.name", T_STR, f"parity-{arch}")
    w.add("general.alignment", T_U32, 32)
    p = arch + "."
    w.add(p + "block_count", T_U32, cfg.num_hidden_layers)
    w.add(p + "context_length", T_U32, cfg.max_position_embeddings)
    w.add(p + "embedding_length", T_U32, cfg.hidden_size)
    w.add(p + "feed_forward_length", T_U32, cfg.intermediate_size)
    w.add(p + "attention.head_count", T_U32, n_head)
    w.add(p + "attention.head_count_kv", T_U32, n_kv)
    w.add(p + "attention.layer_norm_rms_epsilon", T_F32, cfg.rms_norm_eps)
    w.add(p + "rope.freq_base", T_F32, float(cfg.kvs_theta))
    w.add(p + "rope.dimension_count", T_U32, hd)
    w.add(p + "vocab_size", T_U32, cfg.vocab_size)
    w.tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.tensor("output_norm.weight", sd["model.norm.weight"])
    w.tensor("output.weight", sd["lm_head.weight"])
    if arch == "llama":
        # The divisors llama.cpp reads from rope_freqs.weight, taken from the inv_freq that
        # transformers itself computed, so both sides rotate by the same angles.
        inv = model.model.rotary_emb.inv_freq.detach().double().numpy()
        plain = cfg.kvs_theta ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
        w.tensor("rope_freqs.weight", (plain / inv).astype(np.float32))
        print("llama3 rope factors:", np.round(plain / inv, 3).tolist())
    for i in range(cfg.num_hidden_layers):
        g = lambda n: sd[f"model.layers.{i}.{n}"]
        q, k = g("self_attn.q_proj.weight"), g("self_attn.k_proj.weight")
        if arch == "llama":
            q, k = permute_qk(q, n_head), permute_qk(k, n_kv)
        b = f"blk.{i}."
        w.tensor(b + "attn_norm.weight", g("input_layernorm.weight"))
        w.tensor(b + "attn_q.weight", q)
        w.tensor(b + "attn_k.weight", k)
        w.tensor(b + "attn_v.weight", g("self_attn.v_proj.weight"))
        w.tensor(b + "attn_output.weight", g("self_attn.o_proj.weight"))
        if arch == "qwen2":
            w.tensor(b + "attn_q.bias", g("self_attn.q_proj.bias"))
            w.tensor(b + "attn_k.bias", g("self_attn.k_proj.bias"))
            w.tensor(b + "attn_v.bias", g("self_attn.v_proj.bias"))
        w.tensor(b + "ffn_norm.weight", g("post_attention_layernorm.weight"))
        w.tensor(b + "ffn_gate.weight", g("mlp.gate_proj.weight"))
        w.tensor(b + "ffn_up.weight", g("mlp.up_proj.weight"))
        w.tensor(b + "ffn_down.weight", g("mlp.down_proj.weight"))
    w.write(path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-o", "--out", default=os.path.join(os.path.dirname(__file__), "..", "data",
                                                        "parity"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for arch, seed in (("llama", 1), ("qwen2", 2)):
        cfg, model = build(arch, seed)
        export(arch, cfg, model, os.path.join(args.out, arch + ".gguf"))
        rng = np.random.default_rng(seed)
        prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (1, 7, 40, 100)]
        logits = []
        with torch.no_grad():
            for pr in prompts:
                out = model(torch.tensor([pr])).logits[0].float().numpy()
                logits.append(out.astype(np.float32))
        np.concatenate(logits).astype("<f4").tofile(os.path.join(args.out, arch + ".logits.bin"))
        meta = {"arch": arch, "n_vocab": cfg.vocab_size, "prompts": prompts,
                "torch": torch.__version__, "transformers": transformers.__version__,
                "dtype": "float32", "seed": seed}
        with open(os.path.join(args.out, arch + ".json"), "w") as f:
            json.dump(meta, f)
        print(arch, "ok", sum(len(p) for p in prompts), "positions")


if __name__ == "__main__":
    main()

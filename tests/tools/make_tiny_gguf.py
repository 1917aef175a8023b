#!/usr/bin/env python3
"""Write a tiny random-weight llama/qwen2 model as a GGUF v3 file (stdlib only).

The tokenizer metadata (tokenizer.ggml.*) is copied byte for byte from another GGUF given
with --vocab (default: the default model), so the tiny model tokenizes exactly like it and
n_vocab is that tokenizer's size. --tiny-vocab writes a made-up 16-token vocabulary instead
(for fuzz seeds and other places where a few KB matter more than a real tokenizer).

Weights are uniform in [-0.035, 0.035] (std ~0.02); norm weights are ~1; biases ~0.02.

  python3 make_tiny_gguf.py -o tiny.gguf [--arch llama|qwen2] [--type f32|f16|q8_0|q4_1]
          [--layers 2] [--seed 1] [--vocab MODEL.gguf | --tiny-vocab] [--untied]
          [--rope-scaling none|linear|llama3] [--rope-factor 8] [--rope-freqs]
"""
import argparse
import array
import os
import random
import struct
import sys

GGUF_MAGIC = b"GGUF"
ALIGNMENT = 32

# GGUF metadata value types
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
SCALAR_FMT = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f",
              BOOL: "<?", U64: "<Q", I64: "<q", F64: "<d"}

# ggml tensor types
GGML_F32, GGML_F16, GGML_Q4_1, GGML_Q8_0 = 0, 1, 3, 8
TYPES = {"f32": GGML_F32, "f16": GGML_F16, "q4_1": GGML_Q4_1, "q8_0": GGML_Q8_0}
FILE_TYPE = {"f32": 0, "f16": 1, "q4_1": 3, "q8_0": 7}  # llama_ftype


def default_model():
    env = os.environ.get("KVSTREAM_MODEL")
    if env:
        return env
    d = os.environ.get("KVS_MODEL_DIR") or os.path.expanduser("~/.cache/kvstream/models")
    return os.path.join(d, "SmolLM2-135M-Instruct.Q4_1.gguf")


# ---- reading (just enough to copy metadata entries) ----

class Reader:
    def __init__(self, data):
        self.d = data
        self.p = 0

    def take(self, n):
        if n < 0 or self.p + n > len(self.d):
            raise ValueError("truncated GGUF at offset %d" % self.p)
        b = self.d[self.p:self.p + n]
        self.p += n
        return b

    def u32(self):
        return struct.unpack("<I", self.take(4))[0]

    def u64(self):
        return struct.unpack("<Q", self.take(8))[0]

    def string(self):
        return self.take(self.u64())

    def skip_value(self, t):
        if t == STR:
            self.string()
        elif t == ARR:
            et = self.u32()
            n = self.u64()
            if et == STR:
                for _ in range(n):
                    self.string()
            elif et in SCALAR_FMT:
                self.take(n * struct.calcsize(SCALAR_FMT[et]))
            else:
                raise ValueError("bad array element type %d" % et)
        elif t in SCALAR_FMT:
            self.take(struct.calcsize(SCALAR_FMT[t]))
        else:
            raise ValueError("bad value type %d" % t)


def read_metadata(path):
    """Return [(key str, type, raw value bytes)] of a GGUF file's metadata."""
    with open(path, "rb") as f:
        data = f.read()
    r = Reader(data)
    if r.take(4) != GGUF_MAGIC:
        raise ValueError("%s: not a GGUF file" % path)
    version = r.u32()
    if version not in (2, 3):
        raise ValueError("%s: GGUF version %d" % (path, version))
    r.u64()  # n_tensors
    n_kv = r.u64()
    out = []
    for _ in range(n_kv):
        key = r.string().decode("utf-8")
        t = r.u32()
        start = r.p
        r.skip_value(t)
        out.append((key, t, data[start:r.p]))
    return out


# ---- writing ----

def enc_str(s):
    b = s.encode("utf-8") if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def kv_scalar(key, t, v):
    return (key, t, struct.pack(SCALAR_FMT[t], v))


def kv_str(key, s):
    return (key, STR, enc_str(s))


def kv_arr(key, et, values):
    body = struct.pack("<IQ", et, len(values))
    if et == STR:
        body += b"".join(enc_str(v) for v in values)
    else:
        body += b"".join(struct.pack(SCALAR_FMT[et], v) for v in values)
    return (key, ARR, body)


def tiny_vocab():
    """A 16-token byte-level BPE vocabulary with a chatml template."""
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "a", "b", "c", "d", "e",
              "\u0120", "\u0120a", "ab", "cd", "abcd", "\u0120ab", "!", "?"]
    types = [3, 3, 3] + [1] * 13
    merges = ["a b", "c d", "ab cd", "\u0120 a", "\u0120a b"]
    return [
        kv_str("tokenizer.ggml.model", "gpt2"),
        kv_str("tokenizer.ggml.pre", "default"),
        kv_arr("tokenizer.ggml.tokens", STR, tokens),
        kv_arr("tokenizer.ggml.token_type", I32, types),
        kv_arr("tokenizer.ggml.merges", STR, merges),
        kv_scalar("tokenizer.ggml.bos_token_id", U32, 1),
        kv_scalar("tokenizer.ggml.eos_token_id", U32, 2),
        kv_scalar("tokenizer.ggml.add_bos_token", BOOL, False),
        kv_str("tokenizer.chat_template",
               "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
               "<|im_end|>\n{% endfor %}"),
    ]


def vocab_size_of(kvs):
    for key, t, raw in kvs:
        if key == "tokenizer.ggml.tokens" and t == ARR:
            return struct.unpack("<Q", raw[4:12])[0]
    raise ValueError("no tokenizer.ggml.tokens in the vocab file")


# ---- quantization (reference layouts as in kernels/dtype.h) ----

def f16(x):
    return struct.pack("<e", x)


def quant_q8_0(xs):
    out = bytearray()
    for b in range(0, len(xs), 32):
        blk = xs[b:b + 32]
        amax = max(abs(v) for v in blk)
        d = amax / 127.0
        inv = 1.0 / d if d else 0.0
        out += f16(d)
        out += struct.pack("<32b", *[max(-127, min(127, round(v * inv))) for v in blk])
    return bytes(out)


def quant_q4_1(xs):
    out = bytearray()
    for b in range(0, len(xs), 32):
        blk = xs[b:b + 32]
        lo, hi = min(blk), max(blk)
        d = (hi - lo) / 15.0
        inv = 1.0 / d if d else 0.0
        q = [max(0, min(15, round((v - lo) * inv))) for v in blk]
        out += f16(d) + f16(lo)
        out += bytes(q[j] | (q[j + 16] << 4) for j in range(16))
    return bytes(out)


def encode(xs, ggml_type):
    if ggml_type == GGML_F32:
        return array.array("f", xs).tobytes() if sys.byteorder == "little" else \
            struct.pack("<%df" % len(xs), *xs)
    if ggml_type == GGML_F16:
        return struct.pack("<%de" % len(xs), *xs)
    if ggml_type == GGML_Q8_0:
        return quant_q8_0(xs)
    if ggml_type == GGML_Q4_1:
        return quant_q4_1(xs)
    raise ValueError(ggml_type)


def write_gguf(path, kvs, tensors):
    """kvs: [(key, type, raw)]; tensors: [(name, ne list, ggml type, data bytes)]."""
    head = bytearray()
    head += GGUF_MAGIC + struct.pack("<IQQ", 3, len(tensors), len(kvs))
    for key, t, raw in kvs:
        head += enc_str(key) + struct.pack("<I", t) + raw
    offset = 0
    offsets = []
    for name, ne, gt, data in tensors:
        offsets.append(offset)
        head += enc_str(name) + struct.pack("<I", len(ne))
        head += b"".join(struct.pack("<Q", n) for n in ne)
        head += struct.pack("<IQ", gt, offset)
        offset += (len(data) + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT
    head += b"\0" * ((-len(head)) % ALIGNMENT)
    with open(path, "wb") as f:
        f.write(head)
        for (name, ne, gt, data), off in zip(tensors, offsets):
            f.write(data)
            f.write(b"\0" * ((-len(data)) % ALIGNMENT))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--arch", choices=["llama", "qwen2"], default="llama")
    ap.add_argument("--type", choices=sorted(TYPES), default="f32",
                    help="type of the 2-D weights (norms and biases stay f32)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--n-embd", type=int, default=64)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--n-head-kv", type=int, default=2)
    ap.add_argument("--n-ff", type=int, default=128)
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--vocab", default=None, help="GGUF to copy tokenizer.* metadata from")
    ap.add_argument("--tiny-vocab", action="store_true", help="write a 16-token vocabulary")
    ap.add_argument("--untied", action="store_true", help="write a separate output.weight")
    ap.add_argument("--rope-scaling", choices=["none", "linear", "llama3"], default=None,
                    help="write <arch>.rope.scaling.* keys (llama3: factor, low/high freq "
                         "factors 1/4, original context = --ctx / 4)")
    ap.add_argument("--rope-factor", type=float, default=8.0)
    ap.add_argument("--rope-freqs", action="store_true",
                    help="write a rope_freqs.weight tensor [head_dim/2] (as Llama 3.1 GGUFs do)")
    a = ap.parse_args()

    if a.n_embd % a.n_head or a.n_head % a.n_head_kv or (a.n_embd // a.n_head) % 2:
        ap.error("need n_embd %% n_head == 0, n_head %% n_head_kv == 0, even head_dim")
    wtype = TYPES[a.type]
    if wtype in (GGML_Q8_0, GGML_Q4_1) and (a.n_embd % 32 or a.n_ff % 32):
        ap.error("quantized types need n_embd and n_ff to be multiples of 32")

    if a.tiny_vocab:
        vocab_kvs = tiny_vocab()
    else:
        vocab_kvs = [kv for kv in read_metadata(a.vocab or default_model())
                     if kv[0].startswith("tokenizer.")]
    n_vocab = vocab_size_of(vocab_kvs)

    head_dim = a.n_embd // a.n_head
    arch = a.arch
    kvs = [
        kv_str("general.architecture", arch),
        kv_str("general.name", "tiny-%s-%s" % (arch, a.type)),
        kv_scalar("general.file_type", U32, FILE_TYPE[a.type]),
        kv_scalar(arch + ".block_count", U32, a.layers),
        kv_scalar(arch + ".context_length", U32, a.ctx),
        kv_scalar(arch + ".embedding_length", U32, a.n_embd),
        kv_scalar(arch + ".feed_forward_length", U32, a.n_ff),
        kv_scalar(arch + ".attention.head_count", U32, a.n_head),
        kv_scalar(arch + ".attention.head_count_kv", U32, a.n_head_kv),
        kv_scalar(arch + ".rope.freq_base", F32, 10000.0 if arch == "llama" else 1000000.0),
        kv_scalar(arch + ".attention.layer_norm_rms_epsilon", F32,
                  1e-5 if arch == "llama" else 1e-6),
        kv_scalar(arch + ".rope.dimension_count", U32, head_dim),
        kv_scalar(arch + ".vocab_size", U32, n_vocab),
    ]
    if a.rope_scaling:
        kvs.append(kv_str(arch + ".rope.scaling.type", a.rope_scaling))
        if a.rope_scaling != "none":
            kvs.append(kv_scalar(arch + ".rope.scaling.factor", F32, a.rope_factor))
        if a.rope_scaling == "llama3":
            kvs += [kv_scalar(arch + ".rope.scaling.original_context_length", U32,
                              max(1, a.ctx // 4)),
                    kv_scalar(arch + ".rope.scaling.low_freq_factor", F32, 1.0),
                    kv_scalar(arch + ".rope.scaling.high_freq_factor", F32, 4.0)]
    kvs += vocab_kvs

    rng = random.Random(a.seed)
    scale = 0.035

    def weight(name, ne0, ne1):
        xs = [rng.uniform(-scale, scale) for _ in range(ne0 * ne1)]
        return (name, [ne0, ne1], wtype, encode(xs, wtype))

    def vec(name, n, center, spread):
        xs = [center + rng.uniform(-spread, spread) for _ in range(n)]
        return (name, [n], GGML_F32, encode(xs, GGML_F32))

    q_dim = a.n_head * head_dim
    kv_dim = a.n_head_kv * head_dim
    tensors = [weight("token_embd.weight", a.n_embd, n_vocab),
               vec("output_norm.weight", a.n_embd, 1.0, 0.1)]
    if a.untied:
        tensors.append(weight("output.weight", a.n_embd, n_vocab))
    if a.rope_freqs:
        # per-frequency divisors: 1 for high frequencies up to --rope-factor for low ones
        half = head_dim // 2
        xs = [1.0 + (a.rope_factor - 1.0) * i / max(1, half - 1) for i in range(half)]
        tensors.append(("rope_freqs.weight", [half], GGML_F32, encode(xs, GGML_F32)))
    for l in range(a.layers):
        p = "blk.%d." % l
        tensors += [
            vec(p + "attn_norm.weight", a.n_embd, 1.0, 0.1),
            weight(p + "attn_q.weight", a.n_embd, q_dim),
            weight(p + "attn_k.weight", a.n_embd, kv_dim),
            weight(p + "attn_v.weight", a.n_embd, kv_dim),
            weight(p + "attn_output.weight", q_dim, a.n_embd),
            vec(p + "ffn_norm.weight", a.n_embd, 1.0, 0.1),
            weight(p + "ffn_gate.weight", a.n_embd, a.n_ff),
            weight(p + "ffn_up.weight", a.n_embd, a.n_ff),
            weight(p + "ffn_down.weight", a.n_ff, a.n_embd),
        ]
        if arch == "qwen2":
            tensors += [vec(p + "attn_q.bias", q_dim, 0.0, 0.02),
                        vec(p + "attn_k.bias", kv_dim, 0.0, 0.02),
                        vec(p + "attn_v.bias", kv_dim, 0.0, 0.02)]
    write_gguf(a.output, kvs, tensors)


if __name__ == "__main__":
    main()

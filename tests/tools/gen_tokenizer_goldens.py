#!/usr/bin/env python3
"""Generate tests/data/tokenizer/golden-<name>.jsonl: llama.cpp's token ids for the corpus.

    /opt/refvenv/bin/python tests/tools/gen_tokenizer_goldens.py

Needs llama-cpp-python (the reference: llama.cpp's own tokenizer) and the vocab files:
  smollm     ~/.cache/kvstream/models/SmolLM2-135M-Instruct.Q4_1.gguf (the default model)
  llama-bpe  ~/.cache/kvstream/vocab/ggml-vocab-llama-bpe.gguf  (Llama 3)
  qwen2      ~/.cache/kvstream/vocab/ggml-vocab-qwen2.gguf
  llama-spm  ~/.cache/kvstream/vocab/ggml-vocab-llama-spm.gguf  (SentencePiece, Llama 2)
  gpt2, default: the default model's vocabulary with tokenizer.ggml.pre set to "gpt-2" /
             "default" (a metadata-only copy made in a temporary directory)

Inputs (tests/data/tokenizer/):
  corpus.jsonl          one JSON string per line, tokenized with special=False
  corpus-special.jsonl  one JSON string per line, tokenized with special=True (and False)
  corpus-invalid.txt    one hex byte string per line (not valid UTF-8), special=False. No
                        4-byte forms above U+10FFFF: llama.cpp aborts on those.

Output, one JSON object per line. The first line is a header:
  {"header": true, "model": file name, "sha256": ..., "llama_cpp_python": version,
   "n_vocab": N, "bos": id, "eos": id, "add_bos": bool (does tokenize(add_bos=True) add it)}
then per input:
  {"text": str | "hex": str, "special": bool, "ids": [...], "detok": str | "detok_hex": str}
ids come from Llama.tokenize(text, add_bos=False, special=...). detok is the plain
concatenation of llama_token_to_piece(id, special=False) over ids (no leading-space strip,
no clean-up); it is given as hex when it is not valid UTF-8.
"""
import ctypes
import hashlib
import json
import os
import struct
import sys
import tempfile

import llama_cpp
from llama_cpp import Llama

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.normpath(os.path.join(HERE, "..", "data", "tokenizer"))
HOME = os.path.expanduser("~")
MODEL_DIR = os.environ.get("KVS_MODEL_DIR", os.path.join(HOME, ".cache/kvstream/models"))
VOCAB_DIR = os.environ.get("KVS_VOCAB_DIR", os.path.join(HOME, ".cache/kvstream/vocab"))

MODELS = {
    "smollm": os.path.join(MODEL_DIR, "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "llama-bpe": os.path.join(VOCAB_DIR, "ggml-vocab-llama-bpe.gguf"),
    "qwen2": os.path.join(VOCAB_DIR, "ggml-vocab-qwen2.gguf"),
    "llama-spm": os.path.join(VOCAB_DIR, "ggml-vocab-llama-spm.gguf"),
}


# Variants of the default model's vocabulary with another pre-tokenizer name, to test the
# "gpt-2" and "default" pre-tokenizers on a real vocabulary. test_tokenizer.c builds the same
# vocabulary in memory (the tokenizer.* keys of the default model, pre replaced).
VARIANTS = {"gpt2": "gpt-2", "default": "default"}

_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
           11: "<q", 12: "<d"}


def gguf_with_pre(src, dst, pre):
    """Copy src's metadata (no tensors) to dst, with tokenizer.ggml.pre set to pre."""
    with open(src, "rb") as f:
        data = f.read()
    magic, version, n_tensors, n_kv = struct.unpack_from("<4sIQQ", data, 0)
    assert magic == b"GGUF"
    pos = 24

    def skip_value(t, pos):
        if t == 8:
            (n,) = struct.unpack_from("<Q", data, pos)
            return pos + 8 + n
        if t == 9:
            et, n = struct.unpack_from("<IQ", data, pos)
            pos += 12
            for _ in range(n):
                pos = skip_value(et, pos)
            return pos
        return pos + struct.calcsize(_SCALAR[t])

    out = [struct.pack("<4sIQQ", b"GGUF", version, 0, n_kv)]
    for _ in range(n_kv):
        start = pos
        (klen,) = struct.unpack_from("<Q", data, pos)
        key = data[pos + 8:pos + 8 + klen].decode()
        pos += 8 + klen
        (t,) = struct.unpack_from("<I", data, pos)
        end = skip_value(t, pos + 4)
        if key == "tokenizer.ggml.pre":
            v = pre.encode()
            out.append(data[start:pos + 4] + struct.pack("<Q", len(v)) + v)
        else:
            out.append(data[start:end])
        pos = end
    with open(dst, "wb") as f:
        f.write(b"".join(out))


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_jsonl(name):
    with open(os.path.join(DATA, name), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip() != ""]


def piece(vocab, tid, special):
    buf = ctypes.create_string_buffer(4096)
    n = llama_cpp.llama_token_to_piece(vocab, tid, buf, len(buf), 0, special)
    assert 0 <= n <= len(buf), n
    return buf.raw[:n]


def detok_field(vocab, ids):
    raw = b"".join(piece(vocab, t, False) for t in ids)
    try:
        return {"detok": raw.decode("utf-8")}
    except UnicodeDecodeError:
        return {"detok_hex": raw.hex()}


def main():
    corpus = read_jsonl("corpus.jsonl")
    special = read_jsonl("corpus-special.jsonl")
    with open(os.path.join(DATA, "corpus-invalid.txt")) as f:
        invalid = [line.strip() for line in f if line.strip()]

    names = sys.argv[1:] or list(MODELS) + list(VARIANTS)
    tmpdir = tempfile.mkdtemp()
    for name in names:
        if name in VARIANTS:
            path = os.path.join(tmpdir, "smollm-pre-%s.gguf" % name)
            gguf_with_pre(MODELS["smollm"], path, VARIANTS[name])
        else:
            path = MODELS[name]
        llm = Llama(model_path=path, vocab_only=True, verbose=False)
        vocab = llm._model.vocab
        probe = llm.tokenize(b"x", add_bos=True, special=False)
        plain = llm.tokenize(b"x", add_bos=False, special=False)
        header = {
            "header": True,
            "model": os.path.basename(MODELS["smollm"] if name in VARIANTS else path),
            "sha256": sha256(MODELS["smollm"] if name in VARIANTS else path),
            "pre": VARIANTS.get(name),
            "llama_cpp_python": llama_cpp.__version__,
            "n_vocab": llm.n_vocab(),
            "bos": llm.token_bos(),
            "eos": llm.token_eos(),
            "add_bos": len(probe) > len(plain) and probe[0] == llm.token_bos(),
        }
        out = os.path.join(DATA, "golden-%s.jsonl" % name)
        with open(out, "w", encoding="utf-8") as f:
            f.write(json.dumps(header) + "\n")

            def emit(rec, data, sp):
                ids = llm.tokenize(data, add_bos=False, special=sp)
                rec.update({"special": sp, "ids": ids})
                rec.update(detok_field(vocab, ids))
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")

            for text in corpus:
                emit({"text": text}, text.encode("utf-8"), False)
            for text in special:
                emit({"text": text}, text.encode("utf-8"), True)
                emit({"text": text}, text.encode("utf-8"), False)
            for hx in invalid:
                emit({"hex": hx}, bytes.fromhex(hx), False)
        print("%s: %d lines -> %s" % (name, len(corpus) + 2 * len(special) + len(invalid), out))


if __name__ == "__main__":
    main()

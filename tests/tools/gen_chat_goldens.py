#!/usr/bin/env python3
"""Render chat goldens for tests/test_chat.c from the real Jinja chat templates.

Writes tests/data/chat/<name>.json: the template text, the family and default system message
worker/chat.c should detect, and cases (messages -> exact rendered text). The goldens are
committed, so CI needs neither jinja2 nor the model files; rerun this after changing cases:

    python3 tests/tools/gen_chat_goldens.py            # needs jinja2 (pip install jinja2)

Templates:
  smollm2     tokenizer.chat_template of ~/.cache/kvstream/models/SmolLM2-135M-Instruct.Q4_1.gguf
  qwen2       tokenizer.chat_template of ~/.cache/kvstream/vocab/ggml-vocab-qwen2.gguf
              (falls back to llama.cpp's models/ copy)
  llama3      ggml-vocab-llama-bpe.gguf has no chat template: the well-known
              Meta-Llama-3-8B-Instruct template text is written below (LLAMA3_TEMPLATE)
  llama31     llama.cpp's models/templates/meta-llama-Llama-3.1-8B-Instruct.jinja (if present)
  qwen25      llama.cpp's models/templates/Qwen-Qwen2.5-7B-Instruct.jinja (if present)
  llama2      the well-known Llama-2-chat template text written below (LLAMA2_TEMPLATE)

Rendering follows Hugging Face transformers' apply_chat_template: a sandboxed jinja2
environment with trim_blocks and lstrip_blocks, raise_exception, bos_token / eos_token. The
BOS text a template writes (bos_token) at the very start is removed from the golden: kvstream's
tokenizer adds that BOS (see worker/chat.h).

Question / record cases are derived from the template too: the text that appending one user
turn (with / without the generation prompt) adds to the rendering of an existing
conversation.
"""
import json
import os
import struct
import sys

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

HOME = os.path.expanduser("~")
MODEL_DIR = os.environ.get("KVS_MODEL_DIR", os.path.join(HOME, ".cache/kvstream/models"))
VOCAB_DIR = os.environ.get("KVS_VOCAB_DIR", os.path.join(HOME, ".cache/kvstream/vocab"))
LLAMA_CPP_MODELS = os.environ.get(
    "LLAMA_CPP_MODELS", "/tmp/llama_cpp_python-0.3.36/vendor/llama.cpp/models")
OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data", "chat")

# tokenizer_config.json of meta-llama/Meta-Llama-3-8B-Instruct
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}")

# tokenizer_config.json of meta-llama/Llama-2-7b-chat-hf
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}"
    "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}")


def gguf_chat_template(path):
    """tokenizer.chat_template from a GGUF's metadata (v2/v3), or None. No numpy needed."""
    with open(path, "rb") as f:
        data = f.read(64 << 20)
    off = 0

    def rd(fmt):
        nonlocal off
        v = struct.unpack_from("<" + fmt, data, off)[0]
        off += struct.calcsize(fmt)
        return v

    def rstr():
        nonlocal off
        n = rd("Q")
        s = data[off:off + n]
        off += n
        return s.decode("utf-8")

    scalar = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q",
              11: "q", 12: "d"}

    def value(t):
        nonlocal off
        if t in scalar:
            return rd(scalar[t])
        if t == 8:
            return rstr()
        if t == 9:
            at, n = rd("I"), rd("Q")
            if at in scalar:
                off += n * struct.calcsize(scalar[at])
                return None
            for _ in range(n):
                value(at)
            return None
        raise ValueError("bad GGUF value type %d" % t)

    if data[:4] != b"GGUF":
        raise ValueError(path + ": not a GGUF file")
    off = 4
    rd("I")  # version
    rd("Q")  # n_tensors
    n_kv = rd("Q")
    for _ in range(n_kv):
        key = rstr()
        v = value(rd("I"))
        if key == "tokenizer.chat_template":
            return v
    return None


def first_existing(*paths):
    for p in paths:
        if os.path.exists(p):
            return p
    return None


def render(template, messages, add_generation_prompt, bos, eos):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(msg):
        raise jinja2.exceptions.TemplateError(msg)

    env.globals["raise_exception"] = raise_exception
    text = env.from_string(template).render(
        messages=messages, add_generation_prompt=add_generation_prompt, bos_token=bos,
        eos_token=eos)
    if "bos_token" in template and text.startswith(bos):
        text = text[len(bos):]  # the template's leading BOS: the tokenizer adds it
    return text


def msgs(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


SYS = "You are a terse market analyst."
CASES = [
    ("user_only", msgs(("user", "Hello!")), True),
    ("user_only_no_gen", msgs(("user", "Hello!")), False),
    ("system_user", msgs(("system", SYS), ("user", "What moved AAPL today?")), True),
    ("multi_turn", msgs(("system", SYS), ("user", "Price of AAPL?"),
                        ("assistant", "189.70 at the close."), ("user", "And MSFT?")), True),
    ("multi_turn_no_system", msgs(("user", "Price of AAPL?"), ("assistant", "189.70."),
                                  ("user", "And MSFT?")), False),
    ("whitespace", msgs(("system", "  spaced system \n"), ("user", " \t padded question \n\n"),
                        ("assistant", "\n answer\t "), ("user", "\u00a0nbsp\u3000 and \x1c")),
     True),
    ("empty_content", msgs(("user", "")), True),
    ("unicode", msgs(("user", "Привет, 世界 🎉 — ok?")), True),
    ("only_system", msgs(("system", SYS)), True),
    ("user_user", msgs(("user", "first record"), ("user", "second record")), True),
]

# (prefix conversation, kind, text): question = user turn + generation prompt,
# record = user turn alone, each appended to the prefix.
APPENDS = [
    (msgs(("system", SYS), ("user", "tick: AAPL 189.70"), ("assistant", "noted")), "question",
     "What is the last AAPL price?"),
    (msgs(("system", SYS), ("user", "tick: AAPL 189.70"), ("assistant", "noted")), "record",
     "tick: MSFT 411.20"),
    (msgs(("user", "tick: AAPL 189.70"), ("assistant", "noted")), "question",
     "  Summarize.\n"),
]

TEMPLATES = [
    # name, path or literal, bos, eos, expected family, expected default system
    ("smollm2", ("gguf", os.path.join(MODEL_DIR, "SmolLM2-135M-Instruct.Q4_1.gguf")),
     "<|im_start|>", "<|im_end|>", "chatml",
     "You are a helpful AI assistant named SmolLM, trained by Hugging Face"),
    ("qwen2", ("gguf", first_existing(os.path.join(VOCAB_DIR, "ggml-vocab-qwen2.gguf"),
                                      os.path.join(LLAMA_CPP_MODELS, "ggml-vocab-qwen2.gguf"))),
     "<|endoftext|>", "<|endoftext|>", "chatml", "You are a helpful assistant"),
    ("qwen25", ("file", os.path.join(LLAMA_CPP_MODELS, "templates",
                                     "Qwen-Qwen2.5-7B-Instruct.jinja")),
     "<|endoftext|>", "<|im_end|>", "chatml",
     "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."),
    ("llama3", ("text", LLAMA3_TEMPLATE), "<|begin_of_text|>", "<|eot_id|>", "llama3", ""),
    ("llama31", ("file", os.path.join(LLAMA_CPP_MODELS, "templates",
                                      "meta-llama-Llama-3.1-8B-Instruct.jinja")),
     "<|begin_of_text|>", "<|eot_id|>", "llama3", ""),
    ("llama2", ("text", LLAMA2_TEMPLATE), "<s>", "</s>", "llama2", ""),
]

# SmolLM2's BOS token (id 1) is "<|im_start|>", but its GGUF says add_bos_token = false and
# its template never writes bos_token: nothing is stripped there.


def load_template(src):
    kind, where = src
    if kind == "text":
        return where
    if where is None or not os.path.exists(where):
        return None
    if kind == "gguf":
        return gguf_chat_template(where)
    with open(where, encoding="utf-8") as f:
        return f.read()


def main():
    os.makedirs(OUT_DIR, exist_ok=True)
    for name, src, bos, eos, family, default_system in TEMPLATES:
        tmpl = load_template(src)
        if tmpl is None:
            print("skip %s: template not found (%s)" % (name, src[1]), file=sys.stderr)
            continue
        cases = []
        for cname, messages, gen in CASES:
            try:
                expected = render(tmpl, messages, gen, bos, eos)
                cases.append({"name": cname, "kind": "format", "messages": messages,
                              "add_generation_prompt": gen, "expected": expected})
            except jinja2.exceptions.TemplateError as e:
                cases.append({"name": cname, "kind": "format", "messages": messages,
                              "add_generation_prompt": gen, "error": str(e)})
        for i, (prefix, kind, text) in enumerate(APPENDS):
            gen = kind == "question"
            before = render(tmpl, prefix, False, bos, eos)
            after = render(tmpl, prefix + msgs(("user", text)), gen, bos, eos)
            assert after.startswith(before), (name, kind)
            cases.append({"name": "%s_%d" % (kind, i), "kind": kind, "text": text,
                          "expected": after[len(before):]})
        doc = {
            "comment": "generated by tests/tools/gen_chat_goldens.py from the real template; "
                       "do not edit",
            "name": name,
            "family": family,
            "default_system": default_system,
            "template": tmpl,
            "cases": cases,
        }
        path = os.path.join(OUT_DIR, name + ".json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(doc, f, ensure_ascii=False, indent=1)
            f.write("\n")
        print("wrote %s (%d cases)" % (path, len(cases)))


if __name__ == "__main__":
    main()

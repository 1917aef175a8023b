/* Helpers shared by the check test programs: where the source tree, the default model and
 * the tokenizer vocab files are. */
#ifndef KVS_TESTUTIL_H
#define KVS_TESTUTIL_H

#include <stddef.h>

/* The source tree (KVS_SOURCE_DIR from the environment, else the compile-time path). */
const char *kvs_test_source_dir(void);

/* Path of the default model (SmolLM2-135M-Instruct Q4_1) in the model cache:
 * $KVS_MODEL_DIR or ~/.cache/kvstream/models. The set-up fetches it; a missing file is a
 * test failure, not a skip. Returns a static buffer. */
const char *kvs_test_default_model(void);

/* Path of a llama.cpp vocab-only GGUF ("llama-bpe", "qwen2", "llama-spm") fetched by the
 * set-up into ~/.cache/kvstream/vocab. Returns a static buffer (one per call site is fine:
 * copy it if you need two). */
const char *kvs_test_vocab(const char *name);

/* Read a whole file into a malloc'd NUL-terminated buffer; NULL on error. *len optional. */
char *kvs_test_read_file(const char *path, size_t *len);

#endif

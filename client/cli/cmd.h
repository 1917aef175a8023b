/* The `kvstream` CLI: one function per subcommand, each in its own cmd_<name>.c.
 * Each takes the arguments after the subcommand name (argv[0] is the subcommand) and
 * returns the process exit code: 0 ok, 1 runtime failure, 2 usage error; the commands that
 * talk to a worker also 3 (no answer), 4 (not found), 5 (already exists): client/cli/remote.h.
 * Errors are one line on standard error, prefixed "kvstream <cmd>: ". */
#ifndef KVS_CLI_CMD_H
#define KVS_CLI_CMD_H

int kvs_cmd_tokenize(int argc, char **argv);
int kvs_cmd_inspect(int argc, char **argv);
int kvs_cmd_generate(int argc, char **argv);
int kvs_cmd_demo(int argc, char **argv);
int kvs_cmd_up(int argc, char **argv);
int kvs_cmd_session(int argc, char **argv);
int kvs_cmd_append(int argc, char **argv);
int kvs_cmd_query(int argc, char **argv);
int kvs_cmd_flash(int argc, char **argv);
int kvs_cmd_admin(int argc, char **argv);
int kvs_cmd_keygen(int argc, char **argv);

/* Print "kvstream <cmd>: <message>\n" on standard error. */
#if defined(__GNUC__)
__attribute__((format(printf, 2, 3)))
#endif
void kvs_cli_error(const char *cmd, const char *fmt, ...);

/* The default model path (~/.cache/kvstream/models/SmolLM2-135M-Instruct.Q4_1.gguf, or
 * $KVSTREAM_MODEL) used when -m is not given. Static buffer. */
const char *kvs_cli_default_model(void);

#endif

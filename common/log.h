/* Structured-enough logging to standard error: one line per event, level first.
 * Thread-safe (each line is written with one fprintf call). The level comes from
 * KVS_LOG_LEVEL (error|warn|info|debug) at first use, or kvs_log_set_level().
 */
#ifndef KVS_LOG_H
#define KVS_LOG_H

enum kvs_log_level { KVS_LOG_ERROR = 0, KVS_LOG_WARN = 1, KVS_LOG_INFO = 2, KVS_LOG_DEBUG = 3 };

void kvs_log_set_level(enum kvs_log_level level);
enum kvs_log_level kvs_log_get_level(void);

#if defined(__GNUC__)
__attribute__((format(printf, 2, 3)))
#endif
void kvs_log(enum kvs_log_level level, const char *fmt, ...);

#define KVS_ERROR(...) kvs_log(KVS_LOG_ERROR, __VA_ARGS__)
#define KVS_WARN(...) kvs_log(KVS_LOG_WARN, __VA_ARGS__)
#define KVS_INFO(...) kvs_log(KVS_LOG_INFO, __VA_ARGS__)
#define KVS_DEBUG(...) kvs_log(KVS_LOG_DEBUG, __VA_ARGS__)

#endif

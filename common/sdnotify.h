/* systemd's readiness and watchdog protocol (sd_notify(3)) without libsystemd: one datagram
 * to the unix socket named by $NOTIFY_SOCKET. Under `Type=notify` kvs-worker and
 * kvs-coordinator say READY=1 once they listen, WATCHDOG=1 from their request loops (every half
 * of $WATCHDOG_USEC: a loop that hangs is restarted) and STOPPING=1 at shutdown. Outside
 * systemd ($NOTIFY_SOCKET unset) every call does nothing.
 *
 * Thread-safety: reentrant (a socket per call).
 */
#ifndef KVS_SDNOTIFY_H
#define KVS_SDNOTIFY_H

#include <stdint.h>

/* Send state ("READY=1", "WATCHDOG=1", "STOPPING=1", "STATUS=..."). 1 sent, 0 no
 * $NOTIFY_SOCKET, or a negative errno when the send failed (nothing else happens). */
int kvs_sd_notify(const char *state);

/* The watchdog interval systemd expects pings within, in milliseconds ($WATCHDOG_USEC, for
 * this process per $WATCHDOG_PID when set); 0 when there is no watchdog. */
int64_t kvs_sd_watchdog_ms(void);

#endif

/* Whole-buffer file I/O that survives short reads/writes and EINTR, and directory fsync (a
 * rename or create is durable only once its directory is synced). POSIX only. */
#ifndef KVS_FILEIO_H
#define KVS_FILEIO_H

#include <stddef.h>
#include <stdint.h>

/* Write exactly n bytes at off. 0, or -1 with errno (EIO when the file accepts nothing). */
int kvs_pwrite_all(int fd, const void *buf, size_t n, uint64_t off);

/* Read exactly n bytes at off. 0, or -1 with errno (EIO for an unexpected end of file). */
int kvs_pread_all(int fd, void *buf, size_t n, uint64_t off);

/* fsync the directory dir. 0, or -1 with errno. */
int kvs_fsync_dir(const char *dir);

#endif

/*
 * vl_native: the native fast path of vfs-lockd.
 *
 * Host lock calls (OFD/classic fcntl locks, flock), the wake signal used to
 * interrupt blocked waits, file handles, and the FUSE request codec.
 * Every function answers an errno value (or -errno / a count) and never
 * aborts: bad input from a guest must end in an errno, not a crash.
 *
 * The block between CDEF-BEGIN and CDEF-END is fed verbatim to cffi's
 * cdef(), so it must stay plain declarations (no preprocessor lines).
 */
#ifndef VL_NATIVE_H
#define VL_NATIVE_H

#include <stddef.h>
#include <stdint.h>

/* CDEF-BEGIN */
typedef struct {
    int32_t type;   /* F_RDLCK / F_WRLCK / F_UNLCK */
    int64_t start;
    int64_t end;    /* inclusive; 0x7fffffffffffffff = to EOF */
    int64_t pid;    /* classic holder's pid; -1 for OFD holders */
} vl_lock;

int vl_ofd_setlk(int fd, int type, uint64_t start, uint64_t end);
int vl_ofd_setlkw(int fd, int type, uint64_t start, uint64_t end);
int vl_ofd_getlk(int fd, int type, uint64_t start, uint64_t end, vl_lock *out);
int vl_posix_getlk(int fd, int type, uint64_t start, uint64_t end, vl_lock *out);
int vl_flock(int fd, int op);
int vl_install_wake_signal(int signo);

int vl_name_to_handle(int fd, uint8_t *out, int cap, int *handle_type, int *handle_len);
int vl_open_by_handle(int mount_fd, const uint8_t *handle, int handle_len,
                      int handle_type, int flags);

int vl_decode(const uint8_t *buf, size_t len, uint64_t out[18]);
size_t vl_decode_batch(const uint8_t *buf, size_t len, uint64_t *out, size_t max_msgs);
void vl_encode_out_header(uint8_t out[16], uint32_t len, int32_t error, uint64_t unique);
void vl_encode_lk_reply(uint8_t out[40], uint64_t unique, uint64_t start, uint64_t end,
                        uint32_t type, uint32_t pid);

/* Sizes the Python side checks its fallbacks against. */
size_t vl_sizeof_flock(void);
int vl_max_handle_sz(void);
/* CDEF-END */

#endif

/* vl_native.c: see vl_native.h. Linux only; little-endian hosts. */
#define _GNU_SOURCE
#define _FILE_OFFSET_BITS 64

#include "vl_native.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <linux/openat2.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "vl_native assumes a little-endian host (FUSE messages are host-endian)"
#endif

/* Older libcs lack the OFD commands; the numbers are the Linux ABI. */
#ifndef F_OFD_GETLK
#define F_OFD_GETLK 36
#define F_OFD_SETLK 37
#define F_OFD_SETLKW 38
#endif
#ifndef MAX_HANDLE_SZ
#define MAX_HANDLE_SZ 128
#endif

#define VL_OFFSET_MAX 0x7fffffffffffffffULL

/* ---------------------------------------------------------------- locks */

/* Build a SEEK_SET flock for the inclusive range [start, end]. */
static int fill_flock(struct flock *fl, int type, uint64_t start, uint64_t end)
{
    if (start > VL_OFFSET_MAX || end > VL_OFFSET_MAX || start > end)
        return EINVAL;
    memset(fl, 0, sizeof(*fl)); /* OFD commands require l_pid == 0 */
    fl->l_type = (short)type;
    fl->l_whence = SEEK_SET;
    fl->l_start = (off_t)start;
    /* end - start + 1 <= OFFSET_MAX because end < OFFSET_MAX here */
    fl->l_len = end == VL_OFFSET_MAX ? 0 : (off_t)(end - start + 1);
    return 0;
}

static int setlk_cmd(int cmd, int fd, int type, uint64_t start, uint64_t end)
{
    struct flock fl;
    int err = fill_flock(&fl, type, start, end);
    if (err)
        return err;
    /* No EINTR retry: an interrupted SETLKW is how a wait gets cancelled. */
    return fcntl(fd, cmd, &fl) == 0 ? 0 : errno;
}

int vl_ofd_setlk(int fd, int type, uint64_t start, uint64_t end)
{
    return setlk_cmd(F_OFD_SETLK, fd, type, start, end);
}

int vl_ofd_setlkw(int fd, int type, uint64_t start, uint64_t end)
{
    return setlk_cmd(F_OFD_SETLKW, fd, type, start, end);
}

static int getlk_cmd(int cmd, int fd, int type, uint64_t start, uint64_t end, vl_lock *out)
{
    struct flock fl;
    int err = fill_flock(&fl, type, start, end);
    if (err)
        return err;
    if (fcntl(fd, cmd, &fl) != 0)
        return errno;
    out->type = fl.l_type;
    out->start = fl.l_start;
    out->pid = fl.l_pid;
    if (fl.l_type == F_UNLCK)
        out->start = out->end = out->pid = 0; /* the kernel leaves the query here */
    else if (fl.l_len == 0)
        out->end = (int64_t)VL_OFFSET_MAX;
    else
        out->end = fl.l_start + fl.l_len - 1;
    return 0;
}

int vl_ofd_getlk(int fd, int type, uint64_t start, uint64_t end, vl_lock *out)
{
    return getlk_cmd(F_OFD_GETLK, fd, type, start, end, out);
}

int vl_posix_getlk(int fd, int type, uint64_t start, uint64_t end, vl_lock *out)
{
    return getlk_cmd(F_GETLK, fd, type, start, end, out);
}

int vl_flock(int fd, int op)
{
    return flock(fd, op) == 0 ? 0 : errno;
}

static void wake_handler(int signo)
{
    (void)signo; /* only here so that blocking syscalls return EINTR */
}

int vl_install_wake_signal(int signo)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = wake_handler;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0; /* no SA_RESTART: the interrupted call must fail with EINTR */
    return sigaction(signo, &sa, NULL) == 0 ? 0 : errno;
}

/* -------------------------------------------------------- file handles */

int vl_name_to_handle(int fd, uint8_t *out, int cap, int *handle_type, int *handle_len)
{
    struct file_handle *fh = malloc(sizeof(*fh) + MAX_HANDLE_SZ);
    int mount_id, err = 0;
    if (!fh)
        return ENOMEM;
    fh->handle_bytes = MAX_HANDLE_SZ;
    if (name_to_handle_at(fd, "", fh, &mount_id, AT_EMPTY_PATH) != 0) {
        err = errno;
    } else if (cap < 0 || fh->handle_bytes > (unsigned)cap) {
        err = EOVERFLOW;
    } else {
        memcpy(out, fh->f_handle, fh->handle_bytes);
        *handle_type = fh->handle_type;
        *handle_len = (int)fh->handle_bytes;
    }
    free(fh);
    return err;
}

int vl_open_by_handle(int mount_fd, const uint8_t *handle, int handle_len, int handle_type,
                      int flags)
{
    struct file_handle *fh;
    int fd;
    if (handle_len < 0 || handle_len > MAX_HANDLE_SZ)
        return -EINVAL;
    fh = malloc(sizeof(*fh) + MAX_HANDLE_SZ);
    if (!fh)
        return -ENOMEM;
    fh->handle_bytes = (unsigned)handle_len;
    fh->handle_type = handle_type;
    memcpy(fh->f_handle, handle, (size_t)handle_len);
    fd = open_by_handle_at(mount_fd, fh, flags);
    if (fd < 0)
        fd = -errno;
    free(fh);
    return fd;
}

static int openat2_beneath_how(int dir_fd, const char *path, int flags, uint64_t resolve)
{
    struct open_how how;
    long fd;
    memset(&how, 0, sizeof(how));
    how.flags = (uint64_t)(unsigned)(flags | O_CLOEXEC);
    how.resolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | resolve;
    fd = syscall(SYS_openat2, dir_fd, path, &how, sizeof(how));
    return fd < 0 ? -errno : (int)fd;
}

int vl_openat2_beneath(int dir_fd, const char *path, int flags)
{
    return openat2_beneath_how(dir_fd, path, flags, 0);
}

int vl_dir_under_root(const char *link, int root_fd, const char *top, size_t top_len,
                      uint64_t dev, uint64_t ino)
{
    char path[4096 + 1];
    const char *rel;
    struct stat st;
    ssize_t n;
    int probe, same, within;
    n = readlink(link, path, sizeof(path) - 1);
    if (n < 0)
        return -errno;
    if ((size_t)n >= sizeof(path) - 1)
        return -ENAMETOOLONG;  /* maybe cut: the caller walks '..' instead */
    path[n] = '\0';
    if ((size_t)n < top_len || memcmp(path, top, top_len) != 0)
        return 0;
    rel = path + top_len;
    /* A path ending in " (deleted)" does not resolve: 0, as for a moved directory. */
    /* First within the share's own mount: a directory found so has only ancestors of
     * that filesystem, which only a rename there can change (vl_moves). */
    within = 2;
    probe = openat2_beneath_how(root_fd, *rel ? rel : ".", O_PATH | O_DIRECTORY,
                                RESOLVE_NO_XDEV);
    if (probe == -EXDEV) {
        within = 1;
        probe = vl_openat2_beneath(root_fd, *rel ? rel : ".", O_PATH | O_DIRECTORY);
    }
    if (probe < 0)
        return 0;  /* not there: moved, deleted, or it would leave the share */
    same = fstat(probe, &st) == 0 && (uint64_t)st.st_dev == dev && (uint64_t)st.st_ino == ino;
    close(probe);
    return same ? within : 0;
}

size_t vl_sizeof_flock(void) { return sizeof(struct flock); }
int vl_max_handle_sz(void) { return MAX_HANDLE_SZ; }

/* --------------------------------------------------------------- codec */

enum {
    F_STATUS, F_LEN, F_OPCODE, F_UNIQUE, F_NODEID, F_UID, F_GID, F_PID,
    F_FH, F_OWNER, F_LK_START, F_LK_END, F_LK_TYPE, F_LK_PID, F_LK_FLAGS,
    F_FLAGS, F_RELEASE_FLAGS, F_TARGET, F_COUNT
};

enum {
    OP_RELEASE = 18, OP_FLUSH = 25, OP_RELEASEDIR = 29, OP_GETLK = 31,
    OP_SETLK = 32, OP_SETLKW = 33, OP_INTERRUPT = 36,
};

#define IN_HEADER_SIZE 40

/* memcpy loads: FUSE buffers carry no alignment promise. */
static inline uint64_t ld64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

static inline uint64_t ld32(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* Decode one message; *fatal is set when the header itself is unusable
 * (the caller of a batch cannot find the next message). Returns status. */
static int decode_one(const uint8_t *buf, size_t len, uint64_t *out, int *fatal)
{
    uint64_t hlen, opcode;
    size_t body;
    const uint8_t *b;

    memset(out, 0, F_COUNT * sizeof(uint64_t));
    *fatal = 1;
    if (len < IN_HEADER_SIZE) {
        out[F_STATUS] = EINVAL;
        return EINVAL;
    }
    hlen = ld32(buf);
    opcode = ld32(buf + 4);
    out[F_LEN] = hlen;
    out[F_OPCODE] = opcode;
    out[F_UNIQUE] = ld64(buf + 8);
    out[F_NODEID] = ld64(buf + 16);
    out[F_UID] = ld32(buf + 24);
    out[F_GID] = ld32(buf + 28);
    out[F_PID] = ld32(buf + 32);
    if (hlen < IN_HEADER_SIZE || hlen > len) {
        out[F_STATUS] = EINVAL;
        return EINVAL;
    }
    *fatal = 0;
    b = buf + IN_HEADER_SIZE;
    body = (size_t)hlen - IN_HEADER_SIZE;

    switch (opcode) {
    case OP_GETLK:
    case OP_SETLK:
    case OP_SETLKW:
        if (body < 48)
            break;
        out[F_FH] = ld64(b);
        out[F_OWNER] = ld64(b + 8);
        out[F_LK_START] = ld64(b + 16);
        out[F_LK_END] = ld64(b + 24);
        out[F_LK_TYPE] = ld32(b + 32);
        out[F_LK_PID] = ld32(b + 36);
        out[F_LK_FLAGS] = ld32(b + 40);
        return 0;
    case OP_INTERRUPT:
        if (body < 8)
            break;
        out[F_TARGET] = ld64(b);
        return 0;
    case OP_FLUSH:
        if (body < 24)
            break;
        out[F_FH] = ld64(b);
        out[F_OWNER] = ld64(b + 16);
        return 0;
    case OP_RELEASE:
    case OP_RELEASEDIR:
        if (body < 24)
            break;
        out[F_FH] = ld64(b);
        out[F_FLAGS] = ld32(b + 8);
        out[F_RELEASE_FLAGS] = ld32(b + 12);
        out[F_OWNER] = ld64(b + 16);
        return 0;
    default:
        return 0;
    }
    out[F_STATUS] = EINVAL; /* body too short for its opcode */
    return EINVAL;
}

int vl_decode(const uint8_t *buf, size_t len, uint64_t out[18])
{
    int fatal;
    return decode_one(buf, len, out, &fatal);
}

size_t vl_decode_batch(const uint8_t *buf, size_t len, uint64_t *out, size_t max_msgs)
{
    size_t pos = 0, n = 0;
    int fatal;

    while (pos < len && n < max_msgs) {
        decode_one(buf + pos, len - pos, out + n * F_COUNT, &fatal);
        n++;
        if (fatal)
            break;
        pos += (size_t)out[(n - 1) * F_COUNT + F_LEN]; /* >= 40, <= len - pos */
    }
    return n;
}

void vl_encode_out_header(uint8_t out[16], uint32_t len, int32_t error, uint64_t unique)
{
    memcpy(out, &len, 4);
    memcpy(out + 4, &error, 4);
    memcpy(out + 8, &unique, 8);
}

void vl_encode_lk_reply(uint8_t out[40], uint64_t unique, uint64_t start, uint64_t end,
                        uint32_t type, uint32_t pid)
{
    vl_encode_out_header(out, 40, 0, unique);
    memcpy(out + 16, &start, 8);
    memcpy(out + 24, &end, 8);
    memcpy(out + 32, &type, 4);
    memcpy(out + 36, &pid, 4);
}

/* ------------------------------------------------------- split virtqueues */

/* Layout (virtio 1.1, 2.6): desc[num] {le64 addr; le32 len; le16 flags; le16 next},
 * avail {le16 flags; le16 idx; le16 ring[num]}, used {le16 flags; le16 idx;
 * {le32 id; le32 len} ring[num]}. All of it lives in memory the guest can change
 * at any time: every field is loaded once into a local and checked there. */
#define VQ_DESC_F_NEXT 1
#define VQ_DESC_F_WRITE 2
#define VQ_DESC_F_INDIRECT 4
#define VQ_AVAIL_F_NO_INTERRUPT 1

struct vq_desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

static inline uint16_t ld16_acquire(uint64_t addr)
{
    return __atomic_load_n((const uint16_t *)(uintptr_t)addr, __ATOMIC_ACQUIRE);
}

static inline uint16_t ld16(uint64_t addr)
{
    uint16_t v;
    memcpy(&v, (const void *)(uintptr_t)addr, 2);
    return v;
}

/* The host address of guest physical `gpa` and how many bytes from there (at most
 * `len`) are in the same region; 0 when gpa is in no region. */
static uint64_t gpa_span(const vl_vq *vq, uint64_t gpa, uint64_t len, uint64_t *host)
{
    uint32_t i;
    for (i = 0; i < vq->nregions; i++) {
        const vl_region *r = &vq->regions[i];
        uint64_t off = gpa - r->gpa; /* wraps when gpa < r->gpa: then off >= size */
        if (off < r->size) {
            uint64_t room = r->size - off;
            *host = r->host + off;
            return len < room ? len : room;
        }
    }
    return 0;
}

/* Copy a readable descriptor's bytes to buf[*pos..]; may span adjacent regions. */
static int gather(const vl_vq *vq, uint64_t gpa, uint64_t len, uint8_t *buf, uint64_t cap,
                  uint64_t *pos)
{
    if (len > cap - *pos)
        return E2BIG; /* more than the caller can take (cap >= *pos always) */
    while (len) {
        uint64_t host, n = gpa_span(vq, gpa, len, &host);
        if (n == 0)
            return EFAULT;
        memcpy(buf + *pos, (const void *)(uintptr_t)host, n);
        *pos += n;
        gpa += n; /* cannot wrap: n <= region size - offset */
        len -= n;
    }
    return 0;
}

/* Record a writable descriptor as host segments (one per region it touches). */
static int add_segs(const vl_vq *vq, uint64_t gpa, uint64_t len, vl_seg *segs,
                    uint32_t max_segs, vl_chain *out)
{
    while (len) {
        uint64_t host, n = gpa_span(vq, gpa, len, &host);
        if (n == 0)
            return EFAULT;
        if (out->nsegs >= max_segs)
            return E2BIG;
        segs[out->nsegs].host = host;
        segs[out->nsegs].len = n;
        segs[out->nsegs].gpa = gpa;
        out->nsegs++;
        out->out_len += n;
        gpa += n;
        len -= n;
    }
    return 0;
}

/* EVENT_IDX: tell the driver to kick us when it makes entry `idx` available (the
 * avail_event field after the used ring, ours to write), and log the write. */
static void set_avail_event(vl_vq *vq, uint16_t idx)
{
    uint64_t off = 4 + 8 * (uint64_t)vq->num;
    __atomic_store_n((uint16_t *)(uintptr_t)(vq->used + off), idx, __ATOMIC_RELAXED);
    if (vq->log && vq->log_used_on)
        vl_log_mark(vq->log, vq->log_size, vq->log_used + off, 2);
}

uint32_t vl_vq_pending(vl_vq *vq)
{
    return (uint16_t)(ld16_acquire(vq->avail + 2) - vq->last_avail);
}

/* Walk the chain starting at `head`. Bounds: a direct chain has at most num
 * descriptors, an indirect table at most max_indirect entries and no nested
 * table, every `next` must index the current table; so any loop ends in ELOOP. */
static int walk(const vl_vq *vq, uint32_t head, uint8_t *buf, uint64_t cap, vl_seg *segs,
                uint32_t max_segs, vl_chain *out)
{
    uint64_t table = vq->desc, pos = 0;
    uint32_t size = vq->num, limit = vq->num, count = 0, i = head;
    int indirect = 0, seen_write = 0, err;
    struct vq_desc d;

    for (;;) {
        if (count++ >= limit)
            return ELOOP;
        out->ndesc++;
        memcpy(&d, (const void *)(uintptr_t)(table + (uint64_t)i * 16), sizeof(d));
        if (d.flags & VQ_DESC_F_INDIRECT) {
            uint64_t host;
            if (indirect)
                return ELOOP; /* a table inside a table: forbidden by the spec */
            if (d.flags & VQ_DESC_F_NEXT)
                return EINVAL; /* INDIRECT with NEXT: forbidden by the spec */
            if (d.len == 0 || d.len % 16 || d.len / 16 > vq->max_indirect)
                return EINVAL;
            /* The table must be contiguous in our mapping: it is read by index. */
            if (gpa_span(vq, d.addr, d.len, &host) != d.len)
                return EFAULT;
            table = host;
            size = limit = d.len / 16;
            count = 0;
            i = 0;
            indirect = 1;
            continue;
        }
        if (d.flags & VQ_DESC_F_WRITE) {
            seen_write = 1;
            err = add_segs(vq, d.addr, d.len, segs, max_segs, out);
        } else if (seen_write) {
            return EINVAL; /* readable after writable: forbidden by the spec */
        } else {
            err = gather(vq, d.addr, d.len, buf, cap, &pos);
            out->in_len = pos;
        }
        if (err)
            return err;
        if (!(d.flags & VQ_DESC_F_NEXT))
            return 0;
        i = d.next;
        if (i >= size)
            return EINVAL;
    }
}

/* Pop the next available chain: 1 popped (out->error says whether it is usable; a
 * refused chain is consumed and must still be pushed back), 0 nothing available,
 * -errno the ring itself is broken (stop serving it until it is set up again). */
int vl_vq_pop(vl_vq *vq, uint8_t *buf, uint64_t cap, vl_seg *segs, uint32_t max_segs,
              vl_chain *out)
{
    uint16_t avail_idx;
    uint32_t head;

    memset(out, 0, sizeof(*out));
    if (vq->broken)
        return -EIO;
    if (vq->num == 0 || vq->num > 32768 || (vq->num & (vq->num - 1))) {
        vq->broken = 1;
        return -EINVAL;
    }
    avail_idx = ld16_acquire(vq->avail + 2); /* entries below it are written */
    if (avail_idx == vq->last_avail) {
        if (!vq->event_idx)
            return 0;
        /* Out of work: ask for a kick at the next entry, then look once more. The
         * fence orders our store before the load; without it (or without the second
         * look) an entry published in between would come with no kick and wait. */
        set_avail_event(vq, vq->last_avail);
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        avail_idx = ld16_acquire(vq->avail + 2);
        if (avail_idx == vq->last_avail)
            return 0;
    }
    if ((uint16_t)(avail_idx - vq->last_avail) > vq->num) {
        vq->broken = 1; /* the driver claims more entries than the ring holds */
        return -EIO;
    }
    head = ld16(vq->avail + 4 + 2 * (uint64_t)(vq->last_avail % vq->num));
    if (head >= vq->num) {
        vq->broken = 1; /* nothing we could hand back in the used ring */
        return -EIO;
    }
    vq->last_avail++;
    out->head = head;
    out->error = walk(vq, head, buf, cap, segs, max_segs, out);
    return 1;
}

/* 1 when the used index moving from `old` to `new` passes `event` (the driver wants
 * a signal once the entry at index `event` is used): event in [old, new). */
static inline int need_event(uint16_t event, uint16_t new_idx, uint16_t old)
{
    return (uint16_t)(new_idx - event - 1) < (uint16_t)(new_idx - old);
}

/* Signal the call eventfd unless the driver asked for no interrupts: with EVENT_IDX
 * when the used entries since the last decision pass its used_event, else unless
 * the avail ring's NO_INTERRUPT flag is set. */
int vl_vq_notify(vl_vq *vq)
{
    uint64_t one = 1;
    /* The used idx store must be visible before we read the driver's flags/event. */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (vq->call_fd < 0)
        return 0; /* decided when a call fd comes (signalled_* left as they are) */
    if (vq->event_idx) {
        uint16_t event = ld16(vq->avail + 4 + 2 * (uint64_t)vq->num);
        uint16_t old = vq->signalled_used, new_idx = vq->used_idx;
        int valid = vq->signalled_valid != 0;
        vq->signalled_used = new_idx;
        vq->signalled_valid = 1;
        if (valid && !need_event(event, new_idx, old))
            return 0;
    } else if (ld16(vq->avail) & VQ_AVAIL_F_NO_INTERRUPT) {
        return 0;
    }
    return write(vq->call_fd, &one, 8) == 8 ? 0 : errno;
}

/* Mark the guest pages of [gpa, gpa+len) dirty in the log (atomically: QEMU reads
 * and clears words concurrently). Pages past the log's end are not marked: -ERANGE
 * (the front-end sized the log for all of guest memory, so that is a bug or a lie). */
#define VL_LOG_PAGE 4096ULL
int vl_log_mark(uint64_t log, uint64_t log_size, uint64_t gpa, uint64_t len)
{
    uint64_t page, last;
    int rc = 0;

    if (!log || !len)
        return 0;
    page = gpa / VL_LOG_PAGE;
    last = (gpa + len - 1) / VL_LOG_PAGE;
    if (gpa + len - 1 < gpa)
        last = UINT64_MAX / VL_LOG_PAGE; /* wraps: mark to the end, fail below */
    for (; page <= last; page++) {
        uint64_t word = page / 64;
        if (word >= log_size / 8) {
            rc = -ERANGE;
            break;
        }
        __atomic_fetch_or((uint64_t *)(uintptr_t)(log + 8 * word), 1ULL << (page % 64),
                          __ATOMIC_RELAXED);
        if (page == UINT64_MAX / VL_LOG_PAGE)
            break;
    }
    return rc;
}

/* Copy `data` into the chain's writable segments (as much as fits) and add the
 * used element {head, bytes written}; signal the call fd when `notify`. Returns
 * the bytes written, or -errno (EINVAL: head out of range; EIO: ring broken). */
int64_t vl_vq_push(vl_vq *vq, uint32_t head, const vl_seg *segs, uint32_t nsegs,
                   const uint8_t *data, uint64_t len, int notify)
{
    uint64_t done = 0, elem;
    uint32_t i, id = head, wlen;

    if (vq->num == 0 || head >= vq->num)
        return -EINVAL;
    for (i = 0; i < nsegs && done < len; i++) {
        uint64_t n = len - done < segs[i].len ? len - done : segs[i].len;
        memcpy((void *)(uintptr_t)segs[i].host, data + done, n);
        if (vq->log)
            vl_log_mark(vq->log, vq->log_size, segs[i].gpa, n);
        done += n;
    }
    wlen = done > 0xffffffffULL ? 0xffffffffU : (uint32_t)done;
    elem = vq->used + 4 + 8 * (uint64_t)(vq->used_idx % vq->num);
    memcpy((void *)(uintptr_t)elem, &id, 4);
    memcpy((void *)(uintptr_t)(elem + 4), &wlen, 4);
    vq->used_idx++;
    /* The element (and the reply bytes) before the index that publishes them. */
    __atomic_store_n((uint16_t *)(uintptr_t)(vq->used + 2), vq->used_idx, __ATOMIC_RELEASE);
    if (vq->log && vq->log_used_on) {
        /* The element and the index, after they are written (QEMU syncs the log
         * after it stopped us, so the order against its reads does not matter). */
        vl_log_mark(vq->log, vq->log_size,
                    vq->log_used + 4 + 8 * (uint64_t)((uint16_t)(vq->used_idx - 1) % vq->num), 8);
        vl_log_mark(vq->log, vq->log_size, vq->log_used + 2, 2);
    }
    if (notify)
        vl_vq_notify(vq);
    return (int64_t)done;
}

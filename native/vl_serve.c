/* vl_serve.c: the descriptor table and the native FUSE fast path (see vl_native.h).
 *
 * The table is where a node id or a file handle becomes a host descriptor. The Python
 * file system (fuse_server/passthrough.py) publishes each inode and open handle here
 * once it exists and retires it here when it goes; the descriptors it published are
 * closed here, never by Python, because a request served here may be using one: a
 * retired entry still in use is closed by its last user.
 *
 * vl_serve answers the requests whose whole work is one host call on a known
 * descriptor (GETATTR, STATFS, READ, WRITE) when the session allows it (vl_tab_config);
 * anything else, and anything unusual (an unknown id, a short body, a lost file),
 * returns 0 for the Python session to answer: it stays the reference, and this file
 * must produce byte for byte what it would (tests/test_native_serve.py).
 */
#define _GNU_SOURCE
#define _FILE_OFFSET_BITS 64

#include "vl_native.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/sysmacros.h>
#include <unistd.h>

enum { OP_GETATTR = 3, OP_READ = 15, OP_WRITE = 16, OP_STATFS = 17 };

#define IN_HEADER 40
#define OUT_HEADER 16
#define GETATTR_FH 1u
#define ATTR_SIZE 88
#define ATTR_OUT_SIZE (16 + ATTR_SIZE)
#define KSTATFS_SIZE 80
#define RW_IN 40

struct ent {
    uint64_t id;
    uint64_t nodeid;    /* a handle's inode; an inode's own id */
    int32_t fd;
    uint32_t flags;     /* VL_ENT_* */
    uint32_t refs;      /* requests using fd now */
    uint8_t retired;    /* out of the map; the last user frees it */
    uint8_t close_fd;   /* ... and closes fd */
};

/* Open addressing, linear probing, deletion by backward shift (no tombstones). */
struct map {
    struct ent **slot;
    uint64_t cap;       /* a power of 2, or 0 */
    uint64_t n;
};

struct vl_tab {
    pthread_mutex_t mu;
    struct map inodes, handles;
    uint64_t ops;       /* bit k: opcode k may be served here */
    uint64_t attr_sec;
    uint32_t attr_nsec;
    uint64_t served[64];  /* requests answered here, by opcode */
};

static inline uint64_t mix(uint64_t k)
{
    k ^= k >> 33;
    k *= 0xff51afd7ed558ccdULL;
    k ^= k >> 33;
    return k;
}

static struct ent *map_get(const struct map *m, uint64_t id)
{
    if (!m->cap)
        return NULL;
    for (uint64_t i = mix(id) & (m->cap - 1);; i = (i + 1) & (m->cap - 1)) {
        struct ent *e = m->slot[i];
        if (!e || e->id == id)
            return e;
    }
}

static int map_grow(struct map *m)
{
    uint64_t cap = m->cap ? m->cap * 2 : 64;
    struct ent **slot = calloc(cap, sizeof(*slot));
    if (!slot)
        return -ENOMEM;
    for (uint64_t j = 0; j < m->cap; j++) {
        struct ent *e = m->slot[j];
        if (!e)
            continue;
        uint64_t i = mix(e->id) & (cap - 1);
        while (slot[i])
            i = (i + 1) & (cap - 1);
        slot[i] = e;
    }
    free(m->slot);
    m->slot = slot;
    m->cap = cap;
    return 0;
}

static int map_put(struct map *m, struct ent *e)
{
    if ((m->n + 1) * 4 > m->cap * 3) {  /* load factor 3/4 */
        int err = map_grow(m);
        if (err)
            return err;
    }
    uint64_t i = mix(e->id) & (m->cap - 1);
    while (m->slot[i]) {
        if (m->slot[i]->id == e->id)
            return -EEXIST;
        i = (i + 1) & (m->cap - 1);
    }
    m->slot[i] = e;
    m->n++;
    return 0;
}

static struct ent *map_del(struct map *m, uint64_t id)
{
    if (!m->cap)
        return NULL;
    uint64_t mask = m->cap - 1, i = mix(id) & mask;
    while (m->slot[i] && m->slot[i]->id != id)
        i = (i + 1) & mask;
    struct ent *found = m->slot[i];
    if (!found)
        return NULL;
    /* Shift back the entries of the run after i that would be unreachable. */
    for (uint64_t j = (i + 1) & mask; m->slot[j]; j = (j + 1) & mask) {
        uint64_t home = mix(m->slot[j]->id) & mask;
        /* j's entry may fill the hole at i unless its home lies cyclically in (i, j] */
        if ((j > i && (home <= i || home > j)) || (j < i && home <= i && home > j)) {
            m->slot[i] = m->slot[j];
            i = j;
        }
    }
    m->slot[i] = NULL;
    m->n--;
    return found;
}

vl_tab *vl_tab_new(void)
{
    vl_tab *t = calloc(1, sizeof(*t));
    if (t)
        pthread_mutex_init(&t->mu, NULL);
    return t;
}

static void map_free(struct map *m)
{
    for (uint64_t i = 0; i < m->cap; i++)
        free(m->slot[i]);  /* descriptors are not closed: see vl_tab_free */
    free(m->slot);
}

void vl_tab_free(vl_tab *t)
{
    if (!t)
        return;
    map_free(&t->inodes);
    map_free(&t->handles);
    pthread_mutex_destroy(&t->mu);
    free(t);
}

static int put(vl_tab *t, struct map *m, uint64_t id, int fd, uint64_t nodeid, uint32_t flags)
{
    if (id == 0 || fd < 0)
        return -EINVAL;
    struct ent *e = calloc(1, sizeof(*e));
    if (!e)
        return -ENOMEM;
    e->id = id;
    e->nodeid = nodeid;
    e->fd = fd;
    e->flags = flags;
    pthread_mutex_lock(&t->mu);
    int err = map_put(m, e);
    pthread_mutex_unlock(&t->mu);
    if (err)
        free(e);
    return err;
}

int vl_tab_put_inode(vl_tab *t, uint64_t nodeid, int fd, uint32_t flags)
{
    return put(t, &t->inodes, nodeid, fd, nodeid, flags);
}

int vl_tab_put_handle(vl_tab *t, uint64_t fh, int fd, uint64_t nodeid, uint32_t flags)
{
    return put(t, &t->handles, fh, fd, nodeid, flags);
}

static int drop(vl_tab *t, struct map *m, uint64_t id, int close_fd)
{
    int fd = -1;
    pthread_mutex_lock(&t->mu);
    struct ent *e = map_del(m, id);
    if (!e) {
        pthread_mutex_unlock(&t->mu);
        return -ENOENT;
    }
    if (e->refs) {
        e->retired = 1;  /* its last user closes and frees it */
        e->close_fd = close_fd != 0;
        e = NULL;
    } else if (close_fd) {
        fd = e->fd;
    }
    pthread_mutex_unlock(&t->mu);
    if (fd >= 0)
        close(fd);
    free(e);  /* (NULL when its last user frees it) */
    return 0;
}

int vl_tab_drop_inode(vl_tab *t, uint64_t nodeid, int close_fd)
{
    return drop(t, &t->inodes, nodeid, close_fd);
}

int vl_tab_drop_handle(vl_tab *t, uint64_t fh, int close_fd)
{
    return drop(t, &t->handles, fh, close_fd);
}

int vl_tab_flags(vl_tab *t, uint64_t nodeid, uint32_t set, uint32_t clear)
{
    pthread_mutex_lock(&t->mu);
    struct ent *e = map_get(&t->inodes, nodeid);
    int old = e ? (int)e->flags : -ENOENT;
    if (e)
        e->flags = (e->flags | set) & ~clear;
    pthread_mutex_unlock(&t->mu);
    return old;
}

int vl_tab_get(vl_tab *t, int handles, uint64_t id, vl_tab_entry *out)
{
    pthread_mutex_lock(&t->mu);
    struct ent *e = map_get(handles ? &t->handles : &t->inodes, id);
    if (e) {
        out->fd = e->fd;
        out->nodeid = e->nodeid;
        out->flags = e->flags;
    }
    pthread_mutex_unlock(&t->mu);
    return e ? 0 : -ENOENT;
}

uint64_t vl_tab_count(vl_tab *t, int handles)
{
    pthread_mutex_lock(&t->mu);
    uint64_t n = handles ? t->handles.n : t->inodes.n;
    pthread_mutex_unlock(&t->mu);
    return n;
}

uint64_t vl_tab_served(vl_tab *t, uint32_t opcode)
{
    return opcode < 64 ? __atomic_load_n(&t->served[opcode], __ATOMIC_RELAXED) : 0;
}

void vl_tab_config(vl_tab *t, uint64_t ops, uint64_t attr_sec, uint32_t attr_nsec)
{
    pthread_mutex_lock(&t->mu);
    t->ops = ops;
    t->attr_sec = attr_sec;
    t->attr_nsec = attr_nsec;
    pthread_mutex_unlock(&t->mu);
}

/* ------------------------------------------------------------- serving */

/* Under the mutex: the entry, counted as used, or NULL (lost entries are Python's:
 * it answers EIO with the reason). */
static struct ent *acquire(struct map *m, uint64_t id)
{
    struct ent *e = map_get(m, id);
    if (!e || (e->flags & VL_ENT_LOST))
        return NULL;
    e->refs++;
    return e;
}

static void release(vl_tab *t, struct ent *e)
{
    int fd = -1, gone = 0;
    pthread_mutex_lock(&t->mu);
    if (--e->refs == 0 && e->retired) {
        gone = 1;
        if (e->close_fd)
            fd = e->fd;
    }
    pthread_mutex_unlock(&t->mu);
    if (fd >= 0)
        close(fd);
    if (gone)
        free(e);
}

static inline void st64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }
static inline void st32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static inline uint64_t get64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static inline uint32_t get32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }

static int64_t reply(uint8_t *out, uint64_t unique, int err, uint32_t body)
{
    st32(out, OUT_HEADER + (err ? 0 : body));
    st32(out + 4, (uint32_t)(err ? -err : 0));
    st64(out + 8, unique);
    return OUT_HEADER + (err ? 0 : body);
}

/* fuse_attr, as protocol.pack_attr writes it (negative times: seconds 0). */
static void pack_attr(uint8_t *p, const struct stat *st)
{
    st64(p, st->st_ino);
    st64(p + 8, (uint64_t)st->st_size);
    st64(p + 16, (uint64_t)st->st_blocks);
    st64(p + 24, st->st_atim.tv_sec > 0 ? (uint64_t)st->st_atim.tv_sec : 0);
    st64(p + 32, st->st_mtim.tv_sec > 0 ? (uint64_t)st->st_mtim.tv_sec : 0);
    st64(p + 40, st->st_ctim.tv_sec > 0 ? (uint64_t)st->st_ctim.tv_sec : 0);
    st32(p + 48, (uint32_t)st->st_atim.tv_nsec);
    st32(p + 52, (uint32_t)st->st_mtim.tv_nsec);
    st32(p + 56, (uint32_t)st->st_ctim.tv_nsec);
    st32(p + 60, st->st_mode);
    st32(p + 64, (uint32_t)st->st_nlink);
    st32(p + 68, st->st_uid);
    st32(p + 72, st->st_gid);
    uint32_t ma = major(st->st_rdev), mi = minor(st->st_rdev);
    st32(p + 76, (mi & 0xff) | (ma << 8) | ((mi & ~0xffu) << 12));
    st32(p + 80, (uint32_t)st->st_blksize);
    st32(p + 84, 0);
}

/* Passthrough.drop_setid: a write by anyone but root clears setuid, and setgid where
 * group execute is set or the writer is not in the file's group. */
static int drop_setid(int fd, uint32_t gid)
{
    struct stat st;
    if (fstat(fd, &st) != 0)
        return errno;
    mode_t kill = st.st_mode & S_ISUID;
    if ((st.st_mode & S_IXGRP) || st.st_gid != gid)
        kill |= st.st_mode & S_ISGID;
    if (kill && S_ISREG(st.st_mode) && fchmod(fd, (st.st_mode & 07777) & ~kill) != 0)
        return errno;
    return 0;
}

int64_t vl_serve(vl_tab *t, const uint8_t *req, size_t len, uint8_t *out, size_t cap)
{
    if (len < IN_HEADER || cap < OUT_HEADER + ATTR_OUT_SIZE)
        return 0;
    uint32_t hlen = get32(req), opcode = get32(req + 4);
    uint64_t unique = get64(req + 8), nodeid = get64(req + 16);
    uint32_t uid = get32(req + 24), gid = get32(req + 28);
    if (hlen < IN_HEADER || hlen > len || opcode >= 64)
        return 0;
    const uint8_t *body = req + IN_HEADER;
    size_t blen = hlen - IN_HEADER;
    struct ent *e = NULL, *node = NULL;
    uint64_t attr_sec;
    uint32_t attr_nsec;
    int err = 0;

    pthread_mutex_lock(&t->mu);
    if (!(t->ops >> opcode & 1))
        goto python;
    attr_sec = t->attr_sec;
    attr_nsec = t->attr_nsec;
    /* What the session's `_cached` does before every request: the guest may now
     * cache something of this inode again. */
    node = map_get(&t->inodes, nodeid);
    if (node)
        node->flags &= ~VL_ENT_UNCACHED;
    switch (opcode) {
    case OP_GETATTR: {
        uint32_t gflags = blen >= 16 ? get32(body) : 0;
        uint64_t fh = blen >= 16 ? get64(body + 8) : 0;
        if (!node || (node->flags & VL_ENT_LOST))
            goto python;
        e = (gflags & GETATTR_FH) ? map_get(&t->handles, fh) : NULL;
        if (!e || e->nodeid != nodeid || (e->flags & VL_ENT_LOST))
            e = node;  /* the handle is used only if it is this inode's */
        e->refs++;
        break;
    }
    case OP_STATFS:
        if (!(e = acquire(&t->inodes, nodeid)))
            goto python;
        break;
    case OP_READ:
    case OP_WRITE:
        if (blen < RW_IN || !(e = acquire(&t->handles, get64(body))))
            goto python;
        break;
    default:
        goto python;
    }
    pthread_mutex_unlock(&t->mu);

    int64_t n = 0;
    switch (opcode) {
    case OP_GETATTR: {
        struct stat st;
        if (fstat(e->fd, &st) != 0) {
            n = reply(out, unique, errno, 0);
            break;
        }
        st64(out + OUT_HEADER, attr_sec);
        st32(out + OUT_HEADER + 8, attr_nsec);
        st32(out + OUT_HEADER + 12, 0);
        pack_attr(out + OUT_HEADER + 16, &st);
        n = reply(out, unique, 0, ATTR_OUT_SIZE);
        break;
    }
    case OP_STATFS: {
        struct statvfs s;
        if (fstatvfs(e->fd, &s) != 0) {
            n = reply(out, unique, errno, 0);
            break;
        }
        uint8_t *p = out + OUT_HEADER;
        memset(p, 0, KSTATFS_SIZE);
        st64(p, s.f_blocks);
        st64(p + 8, s.f_bfree);
        st64(p + 16, s.f_bavail);
        st64(p + 24, s.f_files);
        st64(p + 32, s.f_ffree);
        st32(p + 40, (uint32_t)s.f_bsize);
        st32(p + 44, (uint32_t)s.f_namemax);
        st32(p + 48, (uint32_t)s.f_frsize);
        n = reply(out, unique, 0, KSTATFS_SIZE);
        break;
    }
    case OP_READ: {
        uint64_t off = get64(body + 8);
        uint64_t size = get32(body + 16);
        if (off > INT64_MAX) {
            n = 0;  /* Python's answer (EINVAL), from its own checks */
            break;
        }
        if (size > cap - OUT_HEADER)
            size = cap - OUT_HEADER;
        ssize_t got = pread(e->fd, out + OUT_HEADER, size, (off_t)off);
        n = got < 0 ? reply(out, unique, errno, 0) : reply(out, unique, 0, (uint32_t)got);
        break;
    }
    case OP_WRITE: {
        uint64_t off = get64(body + 8);
        uint32_t size = get32(body + 16);
        if (off > INT64_MAX || blen - RW_IN < size) {
            n = 0;
            break;
        }
        ssize_t put = pwrite(e->fd, body + RW_IN, size, (off_t)off);
        if (put < 0) {
            n = reply(out, unique, errno, 0);
            break;
        }
        if (put > 0 && uid != 0 && (err = drop_setid(e->fd, gid)) != 0) {
            n = reply(out, unique, err, 0);
            break;
        }
        st32(out + OUT_HEADER, (uint32_t)put);
        st32(out + OUT_HEADER + 4, 0);
        n = reply(out, unique, 0, 8);
        break;
    }
    }
    release(t, e);
    if (n)
        __atomic_fetch_add(&t->served[opcode], 1, __ATOMIC_RELAXED);
    return n;

python:
    pthread_mutex_unlock(&t->mu);
    return 0;
}

int64_t vl_fuse_serve(vl_tab *t, int fuse_fd, uint8_t *in, size_t incap, uint8_t *out,
                      size_t outcap)
{
    for (;;) {
        ssize_t n = read(fuse_fd, in, incap);
        if (n < 0) {
            if (errno == EINTR || errno == EAGAIN || errno == ENOENT)
                continue;  /* ENOENT: interrupted before we read it */
            return -errno;
        }
        int64_t r = vl_serve(t, in, (size_t)n, out, outcap);
        if (r == 0)
            return n;  /* the session's */
        if (write(fuse_fd, out, (size_t)r) < 0 && errno == ENODEV)
            return -ENODEV;  /* unmounted; ENOENT: interrupted meanwhile */
    }
}

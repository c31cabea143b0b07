/* vl_serve.c: the descriptor table and the native FUSE fast path (see vl_native.h).
 *
 * The table is where a node id or a file handle becomes a host descriptor. The Python
 * file system (fuse_server/passthrough.py) publishes each inode and open handle here
 * once it exists and retires it here when it goes; the descriptors it published are
 * closed here, never by Python, because a request served here may be using one: a
 * retired entry still in use is closed by its last user.
 *
 * vl_serve answers the requests whose work is host calls on known descriptors (GETATTR,
 * STATFS, READ, WRITE, GETXATTR, LOOKUP of a known inode; a directory's OPENDIR, READDIR,
 * READDIRPLUS whose entries are known inodes, RELEASEDIR; UNLINK, RMDIR, RENAME(2) of
 * plain names) when the session allows it (vl_tab_config);
 * anything else, and anything unusual (an unknown id, a short body, a lost file),
 * returns 0 for the Python session to answer: it stays the reference, and this file
 * must produce byte for byte what it would (tests/test_native_serve.py).
 */
#define _GNU_SOURCE
#define _FILE_OFFSET_BITS 64

#include "vl_native.h"

#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <dirent.h>
#include <sys/fanotify.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/xattr.h>
#include <time.h>
#include <linux/limits.h>  /* XATTR_SIZE_MAX */
#include <unistd.h>

enum { OP_LOOKUP = 1, OP_GETATTR = 3, OP_UNLINK = 10, OP_RMDIR = 11, OP_RENAME = 12,
       OP_READ = 15, OP_WRITE = 16, OP_STATFS = 17, OP_RELEASE = 18, OP_GETXATTR = 22,
       OP_OPENDIR = 27, OP_READDIR = 28, OP_RELEASEDIR = 29, OP_READDIRPLUS = 44,
       OP_RENAME2 = 45 };

#define ROOT_ID 1  /* the share's root: always known, never forgotten */
#define IN_HEADER 40
#define OUT_HEADER 16
#define GETATTR_FH 1u
#define ATTR_SIZE 88
#define ATTR_OUT_SIZE (16 + ATTR_SIZE)
#define OPEN_OUT_SIZE 16
#define RELEASE_IN 24   /* fuse_release_in: shorter is EINVAL (lockd/fuse/codec.py) */
#define ENTRY_OUT_SIZE (40 + ATTR_SIZE)
#define DIRENT_SIZE 24  /* fuse_dirent before its name */
#define KSTATFS_SIZE 80
#define RW_IN 40
#define WRITE_KILL_SUIDGID 4u  /* fuse_write_in.write_flags (HANDLE_KILLPRIV_V2) */

struct ent {
    uint64_t id;
    uint64_t nodeid;    /* a handle's inode; an inode's own id */
    uint64_t dev, ino;  /* an inode's host identity */
    int64_t nlookup;    /* an inode's count of the guest's lookups (FORGET subtracts) */
    /* Cache auto (Session.locked_uncached; without notifications Session._first_lock),
     * in CLOCK_MONOTONIC ns: until when the guest may hold what it was given of the inode
     * (a directory: names in it); when its first lock request's grants may answer; the
     * directory it was last named in. VL_ENT_LOCKED/LOCKDIR are the flags. */
    int64_t cached_until, settle_until;
    uint64_t parent;
    uint64_t beneath;   /* a directory's vl_moves count when found below the share */
    struct lbuf *listing;  /* a directory handle's snapshot (vl_tab_set_listing) */
    int32_t fd;
    uint32_t flags;     /* VL_ENT_* */
    uint32_t fmt;       /* an inode's S_IFMT bits */
    uint32_t refs;      /* requests using fd now */
    uint8_t retired;    /* out of the map; the last user frees it */
    uint8_t close_fd;   /* ... and closes fd */
    uint8_t indexed;    /* an inode found by its host identity (the `keys` map) */
};

/* A directory handle's listing as the session packed it (fdtable.pack_entries): shared
 * by the handle and the READDIRs using it, freed by the last. */
struct lbuf {
    uint64_t refs;
    uint64_t serial;    /* which snapshot (the table's count of them) */
    size_t len;
    uint64_t count;
    uint8_t bytes[];
};

static void lbuf_put(struct lbuf *l)
{
    if (l && __atomic_sub_fetch(&l->refs, 1, __ATOMIC_ACQ_REL) == 0)
        free(l);
}

static void ent_free(struct ent *e)
{
    if (e)
        lbuf_put(e->listing);
    free(e);
}

/* Open addressing, linear probing, deletion by backward shift (no tombstones). Keyed
 * by id, or, for `keys`, by (dev, ino). */
struct map {
    struct ent **slot;
    uint64_t cap;       /* a power of 2, or 0 */
    uint64_t n;
    int by_key;
};

/* A name handed out with an entry timeout since the last sweep (invalidate.py): the
 * directory's node id and the name. */
struct name {
    uint64_t parent, hash;
    /* Until when the guest holds the entry it was last given for this name (its entry
     * timeout, CLOCK_MONOTONIC ns; 0: it was given none, or with timeout 0). */
    int64_t until;
    uint32_t len;
    char s[];
};

/* A set of names: open addressing, never deleted from (taken whole by a sweep). */
struct names {
    struct name **slot;
    uint64_t cap, n;
};

struct vl_names {  /* a sweep's names, detached from the table */
    struct name **items;
    uint64_t n;
};

struct vl_tab {
    pthread_mutex_t mu;
    struct map inodes, handles, keys;
    /* Names kept for the next grant's sweep (the invalidator's: fuse_server/invalidate.py
     * documents the rule); `epoch` counts sweeps begun. */
    struct names names;
    uint64_t epoch, max_names;
    int remember, sweeping;
    uint64_t ops;       /* bit k: opcode k may be served here */
    uint64_t attr_sec, entry_sec;
    uint32_t attr_nsec, entry_nsec;
    /* LOOKUP's check that a directory is still below the share (vl_dir_under_root). */
    char top[4096];     /* the share's path as /proc names it, ending in '/' */
    size_t top_len;
    char proc[256];     /* what "/proc/self/fd" is here (procfd.py) */
    /* Caching without notifications: on, and how long what the guest is given may be
     * held (its attribute timeout and a margin), in ns. */
    int tracking;
    int64_t hold_ns;
    /* RELEASEs read and passed to the session, not yet answered (vl_tab_releasing):
     * registered as they are read, before any other request's thread may go on. */
    struct { uint64_t unique, nodeid; int64_t since; } releasing[VL_MAX_RELEASING];
    uint32_t nreleasing;
    /* vl_fuse_serve's reads (vl_tab_order_reads): the uniques read lately, slot
     * unique / 2 mod VL_SEEN, each stored once a RELEASE among them is registered. */
    uint64_t seen[VL_SEEN];
    int order_reads;
    /* GETXATTR (Session.op_getxattr): only the POSIX ACL names pass (no --xattr), and
     * whether INIT granted POSIX_ACL (an ACL name's EOPNOTSUPP is then ENODATA). */
    int acl_names_only, acl;
    uint64_t served[64];  /* requests answered here, by opcode */
    /* WRITE: INIT granted FUSE_HANDLE_KILLPRIV_V2, so the guest's write_flags say
     * whether setuid/setgid go (Session._writer_gid); else uid != 0 does. */
    int killpriv;
    vl_moves *moves;    /* the share's count of directory renames, or NULL */
    uint64_t snapshots; /* directory listings taken (struct lbuf's serial) */
    /* File handle ids, for the session's opens and OPENDIR here alike. */
    uint64_t next_fh;
    /* OPENDIR's fuse_open_out flags (the session's cache mode decides). */
    uint32_t opendir_flags;
    /* What each user of the guest may cost in open handles (Session, "open budget"):
     * uid -> handles charged to it (ent.nlookup; root is never charged), fh -> the uid
     * its handle is charged to (ent.nodeid), the limits, and the users' total. */
    struct map uids, charges;
    uint64_t per_uid, users, charged;
};

static inline uint64_t mix(uint64_t k)
{
    k ^= k >> 33;
    k *= 0xff51afd7ed558ccdULL;
    k ^= k >> 33;
    return k;
}

static inline uint64_t hash_of(const struct map *m, uint64_t a, uint64_t b)
{
    return m->by_key ? mix(a * 0x9e3779b97f4a7c15ULL ^ mix(b)) : mix(a);
}

static inline uint64_t hash_ent(const struct map *m, const struct ent *e)
{
    return m->by_key ? hash_of(m, e->dev, e->ino) : hash_of(m, e->id, 0);
}

static inline int is(const struct map *m, const struct ent *e, uint64_t a, uint64_t b)
{
    return m->by_key ? e->dev == a && e->ino == b : e->id == a;
}

static struct ent *map_find(const struct map *m, uint64_t a, uint64_t b)
{
    if (!m->cap)
        return NULL;
    for (uint64_t i = hash_of(m, a, b) & (m->cap - 1);; i = (i + 1) & (m->cap - 1)) {
        struct ent *e = m->slot[i];
        if (!e || is(m, e, a, b))
            return e;
    }
}

static struct ent *map_get(const struct map *m, uint64_t id)
{
    return map_find(m, id, 0);
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
        uint64_t i = hash_ent(m, e) & (cap - 1);
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
    uint64_t i = hash_ent(m, e) & (m->cap - 1);
    while (m->slot[i]) {
        if (m->by_key ? is(m, m->slot[i], e->dev, e->ino) : m->slot[i]->id == e->id)
            return -EEXIST;
        i = (i + 1) & (m->cap - 1);
    }
    m->slot[i] = e;
    m->n++;
    return 0;
}

static struct ent *map_del(struct map *m, uint64_t a, uint64_t b)
{
    if (!m->cap)
        return NULL;
    uint64_t mask = m->cap - 1, i = hash_of(m, a, b) & mask;
    while (m->slot[i] && !is(m, m->slot[i], a, b))
        i = (i + 1) & mask;
    struct ent *found = m->slot[i];
    if (!found)
        return NULL;
    /* Shift back the entries of the run after i that would be unreachable. */
    for (uint64_t j = (i + 1) & mask; m->slot[j]; j = (j + 1) & mask) {
        uint64_t home = hash_ent(m, m->slot[j]) & mask;
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
    if (t) {
        pthread_mutex_init(&t->mu, NULL);
        t->keys.by_key = 1;
    }
    return t;
}

static void map_free(struct map *m, int entries)
{
    for (uint64_t i = 0; entries && i < m->cap; i++)
        ent_free(m->slot[i]);  /* descriptors are not closed: see vl_tab_free */
    free(m->slot);
}

void vl_tab_free(vl_tab *t)
{
    if (!t)
        return;
    map_free(&t->keys, 0);  /* (its entries are the inodes') */
    for (uint64_t i = 0; i < t->names.cap; i++)
        free(t->names.slot[i]);
    free(t->names.slot);
    map_free(&t->inodes, 1);
    map_free(&t->handles, 1);
    map_free(&t->uids, 1);
    map_free(&t->charges, 1);
    pthread_mutex_destroy(&t->mu);
    free(t);
}

static struct ent *new_ent(uint64_t id, int fd, uint64_t nodeid, uint32_t flags)
{
    struct ent *e = calloc(1, sizeof(*e));
    if (e) {
        e->id = id;
        e->nodeid = nodeid;
        e->fd = fd;
        e->flags = flags;
    }
    return e;
}

int vl_tab_put_inode(vl_tab *t, uint64_t nodeid, int fd, uint64_t dev, uint64_t ino,
                     uint32_t fmt, int64_t nlookup, uint32_t flags)
{
    if (nodeid == 0 || fd < 0)
        return -EINVAL;
    struct ent *e = new_ent(nodeid, fd, nodeid, flags);
    if (!e)
        return -ENOMEM;
    e->dev = dev;
    e->ino = ino;
    e->fmt = fmt;
    e->nlookup = nlookup;
    pthread_mutex_lock(&t->mu);
    int err = map_put(&t->inodes, e);
    /* Indexed unless lost, or another inode has that identity (a migration's load). */
    if (!err && !(flags & VL_ENT_LOST) && !map_find(&t->keys, dev, ino)) {
        err = map_put(&t->keys, e);
        if (err)
            map_del(&t->inodes, nodeid, 0);
        else
            e->indexed = 1;
    }
    pthread_mutex_unlock(&t->mu);
    if (err)
        ent_free(e);
    return err;
}

int vl_tab_put_handle(vl_tab *t, uint64_t fh, int fd, uint64_t nodeid, uint32_t flags)
{
    if (fh == 0 || fd < 0)
        return -EINVAL;
    struct ent *e = new_ent(fh, fd, nodeid, flags);
    if (!e)
        return -ENOMEM;
    pthread_mutex_lock(&t->mu);
    int err = map_put(&t->handles, e);
    pthread_mutex_unlock(&t->mu);
    if (err)
        ent_free(e);
    return err;
}

static struct lbuf *lbuf_new(const uint8_t *packed, size_t len, uint64_t count)
{
    struct lbuf *l = malloc(sizeof(*l) + len);
    if (l) {
        l->refs = 1;
        l->len = len;
        l->count = count;
        memcpy(l->bytes, packed, len);
    }
    return l;
}

/* Under the mutex: directory handle e's snapshot is now l (taken by the caller); its
 * serial, or -ENOENT (l is freed). */
static int64_t set_listing_locked(vl_tab *t, struct ent *e, struct lbuf *l)
{
    if (!e || !(e->flags & VL_ENT_DIR)) {
        free(l);
        return -ENOENT;
    }
    struct lbuf *old = e->listing;
    l->serial = ++t->snapshots;
    e->listing = l;
    lbuf_put(old);  /* (a READDIR using it holds its own reference) */
    return (int64_t)l->serial;
}

int64_t vl_tab_set_listing(vl_tab *t, uint64_t fh, const uint8_t *packed, size_t len,
                           uint64_t count)
{
    struct lbuf *l = lbuf_new(packed, len, count);
    if (!l)
        return -ENOMEM;
    pthread_mutex_lock(&t->mu);
    int64_t r = set_listing_locked(t, map_get(&t->handles, fh), l);
    pthread_mutex_unlock(&t->mu);
    return r;
}

int64_t vl_tab_listing(vl_tab *t, uint64_t fh, uint64_t have, uint8_t **out, size_t *len,
                       uint64_t *count)
{
    *out = NULL;
    pthread_mutex_lock(&t->mu);
    struct ent *e = map_get(&t->handles, fh);
    struct lbuf *l = e ? e->listing : NULL;
    int64_t r = !e ? -ENOENT : l ? (int64_t)l->serial : 0;
    if (l && l->serial != have) {
        *out = malloc(l->len ? l->len : 1);
        if (*out) {
            memcpy(*out, l->bytes, l->len);
            *len = l->len;
            *count = l->count;
        } else {
            r = -ENOMEM;
        }
    }
    pthread_mutex_unlock(&t->mu);
    return r;
}

/* Under the mutex: the inode is no longer found by its identity. */
static void unindex(vl_tab *t, struct ent *e)
{
    if (e->indexed) {
        map_del(&t->keys, e->dev, e->ino);
        e->indexed = 0;
    }
}

uint64_t vl_tab_ref_key(vl_tab *t, uint64_t dev, uint64_t ino)
{
    uint64_t id = 0;
    pthread_mutex_lock(&t->mu);
    struct ent *e = map_find(&t->keys, dev, ino);
    if (e) {
        e->nlookup++;
        id = e->id;
    }
    pthread_mutex_unlock(&t->mu);
    return id;
}

int64_t vl_tab_ref(vl_tab *t, uint64_t nodeid, int64_t delta)
{
    pthread_mutex_lock(&t->mu);
    struct ent *e = map_get(&t->inodes, nodeid);
    int64_t n = -ENOENT;
    if (e) {
        e->nlookup += delta;
        if (e->nlookup <= 0) {
            e->nlookup = 0;
            if (nodeid != ROOT_ID)  /* the share's root is never forgotten */
                unindex(t, e);  /* forgotten: a lookup makes a new inode */
        }
        n = e->nlookup;
    }
    pthread_mutex_unlock(&t->mu);
    return n;
}

/* ---- the open budget (the Session's: its docstring has the rule) ---- */

/* Under the mutex: one more handle for uid, or -EMFILE (its own limit) / -ENFILE (all
 * users' together); `force`: counted whatever the limits (a migration's load). */
static int budget_take_locked(vl_tab *t, uint32_t uid, int force)
{
    if (uid == 0)
        return 0;
    struct ent *u = map_get(&t->uids, uid);
    int64_t n = u ? u->nlookup : 0;
    if (!force && t->per_uid && (uint64_t)n >= t->per_uid)
        return -EMFILE;
    if (!force && t->users && t->charged >= t->users)
        return -ENFILE;
    if (!u) {
        if (!(u = new_ent(uid, 0, 0, 0)))
            return -ENOMEM;
        if (map_put(&t->uids, u)) {
            ent_free(u);
            return -ENOMEM;
        }
    }
    u->nlookup++;
    t->charged++;
    return 0;
}

static void budget_give_locked(vl_tab *t, uint32_t uid)
{
    struct ent *u = uid ? map_get(&t->uids, uid) : NULL;
    if (!u)
        return;
    t->charged--;
    if (--u->nlookup <= 0)
        ent_free(map_del(&t->uids, uid, 0));
}

void vl_tab_budget_config(vl_tab *t, uint64_t per_uid, uint64_t users)
{
    pthread_mutex_lock(&t->mu);
    t->per_uid = per_uid;
    t->users = users;
    pthread_mutex_unlock(&t->mu);
}

int vl_tab_budget_take(vl_tab *t, uint32_t uid, int force)
{
    pthread_mutex_lock(&t->mu);
    int r = budget_take_locked(t, uid, force);
    pthread_mutex_unlock(&t->mu);
    return r;
}

void vl_tab_budget_give(vl_tab *t, uint32_t uid)
{
    pthread_mutex_lock(&t->mu);
    budget_give_locked(t, uid);
    pthread_mutex_unlock(&t->mu);
}

/* Under the mutex: handle fh holds one of uid's (taken already). */
static int charge_locked(vl_tab *t, uint64_t fh, uint32_t uid)
{
    if (uid == 0)
        return 0;
    struct ent *c = new_ent(fh, 0, uid, 0);
    if (!c)
        return -ENOMEM;
    int err = map_put(&t->charges, c);
    if (err)
        ent_free(c);
    return err;
}

int vl_tab_charge(vl_tab *t, uint64_t fh, uint32_t uid)
{
    pthread_mutex_lock(&t->mu);
    int r = charge_locked(t, fh, uid);
    pthread_mutex_unlock(&t->mu);
    return r;
}

uint64_t vl_tab_charges(vl_tab *t, uint64_t *fhs, uint32_t *uids, uint64_t max)
{
    uint64_t n = 0;
    pthread_mutex_lock(&t->mu);
    for (uint64_t i = 0; i < t->charges.cap; i++) {
        struct ent *c = t->charges.slot[i];
        if (c && n < max) {
            fhs[n] = c->id;
            uids[n] = (uint32_t)c->nodeid;
        }
        n += c != NULL;
    }
    pthread_mutex_unlock(&t->mu);
    return n;
}

uint64_t vl_tab_new_fh(vl_tab *t)
{
    pthread_mutex_lock(&t->mu);
    uint64_t fh = ++t->next_fh;
    pthread_mutex_unlock(&t->mu);
    return fh;
}

void vl_tab_set_next_fh(vl_tab *t, uint64_t fh)
{
    pthread_mutex_lock(&t->mu);
    if (fh > t->next_fh + 1)
        t->next_fh = fh - 1;
    pthread_mutex_unlock(&t->mu);
}

void vl_tab_opendir_config(vl_tab *t, uint32_t open_flags)
{
    pthread_mutex_lock(&t->mu);
    t->opendir_flags = open_flags;
    pthread_mutex_unlock(&t->mu);
}

int vl_tab_adopt(vl_tab *t, uint64_t fh, vl_tab_entry *out)
{
    pthread_mutex_lock(&t->mu);
    struct ent *e = map_get(&t->handles, fh);
    int r = !e ? -ENOENT : (e->flags & VL_ENT_NATIVE) != 0;
    if (r == 1) {
        e->flags &= ~VL_ENT_NATIVE;
        out->fd = e->fd;
        out->nodeid = e->nodeid;
        out->flags = e->flags;
    }
    pthread_mutex_unlock(&t->mu);
    return r;
}

uint64_t vl_tab_native_handles(vl_tab *t, uint64_t *fhs, uint64_t max)
{
    uint64_t n = 0;
    pthread_mutex_lock(&t->mu);
    for (uint64_t i = 0; i < t->handles.cap; i++) {
        struct ent *e = t->handles.slot[i];
        if (e && (e->flags & VL_ENT_NATIVE)) {
            if (n < max)
                fhs[n] = e->id;
            n++;
        }
    }
    pthread_mutex_unlock(&t->mu);
    return n;
}

static int drop(vl_tab *t, struct map *m, uint64_t id, int close_fd)
{
    int fd = -1;
    pthread_mutex_lock(&t->mu);
    struct ent *e = map_del(m, id, 0);
    if (!e) {
        pthread_mutex_unlock(&t->mu);
        return -ENOENT;
    }
    unindex(t, e);
    if (m == &t->handles) {  /* a released handle gives its user's charge back */
        struct ent *c = map_del(&t->charges, id, 0);
        if (c)
            budget_give_locked(t, (uint32_t)c->nodeid);
        ent_free(c);
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
    ent_free(e);  /* (NULL when its last user frees it) */
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
        out->nlookup = e->nlookup;
        out->indexed = e->indexed;
        out->parent = e->parent;
        out->cached_until = e->cached_until;
        out->settle_until = e->settle_until;
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

void vl_tab_config(vl_tab *t, uint64_t ops, uint64_t attr_sec, uint32_t attr_nsec,
                   uint64_t entry_sec, uint32_t entry_nsec)
{
    pthread_mutex_lock(&t->mu);
    t->ops = ops;
    t->attr_sec = attr_sec;
    t->attr_nsec = attr_nsec;
    t->entry_sec = entry_sec;
    t->entry_nsec = entry_nsec;
    pthread_mutex_unlock(&t->mu);
}

void vl_tab_xattr_config(vl_tab *t, int acl_names_only, int acl)
{
    pthread_mutex_lock(&t->mu);
    t->acl_names_only = acl_names_only != 0;
    t->acl = acl != 0;
    pthread_mutex_unlock(&t->mu);
}

void vl_tab_killpriv_config(vl_tab *t, int on)
{
    pthread_mutex_lock(&t->mu);
    t->killpriv = on != 0;
    pthread_mutex_unlock(&t->mu);
}

/* ------------------------------- directories known below the share (vl_moves) */

struct vl_moves {
    pthread_mutex_t mu;
    int fd;             /* fanotify, non-blocking; -1 once broken */
    uint64_t count;     /* from 1; bumped by every directory moved on the filesystem */
};

/* Filesystems whose every rename is made by this kernel (so fanotify sees it): not a
 * network or cluster filesystem, not FUSE, not overlayfs (its layers change beneath). */
static int local_fs(long type)
{
    switch ((unsigned long)type) {
    case 0xEF53:        /* ext2/3/4 */
    case 0x58465342:    /* xfs */
    case 0x9123683E:    /* btrfs */
    case 0x01021994:    /* tmpfs */
    case 0xF2F52010:    /* f2fs */
        return 1;
    }
    return 0;
}

vl_moves *vl_moves_new(int root_fd, int *err)
{
    struct statfs sf;
    vl_moves *m;
    int fd;

    if (fstatfs(root_fd, &sf) != 0) {
        *err = errno;
        return NULL;
    }
    if (!local_fs(sf.f_type)) {
        *err = EOPNOTSUPP;
        return NULL;
    }
    /* FID reporting: what lets a group take directory-entry events (FAN_MOVED_FROM). */
    fd = fanotify_init(FAN_CLASS_NOTIF | FAN_CLOEXEC | FAN_NONBLOCK | FAN_REPORT_FID,
                       O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        *err = errno;
        return NULL;
    }
    /* The whole filesystem: a rename of any ancestor, wherever it is made from. */
    if (fanotify_mark(fd, FAN_MARK_ADD | FAN_MARK_FILESYSTEM, FAN_MOVED_FROM | FAN_ONDIR,
                      root_fd, ".") != 0) {
        *err = errno;
        close(fd);
        return NULL;
    }
    m = calloc(1, sizeof(*m));
    if (!m) {
        *err = ENOMEM;
        close(fd);
        return NULL;
    }
    pthread_mutex_init(&m->mu, NULL);
    m->fd = fd;
    m->count = 1;
    return m;
}

/* The events are queued by the rename itself, before it returns: a directory moved
 * before this read is counted here. Files' moves (FAN_ONDIR not set) change nothing. */
uint64_t vl_moves_count(vl_moves *m)
{
    union {
        struct fanotify_event_metadata meta;
        char bytes[4096];
    } buf;
    uint64_t count;

    if (!m)
        return 0;
    pthread_mutex_lock(&m->mu);
    while (m->fd >= 0) {
        ssize_t n = read(m->fd, buf.bytes, sizeof(buf.bytes));
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN)
            break;
        if (n <= 0) {  /* broken: checked every time from now on */
            close(m->fd);
            m->fd = -1;
            break;
        }
        for (ssize_t off = 0; off < n;) {
            struct fanotify_event_metadata ev;
            if ((size_t)(n - off) < sizeof(ev)) {
                m->count++;
                break;
            }
            memcpy(&ev, buf.bytes + off, sizeof(ev));
            if (ev.event_len < sizeof(ev) || ev.event_len > (size_t)(n - off)) {
                m->count++;
                break;
            }
            if (ev.mask & (FAN_ONDIR | FAN_Q_OVERFLOW))
                m->count++;
            if (ev.fd >= 0)
                close(ev.fd);  /* (FID groups report none) */
            off += ev.event_len;
        }
    }
    count = m->fd >= 0 ? m->count : 0;
    pthread_mutex_unlock(&m->mu);
    return count;
}

void vl_tab_set_moves(vl_tab *t, vl_moves *m)
{
    pthread_mutex_lock(&t->mu);
    t->moves = m;
    pthread_mutex_unlock(&t->mu);
}

/* Under t->mu (lock order: t->mu, then the count's). */
static int beneath_locked(vl_tab *t, const struct ent *dir, uint64_t *count)
{
    *count = vl_moves_count(t->moves);
    return *count && dir->beneath == *count;
}

int vl_tab_beneath(vl_tab *t, uint64_t nodeid, uint64_t *count)
{
    pthread_mutex_lock(&t->mu);
    struct ent *e = map_get(&t->inodes, nodeid);
    int r = 0;
    if (e && !(e->flags & VL_ENT_LOST))
        r = beneath_locked(t, e, count);
    else
        *count = 0;
    pthread_mutex_unlock(&t->mu);
    return r;
}

void vl_tab_beneath_seen(vl_tab *t, uint64_t nodeid, uint64_t count)
{
    pthread_mutex_lock(&t->mu);
    struct ent *e = map_get(&t->inodes, nodeid);
    if (e && count)
        e->beneath = count;
    pthread_mutex_unlock(&t->mu);
}

int vl_tab_set_share(vl_tab *t, const char *top, size_t top_len, const char *proc)
{
    size_t plen = strlen(proc);
    if (top_len == 0 || top_len >= sizeof(t->top) || plen >= sizeof(t->proc))
        return -ENAMETOOLONG;
    pthread_mutex_lock(&t->mu);
    memcpy(t->top, top, top_len);
    t->top[top_len] = 0;
    t->top_len = top_len;
    memcpy(t->proc, proc, plen + 1);
    pthread_mutex_unlock(&t->mu);
    return 0;
}

/* ------------------- a locked file's attributes uncached (tracking, cache auto) */

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

void vl_tab_tracking(vl_tab *t, int mode, int64_t hold_ns)
{
    pthread_mutex_lock(&t->mu);
    t->tracking = mode;
    t->hold_ns = hold_ns;
    pthread_mutex_unlock(&t->mu);
}

/* Under the mutex: an attribute reply's deadline is set, then the flag read (the order
 * Session._first_lock relies on). 1: the inode is locked (timeout 0). */
static int attr_time_locked(vl_tab *t, struct ent *e, int64_t now)
{
    e->cached_until = now + t->hold_ns;
    return (e->flags & VL_ENT_LOCKED) != 0;
}

/* Under the mutex: an entry reply's (Session._uncached_times): bit 1 the inode is
 * locked (timeouts 0), bit 2 its directory holds a locked file (entry timeout 0; only
 * in mode 2: with notifications a grant's sweep expires the names). */
static int entry_times_locked(vl_tab *t, struct ent *dir, struct ent *e, int64_t now)
{
    int64_t until = now + t->hold_ns;
    e->cached_until = until;
    e->parent = dir ? dir->id : e->parent;
    if (dir)
        dir->cached_until = until;  /* the name, cached in the directory */
    return ((e->flags & VL_ENT_LOCKED) ? 1 : 0) |
           (t->tracking > 1 && dir && (dir->flags & VL_ENT_LOCKDIR) ? 2 : 0);
}

int vl_tab_attr_time(vl_tab *t, uint64_t nodeid, int64_t now)
{
    pthread_mutex_lock(&t->mu);
    struct ent *e = map_get(&t->inodes, nodeid);
    int r = e ? attr_time_locked(t, e, now) : -ENOENT;
    pthread_mutex_unlock(&t->mu);
    return r;
}

int vl_tab_entry_times(vl_tab *t, uint64_t parent, uint64_t nodeid, int64_t now)
{
    pthread_mutex_lock(&t->mu);
    struct ent *e = map_get(&t->inodes, nodeid);
    int r = e ? entry_times_locked(t, map_get(&t->inodes, parent), e, now) : -ENOENT;
    if (e && !map_get(&t->inodes, parent))
        e->parent = parent;
    pthread_mutex_unlock(&t->mu);
    return r;
}

int64_t vl_tab_first_lock(vl_tab *t, uint64_t nodeid, int64_t now, int64_t late_ns)
{
    pthread_mutex_lock(&t->mu);
    struct ent *e = map_get(&t->inodes, nodeid);
    int64_t settle = -ENOENT;
    if (e) {
        if (!(e->flags & VL_ENT_LOCKED)) {
            /* The flag first, then the deadlines: a reply racing this either sees the
             * flag or leaves a deadline that is waited for. */
            e->flags |= VL_ENT_LOCKED;
            struct ent *p = e->parent ? map_get(&t->inodes, e->parent) : NULL;
            if (p)
                p->flags |= VL_ENT_LOCKDIR;
            e->settle_until = e->cached_until;
            if (p && p->cached_until > e->settle_until)
                e->settle_until = p->cached_until;
            /* A guest dates a timeout from when it applies a reply, which can be long
             * after we sent it: whatever it applied before sending this request runs
             * out within a timeout of its arrival. */
            if (e->settle_until + late_ns > now && now + t->hold_ns > e->settle_until)
                e->settle_until = now + t->hold_ns;
        }
        settle = e->settle_until;
    }
    pthread_mutex_unlock(&t->mu);
    return settle;
}

int vl_tab_set_tracked(vl_tab *t, uint64_t nodeid, uint64_t parent, uint32_t flags,
                       int64_t cached_until)
{
    pthread_mutex_lock(&t->mu);
    struct ent *e = map_get(&t->inodes, nodeid);
    if (e) {
        e->parent = parent;
        e->flags |= flags & (VL_ENT_LOCKED | VL_ENT_LOCKDIR);
        e->cached_until = cached_until;
    }
    pthread_mutex_unlock(&t->mu);
    return e ? 0 : -ENOENT;
}

/* ------------------------------------------------ names for the sweeps */

static uint64_t name_hash(uint64_t parent, const char *s, uint32_t len)
{
    uint64_t h = 0xcbf29ce484222325ULL;  /* FNV-1a */
    for (uint32_t i = 0; i < len; i++)
        h = (h ^ (uint8_t)s[i]) * 0x100000001b3ULL;
    return mix(h ^ mix(parent));
}

/* Under the mutex: (parent, s)'s slot in m, or NULL. */
static struct name *names_find(const struct names *m, uint64_t parent, const char *s,
                               uint32_t len)
{
    if (!m->cap)
        return NULL;
    uint64_t h = name_hash(parent, s, len);
    for (uint64_t i = h & (m->cap - 1); m->slot[i]; i = (i + 1) & (m->cap - 1)) {
        struct name *x = m->slot[i];
        if (x->hash == h && x->parent == parent && x->len == len && !memcmp(x->s, s, len))
            return x;
    }
    return NULL;
}

/* Under the mutex: add (parent, s) unless there; its record, or NULL (no memory). */
static struct name *names_add(struct names *m, uint64_t parent, const char *s, uint32_t len)
{
    struct name *x = names_find(m, parent, s, len);
    if (x)
        return x;
    uint64_t h = name_hash(parent, s, len);
    if ((m->n + 1) * 4 > m->cap * 3) {
        uint64_t cap = m->cap ? m->cap * 2 : 256;
        struct name **slot = calloc(cap, sizeof(*slot));
        if (!slot)
            return NULL;
        for (uint64_t j = 0; j < m->cap; j++) {
            if (!m->slot[j])
                continue;
            uint64_t i = m->slot[j]->hash & (cap - 1);
            while (slot[i])
                i = (i + 1) & (cap - 1);
            slot[i] = m->slot[j];
        }
        free(m->slot);
        m->slot = slot;
        m->cap = cap;
    }
    uint64_t i = h & (m->cap - 1);
    while (m->slot[i])
        i = (i + 1) & (m->cap - 1);
    x = malloc(sizeof(*x) + len);
    if (!x)
        return NULL;
    x->parent = parent;
    x->hash = h;
    x->until = 0;
    x->len = len;
    memcpy(x->s, s, len);
    m->slot[i] = x;
    m->n++;
    return x;
}

void vl_tab_names_config(vl_tab *t, int remember, uint64_t max_names)
{
    pthread_mutex_lock(&t->mu);
    t->remember = remember != 0;
    t->max_names = max_names;
    pthread_mutex_unlock(&t->mu);
}

uint64_t vl_tab_names_epoch(vl_tab *t)
{
    pthread_mutex_lock(&t->mu);
    uint64_t e = t->epoch;
    pthread_mutex_unlock(&t->mu);
    return e;
}

/* Under the mutex: invalidate.py's `named`. 0: not to be cached (a sweep began since
 * `since`), 1: remembered, 2: remembered and the set is full (sweep it now); `*rec` the
 * record when remembered (its `until` is the caller's to set). */
static int names_named(vl_tab *t, uint64_t parent, const char *s, uint32_t len, uint64_t since,
                       struct name **rec)
{
    *rec = NULL;
    if (since != t->epoch)
        return 0;
    if (!(*rec = names_add(&t->names, parent, s, len)))
        return 0;  /* (no memory: not cached, as if swept) */
    if (t->names.n >= t->max_names && !t->sweeping) {
        t->sweeping = 1;
        return 2;
    }
    return 1;
}

int vl_tab_names_add(vl_tab *t, uint64_t parent, const char *s, uint32_t len, uint64_t since,
                     int64_t until)
{
    struct name *rec;
    pthread_mutex_lock(&t->mu);
    int r = names_named(t, parent, s, len, since, &rec);
    if (rec)
        rec->until = until;
    pthread_mutex_unlock(&t->mu);
    return r;
}

/* Under the mutex: was (parent, s) given to the guest since the last sweep with an entry
 * that it still holds at `now`? Only names are remembered when there are sweeps. */
static int names_held(vl_tab *t, uint64_t parent, const char *s, uint32_t len, int64_t now)
{
    struct name *x = t->remember ? names_find(&t->names, parent, s, len) : NULL;
    return x && x->until > now;
}

int vl_tab_names_held(vl_tab *t, uint64_t parent, const char *s, uint32_t len, int64_t now)
{
    pthread_mutex_lock(&t->mu);
    int r = names_held(t, parent, s, len, now);
    pthread_mutex_unlock(&t->mu);
    return r;
}

int vl_tab_names_needed(vl_tab *t, uint64_t nodeid)
{
    pthread_mutex_lock(&t->mu);
    struct ent *e = map_get(&t->inodes, nodeid);
    int needed = !e || !(e->flags & VL_ENT_UNCACHED) || t->names.n;
    if (!needed)
        t->epoch++;  /* a grant with nothing to sweep still begins an epoch */
    pthread_mutex_unlock(&t->mu);
    return needed;
}

vl_names *vl_tab_names_take(vl_tab *t)
{
    vl_names *out = calloc(1, sizeof(*out));
    pthread_mutex_lock(&t->mu);
    struct names m = t->names;
    t->epoch++;
    t->sweeping = 0;
    if (out)
        memset(&t->names, 0, sizeof(t->names));
    pthread_mutex_unlock(&t->mu);
    if (!out)
        return NULL;  /* (the names stay: the next sweep takes them) */
    out->items = m.slot;
    for (uint64_t i = 0; i < m.cap; i++)  /* compact in place */
        if (m.slot[i])
            m.slot[out->n++] = m.slot[i];
    return out;
}

uint64_t vl_names_count(const vl_names *ns)
{
    return ns ? ns->n : 0;
}

int vl_names_get(const vl_names *ns, uint64_t i, uint64_t *parent, const char **s)
{
    if (!ns || i >= ns->n)
        return -ENOENT;
    *parent = ns->items[i]->parent;
    *s = ns->items[i]->s;
    return (int)ns->items[i]->len;
}

void vl_names_free(vl_names *ns)
{
    if (!ns)
        return;
    for (uint64_t i = 0; i < ns->n; i++)
        free(ns->items[i]);
    free(ns->items);
    free(ns);
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
        ent_free(e);
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

/* Passthrough.drop_setid: a write by a caller without CAP_FSETID clears setuid, and
 * setgid where group execute is set or the writer is not in the file's group. */
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

/* Is directory `dir` (held by the caller) still below the share? Passthrough._inside:
 * the verdict kept since the last directory move (vl_moves), else vl_dir_under_root
 * with the share's path as last seen. 1 yes; 0 not known here: the share's own path
 * may have changed, so the session checks again (and tells us). */
static int dir_below(vl_tab *t, struct ent *dir)
{
    char link[300], top[sizeof(t->top)];
    uint64_t moves = 0;
    pthread_mutex_lock(&t->mu);
    struct ent *root = map_get(&t->inodes, ROOT_ID);
    if (dir->id == ROOT_ID || beneath_locked(t, dir, &moves)) {
        pthread_mutex_unlock(&t->mu);
        return 1;
    }
    if (!root || !t->top_len) {
        pthread_mutex_unlock(&t->mu);
        return 0;
    }
    root->refs++;
    snprintf(link, sizeof(link), "%s/%d", t->proc, dir->fd);
    size_t top_len = t->top_len;
    memcpy(top, t->top, top_len + 1);
    pthread_mutex_unlock(&t->mu);

    int below = vl_dir_under_root(link, root->fd, top, top_len, dir->dev, dir->ino);
    if (below == 2 && moves) {
        pthread_mutex_lock(&t->mu);
        dir->beneath = moves;
        pthread_mutex_unlock(&t->mu);
    }
    release(t, root);
    return below >= 1;
}

/* A plain name (not '.' or '..', no '/', 1..255 bytes) in directory `nodeid` still below
 * the share, found to be an inode the guest knows already: its fuse_entry_out into
 * `entry` (ENTRY_OUT_SIZE bytes) and 1, as Passthrough.lookup and Session._entry make
 * it, with the names epoch `*since` (NULL: read now, before the host is). `checked`:
 * the caller found the directory below the share for this request (READDIRPLUS checks
 * once, not per entry). -errno when the host says so (openat, fstat). 0 for anything
 * the Python side must decide: a new inode, a directory it must check itself, a full
 * set of names. */
static int lookup_entry(vl_tab *t, uint64_t nodeid, const char *name, size_t nlen,
                        const uint64_t *since_in, int checked, uint8_t *entry)
{
    char cname[256];
    uint64_t esec, asec, since;
    uint32_t ensec, ansec;

    pthread_mutex_lock(&t->mu);
    since = since_in ? *since_in : t->epoch;  /* before the host is read (invalidate.py) */
    struct ent *dir = map_get(&t->inodes, nodeid);
    if (!dir || (dir->flags & VL_ENT_LOST) || !t->top_len ||
        (dir->id != ROOT_ID && dir->fmt != S_IFDIR)) {
        pthread_mutex_unlock(&t->mu);
        return 0;
    }
    dir->flags &= ~VL_ENT_UNCACHED;
    dir->refs++;
    esec = t->entry_sec, ensec = t->entry_nsec, asec = t->attr_sec, ansec = t->attr_nsec;
    pthread_mutex_unlock(&t->mu);

    int r = 0;
    struct stat st;
    if (!checked && !dir_below(t, dir))
        goto done;
    memcpy(cname, name, nlen);
    cname[nlen] = 0;
    /* Only its identity and attributes: one fstatat, no descriptor (the inode's own is
     * the table's), as an O_PATH|O_NOFOLLOW open would find it (no automount either). */
    if (fstatat(dir->fd, cname, &st, AT_SYMLINK_NOFOLLOW | AT_NO_AUTOMOUNT) != 0) {
        r = -errno;
        goto done;
    }
    uint64_t id = 0;
    int64_t now = now_ns();
    struct name *rec = NULL;
    pthread_mutex_lock(&t->mu);
    struct ent *e = map_find(&t->keys, st.st_dev, st.st_ino);
    int fresh = 1;
    if (e && t->remember) {
        /* A full set is the session's to sweep: it asks its invalidator's thread. */
        fresh = t->names.n >= t->max_names
            ? -1 : names_named(t, dir->id, cname, nlen, since, &rec);
        if (fresh == 0)
            esec = ensec = asec = ansec = 0;  /* a sweep began since the host was read */
    }
    if (e && fresh >= 0) {
        e->nlookup++;
        e->flags &= ~VL_ENT_UNCACHED;
        id = e->id;
        if (t->tracking) {
            int r = entry_times_locked(t, dir, e, now);
            if (r & 1)
                esec = ensec = asec = ansec = 0;
            else if (r & 2)
                esec = ensec = 0;
        }
        if (rec)
            rec->until = esec || ensec ? now + (int64_t)esec * 1000000000 + ensec : 0;
    }
    pthread_mutex_unlock(&t->mu);
    if (!id)
        goto done;  /* a new inode: the session makes it */
    st64(entry, id);
    st64(entry + 8, 0);  /* generation */
    st64(entry + 16, esec);
    st64(entry + 24, asec);
    st32(entry + 32, ensec);
    st32(entry + 36, ansec);
    pack_attr(entry + 40, &st);
    r = 1;
done:
    release(t, dir);
    return r;
}

static int plain_name(const char *s, size_t n)
{
    return n > 0 && n <= 255 && !memchr(s, '/', n) && !memchr(s, 0, n) &&
           !(n == 1 && s[0] == '.') && !(n == 2 && s[0] == '.' && s[1] == '.');
}

/* LOOKUP (Session.op_lookup): lookup_entry's answer as a reply. */
static int64_t serve_lookup(vl_tab *t, uint64_t unique, uint64_t nodeid, const uint8_t *body,
                            size_t blen, uint8_t *out)
{
    const uint8_t *nul = memchr(body, 0, blen);
    if (!nul || !plain_name((const char *)body, (size_t)(nul - body)))
        return 0;
    int r = lookup_entry(t, nodeid, (const char *)body, (size_t)(nul - body), NULL, 0,
                         out + OUT_HEADER);
    if (r == 0)
        return 0;
    return r < 0 ? reply(out, unique, -r, 0) : reply(out, unique, 0, ENTRY_OUT_SIZE);
}

/* A packed listing's record (vl_dir_list writes them, fdtable.pack_entries in Python):
 * u64 ino, u32 d_type, u32 name length, then the name. */
struct record {
    uint64_t ino;
    uint32_t type, nlen;
    const char *name;
};

/* The record at *at, and *at past it: 1; 0 with fewer than a record header left (the
 * caller tells the end from a truncated tail); -EINVAL when its name runs past the end. */
static int read_record(const uint8_t *ents, size_t len, size_t *at, struct record *rec)
{
    if (*at + 16 > len)
        return 0;
    rec->ino = get64(ents + *at);
    rec->type = get32(ents + *at + 8);
    rec->nlen = get32(ents + *at + 12);
    if (rec->nlen > len - *at - 16)
        return -EINVAL;
    rec->name = (const char *)ents + *at + 16;
    *at += 16 + (size_t)rec->nlen;
    return 1;
}

/* One fuse_dirent (its `off`: the next entry's index), zero-padded to `size` bytes. */
static void put_dirent(uint8_t *d, uint64_t ino, uint64_t off, uint32_t type,
                       const void *name, uint32_t nlen, size_t size)
{
    st64(d, ino);
    st64(d + 8, off);
    st32(d + 16, nlen);
    st32(d + 20, type);
    memcpy(d + DIRENT_SIZE, name, nlen);
    memset(d + DIRENT_SIZE + nlen, 0, size - DIRENT_SIZE - nlen);
}

/* READDIRPLUS's entries (Session._readdir) from index `first` of a listing packed once
 * per snapshot (vl_dir_list; `struct record`). Each entry is a fuse_entry_out (zeros
 * for '.' and '..' and for a name the guest still holds as it was given since the last
 * sweep (names_held): the kernel then links nothing and keeps what it has, which spares
 * a host lookup and the kernel's refresh per entry; else what LOOKUP would answer:
 * lookup_entry) and a fuse_dirent at offset index + 1, as the session
 * builds them, while they fit in `limit` bytes. Stops before an entry the session must
 * look up itself (a new inode), skips one the host no longer finds; `*next` is the
 * index to go on from. Returns the bytes written to `out`, or -EINVAL (a bad listing). */
static int64_t direntplus(vl_tab *t, uint64_t parent, const uint8_t *ents, size_t ents_len,
                          uint64_t first, uint64_t since, int checked, uint8_t *out,
                          size_t limit, uint64_t *next, int *stopped)
{
    size_t at = 0, total = 0;
    uint64_t i = 0;

    *next = first;
    *stopped = 1;
    pthread_mutex_lock(&t->mu);
    int on = t->ops >> OP_LOOKUP & 1;
    pthread_mutex_unlock(&t->mu);
    if (!on)
        return 0;
    *stopped = 0;
    struct record rec;
    int got;
    int64_t now = now_ns();
    for (; (got = read_record(ents, ents_len, &at, &rec)) > 0; i++) {
        uint64_t ino = rec.ino;
        uint32_t type = rec.type, nlen = rec.nlen;
        const char *name = rec.name;
        if (i < first)
            continue;
        size_t size = (ENTRY_OUT_SIZE + DIRENT_SIZE + nlen + 7) & ~(size_t)7;
        if (total + size > limit)
            break;
        uint8_t *p = out + total;
        int dots = (nlen == 1 && name[0] == '.') || (nlen == 2 && name[0] == '.' && name[1] == '.');
        if (dots || (plain_name(name, nlen) &&
                     vl_tab_names_held(t, parent, name, nlen, now))) {
            memset(p, 0, ENTRY_OUT_SIZE);  /* nodeid 0: the kernel links nothing */
        } else {
            int r = plain_name(name, nlen)
                ? lookup_entry(t, parent, name, nlen, &since, checked, p) : 0;
            if (r == 0) {
                *stopped = 1;  /* the session's */
                break;
            }
            if (r < 0) {
                *next = i + 1;  /* gone since the snapshot */
                continue;
            }
            ino = get64(p + ENTRY_OUT_SIZE - ATTR_SIZE);  /* the attr's */
            __atomic_fetch_add(&t->served[OP_READDIRPLUS], 1, __ATOMIC_RELAXED);
        }
        put_dirent(p + ENTRY_OUT_SIZE, ino, i + 1, type, name, nlen, size - ENTRY_OUT_SIZE);
        total += size;
        *next = i + 1;
    }
    if (got < 0 || (at + 16 > ents_len && at != ents_len))
        return -EINVAL;  /* a name past the end, or ended in a truncated record */
    return (int64_t)total;
}

int64_t vl_tab_direntplus(vl_tab *t, uint64_t parent, const uint8_t *ents, size_t ents_len,
                          uint64_t first, uint64_t since, int checked, uint8_t *out,
                          size_t limit, uint64_t *next)
{
    int stopped;
    return direntplus(t, parent, ents, ents_len, first, since, checked, out, limit, next,
                      &stopped);
}

/* direntplus's `len` bytes of entries not sent after all: the lookups they counted given
 * back (as if the kernel had forgotten them at once), and their count in `served`. */
static void direntplus_undo(vl_tab *t, const uint8_t *p, size_t len)
{
    for (size_t at = 0; at + ENTRY_OUT_SIZE + DIRENT_SIZE <= len;) {
        uint64_t id = get64(p + at);
        uint32_t nlen = get32(p + at + ENTRY_OUT_SIZE + 16);
        if (id) {
            vl_tab_ref(t, id, -1);
            __atomic_fetch_sub(&t->served[OP_READDIRPLUS], 1, __ATOMIC_RELAXED);
        }
        at += (ENTRY_OUT_SIZE + DIRENT_SIZE + nlen + 7) & ~(size_t)7;
    }
}

/* ------------------------------------------------ directory listings (READDIR) */

struct listing {
    uint8_t *buf;
    size_t len, cap;
    uint64_t count;
};

static int listing_add(struct listing *l, uint64_t ino, uint32_t type, const char *name,
                       size_t nlen)
{
    if (l->len + 16 + nlen > l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 8192;
        while (cap < l->len + 16 + nlen)
            cap *= 2;
        uint8_t *b = realloc(l->buf, cap);
        if (!b)
            return -ENOMEM;
        l->buf = b;
        l->cap = cap;
    }
    uint8_t *p = l->buf + l->len;
    st64(p, ino);
    st32(p + 8, type);
    st32(p + 12, (uint32_t)nlen);
    memcpy(p + 16, name, nlen);
    l->len += 16 + nlen;
    l->count++;
    return 0;
}

struct dirent64_rec {  /* getdents64's record (linux_dirent64) */
    uint64_t d_ino;
    int64_t d_off;
    unsigned short d_reclen;
    unsigned char d_type;
    char d_name[];
};

/* vl_dir_list into a buffer whose first `head` bytes are left for the caller (a struct
 * lbuf's header: the listing is not copied again); *out_len counts the records only. */
static int dir_list(int fd, uint64_t dir_ino, size_t head, uint8_t **out, size_t *out_len,
                    uint64_t *count)
{
    struct listing l = {.len = head};
    union {
        struct dirent64_rec rec;
        char bytes[32768];
    } chunk;
    int r = listing_add(&l, dir_ino, DT_DIR, ".", 1);
    if (!r)
        r = listing_add(&l, dir_ino, DT_DIR, "..", 2);
    if (!r && lseek(fd, 0, SEEK_SET) < 0)
        r = -errno;
    while (!r) {
        long n = syscall(SYS_getdents64, fd, chunk.bytes, sizeof(chunk.bytes));
        if (n < 0 && errno == ENOENT)
            break;  /* a removed directory: its end, as readdir(3) has it */
        if (n < 0) {
            r = -errno;
            break;
        }
        if (n == 0)
            break;
        for (long off = 0; off < n && !r;) {
            const struct dirent64_rec *d = (const void *)(chunk.bytes + off);
            off += d->d_reclen;
            const char *name = d->d_name;
            if (!strcmp(name, ".") || !strcmp(name, ".."))
                continue;
            unsigned type = d->d_type;
            if (type == DT_UNKNOWN) {  /* as os.scandir's is_dir() would: an lstat */
                struct stat st;
                if (fstatat(fd, name, &st, AT_SYMLINK_NOFOLLOW) == 0)
                    type = IFTODT(st.st_mode);
            }
            if (type != DT_DIR && type != DT_LNK && type != DT_REG)
                type = DT_UNKNOWN;
            r = listing_add(&l, d->d_ino, type, name, strlen(name));
        }
    }
    if (r) {
        free(l.buf);
        return r;
    }
    *out = l.buf;
    *out_len = l.len - head;
    *count = l.count;
    return 0;
}

int vl_dir_list(int fd, uint64_t dir_ino, uint8_t **out, size_t *out_len, uint64_t *count)
{
    return dir_list(fd, dir_ino, 0, out, out_len, count);
}

void vl_free(void *p)
{
    free(p);
}

int64_t vl_dirents(const uint8_t *ents, size_t ents_len, uint64_t first, uint8_t *out,
                   size_t limit, uint64_t *next)
{
    size_t at = 0, total = 0;
    uint64_t i = 0;

    *next = first;
    struct record rec;
    int got;
    for (; (got = read_record(ents, ents_len, &at, &rec)) > 0; i++) {
        if (i < first)
            continue;
        size_t size = (DIRENT_SIZE + rec.nlen + 7) & ~(size_t)7;
        if (total + size > limit)
            break;
        put_dirent(out + total, rec.ino, i + 1, rec.type, rec.name, rec.nlen, size);
        total += size;
        *next = i + 1;
    }
    if (got < 0 || (at + 16 > ents_len && at != ents_len))
        return -EINVAL;  /* a name past the end, or ended in a truncated record */
    return (int64_t)total;
}

static int acl_name(const char *name)
{
    return !strcmp(name, "system.posix_acl_access") || !strcmp(name, "system.posix_acl_default");
}

/* GETXATTR (Session.op_getxattr, Passthrough.getxattr, Session._sized): the value, its
 * size (size 0), ERANGE (too small a buffer), or the host's error. The guest asks it
 * before every buffered write (security.capability), so it is hot. */
static int64_t serve_getxattr(vl_tab *t, uint64_t unique, uint64_t nodeid, const uint8_t *body,
                              size_t blen, uint8_t *out, size_t cap)
{
    const uint8_t *nul = blen > 8 ? memchr(body + 8, 0, blen - 8) : NULL;
    if (!nul)
        return 0;
    uint32_t size = get32(body);
    const char *name = (const char *)body + 8;
    char link[300];
    int only_acl, acl;

    pthread_mutex_lock(&t->mu);
    struct ent *node = map_get(&t->inodes, nodeid);
    if (!(t->ops >> OP_GETXATTR & 1) || !node || (node->flags & VL_ENT_LOST)) {
        pthread_mutex_unlock(&t->mu);
        return 0;
    }
    node->flags &= ~VL_ENT_UNCACHED;
    node->refs++;
    only_acl = t->acl_names_only;
    acl = t->acl;
    snprintf(link, sizeof(link), "%s/%d", t->proc, node->fd);
    pthread_mutex_unlock(&t->mu);

    int64_t n;
    if (only_acl && !acl_name(name)) {
        n = reply(out, unique, EOPNOTSUPP, 0);  /* extended attributes are off */
    } else if (node->fmt == S_IFLNK) {
        n = reply(out, unique, ENODATA, 0);
    } else {
        uint8_t *value = malloc(XATTR_SIZE_MAX);
        ssize_t got = value ? getxattr(link, name, value, XATTR_SIZE_MAX) : -1;
        int err = value ? errno : ENOMEM;
        if (got < 0) {
            if (acl && acl_name(name) && err == EOPNOTSUPP)
                err = ENODATA;  /* (a submount without ACLs has none) */
            n = reply(out, unique, err, 0);
        } else if (size == 0) {
            st32(out + OUT_HEADER, (uint32_t)got);
            st32(out + OUT_HEADER + 4, 0);
            n = reply(out, unique, 0, 8);
        } else if ((size_t)got > size || (size_t)got > cap - OUT_HEADER) {
            n = reply(out, unique, ERANGE, 0);
        } else {
            memcpy(out + OUT_HEADER, value, (size_t)got);
            n = reply(out, unique, 0, (uint32_t)got);
        }
        free(value);
    }
    release(t, node);
    return n;
}

/* A plain name (plain_name) at *at in the body, NUL-terminated: copied to `name` and *at
 * moved past it; 0 for anything else (the session's errors). */
static int take_name(const uint8_t *body, size_t blen, size_t *at, char name[256])
{
    const uint8_t *nul = *at < blen ? memchr(body + *at, 0, blen - *at) : NULL;
    size_t n = nul ? (size_t)(nul - body) - *at : 0;
    if (!nul || !plain_name((const char *)body + *at, n))
        return 0;
    memcpy(name, body + *at, n + 1);
    *at += n + 1;
    return 1;
}

/* UNLINK, RMDIR, RENAME and RENAME2 (Session.op_unlink, op_rmdir, op_rename;
 * Passthrough.unlink, rmdir, rename) of plain names in directories still below the
 * share: dir (held) is the one the request names, a RENAME's new directory is its body's.
 * One host call; its error is the reply's, as in the session. */
static int64_t serve_names(vl_tab *t, uint32_t opcode, uint64_t unique, struct ent *dir,
                           const uint8_t *body, size_t blen, uint8_t *out)
{
    char name[256], newname[256];
    int rename = opcode == OP_RENAME || opcode == OP_RENAME2;
    size_t at = !rename ? 0 : opcode == OP_RENAME ? 8 : 16;  /* fuse_rename(2)_in */
    if (blen < at || !take_name(body, blen, &at, name) ||
        (rename && !take_name(body, blen, &at, newname)) || !dir_below(t, dir))
        return 0;
    struct ent *to = NULL;
    if (rename) {
        pthread_mutex_lock(&t->mu);
        to = map_get(&t->inodes, get64(body));
        if (to && !(to->flags & VL_ENT_LOST) && to->fmt == S_IFDIR)
            to->refs++;
        else
            to = NULL;
        pthread_mutex_unlock(&t->mu);
        if (!to)
            return 0;
        if (!dir_below(t, to)) {
            release(t, to);
            return 0;
        }
    }
    int r = opcode == OP_UNLINK ? unlinkat(dir->fd, name, 0)
          : opcode == OP_RMDIR ? unlinkat(dir->fd, name, AT_REMOVEDIR)
          : renameat2(dir->fd, name, to->fd, newname,
                      opcode == OP_RENAME2 ? get32(body + 8) : 0);
    int err = r < 0 ? errno : 0;
    if (to)
        release(t, to);
    return reply(out, unique, err, 0);
}

/* OPENDIR (Session.op_opendir, Passthrough.opendir) of directory dir (held), known
 * below the share: the caller's open budget charged, the directory opened again through
 * its magic link, and a handle that is this table's until the session first needs it
 * (vl_tab_adopt) or a RELEASEDIR here drops it. */
static int64_t serve_opendir(vl_tab *t, uint64_t unique, uint32_t uid, struct ent *dir,
                             uint8_t *out)
{
    char link[300];
    if (!dir_below(t, dir))
        return 0;
    pthread_mutex_lock(&t->mu);
    int err = budget_take_locked(t, uid, 0);
    uint64_t fh = err ? 0 : ++t->next_fh;
    uint32_t flags = t->opendir_flags;
    snprintf(link, sizeof(link), "%s/%d", t->proc, dir->fd);
    pthread_mutex_unlock(&t->mu);
    if (err)
        return err == -ENOMEM ? 0 : reply(out, unique, -err, 0);

    int fd = open(link, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    int open_err = fd < 0 ? errno : 0;
    struct ent *h = fd >= 0 ? new_ent(fh, fd, dir->id, VL_ENT_DIR | VL_ENT_NATIVE) : NULL;
    pthread_mutex_lock(&t->mu);
    err = h ? map_put(&t->handles, h) : -1;
    if (!err && (err = charge_locked(t, fh, uid)) != 0)
        map_del(&t->handles, fh, 0);
    if (err)
        budget_give_locked(t, uid);
    pthread_mutex_unlock(&t->mu);
    if (open_err)
        return reply(out, unique, open_err, 0);
    if (err) {  /* no memory: the session tries */
        ent_free(h);
        if (fd >= 0)
            close(fd);
        return 0;
    }
    st64(out + OUT_HEADER, fh);
    st32(out + OUT_HEADER + 8, flags);
    st32(out + OUT_HEADER + 12, 0);
    return reply(out, unique, 0, OPEN_OUT_SIZE);
}

/* READDIR and READDIRPLUS (Session._readdir, Passthrough.dir_entries) of handle h of
 * directory dir (both held), with the names epoch `since`: offset 0 takes a new snapshot
 * of the directory, found still below the share first; a READDIRPLUS's entries are
 * looked up as LOOKUP looks them up. All or nothing: one that meets an entry the
 * session must look up (a new inode) gives back the lookups it counted and leaves the
 * whole request to the session, which answers it as if this had not run. */
static int64_t serve_readdir(vl_tab *t, int plus, uint64_t unique, struct ent *h,
                             struct ent *dir, uint64_t since, const uint8_t *body,
                             uint8_t *out, size_t cap)
{
    uint64_t first = get64(body + 8), next;
    uint32_t size = get32(body + 16);
    size_t limit = size < cap - OUT_HEADER ? size : cap - OUT_HEADER;
    struct lbuf *l = NULL;
    int below = -1;

    if (first == 0) {
        struct stat st;
        uint8_t *buf;
        size_t len;
        uint64_t count;
        if (!(below = dir_below(t, dir)) || fstat(h->fd, &st) != 0 ||
            dir_list(h->fd, st.st_ino, offsetof(struct lbuf, bytes), &buf, &len, &count) != 0)
            return 0;  /* the session's answer: its check, or the host's error */
        l = (struct lbuf *)buf;  /* listed behind the room for its header */
        l->len = len;
        l->count = count;
        pthread_mutex_lock(&t->mu);
        l->refs = 2;  /* the handle's and ours */
        set_listing_locked(t, h, l);  /* (a directory handle: kept) */
        pthread_mutex_unlock(&t->mu);
    } else {
        pthread_mutex_lock(&t->mu);
        if ((l = h->listing))
            __atomic_add_fetch(&l->refs, 1, __ATOMIC_RELAXED);
        pthread_mutex_unlock(&t->mu);
        if (!l)
            return 0;  /* the session takes the first snapshot */
    }
    int64_t w;
    if (!plus) {
        w = vl_dirents(l->bytes, l->len, first, out + OUT_HEADER, limit, &next);
    } else if (below < 0 && !(below = dir_below(t, dir))) {
        w = -1;
    } else {
        int stopped;
        w = direntplus(t, dir->id, l->bytes, l->len, first, since, 1, out + OUT_HEADER,
                       limit, &next, &stopped);
        if (w >= 0 && stopped) {
            direntplus_undo(t, out + OUT_HEADER, (size_t)w);
            w = -1;
        }
    }
    lbuf_put(l);
    return w < 0 ? 0 : reply(out, unique, 0, (uint32_t)w);
}

/* ------------------------------------------------ RELEASEs being answered */

#define SEEN_PATIENCE_NS 50000000LL

int vl_tab_order_reads(vl_tab *t, int on)
{
    return __atomic_exchange_n(&t->order_reads, on != 0, __ATOMIC_RELAXED);
}

/* The kernel numbers requests by 2 as it queues them and hands them out in that order,
 * but a thread of ours that took an earlier one may not have registered it yet (it
 * can be descheduled right after its read). So, while vl_fuse_serve reads every
 * request, wait until the VL_SEEN_BEFORE uniques just below `unique` are stored: 50 ms
 * at most, since a request withdrawn before anyone read it never is. */
static void wait_seen(vl_tab *t, uint64_t unique)
{
    int64_t deadline = 0;
    for (uint64_t j = 1; j <= VL_SEEN_BEFORE && unique > 2 * j; j++) {
        uint64_t want = unique - 2 * j;
        while (__atomic_load_n(&t->seen[(want >> 1) % VL_SEEN], __ATOMIC_ACQUIRE) < want) {
            int64_t now = now_ns();
            if (!deadline)
                deadline = now + SEEN_PATIENCE_NS;
            else if (now > deadline)
                return;
            struct timespec ts = {0, 20000};
            nanosleep(&ts, NULL);
        }
    }
}

/* Under the mutex. Registered twice (read here, then the session's entry) counts once;
 * a full set registers nothing (that RELEASE is not waited for). */
static void releasing_add(vl_tab *t, uint64_t unique, uint64_t nodeid)
{
    for (uint32_t i = 0; i < t->nreleasing; i++)
        if (t->releasing[i].unique == unique)
            return;
    if (t->nreleasing < VL_MAX_RELEASING) {
        t->releasing[t->nreleasing].unique = unique;
        t->releasing[t->nreleasing].nodeid = nodeid;
        t->releasing[t->nreleasing].since = now_ns();
        t->nreleasing++;
    }
}

void vl_tab_releasing_add(vl_tab *t, uint64_t unique, uint64_t nodeid)
{
    pthread_mutex_lock(&t->mu);
    releasing_add(t, unique, nodeid);
    pthread_mutex_unlock(&t->mu);
}

void vl_tab_releasing_done(vl_tab *t, uint64_t unique)
{
    pthread_mutex_lock(&t->mu);
    for (uint32_t i = 0; i < t->nreleasing; i++)
        if (t->releasing[i].unique == unique) {
            t->releasing[i] = t->releasing[--t->nreleasing];
            break;
        }
    pthread_mutex_unlock(&t->mu);
}

int vl_tab_releasing_before(vl_tab *t, uint64_t unique, uint64_t nodeid, int64_t since)
{
    int found = 0;
    if (__atomic_load_n(&t->order_reads, __ATOMIC_RELAXED))
        wait_seen(t, unique);
    pthread_mutex_lock(&t->mu);
    for (uint32_t i = 0; i < t->nreleasing && !found; i++)
        found = t->releasing[i].unique < unique && t->releasing[i].nodeid == nodeid &&
                t->releasing[i].since >= since;
    pthread_mutex_unlock(&t->mu);
    return found;
}

int64_t vl_serve(vl_tab *t, const uint8_t *req, size_t len, uint8_t *out, size_t cap)
{
    /* A virtqueue chain's room is exactly the reply the guest expects (a WRITE's is
     * 24 bytes, an UNLINK's 16): each opcode checks its own reply's size below. */
    if (len < IN_HEADER || cap < OUT_HEADER)
        return 0;
    uint32_t hlen = get32(req), opcode = get32(req + 4);
    uint64_t unique = get64(req + 8), nodeid = get64(req + 16);
    uint32_t uid = get32(req + 24), gid = get32(req + 28);
    if (hlen < IN_HEADER || hlen > len || opcode >= 64)
        return 0;
    const uint8_t *body = req + IN_HEADER;
    size_t blen = hlen - IN_HEADER;
    struct ent *e = NULL, *node = NULL, *dir = NULL;
    uint64_t attr_sec, since = 0, released = 0;
    uint32_t attr_nsec;
    int err = 0;

    if (opcode == OP_GETXATTR) {
        if (cap < OUT_HEADER + 8)  /* (a size's reply; the session decides with less) */
            return 0;
        int64_t r = serve_getxattr(t, unique, nodeid, body, blen, out, cap);
        if (r)
            __atomic_fetch_add(&t->served[opcode], 1, __ATOMIC_RELAXED);
        return r;
    }
    if (opcode == OP_LOOKUP) {
        if (cap < OUT_HEADER + ENTRY_OUT_SIZE)
            return 0;
        pthread_mutex_lock(&t->mu);
        int on = t->ops >> OP_LOOKUP & 1;
        pthread_mutex_unlock(&t->mu);
        int64_t r = on ? serve_lookup(t, unique, nodeid, body, blen, out) : 0;
        if (r)
            __atomic_fetch_add(&t->served[opcode], 1, __ATOMIC_RELAXED);
        return r;
    }
    pthread_mutex_lock(&t->mu);
    if (!(t->ops >> opcode & 1))
        goto python;
    attr_sec = t->attr_sec;
    attr_nsec = t->attr_nsec;
    int killpriv = t->killpriv;
    /* What the session's `_cached` does before every request: the guest may now
     * cache something of this inode again. */
    node = map_get(&t->inodes, nodeid);
    if (node)
        node->flags &= ~VL_ENT_UNCACHED;
    switch (opcode) {
    case OP_GETATTR: {
        uint32_t gflags = blen >= 16 ? get32(body) : 0;
        uint64_t fh = blen >= 16 ? get64(body + 8) : 0;
        if (!node || (node->flags & VL_ENT_LOST) || cap < OUT_HEADER + ATTR_OUT_SIZE)
            goto python;
        e = (gflags & GETATTR_FH) ? map_get(&t->handles, fh) : NULL;
        if (!e || e->nodeid != nodeid || (e->flags & VL_ENT_LOST))
            e = node;  /* the handle is used only if it is this inode's */
        e->refs++;
        break;
    }
    case OP_STATFS:
        if (cap < OUT_HEADER + KSTATFS_SIZE || !(e = acquire(&t->inodes, nodeid)))
            goto python;
        break;
    case OP_READ:
    case OP_WRITE:
        if (blen < RW_IN || (opcode == OP_WRITE && cap < OUT_HEADER + 8) ||
            !(e = acquire(&t->handles, get64(body))))
            goto python;
        break;
    case OP_OPENDIR:  /* (serve_opendir) */
        if (cap < OUT_HEADER + OPEN_OUT_SIZE)
            goto python;
        /* fall through: a directory the request names, to be checked below the share */
    case OP_UNLINK:
    case OP_RMDIR:
    case OP_RENAME:
    case OP_RENAME2:  /* (serve_names) */
        if (!node || (node->flags & VL_ENT_LOST) || node->fmt != S_IFDIR || !t->top_len)
            goto python;
        e = node;
        e->refs++;
        break;
    case OP_RELEASEDIR: {
        /* Session.op_releasedir of a handle opened here that the session never used
         * (else it is the session's: Passthrough adopted it). Taken from adoption now. */
        struct ent *h = blen >= RELEASE_IN ? map_get(&t->handles, get64(body)) : NULL;
        if (!h || !(h->flags & VL_ENT_NATIVE) || h->nodeid != nodeid)
            goto python;  /* (another inode's handle: EINVAL there) */
        h->flags &= ~VL_ENT_NATIVE;
        released = h->id;
        break;
    }
    case OP_READDIR:
    case OP_READDIRPLUS:
        /* (serve_readdir) */
        e = blen >= RW_IN ? map_get(&t->handles, get64(body)) : NULL;
        if (!e || (e->flags & VL_ENT_LOST) || !(e->flags & VL_ENT_DIR))
            goto python;
        dir = map_get(&t->inodes, e->nodeid);
        if (!dir || (dir->flags & VL_ENT_LOST))
            goto python;
        e->refs++;
        dir->refs++;
        since = t->epoch;  /* before the host is read (invalidate.py) */
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
        pthread_mutex_lock(&t->mu);
        if (t->tracking) {  /* Session._attr_time: the inode as it is now */
            struct ent *now_node = map_get(&t->inodes, nodeid);
            if (!now_node || attr_time_locked(t, now_node, now_ns()))
                attr_sec = attr_nsec = 0;
        }
        pthread_mutex_unlock(&t->mu);
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
        /* Session._writer_gid: the guest's flag with HANDLE_KILLPRIV_V2, else uid 0
         * stands for CAP_FSETID. */
        int kill = killpriv ? (get32(body + 20) & WRITE_KILL_SUIDGID) != 0 : uid != 0;
        if (put > 0 && kill && (err = drop_setid(e->fd, gid)) != 0) {
            n = reply(out, unique, err, 0);
            break;
        }
        st32(out + OUT_HEADER, (uint32_t)put);
        st32(out + OUT_HEADER + 4, 0);
        n = reply(out, unique, 0, 8);
        break;
    }
    case OP_UNLINK:
    case OP_RMDIR:
    case OP_RENAME:
    case OP_RENAME2:
        n = serve_names(t, opcode, unique, e, body, blen, out);
        break;
    case OP_OPENDIR:
        n = serve_opendir(t, unique, uid, e, out);
        break;
    case OP_RELEASEDIR:
        vl_tab_drop_handle(t, released, 1);
        n = reply(out, unique, 0, 0);
        break;
    case OP_READDIR:
    case OP_READDIRPLUS:
        n = serve_readdir(t, opcode == OP_READDIRPLUS, unique, e, dir, since, body, out, cap);
        release(t, dir);
        break;
    }
    if (e)
        release(t, e);
    if (n && opcode != OP_READDIRPLUS)  /* (its entries are counted) */
        __atomic_fetch_add(&t->served[opcode], 1, __ATOMIC_RELAXED);
    return n;

python:
    if (opcode == OP_RELEASE)
        releasing_add(t, unique, nodeid);
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
        if (n >= IN_HEADER) {  /* (wait_seen) */
            uint64_t u = get64(in + 8);
            if (get32(in + 4) == OP_RELEASE)
                vl_tab_releasing_add(t, u, get64(in + 16));
            __atomic_store_n(&t->seen[(u >> 1) % VL_SEEN], u, __ATOMIC_RELEASE);
        }
        int64_t r = vl_serve(t, in, (size_t)n, out, outcap);
        if (r == 0)
            return n;  /* the session's */
        if (write(fuse_fd, out, (size_t)r) < 0 && errno == ENODEV)
            return -ENODEV;  /* unmounted; ENOENT: interrupted meanwhile */
    }
}

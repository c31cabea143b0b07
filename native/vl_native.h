/*
 * vl_native: the native fast path of vfs-lockd.
 *
 * Host lock calls (OFD/classic fcntl locks, flock), the wake signal used to
 * interrupt blocked waits, file handles, the FUSE request codec, and the
 * split-virtqueue walker of the vhost-user (virtio-fs) transport.
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
/* openat2(dir_fd, path, flags) resolved strictly beneath dir_fd, no symbolic link
 * followed (RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS): the descriptor or -errno. */
int vl_openat2_beneath(int dir_fd, const char *path, int flags);
/* Is the directory that the magic link `link` names (its /proc/self/fd entry, whose
 * st_dev/st_ino are dev/ino) still below the share open at root_fd, whose path is `top`
 * (top_len bytes, ending in '/')? The link's target must start with `top`, and the rest,
 * resolved beneath root_fd, must lead to that very directory. 2 yes, without crossing a
 * mount (only a rename on the share's filesystem can change that: vl_moves); 1 yes,
 * across a mount; 0 no; -errno if the link cannot be read (-ENAMETOOLONG: a page or
 * longer). The reference is fuse_server/passthrough.py's `_dir_under_root_py`. */
int vl_dir_under_root(const char *link, int root_fd, const char *top, size_t top_len,
                      uint64_t dev, uint64_t ino);
int vl_open_by_handle(int mount_fd, const uint8_t *handle, int handle_len,
                      int handle_type, int flags);

int vl_decode(const uint8_t *buf, size_t len, uint64_t out[18]);
size_t vl_decode_batch(const uint8_t *buf, size_t len, uint64_t *out, size_t max_msgs);
void vl_encode_out_header(uint8_t out[16], uint32_t len, int32_t error, uint64_t unique);
void vl_encode_lk_reply(uint8_t out[40], uint64_t unique, uint64_t start, uint64_t end,
                        uint32_t type, uint32_t pid);

/* ---- split virtqueues (virtio 1.1 section 2.6), for the vhost-user backend ----
 * Guest memory is a table of regions the front-end passed as fds and we mapped.
 * Descriptor addresses are guest physical (gpa); every access is checked against
 * the table, so a hostile guest can only get an error for its own request. */
typedef struct {
    uint64_t gpa;    /* guest physical address of the first byte */
    uint64_t size;
    uint64_t host;   /* our mapping of the first byte */
} vl_region;

typedef struct {
    uint64_t host;   /* host address of a writable piece of a chain */
    uint64_t len;
    uint64_t gpa;    /* its guest physical address (dirty log; re-mapping after a move) */
} vl_seg;

typedef struct {
    const vl_region *regions;  /* owned by the caller, valid while the ring runs */
    uint32_t nregions;
    uint32_t num;              /* queue size: a power of 2, 1..32768 */
    uint64_t desc;             /* host addresses of the three ring parts */
    uint64_t avail;
    uint64_t used;
    uint16_t last_avail;       /* next avail entry to pop */
    uint16_t used_idx;         /* next used entry to fill */
    int32_t call_fd;           /* eventfd signalled after a push; -1: none */
    uint32_t broken;           /* set when the ring itself is unusable */
    uint32_t max_indirect;     /* entries allowed in one indirect table */
    /* Dirty log (VHOST_F_LOG_ALL, live migration): one bit per 4 KiB guest page, set
     * for every page a push writes. log == 0: not logging. */
    uint64_t log;              /* host address of the log (64-bit words) */
    uint64_t log_size;         /* its size in bytes */
    uint64_t log_used;         /* guest physical address of the used ring */
    uint32_t log_used_on;      /* the used ring's writes are logged (VHOST_VRING_F_LOG) */
    uint32_t log_pad;
    /* VIRTIO_RING_F_EVENT_IDX (virtio 1.1, 2.6.7 and 2.6.10): the driver's used_event
     * (after the avail ring) says when to signal, our avail_event (after the used ring)
     * when to kick us; the rings' flags fields are then ignored. */
    uint32_t event_idx;        /* negotiated */
    uint16_t signalled_used;   /* used_idx when the last signal was decided */
    uint16_t signalled_valid;  /* 0: the next notify signals (start, new call fd) */
    /* vl_ring.c: the queue's mutex (every push and what it reads is under it) and
     * whether the ring runs (a reply may be pushed), set under it. */
    void *mu;
    uint32_t running;
    uint32_t running_pad;
} vl_vq;

typedef struct {
    uint32_t head;      /* descriptor index to hand back in the used ring */
    int32_t error;      /* 0, or why the chain was refused (it is consumed) */
    uint64_t in_len;    /* readable bytes copied to the caller's buffer */
    uint64_t out_len;   /* total writable bytes */
    uint32_t nsegs;     /* writable segments filled in */
    uint32_t ndesc;     /* descriptors walked */
} vl_chain;

int vl_vq_pop(vl_vq *vq, uint8_t *buf, uint64_t cap, vl_seg *segs, uint32_t max_segs,
              vl_chain *out);
int64_t vl_vq_push(vl_vq *vq, uint32_t head, const vl_seg *segs, uint32_t nsegs,
                   const uint8_t *data, uint64_t len, int notify);
int vl_vq_notify(vl_vq *vq);
int vl_log_mark(uint64_t log, uint64_t log_size, uint64_t gpa, uint64_t len);
uint32_t vl_vq_pending(vl_vq *vq);


/* ---- the descriptor table and the native fast path (vl_serve.c) ----
 * Node ids and file handles to host descriptors, published and retired by the Python
 * file system (fuse_server/passthrough.py: the one owner of inodes and handles);
 * descriptors of retired entries are closed here (by their last user if one is busy). */
typedef struct vl_tab vl_tab;
/* VL_ENT_NATIVE: a handle vl_serve's OPENDIR made that Passthrough has not adopted. */
enum { VL_ENT_LOST = 1, VL_ENT_DIR = 2, VL_ENT_UNCACHED = 4, VL_ENT_LOCKED = 8,
       VL_ENT_LOCKDIR = 16, VL_ENT_NATIVE = 32 };
typedef struct {
    int32_t fd;
    uint32_t flags;
    uint64_t nodeid;
    int64_t nlookup;
    int32_t indexed;
    uint64_t parent;
    int64_t cached_until;
    int64_t settle_until;
} vl_tab_entry;

vl_tab *vl_tab_new(void);
void vl_tab_free(vl_tab *t);
/* An inode the guest has looked up `nlookup` times; found by (dev, ino) from then on
 * unless lost or another inode has that identity. */
int vl_tab_put_inode(vl_tab *t, uint64_t nodeid, int fd, uint64_t dev, uint64_t ino,
                     uint32_t fmt, int64_t nlookup, uint32_t flags);
int vl_tab_put_handle(vl_tab *t, uint64_t fh, int fd, uint64_t nodeid, uint32_t flags);
int vl_tab_drop_inode(vl_tab *t, uint64_t nodeid, int close_fd);
int vl_tab_drop_handle(vl_tab *t, uint64_t fh, int close_fd);
/* File handle ids: the next one (the session's opens and vl_serve's OPENDIR draw from
 * one sequence), and, after a migration's load, where the sequence goes on. */
uint64_t vl_tab_new_fh(vl_tab *t);
void vl_tab_set_next_fh(vl_tab *t, uint64_t fh);
/* A handle vl_serve's OPENDIR made is the table's until Passthrough first needs it:
 * 1 and its descriptor and inode in *out (Passthrough's from now on: no longer
 * VL_ENT_NATIVE), 0 for a handle that is not such (the session's already, or being
 * released here), -ENOENT. */
int vl_tab_adopt(vl_tab *t, uint64_t fh, vl_tab_entry *out);
/* The handles not adopted yet (their ids, up to max; the count is returned). */
uint64_t vl_tab_native_handles(vl_tab *t, uint64_t *fhs, uint64_t max);
/* OPENDIR's fuse_open_out flags (FOPEN_*). */
void vl_tab_opendir_config(vl_tab *t, uint32_t open_flags);
/* The open budget (fuse_server/session.py has the rule): each uid but 0 may hold
 * per_uid handles, all of them together `users` (0: unbounded). take: 0, -EMFILE,
 * -ENFILE (force: counted whatever the limits: a migration's load); give: one back.
 * A handle charged to uid (vl_tab_charge, after a take) gives it back when dropped. */
void vl_tab_budget_config(vl_tab *t, uint64_t per_uid, uint64_t users);
int vl_tab_budget_take(vl_tab *t, uint32_t uid, int force);
void vl_tab_budget_give(vl_tab *t, uint32_t uid);
int vl_tab_charge(vl_tab *t, uint64_t fh, uint32_t uid);
/* The charged handles and their uids (up to max; the count is returned). */
uint64_t vl_tab_charges(vl_tab *t, uint64_t *fhs, uint32_t *uids, uint64_t max);
/* One more lookup of the inode with that identity: its node id, or 0 if none. */
uint64_t vl_tab_ref_key(vl_tab *t, uint64_t dev, uint64_t ino);
/* The inode's lookup count changed by delta (FORGET: negative): the new count (at 0 it
 * is no longer found by identity), or -ENOENT. */
int64_t vl_tab_ref(vl_tab *t, uint64_t nodeid, int64_t delta);
/* An inode's flags before `set` was set and `clear` cleared; -ENOENT if unknown. */
int vl_tab_flags(vl_tab *t, uint64_t nodeid, uint32_t set, uint32_t clear);
int vl_tab_get(vl_tab *t, int handles, uint64_t id, vl_tab_entry *out);
uint64_t vl_tab_count(vl_tab *t, int handles);
/* Requests of `opcode` vl_serve has answered (READDIRPLUS: entries vl_tab_direntplus
 * has). */
uint64_t vl_tab_served(vl_tab *t, uint32_t opcode);
/* RELEASEs read and not yet answered (fuse_server/session.py, _after_releases): vl_serve
 * registers each one it leaves to the session as it reads it; the session registers
 * (again: counted once) what other transports read, and ends each one. At most
 * VL_MAX_RELEASING at a time (more are not registered). */
#define VL_MAX_RELEASING 64
void vl_tab_releasing_add(vl_tab *t, uint64_t unique, uint64_t nodeid);
void vl_tab_releasing_done(vl_tab *t, uint64_t unique);
/* Is a RELEASE of nodeid registered since `since` (CLOCK_MONOTONIC ns) with a lower
 * unique (sent before) still being answered? */
int vl_tab_releasing_before(vl_tab *t, uint64_t unique, uint64_t nodeid, int64_t since);
/* While vl_fuse_serve reads every request (on: not over io_uring), releasing_before
 * first waits, 50 ms at most, until the VL_SEEN_BEFORE requests just before `unique`
 * have been read through: one read before it may not be registered yet. */
#define VL_SEEN 256
#define VL_SEEN_BEFORE 8
int vl_tab_order_reads(vl_tab *t, int on);  /* (returns what it was) */
/* Which opcodes vl_serve may answer (bit k: opcode k), and the timeouts of its replies. */
void vl_tab_config(vl_tab *t, uint64_t ops, uint64_t attr_sec, uint32_t attr_nsec,
                   uint64_t entry_sec, uint32_t entry_nsec);
/* For LOOKUP: the share's path as /proc names it (ending in '/') and the directory of
 * magic links ("/proc/self/fd", or "." in a sandbox: lockd/procfd.py). */
int vl_tab_set_share(vl_tab *t, const char *top, size_t top_len, const char *proc);
/* Renames of directories on the share's filesystem, counted (fuse_server/moves.py): a
 * directory found below the share within its mount (vl_dir_under_root's 2) stays below
 * it until a directory of that filesystem is moved. One per share and process: every
 * table of the share reads the same count. vl_moves_new: NULL with *err set where the
 * filesystem is not local (another host's renames make no event here) or the kernel
 * refuses the watch (fanotify needs CAP_SYS_ADMIN). */
typedef struct vl_moves vl_moves;
vl_moves *vl_moves_new(int root_fd, int *err);
/* The count now (events read first); 0 once the watch is broken (never again cached). */
uint64_t vl_moves_count(vl_moves *m);
void vl_tab_set_moves(vl_tab *t, vl_moves *m);
/* Is directory nodeid known below the share (checked within its mount at the current
 * count)? 1 yes; 0 no, with *count to pass to vl_tab_beneath_seen after a check that
 * said 2 (0: no watch, nothing to remember). */
int vl_tab_beneath(vl_tab *t, uint64_t nodeid, uint64_t *count);
void vl_tab_beneath_seen(vl_tab *t, uint64_t nodeid, uint64_t count);
/* Cache auto (fuse_server/session.py `locked_uncached`, and without notifications
 * `_first_lock`), times in CLOCK_MONOTONIC ns. `mode`: 0 off; 1 a locked file's
 * attributes and name uncached; 2 also the names in its directory (no notifications).
 * And how long the guest may hold what it is given (its attribute timeout and a
 * margin). */
void vl_tab_tracking(vl_tab *t, int mode, int64_t hold_ns);
/* An attribute reply for nodeid: its deadline set; 1 if locked (timeout 0); -ENOENT. */
int vl_tab_attr_time(vl_tab *t, uint64_t nodeid, int64_t now);
/* An entry reply for nodeid named in parent: the deadlines set; bit 1 locked (timeouts
 * 0), bit 2 parent holds a locked file (entry timeout 0); -ENOENT. */
int vl_tab_entry_times(vl_tab *t, uint64_t parent, uint64_t nodeid, int64_t now);
/* A lock request on nodeid: marked locked (its directory too) the first time, when its
 * grants may answer (ns), fixed then; -ENOENT. */
int64_t vl_tab_first_lock(vl_tab *t, uint64_t nodeid, int64_t now, int64_t late_ns);
/* A migration's load: what the source had. */
int vl_tab_set_tracked(vl_tab *t, uint64_t nodeid, uint64_t parent, uint32_t flags,
                       int64_t cached_until);
/* GETXATTR: only the POSIX ACL names pass (EOPNOTSUPP for others: extended attributes
 * off), and whether INIT granted POSIX ACLs (an ACL name's EOPNOTSUPP is ENODATA). */
void vl_tab_xattr_config(vl_tab *t, int acl_names_only, int acl);

/* Names handed out with an entry timeout since the last sweep, kept for the next lock
 * grant's sweep (fuse_server/invalidate.py has the rule): `remember` them (else LOOKUP
 * replies are always fresh), at most max_names before a sweep is asked for. */
typedef struct vl_names vl_names;
void vl_tab_names_config(vl_tab *t, int remember, uint64_t max_names);
uint64_t vl_tab_names_epoch(vl_tab *t);
/* (parent, name) read from the host after the epoch was `since`, given to the guest
 * with an entry it holds until `until` (CLOCK_MONOTONIC ns; 0: timeout 0): 0 not to be
 * cached (a sweep began since), 1 remembered, 2 remembered and the set is full (sweep
 * now). */
int vl_tab_names_add(vl_tab *t, uint64_t parent, const char *s, uint32_t len, uint64_t since,
                     int64_t until);
/* Was (parent, name) given since the last sweep with an entry the guest still holds at
 * `now` (a READDIRPLUS then leaves it as it is)? 0 without remembered names. */
int vl_tab_names_held(vl_tab *t, uint64_t parent, const char *s, uint32_t len, int64_t now);
/* Does a grant of nodeid need notifications (the guest may have cached some of it, or
 * names are waiting)? 0 also begins an epoch. */
int vl_tab_names_needed(vl_tab *t, uint64_t nodeid);
/* Every remembered name, taken (a sweep begins); NULL without memory. */
vl_names *vl_tab_names_take(vl_tab *t);
uint64_t vl_names_count(const vl_names *ns);
/* The i-th: its length (the name at *s, not NUL-terminated) and *parent; -ENOENT. */
int vl_names_get(const vl_names *ns, uint64_t i, uint64_t *parent, const char **s);
void vl_names_free(vl_names *ns);
/* READDIRPLUS: the entries from index `first` of a packed listing (records of
 * u64 ino, u32 d_type, u32 name length, name), looked up as LOOKUP would, while they
 * fit in `limit` bytes; stops before one the session must look up (a new inode).
 * Returns the bytes written (`*next`: the index to go on from), or -EINVAL. */
int64_t vl_tab_direntplus(vl_tab *t, uint64_t parent, const uint8_t *ents, size_t ents_len,
                          uint64_t first, uint64_t since, int checked, uint8_t *out,
                          size_t limit, uint64_t *next);
/* A directory's listing, as fuse_server/passthrough.py `_list_dir_py` takes it (the
 * reference): "." and ".." (both `dir_ino`, DT_DIR), then each entry getdents64 gives
 * from the start of directory `fd` (its offset is moved), d_type DT_DIR, DT_LNK or
 * DT_REG (found with fstatat where the filesystem says DT_UNKNOWN), else DT_UNKNOWN;
 * packed as vl_tab_direntplus reads it. 0 with *out (free it with vl_free), its length
 * and the entries' count; -errno. */
int vl_dir_list(int fd, uint64_t dir_ino, uint8_t **out, size_t *out_len, uint64_t *count);
void vl_free(void *p);
/* Directory handle fh's snapshot is now this listing (packed as above, `count`
 * entries): the table owns it; vl_serve's READDIRs read it, and so does the session
 * (vl_tab_listing). Its serial (> 0), or -ENOENT (no such handle), -ENOMEM. */
int64_t vl_tab_set_listing(vl_tab *t, uint64_t fh, const uint8_t *packed, size_t len,
                           uint64_t count);
/* Handle fh's snapshot: its serial (0: none yet; -ENOENT: no such handle, -ENOMEM), and,
 * unless that is `have` (the caller holds it already), a copy at *out (vl_free it) with
 * its length and count. */
int64_t vl_tab_listing(vl_tab *t, uint64_t fh, uint64_t have, uint8_t **out, size_t *len,
                       uint64_t *count);
/* READDIR: the fuse_dirents of a packed listing from index `first` while they fit in
 * `limit` bytes (`*next`: the index to go on from): the bytes written, or -EINVAL. */
int64_t vl_dirents(const uint8_t *ents, size_t ents_len, uint64_t first, uint8_t *out,
                   size_t limit, uint64_t *next);
/* One request: the reply's length written to `out` (cap bytes: a READ gets at most
 * cap - 16), or 0 when the Python session must answer it. */
int64_t vl_serve(vl_tab *t, const uint8_t *req, size_t len, uint8_t *out, size_t cap);
/* /dev/fuse: read requests and answer what vl_serve can until one is the session's:
 * its length (the request is in `in`), or -errno (-ENODEV: unmounted). */
int64_t vl_fuse_serve(vl_tab *t, int fuse_fd, uint8_t *in, size_t incap, uint8_t *out,
                      size_t outcap);
/* WRITE: INIT granted FUSE_HANDLE_KILLPRIV_V2 (the guest's FUSE_WRITE_KILL_SUIDGID says
 * whether setuid/setgid go), or not (any caller but uid 0 clears them). */
void vl_tab_killpriv_config(vl_tab *t, int on);

/* ---- a ring's reader loop (vl_ring.c) ---- */
void *vl_mutex_new(void);
void vl_mutex_free(void *m);
void vl_mutex_lock(void *m);
void vl_mutex_unlock(void *m);

typedef struct {
    int32_t kick_fd;     /* the queue's kick eventfd (non-blocking) */
    int32_t stop_fd;     /* an eventfd: readable when the reader must return */
    uint32_t busy;       /* in vl_serve's host call; the next three under vq->mu */
    uint32_t stopping;   /* asked to stop: no more host calls on this thread */
    uint32_t abandoned;  /* asked to stop while busy: nobody waits for it */
    uint32_t pad;
} vl_reader;

enum { VL_RING_STOP = 0, VL_RING_REQUEST = 1, VL_RING_UNPUSHED = 2 };
/* Pop, answer natively (tab: NULL for none) and push until a chain is the session's
 * (VL_RING_REQUEST: it is in buf/segs/chain as vl_vq_pop leaves it), a native reply may
 * not be pushed (VL_RING_UNPUSHED: its *reply_len bytes are in `out`; the ring stopped
 * or the reader was abandoned), the stop fd is readable (VL_RING_STOP), or the ring is
 * broken (-errno). `out` holds outcap bytes: a READ's reply gets at most that. */
int vl_ring_serve(vl_vq *vq, vl_reader *rd, vl_tab *tab, uint8_t *buf, uint64_t cap,
                  vl_seg *segs, uint32_t max_segs, vl_chain *chain, uint8_t *out,
                  uint64_t outcap, uint64_t *reply_len);

/* Sizes the Python side checks its fallbacks against. */
size_t vl_sizeof_flock(void);
int vl_max_handle_sz(void);
/* CDEF-END */

#endif

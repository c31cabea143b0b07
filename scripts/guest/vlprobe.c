/* vlprobe: the lock probe that runs inside a VM guest (static, no libc beyond glibc).
 *
 * Usage: vlprobe CHANNEL      serve commands read from CHANNEL (a virtio-serial port or
 *                             "-" for stdin/stdout) until "- quit" or EOF.
 *
 * Protocol (one line each way, ASCII):
 *   request:  TAG OWNER CMD ARGS...
 *   answer:   TAG ok [VALUES...]   |   TAG err ERRNO ERRNAME
 *   event:    * exit OWNER STATUS  (an owner process ended)
 * TAG is chosen by the client and echoed, so answers may come back out of order: every
 * OWNER (a name, e.g. "a" or "1") is its own child process, i.e. its own POSIX lock owner,
 * and runs its commands one at a time, so a blocked F_SETLKW/flock holds up that owner
 * only, never the channel. OWNER "-" is the dispatcher itself.
 *
 * Owner commands (SLOT = small integer naming an open file of that owner):
 *   open SLOT PATH [rw|r|create]          open (create: O_CREAT|O_RDWR, mode 0666)
 *   close SLOT
 *   lock SLOT KIND TYPE START LEN [wait]  KIND posix|ofd|flock; TYPE r|w|u
 *   getlk SLOT KIND TYPE START LEN        -> ok u | ok TYPE START LEN PID
 *   write SLOT OFF TEXT                   pwrite TEXT (\xHH escapes allowed)
 *   read SLOT OFF LEN                     -> ok TEXT (non-printable bytes as \xHH)
 *   bench SLOT KIND N                     N lock(w, whole file)+unlock pairs
 *                                         -> ok N NS_PER_PAIR
 *   counter SLOT KIND N                   N times: lock w (waiting), read the decimal
 *                                         counter, write it +1, unlock
 *                                         -> ok DONE LAST_VALUE BAD_READS ERRNO
 *   flockmark SLOT N ID                   N times flock (LOCK_EX, or LOCK_SH every 3rd):
 *                                         a 32-byte marker at offset 0 must read "-..."
 *                                         when taken; EX writes ID, holds, checks, clears
 *                                         -> ok DONE VIOLATIONS ERRNO
 *   (the workloads stop at the first failing lock call and report its errno, 0 if none,
 *   so the increments made before it are never lost from the count)
 *   sleep MS
 *   exit                                  the owner exits (closing its files)
 * Data path commands (scripts/bench_vm.py; no slot, times with CLOCK_MONOTONIC):
 *   dstat PATH N                          N stat(2)             -> ok N NS_PER_OP
 *   dcreate DIR N SIZE                    N x (open O_CREAT, write SIZE bytes, close)
 *                                         as DIR/fNNNNN         -> ok N NS_PER_OP
 *   dunlink DIR N                         unlink those N files  -> ok N NS_PER_OP
 *   dseqw PATH MIB                        write MIB x 1 MiB + fsync -> ok BYTES NS
 *   dseqr PATH                            drop the guest's pages, read all -> ok BYTES NS
 *   drand PATH N BS r|w                   N O_DIRECT preads/pwrites of BS bytes at
 *                                         random BS-aligned offsets -> ok N NS_PER_OP
 * Dispatcher commands: "- ping" -> ok pong; "- kill OWNER" (SIGKILL); "- quit".
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/select.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAXOWN 64
#define MAXSLOT 16
#define LINE 4096
#define MARK 32
#define CWIDTH 20

struct owner { char name[64]; pid_t pid; int cmd_fd; };
static struct owner owners[MAXOWN];
static int result_wr = -1; /* children write answers here (pipe: atomic lines) */

static void say(int fd, const char *s)
{
    size_t n = strlen(s), off = 0;
    while (off < n) {
        ssize_t w = write(fd, s + off, n - off);
        if (w < 0) {
            if (errno == EINTR) continue;
            return;
        }
        off += (size_t)w;
    }
}

static void answer(const char *tag, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static void answer(const char *tag, const char *fmt, ...)
{
    char buf[LINE + 64];
    va_list ap;
    int n = snprintf(buf, sizeof buf, "%s ", tag);
    va_start(ap, fmt);
    n += vsnprintf(buf + n, sizeof buf - (size_t)n - 2, fmt, ap);
    va_end(ap);
    if (n > (int)sizeof buf - 2) n = (int)sizeof buf - 2;
    buf[n++] = '\n';
    buf[n] = 0;
    say(result_wr, buf);
}

static void answer_err(const char *tag, int e)
{
    const char *name = strerrorname_np(e);
    answer(tag, "err %d %s", e, name ? name : "?");
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int type_of(const char *t)
{
    return t[0] == 'r' ? F_RDLCK : t[0] == 'w' ? F_WRLCK : F_UNLCK;
}

/* One lock call; 0 or an errno. */
static int do_lock(int fd, const char *kind, int type, long long start, long long len, int wait)
{
    int r;
    if (!strcmp(kind, "flock")) {
        int op = type == F_RDLCK ? LOCK_SH : type == F_WRLCK ? LOCK_EX : LOCK_UN;
        r = flock(fd, op | (wait || type == F_UNLCK ? 0 : LOCK_NB));
    } else {
        struct flock fl = { .l_type = (short)type, .l_whence = SEEK_SET,
                            .l_start = start, .l_len = len, .l_pid = 0 };
        int ofd = !strcmp(kind, "ofd");
        int cmd = ofd ? (wait ? F_OFD_SETLKW : F_OFD_SETLK) : (wait ? F_SETLKW : F_SETLK);
        r = fcntl(fd, cmd, &fl);
    }
    return r < 0 ? errno : 0;
}

static size_t unescape(const char *in, char *out, size_t cap)
{
    size_t n = 0;
    while (*in && n < cap) {
        if (in[0] == '\\' && in[1] == 'x' && isxdigit((unsigned char)in[2]) &&
            isxdigit((unsigned char)in[3])) {
            char h[3] = { in[2], in[3], 0 };
            out[n++] = (char)strtol(h, NULL, 16);
            in += 4;
        } else {
            out[n++] = *in++;
        }
    }
    return n;
}

static void escape(const unsigned char *in, size_t n, char *out, size_t cap)
{
    size_t o = 0;
    for (size_t i = 0; i < n && o + 5 < cap; i++) {
        if (in[i] > 32 && in[i] < 127 && in[i] != '\\')
            out[o++] = (char)in[i];
        else
            o += (size_t)snprintf(out + o, cap - o, "\\x%02x", in[i]);
    }
    out[o] = 0;
}

static void sleep_us(long us)
{
    struct timespec ts = { us / 1000000, (us % 1000000) * 1000 };
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {}
}

/* ------------------------------------------------------------------ data path commands */
/* Returns 1 when `cmd` was one of them (answered), 0 otherwise. */
static int data_command(const char *tag, const char *cmd, int argc, char **argv)
{
    if (!strcmp(cmd, "dstat") && argc >= 4) {
        long n = atol(argv[3]);
        struct stat st;
        uint64_t t0 = now_ns();
        for (long i = 0; i < n; i++)
            if (stat(argv[2], &st) < 0) { answer_err(tag, errno); return 1; }
        answer(tag, "ok %ld %llu", n, (unsigned long long)(n ? (now_ns() - t0) / (uint64_t)n : 0));
    } else if ((!strcmp(cmd, "dcreate") && argc >= 5) || (!strcmp(cmd, "dunlink") && argc >= 4)) {
        long n = atol(argv[3]);
        size_t size = argc >= 5 ? (size_t)atol(argv[4]) : 0;
        int create = cmd[1] == 'c';
        char path[LINE], *data = calloc(1, size + 1);
        if (!data) { answer_err(tag, ENOMEM); return 1; }
        memset(data, 'd', size);
        uint64_t t0 = now_ns();
        for (long i = 0; i < n; i++) {
            snprintf(path, sizeof path, "%s/f%05ld", argv[2], i);
            int e = 0;
            if (create) {
                int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
                if (fd < 0 || (size && write(fd, data, size) != (ssize_t)size)) e = errno;
                if (fd >= 0 && close(fd) < 0 && !e) e = errno;
            } else if (unlink(path) < 0) {
                e = errno;
            }
            if (e) { free(data); answer_err(tag, e); return 1; }
        }
        uint64_t dt = now_ns() - t0;
        free(data);
        answer(tag, "ok %ld %llu", n, (unsigned long long)(n ? dt / (uint64_t)n : 0));
    } else if (!strcmp(cmd, "dseqw") && argc >= 4) {
        long mib = atol(argv[3]);
        char *blk = malloc(1 << 20);
        int fd = open(argv[2], O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        if (!blk || fd < 0) { int e = blk ? errno : ENOMEM; free(blk); answer_err(tag, e); return 1; }
        for (int i = 0; i < (1 << 20); i++) blk[i] = (char)(i * 131 + 7);
        uint64_t t0 = now_ns();
        int e = 0;
        for (long i = 0; i < mib && !e; i++)
            if (write(fd, blk, 1 << 20) != 1 << 20) e = errno ? errno : EIO;
        if (!e && fsync(fd) < 0) e = errno;
        uint64_t dt = now_ns() - t0;
        close(fd);
        free(blk);
        if (e) answer_err(tag, e);
        else answer(tag, "ok %lld %llu", (long long)mib << 20, (unsigned long long)dt);
    } else if (!strcmp(cmd, "dseqr") && argc >= 3) {
        char *blk = malloc(1 << 20);
        int fd = open(argv[2], O_RDONLY | O_CLOEXEC);
        if (!blk || fd < 0) { int e = blk ? errno : ENOMEM; free(blk); answer_err(tag, e); return 1; }
        posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED); /* the guest's own cached pages */
        long long total = 0;
        ssize_t r;
        uint64_t t0 = now_ns();
        while ((r = read(fd, blk, 1 << 20)) > 0) total += r;
        uint64_t dt = now_ns() - t0;
        int e = r < 0 ? errno : 0;
        close(fd);
        free(blk);
        if (e) answer_err(tag, e);
        else answer(tag, "ok %lld %llu", total, (unsigned long long)dt);
    } else if (!strcmp(cmd, "drand") && argc >= 6) {
        long n = atol(argv[3]);
        size_t bs = (size_t)atol(argv[4]);
        int wr = argv[5][0] == 'w';
        int fd = open(argv[2], (wr ? O_RDWR : O_RDONLY) | O_DIRECT | O_CLOEXEC);
        if (fd < 0) { answer_err(tag, errno); return 1; }
        struct stat st;
        void *buf = NULL;
        if (fstat(fd, &st) < 0 || bs == 0 || (uint64_t)st.st_size < bs ||
            posix_memalign(&buf, 4096, bs)) {
            close(fd);
            answer_err(tag, EINVAL);
            return 1;
        }
        memset(buf, 'r', bs);
        uint64_t blocks = (uint64_t)st.st_size / bs, x = 88172645463325252ull;
        int e = 0;
        uint64_t t0 = now_ns();
        for (long i = 0; i < n && !e; i++) {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17; /* xorshift64: same offsets every run */
            off_t off = (off_t)((x % blocks) * bs);
            ssize_t r = wr ? pwrite(fd, buf, bs, off) : pread(fd, buf, bs, off);
            if (r != (ssize_t)bs) e = r < 0 ? errno : EIO;
        }
        uint64_t dt = now_ns() - t0;
        close(fd);
        free(buf);
        if (e) answer_err(tag, e);
        else answer(tag, "ok %ld %llu", n, (unsigned long long)(n ? dt / (uint64_t)n : 0));
    } else {
        return 0;
    }
    return 1;
}

/* ------------------------------------------------------------------ an owner process */
static void owner_command(char *line)
{
    static int fds[MAXSLOT] = { [0 ... MAXSLOT - 1] = -1 };
    char *argv[16];
    int argc = 0;
    for (char *s = strtok(line, " \t\r"); s && argc < 16; s = strtok(NULL, " \t\r"))
        argv[argc++] = s;
    if (argc < 2) return;
    const char *tag = argv[0], *cmd = argv[1];
    if (cmd[0] == 'd' && data_command(tag, cmd, argc, argv)) return;
    int slot = argc > 2 ? atoi(argv[2]) : 0;
    if (slot < 0 || slot >= MAXSLOT) { answer_err(tag, EBADF); return; }
    int fd = fds[slot];

    if (!strcmp(cmd, "open") && argc >= 4) {
        const char *mode = argc > 4 ? argv[4] : "rw";
        int flags = !strcmp(mode, "r") ? O_RDONLY
                  : !strcmp(mode, "create") ? O_RDWR | O_CREAT : O_RDWR;
        int nfd = open(argv[3], flags | O_CLOEXEC, 0666);
        if (nfd < 0) { answer_err(tag, errno); return; }
        if (fds[slot] >= 0) close(fds[slot]);
        fds[slot] = nfd;
        answer(tag, "ok");
    } else if (!strcmp(cmd, "close")) {
        if (fd < 0) { answer_err(tag, EBADF); return; }
        close(fd);
        fds[slot] = -1;
        answer(tag, "ok");
    } else if (!strcmp(cmd, "exit")) {
        answer(tag, "ok");
        _exit(0);
    } else if (!strcmp(cmd, "sleep")) {
        sleep_us(atol(argv[2]) * 1000);
        answer(tag, "ok");
    } else if (fd < 0) {
        answer_err(tag, EBADF);
    } else if (!strcmp(cmd, "lock") && argc >= 7) {
        int wait = argc > 7 && !strcmp(argv[7], "wait");
        int e = do_lock(fd, argv[3], type_of(argv[4]), atoll(argv[5]), atoll(argv[6]), wait);
        if (e) answer_err(tag, e); else answer(tag, "ok");
    } else if (!strcmp(cmd, "getlk") && argc >= 7) {
        struct flock fl = { .l_type = (short)type_of(argv[4]), .l_whence = SEEK_SET,
                            .l_start = atoll(argv[5]), .l_len = atoll(argv[6]) };
        int c = !strcmp(argv[3], "ofd") ? F_OFD_GETLK : F_GETLK;
        if (fcntl(fd, c, &fl) < 0) { answer_err(tag, errno); return; }
        if (fl.l_type == F_UNLCK)
            answer(tag, "ok u");
        else
            answer(tag, "ok %c %lld %lld %d", fl.l_type == F_RDLCK ? 'r' : 'w',
                   (long long)fl.l_start, (long long)fl.l_len, (int)fl.l_pid);
    } else if (!strcmp(cmd, "write") && argc >= 5) {
        char buf[LINE];
        size_t n = unescape(argv[4], buf, sizeof buf);
        ssize_t w = pwrite(fd, buf, n, atoll(argv[3]));
        if (w < 0) answer_err(tag, errno); else answer(tag, "ok %zd", w);
    } else if (!strcmp(cmd, "read") && argc >= 5) {
        unsigned char buf[1024];
        char out[4 * 1024 + 8];
        size_t want = (size_t)atol(argv[4]);
        if (want > sizeof buf) want = sizeof buf;
        ssize_t r = pread(fd, buf, want, atoll(argv[3]));
        if (r < 0) { answer_err(tag, errno); return; }
        escape(buf, (size_t)r, out, sizeof out);
        answer(tag, "ok %s", out);
    } else if (!strcmp(cmd, "bench") && argc >= 5) {
        long n = atol(argv[4]);
        const char *kind = argv[3];
        uint64_t t0 = now_ns();
        for (long i = 0; i < n; i++) {
            int e = do_lock(fd, kind, F_WRLCK, 0, 0, 0);
            if (!e) e = do_lock(fd, kind, F_UNLCK, 0, 0, 0);
            if (e) { answer_err(tag, e); return; }
        }
        uint64_t dt = now_ns() - t0;
        answer(tag, "ok %ld %llu", n, (unsigned long long)(n ? dt / (uint64_t)n : 0));
    } else if (!strcmp(cmd, "counter") && argc >= 5) {
        long n = atol(argv[4]), done = 0, bad = 0, last = -1;
        const char *kind = argv[3];
        int err = 0;
        for (long i = 0; i < n; i++) {
            int e = do_lock(fd, kind, F_WRLCK, 0, 0, 1);
            if (e == EINTR) { i--; continue; }
            if (e) { err = e; break; }
            char buf[64] = { 0 }, out[64];
            ssize_t r = pread(fd, buf, CWIDTH + 1, 0);
            char *end;
            long v = r > 0 ? strtol(buf, &end, 10) : -1;
            if (r <= 0 || end == buf) { bad++; v = -1; }
            if (v >= 0) {
                /* the rig's counter format: right-justified in 20 columns, newline */
                snprintf(out, sizeof out, "%*ld\n", CWIDTH, v + 1);
                if (pwrite(fd, out, CWIDTH + 1, 0) != CWIDTH + 1) bad++;
                else { done++; last = v + 1; }
            }
            e = do_lock(fd, kind, F_UNLCK, 0, 0, 0);
            if (e) { err = e; break; }
        }
        answer(tag, "ok %ld %ld %ld %d", done, last, bad, err);
    } else if (!strcmp(cmd, "flockmark") && argc >= 5) {
        long n = atol(argv[3]), done = 0, viol = 0;
        int err = 0;
        char me[MARK], free_[MARK], got[MARK];
        memset(free_, '-', MARK);
        memset(me, '-', MARK);
        memcpy(me, argv[4], strnlen(argv[4], MARK));
        for (long i = 0; i < n; i++) {
            int ex = i % 3 != 2;
            if (flock(fd, ex ? LOCK_EX : LOCK_SH) < 0) {
                if (errno == EINTR) { i--; continue; }
                err = errno;
                break;
            }
            if (pread(fd, got, MARK, 0) != MARK || memcmp(got, free_, MARK)) viol++;
            if (ex) {
                if (pwrite(fd, me, MARK, 0) != MARK) viol++;
                sleep_us(200);
                if (pread(fd, got, MARK, 0) != MARK || memcmp(got, me, MARK)) viol++;
                if (pwrite(fd, free_, MARK, 0) != MARK) viol++;
            }
            if (flock(fd, LOCK_UN) < 0) { err = errno; break; }
            done++;
        }
        answer(tag, "ok %ld %ld %d", done, viol, err);
    } else {
        answer_err(tag, EINVAL);
    }
}

static void owner_main(int cmd_fd)
{
    char buf[LINE];
    size_t have = 0;
    for (;;) {
        ssize_t r = read(cmd_fd, buf + have, sizeof buf - 1 - have);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) _exit(0);
        have += (size_t)r;
        char *nl;
        while ((nl = memchr(buf, '\n', have))) {
            *nl = 0;
            owner_command(buf);
            size_t used = (size_t)(nl + 1 - buf);
            memmove(buf, nl + 1, have - used);
            have -= used;
        }
        if (have == sizeof buf - 1) have = 0; /* an overlong line: drop it */
    }
}

/* ------------------------------------------------------------------ the dispatcher */
static struct owner *find_owner(const char *name, int create, int chan_in, int chan_out)
{
    for (int i = 0; i < MAXOWN; i++)
        if (owners[i].pid > 0 && !strcmp(owners[i].name, name)) return &owners[i];
    if (!create) return NULL;
    for (int i = 0; i < MAXOWN; i++) {
        if (owners[i].pid > 0) continue;
        int p[2];
        if (pipe2(p, O_CLOEXEC) < 0) return NULL;
        pid_t pid = fork();
        if (pid < 0) { close(p[0]); close(p[1]); return NULL; }
        if (pid == 0) {
            close(p[1]);
            if (chan_in > 2) close(chan_in);
            if (chan_out > 2 && chan_out != chan_in) close(chan_out);
            for (int j = 0; j < MAXOWN; j++)
                if (owners[j].pid > 0) close(owners[j].cmd_fd);
            signal(SIGPIPE, SIG_DFL);
            owner_main(p[0]);
        }
        close(p[0]);
        owners[i].pid = pid;
        owners[i].cmd_fd = p[1];
        snprintf(owners[i].name, sizeof owners[i].name, "%s", name);
        return &owners[i];
    }
    return NULL;
}

static void reap(int out)
{
    int st;
    pid_t pid;
    while ((pid = waitpid(-1, &st, WNOHANG)) > 0) {
        for (int i = 0; i < MAXOWN; i++) {
            if (owners[i].pid != pid) continue;
            char ev[128];
            snprintf(ev, sizeof ev, "* exit %.63s %d\n", owners[i].name,
                     WIFSIGNALED(st) ? -WTERMSIG(st) : WEXITSTATUS(st));
            say(out, ev);
            close(owners[i].cmd_fd);
            owners[i].pid = 0;
        }
    }
}

/* Returns 1 on quit. */
static int dispatch(char *line, int in, int out)
{
    char copy[LINE], tag[64], own[64], cmd[64];
    snprintf(copy, sizeof copy, "%s", line);
    if (sscanf(line, "%63s %63s %63s", tag, own, cmd) < 3) return 0;
    if (!strcmp(own, "-")) {
        char buf[160];
        if (!strcmp(cmd, "ping")) {
            snprintf(buf, sizeof buf, "%s ok pong\n", tag);
        } else if (!strcmp(cmd, "quit")) {
            snprintf(buf, sizeof buf, "%s ok\n", tag);
            say(out, buf);
            return 1;
        } else if (!strcmp(cmd, "kill")) {
            char victim[64] = "";
            sscanf(line, "%*s %*s %*s %63s", victim);
            struct owner *o = find_owner(victim, 0, in, out);
            if (o) {
                kill(o->pid, SIGKILL);
                snprintf(buf, sizeof buf, "%s ok\n", tag);
            } else {
                snprintf(buf, sizeof buf, "%s err %d ESRCH\n", tag, ESRCH);
            }
        } else {
            snprintf(buf, sizeof buf, "%s err %d EINVAL\n", tag, EINVAL);
        }
        say(out, buf);
        return 0;
    }
    struct owner *o = find_owner(own, 1, in, out);
    if (!o) {
        char buf[96];
        snprintf(buf, sizeof buf, "%s err %d EAGAIN\n", tag, EAGAIN);
        say(out, buf);
        return 0;
    }
    /* The owner sees "TAG CMD ARGS..." (its own name removed). */
    char *rest = copy;
    for (int k = 0; k < 2; k++) { /* skip TAG and OWNER */
        rest += strspn(rest, " \t");
        rest += strcspn(rest, " \t");
    }
    char msg[LINE + 80];
    int n = snprintf(msg, sizeof msg, "%s%s\n", tag, rest);
    if (n > 0) say(o->cmd_fd, msg);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: vlprobe CHANNEL|-\n");
        return 2;
    }
    int in = 0, out = 1;
    if (strcmp(argv[1], "-")) {
        in = out = open(argv[1], O_RDWR | O_NOCTTY);
        if (in < 0) { perror(argv[1]); return 1; }
    }
    signal(SIGPIPE, SIG_IGN);
    int rp[2];
    if (pipe2(rp, O_CLOEXEC) < 0) return 1;
    result_wr = rp[1];
    say(out, "* ready\n");
    char buf[LINE], rbuf[LINE];
    size_t have = 0;
    for (;;) {
        fd_set rs;
        FD_ZERO(&rs);
        FD_SET(in, &rs);
        FD_SET(rp[0], &rs);
        struct timeval tv = { 0, 200000 };
        int r = select((in > rp[0] ? in : rp[0]) + 1, &rs, NULL, NULL, &tv);
        reap(out);
        if (r < 0) continue;
        if (FD_ISSET(rp[0], &rs)) {
            ssize_t n = read(rp[0], rbuf, sizeof rbuf);
            if (n > 0) {
                /* lines from the pipe are whole (each write < PIPE_BUF) */
                size_t off = 0;
                while (off < (size_t)n) {
                    ssize_t w = write(out, rbuf + off, (size_t)n - off);
                    if (w < 0 && errno != EINTR) break;
                    if (w > 0) off += (size_t)w;
                }
            }
        }
        if (FD_ISSET(in, &rs)) {
            ssize_t n = read(in, buf + have, sizeof buf - 1 - have);
            if (n == 0 && in == 0) break;   /* EOF on stdin: done */
            if (n <= 0) {
                if (n < 0 && errno != EINTR && errno != EAGAIN) sleep_us(10000);
                if (n == 0) sleep_us(10000); /* a port with no host side reads 0 */
                continue;
            }
            have += (size_t)n;
            char *nl;
            while ((nl = memchr(buf, '\n', have))) {
                *nl = 0;
                if (dispatch(buf, in, out)) goto quit;
                size_t used = (size_t)(nl + 1 - buf);
                memmove(buf, nl + 1, have - used);
                have -= used;
            }
            if (have == sizeof buf - 1) have = 0;
        }
    }
quit:
    for (int i = 0; i < MAXOWN; i++)
        if (owners[i].pid > 0) kill(owners[i].pid, SIGKILL);
    while (wait(NULL) > 0) {}
    return 0;
}

/* vl-waiter: the waiting parent of the namespace sandbox (fuse_server/sandbox.py).
 *
 * With --sandbox=namespace the back-end unshares its PID namespace and forks; the parent
 * keeps the pid that launchers (libvirt, Kata) know. That parent only forwards signals,
 * waits and cleans up, so it execs this program instead of staying a whole Python
 * interpreter whose heap the child's writes have made private (2.5-4.4 MiB per guest).
 * exec keeps the pid, the process's record locks and every descriptor not marked
 * close-on-exec; the child's PR_SET_PDEATHSIG (SIGKILL) does not fire on exec.
 *
 * What it is told comes in the environment, so that /proc/PID/cmdline stays the
 * launcher's command line (tools find the back-end by it):
 *
 *     VFS_LOCKD_WAITER=CHILD/DIRFD/COMM[/INO/NAME]...
 *
 * CHILD: the sandboxed child's pid. DIRFD: a directory descriptor left open across the
 * exec (-1: none). COMM: the process name to keep (prctl PR_SET_NAME). Each INO/NAME:
 * after the child ended, unlink NAME in DIRFD if it is still the inode INO that the
 * back-end created (its socket and PATH.pid; a file name cannot contain '/'). Any other
 * descriptor the Python parent left open (PATH.pid, flock()ed) stays open until exit, so
 * the lock is held until the files are gone, as before.
 *
 * It forwards the same signals as the Python parent (sandbox.FORWARDED), reaps the child
 * and exits with its status: the exit code, or 128 + the signal that killed it. The
 * forwarded signals arrive blocked (the Python parent blocks them before it forks), so
 * none sent during the exec is lost: they stay pending and are taken here.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#define ENV_NAME "VFS_LOCKD_WAITER"
#define MAX_FILES 8

static const int forwarded[] = {SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2};

struct owned {
    unsigned long long ino;
    const char *name;
};

static int parse_long(const char *s, long long *out)
{
    char *end;

    if (*s == '\0')
        return -1;
    errno = 0;
    *out = strtoll(s, &end, 10);
    return (errno || *end != '\0') ? -1 : 0;
}

/* Only a bug gets here with a child running: it dies with us (PR_SET_PDEATHSIG). */
static void usage(const char *what)
{
    fprintf(stderr, "vl-waiter: %s " ENV_NAME "; it is run by vfs-lockd's namespace "
                    "sandbox, not by hand\n", what);
    exit(2);
}

/* The exit status of the Python parent for a wait status: the code, or 128 + signal. */
static int exit_code(int status)
{
    if (WIFEXITED(status))
        return WEXITSTATUS(status);
    if (WIFSIGNALED(status))
        return 128 + WTERMSIG(status);
    return 1;
}

/* 1 with *code set once the child has been reaped (or cannot be: code 1), else 0. */
static int reaped(pid_t child, int *code)
{
    int status;
    pid_t r;

    do
        r = waitpid(child, &status, WNOHANG);
    while (r < 0 && errno == EINTR);
    if (r == child) {
        *code = exit_code(status);
        return 1;
    }
    if (r < 0) { /* ECHILD: not ours (auto-reaped); the Python parent said 1 too */
        *code = 1;
        return 1;
    }
    return 0;
}

/* As the Python parent's at_exit did: the socket and PATH.pid, if still the inodes the
 * back-end created (a later back-end may have replaced them). */
static void remove_owned(int dirfd, const struct owned *files, int nfiles)
{
    for (int i = 0; i < nfiles && dirfd >= 0; i++) {
        struct stat st;

        if (fstatat(dirfd, files[i].name, &st, AT_SYMLINK_NOFOLLOW) == 0 &&
            (unsigned long long)st.st_ino == files[i].ino)
            unlinkat(dirfd, files[i].name, 0);
    }
}

int main(void)
{
    char *spec = getenv(ENV_NAME);
    struct owned files[MAX_FILES];
    int nfiles = 0, code = 1;
    long long child_ll, dirfd_ll;
    char *fields[3 + 2 * MAX_FILES];
    int nfields = 0;
    sigset_t set;

    if (spec == NULL)
        usage("started without");
    spec = strdup(spec);
    if (spec == NULL)
        return 1;
    unsetenv(ENV_NAME);
    for (char *p = spec;; p++) {
        fields[nfields++] = p;
        p = strchr(p, '/');
        if (p == NULL)
            break;
        *p = '\0';
        if (nfields == (int)(sizeof(fields) / sizeof(fields[0])))
            usage("a malformed");
    }
    if (nfields < 3 || (nfields - 3) % 2 != 0 || parse_long(fields[0], &child_ll) < 0 ||
        child_ll <= 0 || parse_long(fields[1], &dirfd_ll) < 0)
        usage("a malformed");
    for (int i = 3; i < nfields; i += 2) {
        long long ino;

        if (parse_long(fields[i], &ino) < 0 || fields[i + 1][0] == '\0')
            usage("a malformed");
        files[nfiles].ino = (unsigned long long)ino;
        files[nfiles].name = fields[i + 1];
        nfiles++;
    }
    if (fields[2][0] != '\0')
        prctl(PR_SET_NAME, (unsigned long)fields[2], 0, 0, 0);

    pid_t child = (pid_t)child_ll;
    int dirfd = (int)dirfd_ll;

    /* Everything this process cares about is taken synchronously with sigwaitinfo,
     * blocked first, then every disposition back to the default: a forwarded signal the
     * launcher left ignored is forwarded all the same (the Python parent's handlers
     * overrode it too), and a SIGCHLD left ignored would let the kernel reap the child
     * for us and lose its status. */
    sigemptyset(&set);
    for (size_t i = 0; i < sizeof(forwarded) / sizeof(forwarded[0]); i++)
        sigaddset(&set, forwarded[i]);
    sigaddset(&set, SIGCHLD);
    if (sigprocmask(SIG_BLOCK, &set, NULL) != 0) {
        int status;

        perror("vl-waiter: sigprocmask"); /* cannot forward: end the child, never hang */
        kill(child, SIGKILL);
        while (waitpid(child, &status, 0) < 0 && errno == EINTR)
            ;
    }
    for (size_t i = 0; i < sizeof(forwarded) / sizeof(forwarded[0]); i++)
        signal(forwarded[i], SIG_DFL);
    signal(SIGCHLD, SIG_DFL);

    /* The child may have ended already (before SIGCHLD was blocked): look first. */
    while (!reaped(child, &code)) {
        siginfo_t info;
        int sig = sigwaitinfo(&set, &info);

        if (sig < 0 || sig == SIGCHLD)
            continue; /* EINTR (a stop/continue), or look again */
        if (kill(child, sig) != 0 && errno != ESRCH)
            perror("vl-waiter: forwarding a signal");
    }
    remove_owned(dirfd, files, nfiles);
    _exit(code);
}

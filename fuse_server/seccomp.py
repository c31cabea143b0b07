"""The back-end's seccomp filter: an allowlist of system calls, as virtiofsd's --seccomp.

A compromised back-end (it parses what a hostile guest sends) may then make only the
calls serving a share needs: files and directories by descriptor, sockets it already
has or reconnects to the lock daemon (and the one it binds to hand descriptors over in
a live migration, fuse_server/migration.py), threads, memory, signals, io_uring. Never execve,
mount, ptrace, personality, module or key calls, bpf, namespaces. What another call gets
is the mode's action, as virtiofsd's modes (libseccomp's actions) mean:

- `kill`: the whole process dies as by SIGSYS (SECCOMP_RET_KILL_PROCESS); the default,
  as virtiofsd's;
- `trap`: SIGSYS is sent to the calling thread (SECCOMP_RET_TRAP; uncaught, it ends the
  process with a core dump);
- `log`: the call is made, and the kernel logs it (SECCOMP_RET_LOG: an audit record,
  "type=1326 ... syscall=N", in the kernel log when no audit daemon runs);
- `none`: no filter.

The program is classic BPF written here (no libseccomp binding to install): check the
architecture the call came from (anything else, including x32 on x86_64, gets the
action), then one `jeq` per allowed number. The kernel caches the verdict per call
number for such argument-free filters, so serving pays nothing per call. It is
installed with SECCOMP_FILTER_FLAG_TSYNC (every thread of the process), after
PR_SET_NO_NEW_PRIVS, and stays for the life of the process and its children.
"""

from __future__ import annotations

import ctypes
import os
import struct

MODES = ("none", "kill", "log", "trap")
DEFAULT = "kill"

# The allowlist, by name (written once; numbers per architecture below).
ALLOWED = frozenset("""
accept accept4 access bind brk capget capset clock_getres clock_gettime clock_nanosleep clone
clone3 close close_range connect copy_file_range dup dup2 dup3 epoll_create epoll_create1
epoll_ctl epoll_pwait epoll_pwait2 epoll_wait eventfd eventfd2 exit exit_group faccessat
faccessat2 fadvise64 fallocate fchdir fchmod fchmodat fchmodat2 fchown fchownat fcntl
fdatasync fgetxattr flistxattr flock fremovexattr fsetxattr fstat fstatfs fsync ftruncate
futex futex_waitv getcwd getdents getdents64 getegid geteuid getgid getgroups getpeername
getpgrp getpid getppid getpriority getrandom getresgid getresuid getrlimit getrusage
getsockname getsockopt gettid gettimeofday getuid getxattr io_uring_enter
io_uring_register io_uring_setup ioctl lgetxattr link linkat listen listxattr llistxattr
lremovexattr lseek lsetxattr lstat madvise membarrier memfd_create mkdir mkdirat mknod
mknodat mmap mprotect mremap msync munmap name_to_handle_at nanosleep newfstatat open
open_by_handle_at openat openat2 pipe pipe2 poll ppoll prctl pread64 preadv preadv2
prlimit64 pselect6 pwrite64 pwritev pwritev2 read readlink readlinkat readv recvfrom
recvmmsg recvmsg removexattr rename renameat renameat2 restart_syscall rmdir rseq
rt_sigaction rt_sigpending rt_sigprocmask rt_sigreturn rt_sigtimedwait sched_getaffinity
sched_yield select sendfile sendmmsg sendmsg sendto set_robust_list set_tid_address
setfsgid setfsuid setsockopt setxattr shutdown sigaltstack socket socketpair stat statfs
statx symlink symlinkat sync_file_range syncfs sysinfo tgkill time timerfd_create
timerfd_gettime timerfd_settime tkill truncate umask uname unlink unlinkat utime utimensat
utimes wait4 write writev
""".split())

# Numbers (arch/x86/entry/syscalls/syscall_64.tbl; include/uapi/asm-generic/unistd.h).
_X86_64 = {
    "accept": 43, "accept4": 288, "access": 21, "bind": 49, "brk": 12, "capget": 125, "capset": 126,
    "clock_getres": 229, "clock_gettime": 228, "clock_nanosleep": 230, "clone": 56,
    "clone3": 435, "close": 3, "close_range": 436, "connect": 42, "copy_file_range": 326,
    "dup": 32, "dup2": 33, "dup3": 292, "epoll_create": 213, "epoll_create1": 291,
    "epoll_ctl": 233, "epoll_pwait": 281, "epoll_pwait2": 441, "epoll_wait": 232,
    "eventfd": 284, "eventfd2": 290, "exit": 60, "exit_group": 231, "faccessat": 269,
    "faccessat2": 439, "fadvise64": 221, "fallocate": 285, "fchdir": 81, "fchmod": 91,
    "fchmodat": 268, "fchown": 93, "fchownat": 260, "fcntl": 72, "fdatasync": 75,
    "fgetxattr": 193, "flistxattr": 196, "flock": 73, "fremovexattr": 199,
    "fsetxattr": 190, "fstat": 5, "fstatfs": 138, "fsync": 74, "ftruncate": 77,
    "futex": 202, "futex_waitv": 449, "getcwd": 79, "getdents": 78, "getdents64": 217,
    "getegid": 108, "geteuid": 107, "getgid": 104, "getgroups": 115, "getpeername": 52,
    "getpgrp": 111, "getpid": 39, "getppid": 110, "getpriority": 140, "getrandom": 318,
    "getresgid": 120, "getresuid": 118, "getrlimit": 97, "getrusage": 98,
    "getsockname": 51, "getsockopt": 55, "gettid": 186, "gettimeofday": 96, "getuid": 102,
    "getxattr": 191, "io_uring_enter": 426, "io_uring_register": 427,
    "io_uring_setup": 425, "ioctl": 16, "lgetxattr": 192, "link": 86, "linkat": 265,
    "listen": 50, "listxattr": 194, "llistxattr": 195, "lremovexattr": 198, "lseek": 8,
    "lsetxattr": 189, "lstat": 6, "madvise": 28, "membarrier": 324, "memfd_create": 319,
    "mkdir": 83, "mkdirat": 258, "mknod": 133, "mknodat": 259, "mmap": 9, "mprotect": 10,
    "mremap": 25, "msync": 26, "munmap": 11, "name_to_handle_at": 303, "nanosleep": 35,
    "newfstatat": 262, "open": 2, "open_by_handle_at": 304, "openat": 257, "openat2": 437,
    "pipe": 22, "pipe2": 293, "poll": 7, "ppoll": 271, "prctl": 157, "pread64": 17,
    "preadv": 295, "preadv2": 327, "prlimit64": 302, "pselect6": 270, "pwrite64": 18,
    "pwritev": 296, "pwritev2": 328, "read": 0, "readlink": 89, "readlinkat": 267,
    "readv": 19, "recvfrom": 45, "recvmmsg": 299, "recvmsg": 47, "removexattr": 197,
    "rename": 82, "renameat": 264, "renameat2": 316, "restart_syscall": 219, "rmdir": 84,
    "rseq": 334, "rt_sigaction": 13, "rt_sigpending": 127, "rt_sigprocmask": 14,
    "rt_sigreturn": 15, "rt_sigtimedwait": 128, "sched_getaffinity": 204,
    "sched_yield": 24, "select": 23, "sendfile": 40, "sendmmsg": 307, "sendmsg": 46,
    "sendto": 44, "set_robust_list": 273, "set_tid_address": 218, "setfsgid": 123,
    "setfsuid": 122, "setsockopt": 54, "setxattr": 188, "shutdown": 48, "sigaltstack": 131,
    "socket": 41, "socketpair": 53, "stat": 4, "statfs": 137, "statx": 332, "symlink": 88,
    "symlinkat": 266, "sync_file_range": 277, "syncfs": 306, "sysinfo": 99, "tgkill": 234,
    "time": 201, "timerfd_create": 283, "timerfd_gettime": 287, "timerfd_settime": 286,
    "tkill": 200, "truncate": 76, "umask": 95, "uname": 63, "unlink": 87, "unlinkat": 263,
    "utime": 132, "utimensat": 280, "utimes": 235, "wait4": 61, "write": 1, "writev": 20,
}
_AARCH64 = {
    "accept": 202, "accept4": 242, "bind": 200, "brk": 214, "capget": 90, "capset": 91,
    "clock_getres": 114, "clock_gettime": 113, "clock_nanosleep": 115, "clone": 220,
    "clone3": 435, "close": 57, "close_range": 436, "connect": 203, "copy_file_range": 285,
    "dup": 23, "dup3": 24, "epoll_create1": 20, "epoll_ctl": 21, "epoll_pwait": 22,
    "epoll_pwait2": 441, "eventfd2": 19, "exit": 93, "exit_group": 94, "faccessat": 48,
    "faccessat2": 439, "fadvise64": 223, "fallocate": 47, "fchdir": 50, "fchmod": 52,
    "fchmodat": 53, "fchown": 55, "fchownat": 54, "fcntl": 25, "fdatasync": 83,
    "fgetxattr": 10, "flistxattr": 13, "flock": 32, "fremovexattr": 16, "fsetxattr": 7,
    "fstat": 80, "fstatfs": 44, "fsync": 82, "ftruncate": 46, "futex": 98,
    "futex_waitv": 449, "getcwd": 17, "getdents64": 61, "getegid": 177, "geteuid": 175,
    "getgid": 176, "getgroups": 158, "getpeername": 205, "getpid": 172, "getppid": 173,
    "getpriority": 141, "getrandom": 278, "getresgid": 150, "getresuid": 148,
    "getrlimit": 163, "getrusage": 165, "getsockname": 204, "getsockopt": 209,
    "gettid": 178, "gettimeofday": 169, "getuid": 174, "getxattr": 8,
    "io_uring_enter": 426, "io_uring_register": 427, "io_uring_setup": 425, "ioctl": 29,
    "lgetxattr": 9, "linkat": 37, "listen": 201, "listxattr": 11, "llistxattr": 12,
    "lremovexattr": 15, "lseek": 62, "lsetxattr": 6, "madvise": 233, "membarrier": 283,
    "memfd_create": 279, "mkdirat": 34, "mknodat": 33, "mmap": 222, "mprotect": 226,
    "mremap": 216, "msync": 227, "munmap": 215, "name_to_handle_at": 264, "nanosleep": 101,
    "newfstatat": 79, "open_by_handle_at": 265, "openat": 56, "openat2": 437, "pipe2": 59,
    "ppoll": 73, "prctl": 167, "pread64": 67, "preadv": 69, "preadv2": 286,
    "prlimit64": 261, "pselect6": 72, "pwrite64": 68, "pwritev": 70, "pwritev2": 287,
    "read": 63, "readlinkat": 78, "readv": 65, "recvfrom": 207, "recvmmsg": 243,
    "recvmsg": 212, "removexattr": 14, "renameat": 38, "renameat2": 276,
    "restart_syscall": 128, "rseq": 293, "rt_sigaction": 134, "rt_sigpending": 136,
    "rt_sigprocmask": 135, "rt_sigreturn": 139, "rt_sigtimedwait": 137,
    "sched_getaffinity": 123, "sched_yield": 124, "sendfile": 71, "sendmmsg": 269,
    "sendmsg": 211, "sendto": 206, "set_robust_list": 99, "set_tid_address": 96,
    "setfsgid": 152, "setfsuid": 151, "setsockopt": 208, "setxattr": 5, "shutdown": 210,
    "sigaltstack": 132, "socket": 198, "socketpair": 199, "statfs": 43, "statx": 291,
    "symlinkat": 36, "sync_file_range": 84, "syncfs": 267, "sysinfo": 179, "tgkill": 131,
    "timerfd_create": 85, "timerfd_gettime": 87, "timerfd_settime": 86, "tkill": 130,
    "truncate": 45, "umask": 166, "uname": 160, "unlinkat": 35, "utimensat": 88,
    "wait4": 260, "write": 64, "writev": 66,
}
_X86_64["fchmodat2"] = _AARCH64["fchmodat2"] = 452
# (AUDIT_ARCH_*, table, seccomp(2)'s own number, lowest number that is not this ABI)
_ARCHES = {
    "x86_64": (0xC000003E, _X86_64, 317, 0x40000000),  # >= 0x40000000: the x32 ABI
    "aarch64": (0xC00000B7, _AARCH64, 277, None),
}

_RET = {"kill": 0x80000000, "trap": 0x00030000, "log": 0x7FFC0000}  # SECCOMP_RET_*
_RET_ALLOW = 0x7FFF0000
_LD_W_ABS, _JEQ_K, _JGE_K, _RET_K = 0x20, 0x15, 0x35, 0x06  # BPF opcodes
_NR_OFF, _ARCH_OFF = 0, 4  # struct seccomp_data
_PR_SET_NO_NEW_PRIVS = 38
_SECCOMP_SET_MODE_FILTER, _SECCOMP_FILTER_FLAG_TSYNC = 1, 1
_INSN = struct.Struct("=HBBI")  # struct sock_filter


class SeccompError(Exception):
    """The filter could not be installed."""


class _Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def supported(machine: str | None = None) -> bool:
    """Is there a system call table for `machine` (default: this one)?"""
    return (machine or os.uname().machine) in _ARCHES


def program(mode: str, machine: str | None = None) -> bytes:
    """The BPF program (struct sock_filter[]) of `mode` for `machine` (uname -m)."""
    if mode not in _RET:
        raise SeccompError(f"no filter for seccomp mode {mode!r}")
    machine = machine or os.uname().machine
    if machine not in _ARCHES:
        raise SeccompError(f"no system call table for {machine}")
    audit_arch, table, _, foreign = _ARCHES[machine]
    deny = _RET[mode]
    insns = [(_LD_W_ABS, 0, 0, _ARCH_OFF),
             (_JEQ_K, 1, 0, audit_arch),  # ours: skip the next
             (_RET_K, 0, 0, deny),
             (_LD_W_ABS, 0, 0, _NR_OFF)]
    if foreign is not None:
        insns += [(_JGE_K, 0, 1, foreign), (_RET_K, 0, 0, deny)]
    for nr in sorted({table[name] for name in ALLOWED if name in table}):
        insns += [(_JEQ_K, 0, 1, nr), (_RET_K, 0, 0, _RET_ALLOW)]  # short jumps only
    insns.append((_RET_K, 0, 0, deny))
    return b"".join(_INSN.pack(*i) for i in insns)


def install(mode: str) -> None:
    """Install the filter of `mode` on every thread of this process ("none": nothing).
    Raises SeccompError."""
    if mode == "none":
        return
    code = program(mode)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                           ctypes.c_ulong]
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        e = ctypes.get_errno()
        raise SeccompError(f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(e)}")
    buf = ctypes.create_string_buffer(code, len(code))
    prog = _Fprog(len(code) // _INSN.size, ctypes.cast(buf, ctypes.c_void_p))
    nr = _ARCHES[os.uname().machine][2]
    libc.syscall.restype = ctypes.c_long
    ret = libc.syscall(ctypes.c_long(nr), ctypes.c_uint(_SECCOMP_SET_MODE_FILTER),
                       ctypes.c_uint(_SECCOMP_FILTER_FLAG_TSYNC), ctypes.byref(prog))
    if ret < 0:
        e = ctypes.get_errno()
        raise SeccompError(f"seccomp(SECCOMP_SET_MODE_FILTER): {os.strerror(e)}")
    if ret > 0:
        raise SeccompError(f"seccomp: thread {ret} could not take the filter")

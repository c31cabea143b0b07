#!/usr/bin/env python3
"""Fuzz the FUSE session (fuse_server/session.py) with atheris: every opcode, sent as a
hostile guest kernel would send it.

    python scripts/fuzz_session.py [--seconds N] [--asan] [-- extra libFuzzer args]

Each input is a script of up to 24 requests against a fresh share holding a file, a
directory, symlinks out of the share, a FIFO, a socket and (as root) a character device,
next to a directory the share must never reach. A structured generator turns the input
into requests: the opcode (every one the ABI names, and unknown ones), the header (node
ids and file handles the session handed out, or any; the caller's uid/gid; sometimes a
wrong length), a body built from the opcode's layout with fuzzed fields and names from a
dictionary ('..', 'a/b', 256 bytes, the seeds, ...) or raw bytes, cut short at times; and
the room the guest gives for the reply (a virtqueue chain), or none (/dev/fuse).

Checked after every request: handle() returns and never raises; a reply is one well-formed
fuse_out_header (its unique, its length, 0 or -errno, no payload after an error); nothing
is answered for FORGET/BATCH_FORGET/NOTIFY_REPLY, and only lock requests are answered
later (through send, well-formed too); a READ/READDIR/GETXATTR/LISTXATTR reply fits the
guest's room and no reply outgrows INIT's maximum; the thread's fsuid/fsgid are back to
the server's; no special file is open (anything but O_PATH on a FIFO or device); nothing
outside the share changed; the native fast path (native/vl_serve.c), tried first as
/dev/fuse's loop tries it, answers byte for byte what the session answers, or leaves the
request to it. After the input, Session.end() leaves no descriptor behind.
With --asan the native codec (every header is decoded by it) runs under ASan/UBSan in a
second phase, as in scripts/fuzz_codec.py. The test suite runs a bounded --asan run.
"""

from __future__ import annotations

import ctypes
import logging
import os
import random
import resource
import shutil
import signal
import stat
import struct
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
sys.path.insert(0, ROOT)

from fuzz_codec import load_native_from, run  # noqa: E402

MAX_REQUESTS = 24
FILE_LIMIT = 8 << 20  # RLIMIT_FSIZE: a fuzzed WRITE or FALLOCATE cannot fill the disk
NAMES = [b"f", b"d", b"l", b"abs", b"fifo", b"null", b"sock", b"new", b"n2", b"..", b".",
         b"", b"a/b", b"x" * 256, b"d/..", b"f\0g"]
XATTRS = [b"user.x", b"user.y", b"system.posix_acl_access", b"system.posix_acl_default",
          b"trusted.x", b"security.capability", b"", b"bogus"]
UIDS = [0, 0, 65534, 1000, 0xFFFFFFFF]
SIZES = [0, 1, 7, 8, 24, 100, 4096, 65536, 1 << 20, (1 << 20) + 1, 1 << 30, 0xFFFFFFFF]
OFFSETS = [0, 1, 4095, 1 << 20, 1 << 40, (1 << 63) - 1, (1 << 64) - 1]
ROOMS = [None, None, 0, 15, 16, 23, 24, 40, 100, 4096, 65536, (1 << 20) + 16, 1 << 21]
MODES = [stat.S_IFREG, stat.S_IFDIR, stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK,
         stat.S_IFLNK, 0]
OPEN_FLAGS = [os.O_RDONLY, os.O_WRONLY, os.O_RDWR, os.O_RDWR | os.O_TRUNC,
              os.O_RDONLY | os.O_NONBLOCK, os.O_WRONLY | os.O_APPEND, os.O_RDWR | os.O_CREAT,
              os.O_RDWR | os.O_EXCL | os.O_CREAT, os.O_PATH, os.O_TMPFILE | os.O_RDWR,
              os.O_DIRECTORY, os.O_NOFOLLOW, os.O_DIRECT | os.O_RDWR]
_libc = ctypes.CDLL(None, use_errno=True)


def write_seeds(d: str) -> None:
    """Inputs long enough for scripts of many requests (libFuzzer grows lengths slowly)."""
    rng = random.Random(15)
    for i, n in enumerate((64, 256, 512, 1024, 2048, 4096)):
        with open(os.path.join(d, f"seed-{i}"), "wb") as f:
            f.write(rng.randbytes(n))


def build_share(base: str) -> tuple[str, str]:
    """A fresh share and the directory next to it that it must never reach."""
    share, outside = os.path.join(base, "share"), os.path.join(base, "outside")
    os.mkdir(share)
    os.mkdir(outside)
    with open(os.path.join(outside, "secret"), "wb") as f:
        f.write(b"secret")
    with open(os.path.join(share, "f"), "wb") as f:
        f.write(bytes(range(256)) * 64)
    os.mkdir(os.path.join(share, "d"))
    with open(os.path.join(share, "d", "g"), "wb") as f:
        f.write(b"g")
    os.symlink("../outside/secret", os.path.join(share, "l"))
    os.symlink(os.path.join(outside, "secret"), os.path.join(share, "abs"))
    os.mkfifo(os.path.join(share, "fifo"))
    os.mknod(os.path.join(share, "sock"), stat.S_IFSOCK | 0o666)
    if os.geteuid() == 0:
        os.mknod(os.path.join(share, "null"), stat.S_IFCHR | 0o666, os.makedev(1, 3))
    return share, outside


def snapshot(path: str) -> list[tuple]:
    """What must not change outside the share: names, contents, attributes."""
    out = []
    for name in sorted(os.listdir(path)):
        st = os.lstat(os.path.join(path, name))
        out.append((name, st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns,
                    st.st_ctime_ns, st.st_nlink))
    return out


def open_specials() -> list[str]:
    """Descriptors of this process that really open a FIFO or a device (not O_PATH)."""
    bad = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            mode = os.fstat(fd).st_mode
        except OSError:
            continue
        if not (stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISBLK(mode)):
            continue
        try:
            with open(f"/proc/self/fdinfo/{fd}") as f:
                flags = int(f.read().split("flags:")[1].split()[0], 8)
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if not flags & os.O_PATH and "/share/" in target:
            bad.append(target)
    return bad


class Script:
    """The requests of one input, built from a FuzzedDataProvider."""

    def __init__(self, fdp, P, opcodes: list[int]) -> None:  # noqa: ANN001, N803
        self.fdp, self.P, self.opcodes = fdp, P, opcodes
        self.nodes = [1]
        self.fhs = [0]
        self.uniques = [0]

    def pick(self, items: list):  # noqa: ANN201
        return self.fdp.PickValueInList(items)

    def num(self, choices: list[int], bits: int = 64) -> int:
        if self.fdp.ConsumeIntInRange(0, 3):
            return self.pick(choices)
        return self.fdp.ConsumeIntInRange(0, (1 << bits) - 1)

    def node(self) -> int:
        return self.pick(self.nodes) if self.fdp.ConsumeIntInRange(0, 7) else \
            self.fdp.ConsumeIntInRange(0, (1 << 64) - 1)

    def fh(self) -> int:
        return self.pick(self.fhs) if self.fdp.ConsumeIntInRange(0, 7) else \
            self.fdp.ConsumeIntInRange(0, 1 << 20)

    def name(self, z: bytes = b"\0") -> bytes:
        if self.fdp.ConsumeIntInRange(0, 9):
            return self.pick(NAMES) + z
        return self.fdp.ConsumeBytes(self.fdp.ConsumeIntInRange(0, 40)) + z

    def xname(self) -> bytes:
        return self.pick(XATTRS) + b"\0"

    def mode(self) -> int:
        return self.pick(MODES) | self.fdp.ConsumeIntInRange(0, 0o7777)

    def body(self, op: int) -> bytes:  # noqa: C901 - one branch per opcode
        P, f = self.P, self.fdp  # noqa: N806
        u32 = lambda: self.num([0, 1, 0xFFFFFFFF], 32)  # noqa: E731
        if op in (P.LOOKUP, P.UNLINK, P.RMDIR):
            return self.name()
        if op == P.REMOVEXATTR:
            return self.xname()
        if op == P.FORGET:
            return P.FORGET_IN.pack(self.num([0, 1, 2, 1 << 63]))
        if op == P.BATCH_FORGET:
            n = f.ConsumeIntInRange(0, 4)
            items = b"".join(P.FORGET_ONE.pack(self.node(), self.num([1, 2])) for _ in range(n))
            return P.BATCH_FORGET_IN.pack(self.num([n, n + 1, 1 << 31], 32), 0) + items
        if op == P.GETATTR:
            return P.GETATTR_IN.pack(f.ConsumeIntInRange(0, 3), 0, self.fh())
        if op == P.SETATTR:
            return P.SETATTR_IN.pack(f.ConsumeIntInRange(0, (1 << 11) - 1), 0, self.fh(),
                                     self.num(OFFSETS), 0, self.num([0, 1]), self.num([0, 1]),
                                     0, self.num([0, 10**9], 32), self.num([0, 999], 32), 0,
                                     self.mode(), 0, self.pick(UIDS), self.pick(UIDS), 0)
        if op == P.SYMLINK:
            return self.name() + self.name()
        if op == P.MKNOD:
            rdev = self.num([0, 0x103, 0x700, 0x801], 32)
            return P.MKNOD_IN.pack(self.mode(), rdev, u32() & 0o777, 0) + self.name()
        if op == P.MKDIR:
            return P.MKDIR_IN.pack(self.mode(), u32() & 0o777) + self.name()
        if op == P.RENAME:
            return P.RENAME_IN.pack(self.node()) + self.name() + self.name()
        if op == P.RENAME2:
            return P.RENAME2_IN.pack(self.node(), self.num([0, 1, 2, 4], 32), 0) + \
                self.name() + self.name()
        if op == P.LINK:
            return P.LINK_IN.pack(self.node()) + self.name()
        if op in (P.OPEN, P.OPENDIR):
            return P.OPEN_IN.pack(self.num(OPEN_FLAGS, 32), 0)
        if op in (P.READ, P.READDIR, P.READDIRPLUS):
            return P.READ_IN.pack(self.fh(), self.num(OFFSETS), self.num(SIZES, 32), 0, 0, 0, 0)
        if op == P.WRITE:
            data = f.ConsumeBytes(f.ConsumeIntInRange(0, 200))
            size = len(data) if f.ConsumeIntInRange(0, 7) else u32()
            # (write_flags: FUSE_WRITE_KILL_SUIDGID and the rest, drawn)
            return P.WRITE_IN.pack(self.fh(), self.num(OFFSETS), size, f.ConsumeIntInRange(0, 7),
                                   0, 0, 0) + data
        if op in (P.RELEASE, P.RELEASEDIR):
            return P.RELEASE_IN.pack(self.fh(), u32(), f.ConsumeIntInRange(0, 3), self.num([0, 1]))
        if op in (P.FSYNC, P.FSYNCDIR):
            return P.FSYNC_IN.pack(self.fh(), f.ConsumeIntInRange(0, 1), 0)
        if op == P.SETXATTR:
            value = f.ConsumeBytes(f.ConsumeIntInRange(0, 64))
            size = len(value) if f.ConsumeIntInRange(0, 7) else u32()
            return P.SETXATTR_IN.pack(size, f.ConsumeIntInRange(0, 3)) + self.xname() + value
        if op == P.GETXATTR:
            return P.GETXATTR_IN.pack(self.num(SIZES, 32), 0) + self.xname()
        if op == P.LISTXATTR:
            return P.GETXATTR_IN.pack(self.num(SIZES, 32), 0)
        if op == P.FLUSH:
            return P.FLUSH_IN.pack(self.fh(), 0, 0, self.num([0, 1, 2]))
        if op == P.INIT:
            minor = self.num([31, 36, 38, 45, 0], 32)
            return P.INIT_IN.pack(self.num([7, 6, 8], 32), minor, 65536, u32()) + \
                (P.INIT_IN_FLAGS2.pack(u32()) + bytes(44) if f.ConsumeBool() else b"")
        if op in (P.GETLK, P.SETLK, P.SETLKW):
            start = self.num([0, 10, 1 << 62])
            end = self.num([start, (start + 10) % (1 << 64), (1 << 63) - 1, (1 << 64) - 1])
            return P.LK_IN.pack(self.fh(), self.num([0, 1, 2, 3]), start, end,
                                self.num([0, 1, 2, 3], 32), 4242, f.ConsumeIntInRange(0, 1))
        if op == P.ACCESS:
            return P.ACCESS_IN.pack(f.ConsumeIntInRange(0, 15), 0)
        if op == P.CREATE:
            return P.CREATE_IN.pack(self.num(OPEN_FLAGS, 32) | os.O_CREAT, self.mode(),
                                    u32() & 0o777, 0) + self.name()
        if op == P.INTERRUPT:
            return P.INTERRUPT_IN.pack(self.pick(self.uniques))
        if op == P.FALLOCATE:
            return P.FALLOCATE_IN.pack(self.fh(), self.num(OFFSETS), self.num([1, 4096, 1 << 30]),
                                       f.ConsumeIntInRange(0, 0x7F), 0)
        if op == P.LSEEK:
            return P.LSEEK_IN.pack(self.fh(), self.num(OFFSETS), f.ConsumeIntInRange(0, 5), 0)
        return f.ConsumeBytes(f.ConsumeIntInRange(0, 64))  # READLINK, STATFS, DESTROY, ...

    def request(self, unique: int) -> tuple[int, bytes, int | None]:
        """(opcode, bytes, room) of the next request."""
        P, f = self.P, self.fdp  # noqa: N806
        op = self.pick(self.opcodes) if f.ConsumeIntInRange(0, 15) else f.ConsumeIntInRange(0, 4200)
        body = self.body(op) if f.ConsumeIntInRange(0, 15) else f.ConsumeBytes(f.ConsumeIntInRange(0, 96))
        if not f.ConsumeIntInRange(0, 11):
            body = body[: f.ConsumeIntInRange(0, len(body))]  # cut short
        length = P.IN_HEADER.size + len(body)
        if not f.ConsumeIntInRange(0, 31):
            length = f.ConsumeIntInRange(0, length + 64)
        hdr = P.IN_HEADER.pack(length, op, unique, self.node(), self.pick(UIDS), self.pick(UIDS),
                               f.ConsumeIntInRange(0, 1 << 16), 0, 0)
        return op, hdr + body, self.pick(ROOMS)

    def learn(self, op: int, reply: bytes) -> None:
        """Node ids and handles from successful replies: later requests use them."""
        P = self.P  # noqa: N806
        if len(reply) < 16 or P.OUT_HEADER.unpack_from(reply)[1] != 0:
            return
        payload = reply[16:]
        if op in (P.LOOKUP, P.MKNOD, P.MKDIR, P.SYMLINK, P.LINK, P.CREATE) and len(payload) >= 8:
            self.nodes.append(struct.unpack_from("<Q", payload)[0])
        if op in (P.OPEN, P.OPENDIR) and len(payload) >= 8:
            self.fhs.append(struct.unpack_from("<Q", payload)[0])
        if op == P.CREATE and len(payload) >= P.ENTRY_OUT_SIZE + 8:
            self.fhs.append(struct.unpack_from("<Q", payload, P.ENTRY_OUT_SIZE)[0])


def check_reply(P, op: int, unique: int, reply: bytes, room: int | None, max_reply: int,  # noqa: ANN001, N803
                sized: frozenset[int]) -> None:
    if len(reply) < 16:
        raise AssertionError(f"opcode {op}: a {len(reply)}-byte reply")
    length, error, got = P.OUT_HEADER.unpack_from(reply)
    if length != len(reply) or got != unique:
        raise AssertionError(f"opcode {op}: header ({length}, {got}) for {len(reply)} bytes, "
                             f"unique {unique}")
    if error > 0 or error < -4095 or (error and length != 16):
        raise AssertionError(f"opcode {op}: error {error} with {length} bytes")
    if len(reply) > max_reply:
        raise AssertionError(f"opcode {op}: a {len(reply)}-byte reply")
    if room is not None and op in sized and len(reply) > max(room, 24):
        raise AssertionError(f"opcode {op}: {len(reply)} bytes for a {room}-byte buffer")


def fuzz(seconds: int, extra: list[str]) -> None:
    so = os.environ.get("VFS_LOCKD_FUZZ_SO")
    if so:
        load_native_from(so)
    import atheris

    with atheris.instrument_imports():
        from fuse_server import creds, moves, passthrough, protocol, session  # noqa: F401
        from lockd.engine.manager import LockManager
        from lockd.fuse import abi
    if so:
        assert sys.modules["lockd._native"].__file__ == so
        # No coverage feedback under the preloaded sanitizer runtime: long inputs (many
        # requests) from the start instead of libFuzzer's slowly growing length limit.
        extra = ["-len_control=0", *extra]
    P = protocol  # noqa: N806
    opcodes = sorted(getattr(abi, n) for n in (
        "LOOKUP FORGET GETATTR SETATTR READLINK SYMLINK MKNOD MKDIR UNLINK RMDIR RENAME LINK "
        "OPEN READ WRITE STATFS RELEASE FSYNC SETXATTR GETXATTR LISTXATTR REMOVEXATTR FLUSH "
        "INIT OPENDIR READDIR RELEASEDIR FSYNCDIR GETLK SETLK SETLKW ACCESS CREATE INTERRUPT "
        "BMAP DESTROY IOCTL POLL NOTIFY_REPLY BATCH_FORGET FALLOCATE READDIRPLUS RENAME2 "
        "LSEEK COPY_FILE_RANGE").split())
    sized = frozenset((P.READ, P.READDIR, P.READDIRPLUS, P.GETXATTR, P.LISTXATTR))
    moves_names = frozenset((P.UNLINK, P.RMDIR, P.RENAME, P.RENAME2))
    no_reply = frozenset((P.FORGET, P.BATCH_FORGET, P.NOTIFY_REPLY))
    later = frozenset((P.GETLK, P.SETLK, P.SETLKW, P.INTERRUPT, P.FLUSH, P.DESTROY))
    max_reply = 16 + session.MAX_WRITE
    logging.disable(logging.CRITICAL)  # a hostile guest's requests are logged by design
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_LIMIT, FILE_LIMIT))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead
    _libc.setfsuid.argtypes = _libc.setfsgid.argtypes = [ctypes.c_uint]
    manager = LockManager()
    inputs = [0]
    # The shares' filesystem's rename watch is the process's, made once (moves.py): made
    # now, it is not counted as a session's descriptor.
    tmp = os.open(tempfile.gettempdir(), os.O_PATH | os.O_DIRECTORY)
    moves.for_share(tmp)
    os.close(tmp)

    def one_input(data: bytes) -> None:
        fdp = atheris.FuzzedDataProvider(data)
        inputs[0] += 1
        base = tempfile.mkdtemp(prefix="vfs-lockd-fuzz-session-")
        try:
            share, outside = build_share(base)
            fds_before = len(os.listdir("/proc/self/fd"))
            before = snapshot(outside)
            sent: list[bytes] = []
            s = session.Session(passthrough.Passthrough(share), manager, f"g{inputs[0]}",
                                sent.append, cache=fdp.PickValueInList(["none", "auto"]),
                                xattr=fdp.ConsumeBool(), readonly=not fdp.ConsumeIntInRange(0, 7),
                                posix_acl=fdp.ConsumeBool())
            script = Script(fdp, P, opcodes)
            try:
                if fdp.ConsumeIntInRange(0, 7):
                    s.handle(P.IN_HEADER.pack(104, P.INIT, 1, 0, 0, 0, 0, 0, 0) +
                             P.INIT_IN.pack(7, 38, 65536, 0xFFFFFFFF) + bytes(48))
                for i in range(fdp.ConsumeIntInRange(1, MAX_REQUESTS)):
                    unique = 2 * (i + 2)
                    op, buf, room = script.request(unique)
                    script.uniques.append(unique)
                    # The native fast path first, as /dev/fuse's loop runs it: what it
                    # answers must be byte for byte what the session answers. (A name it
                    # removed or moved is gone for the session: that answer is the one,
                    # compared in tests/test_native_serve.py on twin shares instead.)
                    fast = s.fs.table.serve(buf, room)
                    if fast is not None and op in moves_names:
                        fast, reply = None, bytes(fast)
                    else:
                        reply = s.handle(buf, room)
                    # (STATFS: the free counts of a shared /tmp move between the two
                    # answers; tests/test_native_serve.py compares them on its own tmpfs.
                    # OPENDIR: each opens a handle of its own; the file handle differs)
                    same = 16 if op == P.STATFS else None
                    ref = reply
                    if fast is not None and op == P.OPENDIR and reply is not None:
                        fast, ref = bytes(fast[:16]) + bytes(fast[24:]), reply[:16] + reply[24:]
                    if fast is not None and (ref is None or fast[:same] != ref[:same]):
                        raise AssertionError(f"opcode {op}: native {fast[:120]!r} != "
                                             f"session {reply and reply[:120]!r}")
                    if reply is None:
                        if op not in no_reply and op not in later:
                            raise AssertionError(f"opcode {op}: no reply")
                    else:
                        if op in no_reply and len(buf) >= 40:
                            raise AssertionError(f"opcode {op}: answered")
                        check_reply(P, op, unique, reply, room, max_reply, sized)
                        script.learn(op, reply)
                    if _libc.setfsuid(0xFFFFFFFF) != 0 or _libc.setfsgid(0xFFFFFFFF) != 0:
                        raise AssertionError(f"opcode {op}: fsuid/fsgid not restored")
                    bad = open_specials()
                    if bad:
                        raise AssertionError(f"opcode {op}: special files open: {bad}")
            finally:
                s.end()
            for item in sent:  # deferred lock replies and notifications
                length, error, unique = P.OUT_HEADER.unpack_from(item)
                if length != len(item) or (unique and unique not in script.uniques):
                    raise AssertionError(f"deferred reply {item!r}")
            if snapshot(outside) != before:
                raise AssertionError("something outside the share changed")
            if sorted(os.listdir(base)) != ["outside", "share"]:
                raise AssertionError(f"new names next to the share: {os.listdir(base)}")
            leaked = len(os.listdir("/proc/self/fd")) - fds_before
            if leaked > 0:
                raise AssertionError(f"{leaked} descriptors left after Session.end()")
        finally:
            shutil.rmtree(base, ignore_errors=True)

    seeds = os.path.join(tempfile.gettempdir(), "vfs-lockd-fuzz-session-corpus")
    os.makedirs(seeds, exist_ok=True)
    write_seeds(seeds)
    # -timeout: a request that blocks (an open(2) of the FIFO) is a failure too;
    # -handle_xfsz=0: SIGXFSZ stays ignored (EFBIG past FILE_LIMIT).
    atheris.Setup([sys.argv[0], f"-max_total_time={seconds}", "-max_len=4096", "-timeout=30",
                   "-handle_xfsz=0", f"-artifact_prefix={tempfile.gettempdir()}/", seeds,
                   *extra], one_input)
    atheris.Fuzz()


def main() -> None:
    run(os.path.abspath(__file__), "the FUSE session", fuzz)


if __name__ == "__main__":
    main()

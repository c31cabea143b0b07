"""FUSE_HANDLE_KILLPRIV_V2 (issue 26): negotiated when the guest offers it, the guest's
flags say which writes, truncations and O_TRUNC opens clear setuid/setgid (we clear them,
as the host would for that caller), and a cached write costs one request, not a GETXATTR
of security.capability and the WRITE.

Through real /dev/fuse mounts (this host's kernel is the guest) as a real second uid,
every operation's effect on the mode and on security.capability is compared with the
same operation by the same uid on the host's own file system."""

from __future__ import annotations

import json
import os
import random
import re
import stat
import struct
from pathlib import Path

import pytest
from procutil import wait_until
from test_hostile_guest import NOBODY, as_user, public_mount  # noqa: F401 - a fixture

from fuse_server import protocol as P
from fuse_server.passthrough import Passthrough
from fuse_server.session import MAX_WRITE, Session
from fuse_server.virtiofsd_options import Options, parse
from lockd.engine.manager import LockManager

CAP = "security.capability"
# A v2 file capability (what setcap writes): effective, cap_net_bind_service permitted.
CAP_BLOB = struct.pack("<IIIII", 0x02000001, 1 << 10, 0, 0, 0)


# ---- what the session asks for and decides ----
class Guest:
    """A session spoken to directly, as a guest kernel would (no mount)."""

    def __init__(self, root: Path, offer: bool = True, **kw) -> None:  # noqa: ANN003
        root.mkdir(exist_ok=True)
        root.chmod(0o777)  # (a CREATE runs as its caller)
        self.root = root
        self.session = Session(Passthrough(str(root)), LockManager(), "g", lambda b: None,
                               "auto", **kw)
        self.unique = 10
        offered = 0xFFFFFFFF & ~(0 if offer else P.HANDLE_KILLPRIV_V2)
        reply = self.req(P.INIT, P.INIT_IN.pack(7, 38, 65536, offered) + bytes(48))
        assert P.OUT_HEADER.unpack_from(reply)[1] == 0
        self.granted = P.INIT_OUT.unpack_from(reply, 16)[3]

    def req(self, opcode: int, body: bytes, nodeid: int = 1, uid: int = 0, gid: int = 0
            ) -> bytes:
        self.unique += 2
        buf = P.IN_HEADER.pack(40 + len(body), opcode, self.unique, nodeid, uid, gid, 7, 0, 0)
        reply = self.session.handle(buf + body)
        assert reply is not None
        return reply

    def ok(self, opcode: int, body: bytes, nodeid: int = 1, uid: int = 0, gid: int = 0
           ) -> bytes:
        reply = self.req(opcode, body, nodeid, uid, gid)
        assert P.OUT_HEADER.unpack_from(reply)[1] == 0, (opcode, reply[:16])
        return reply

    def lookup(self, name: str) -> int:
        return P.ENTRY_OUT.unpack_from(self.ok(P.LOOKUP, name.encode() + b"\0"), 16)[0]

    def file(self, name: str, mode: int, gid: int = 0) -> int:
        (self.root / name).write_bytes(b"data")
        os.chown(self.root / name, 0, gid)
        os.chmod(self.root / name, mode)
        return self.lookup(name)

    def mode(self, name: str) -> int:
        return stat.S_IMODE(os.stat(self.root / name).st_mode)

    def end(self) -> None:
        self.session.end()


@pytest.mark.parametrize("offer,option,readonly,granted", [
    (True, True, False, True),
    (False, True, False, False),  # an older guest (before 7.33) does not offer it
    (True, False, False, False),  # --no-killpriv-v2
    (True, True, True, False),  # nothing is written on a read-only share
])
def test_killpriv_v2_is_asked_for_unless_told_not_to(tmp_path: Path, offer: bool,
                                                      option: bool, readonly: bool,
                                                      granted: bool) -> None:
    g = Guest(tmp_path / "s", offer, killpriv_v2=option, readonly=readonly)
    try:
        assert bool(g.granted & P.HANDLE_KILLPRIV_V2) == granted
        assert g.session.killpriv == granted
    finally:
        g.end()


def test_a_migrated_session_keeps_what_the_guest_was_granted(tmp_path: Path) -> None:
    """The guest relies on it after a migration too: the destination honours the grant
    whatever its own option says (the guest sends no new INIT)."""
    g = Guest(tmp_path / "s")
    try:
        state = json.loads(json.dumps(g.session.save_state()))
    finally:
        g.end()
    (tmp_path / "s" / "f").write_bytes(b"x")
    dst = Session(Passthrough(str(tmp_path / "s")), LockManager(), "g", lambda b: None,
                  "auto", killpriv_v2=False)
    try:
        dst.load_state(state)
        assert dst.killpriv
        os.chmod(tmp_path / "s" / "f", 0o6777)
        nodeid = dst.fs.lookup(1, b"f")[0].nodeid
        fh, _ = dst.fs.open(nodeid, os.O_WRONLY)
        # a user with CAP_FSETID (no flag): the guest's word, not uid != 0
        buf = P.IN_HEADER.pack(40 + 40 + 1, P.WRITE, 2, nodeid, 1000, 1000, 7, 0, 0)
        reply = dst.handle(buf + P.WRITE_IN.pack(fh, 0, 1, 0, 0, 0, 0) + b"y")
        assert reply is not None and P.OUT_HEADER.unpack_from(reply)[1] == 0
        assert stat.S_IMODE(os.stat(tmp_path / "s" / "f").st_mode) == 0o6777
    finally:
        dst.end()


def test_the_options_are_virtiofsds() -> None:
    base = ["--socket-path=/tmp/x.sock", "--shared-dir=/tmp"]
    assert Options().killpriv_v2 and parse(base).killpriv_v2  # on by default (see README)
    assert not parse([*base, "--no-killpriv-v2"]).killpriv_v2
    assert parse([*base, "--no-killpriv-v2", "--killpriv-v2"]).killpriv_v2
    assert not parse(["--socket-path=/tmp/x.sock", "-o", "source=/tmp,no_killpriv_v2"]).killpriv_v2
    assert parse(["--socket-path=/tmp/x.sock", "-o", "source=/tmp,killpriv_v2"]).killpriv_v2


# Each request as a Linux guest sends it with HANDLE_KILLPRIV_V2 (fs/fuse: the flag is
# set when the caller lacks CAP_FSETID; a chown's always), by a user (uid 1000) or by
# root; and the mode the host would leave for that caller.
def _open(g: Guest, node: int, uid: int, kill: bool) -> bytes:
    return g.ok(P.OPEN, P.OPEN_IN.pack(os.O_WRONLY | os.O_TRUNC,
                                       P.OPEN_KILL_SUIDGID if kill else 0), node, uid, uid)


def _create(g: Guest, node: int, uid: int, kill: bool) -> bytes:
    # CREATE of an existing name (O_CREAT without O_EXCL, and O_TRUNC)
    return g.ok(P.CREATE, P.CREATE_IN.pack(os.O_WRONLY | os.O_TRUNC | os.O_CREAT, 0o644, 0,
                                           P.OPEN_KILL_SUIDGID if kill else 0) + b"f\0",
                1, uid, uid)


def _truncate(g: Guest, node: int, uid: int, kill: bool) -> bytes:
    valid = P.FATTR_SIZE | (P.FATTR_KILL_SUIDGID if kill else 0)
    return g.ok(P.SETATTR, P.SETATTR_IN.pack(valid, 0, 0, 1, *(0,) * 12), node, uid, uid)


def _chown(g: Guest, node: int, uid: int, kill: bool) -> bytes:
    # chown(path, its own uid, -1): allowed to its owner, and clears as any chown does
    valid = P.FATTR_UID | (P.FATTR_KILL_SUIDGID if kill else 0)
    return g.ok(P.SETATTR, P.SETATTR_IN.pack(valid, 0, 0, 0, *(0,) * 9, uid, 0, 0), node,
                uid, uid)


@pytest.mark.parametrize("op", [_open, _create, _truncate, _chown])
@pytest.mark.parametrize("uid,kill,mode,expect", [
    (1000, True, 0o6777, 0o777),  # a user: setuid and setgid (group execute) go
    (1000, True, 0o6767, 0o767),  # setgid without group execute: not in the group
    (1000, False, 0o6777, 0o6777),  # a user with CAP_FSETID (no flag) keeps them
    (0, True, 0o6777, 0o777),  # root without CAP_FSETID does not
])
def test_the_guests_flags_decide(tmp_path: Path, op, uid: int, kill: bool, mode: int,  # noqa: ANN001
                                 expect: int) -> None:
    g = Guest(tmp_path / "s")
    try:
        node = g.file("f", mode)
        if op is _chown:
            os.chown(tmp_path / "s" / "f", uid, 0)
            os.chmod(tmp_path / "s" / "f", mode)
            if not kill:
                # every chown clears setuid, and setgid with group execute (the host's
                # own chown, ours as root); a guest sends the flag with every chown
                expect = mode & ~0o6000 | (mode & 0o2000 if not mode & 0o10 else 0)
            elif uid == 0:
                expect = 0o777 if mode & 0o10 else 0o2767  # root is in every group
        op(g, node, uid, kill)
        assert g.mode("f") == expect
    finally:
        g.end()


# ---- through a real mount, as on the host ----
SETUP = {
    # name: (mode, owner uid, group) before; then who does what (below)
    "w_suid": (0o4777, 0, 0),
    "w_sgid_x": (0o2777, 0, 0),
    "w_sgid_nox": (0o2767, 0, 0),  # setgid without group execute, writer not in the group
    "w_sgid_nox_member": (0o2767, 0, NOBODY),  # ... writer in the group: kept
    "t_open": (0o6777, 0, 0),
    "t_ftrunc": (0o6777, 0, 0),
    "t_trunc": (0o6777, 0, 0),
    "c_own": (0o6777, NOBODY, 0),
    "c_own_nox": (0o6767, NOBODY, 0),
    "c_own_nox_member": (0o6767, NOBODY, NOBODY),
    "cap_w": (0o777, 0, 0),
    "cap_t": (0o777, 0, 0),
    "cap_c": (0o777, NOBODY, 0),
    "r_w": (0o6777, 0, 0),
    "r_t": (0o6777, 0, 0),
    "r_c": (0o6767, 0, 0),
    "r_cap": (0o777, 0, 0),
}


def _reset(src: Path) -> None:
    for name, (mode, uid, gid) in SETUP.items():
        p = src / name
        p.write_bytes(b"x" * 100)
        os.chown(p, uid, gid)
        os.chmod(p, mode)
        if name.startswith(("cap", "r_cap")):
            os.setxattr(p, CAP, CAP_BLOB)


def _by_user(base: str):  # noqa: ANN202
    def run() -> None:
        def write(name: str) -> None:
            fd = os.open(f"{base}/{name}", os.O_WRONLY)
            os.pwrite(fd, b"y", 0)
            os.close(fd)

        for name in ("w_suid", "w_sgid_x", "w_sgid_nox", "w_sgid_nox_member", "cap_w"):
            write(name)
        os.close(os.open(f"{base}/t_open", os.O_WRONLY | os.O_TRUNC))
        fd = os.open(f"{base}/t_ftrunc", os.O_WRONLY)
        os.ftruncate(fd, 1)
        os.close(fd)
        for name in ("t_trunc", "cap_t"):
            os.truncate(f"{base}/{name}", 1)
        for name in ("c_own", "c_own_nox", "cap_c"):
            os.chown(f"{base}/{name}", NOBODY, -1)
        os.chown(f"{base}/c_own_nox_member", -1, NOBODY)
    return run


def _by_root(base: Path) -> None:
    for name in ("r_w", "r_cap"):
        fd = os.open(base / name, os.O_WRONLY)
        os.pwrite(fd, b"y", 0)
        os.close(fd)
    os.close(os.open(base / "r_t", os.O_WRONLY | os.O_TRUNC))
    os.chown(base / "r_c", 0, 0)


def _seen(src: Path) -> dict[str, tuple[str, bool]]:
    out = {}
    for name in SETUP:
        try:
            has_cap = os.getxattr(src / name, CAP) == CAP_BLOB
        except OSError:
            has_cap = False
        out[name] = (oct(stat.S_IMODE(os.stat(src / name).st_mode)), has_cap)
    return out


@pytest.mark.parametrize("cache", ["none", "auto"])
def test_a_users_changes_clear_what_the_hosts_do(public_mount, cache: str) -> None:  # noqa: F811
    """Writes, truncations (O_TRUNC, ftruncate, truncate) and chowns by an unprivileged
    user, and root's, through the mount leave the modes and security.capability as the
    same calls on the host leave them."""
    src, mnt = public_mount("--cache", cache)
    init = re.search(r"INIT: .* flags (0x[0-9a-f]+)", (src.parent / "log0").read_text())
    assert init and int(init[1], 16) & P.HANDLE_KILLPRIV_V2  # (the path under test)
    results = []
    for base in (src, mnt):
        _reset(src)
        as_user(_by_user(str(base)), NOBODY, NOBODY)
        _by_root(base)
        results.append(_seen(src))
    on_host, through_mount = results
    # What this host does (6.x): the cases mean what their names say.
    assert on_host["w_suid"][0] == on_host["t_open"][0] == on_host["c_own"][0] == "0o777"
    assert on_host["w_sgid_nox"][0] == on_host["c_own_nox"][0] == "0o767"
    assert on_host["w_sgid_nox_member"][0] == on_host["c_own_nox_member"][0] == "0o2767"
    assert on_host["r_w"][0] == on_host["r_t"][0] == "0o6777"
    assert on_host["r_c"][0] == "0o2767"
    assert not any(on_host[n][1] for n in ("cap_w", "cap_t", "cap_c", "r_cap"))
    assert through_mount == on_host


# ---- one request per cached write ----
@pytest.mark.parametrize("killpriv", [True, False])
def test_a_cached_write_sends_no_getxattr(fuse_ok, tmp_path: Path, killpriv: bool) -> None:
    """cache=auto: with HANDLE_KILLPRIV_V2 the guest asks nothing before a write (its
    S_NOSEC, once it has looked); without, a GETXATTR of security.capability comes
    before every one."""
    from fuse_server.transports.devfuse import DevFuse

    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    (src / "a").write_bytes(bytes(1 << 20))
    dev = DevFuse(str(mnt), MAX_WRITE + 4096)
    fs = Passthrough(str(src))
    session = Session(fs, LockManager(), "g", dev.send, cache="auto", killpriv_v2=killpriv)
    asked = []

    def handle(buf, *args, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        if int.from_bytes(bytes(buf[4:8]), "little") == P.GETXATTR:
            asked.append(bytes(buf[40:]))
        return session.handle(buf, *args, **kw)

    def getxattrs() -> int:
        return len(asked) + fs.table.served(P.GETXATTR)

    dev.mount()
    try:
        dev.start(handle, 2, table=fs.table)
        assert wait_until(lambda: session.initialized, 10)
        assert session.killpriv == killpriv
        rnd = random.Random(26)
        fd = os.open(mnt / "a", os.O_RDWR)
        try:
            os.pwrite(fd, b"w" * 4096, 0)  # the first may look (then S_NOSEC)
            before, writes = getxattrs(), fs.table.served(P.WRITE)
            for _ in range(32):
                os.pwrite(fd, b"z" * 4096, rnd.randrange(256) * 4096)
            n = getxattrs() - before
            assert fs.table.served(P.WRITE) - writes == 32  # each went to the server
        finally:
            os.close(fd)
        if killpriv:
            assert n == 0
        else:
            assert n >= 32  # the cost this removes
    finally:
        dev.stopped.set()
        dev.unmount()
        session.end()
        os.close(dev.fd)

#!/usr/bin/env python3
"""Memory per guest back-end: N back-ends of ours against N Rust virtiofsd 1.13
(scripts/rust-virtiofsd), each on its own socket, all serving one directory, default
options; no QEMU. Ours twice: `vfs-lockd virtiofs` (the verb) and `vfs-lockd-virtiofsd`
(the drop-in libvirt and Kata run), the same back-end started through either command.

    .venv/bin/python scripts/bench_memory.py [--counts 10,50] [--iterations 40] [--json F]
                                             [--kinds ...] [--ours="--sandbox=chroot"]
    .venv/bin/python scripts/bench_memory.py --breakdown   # where one of ours goes (smaps)

Three states are measured, in this order, for every N (a fresh set of back-ends per kind
and N; the kinds run one after the other, never side by side, so that none shares a
library page with another):
  waiting    listening, no front-end yet: what a libvirt or Kata back-end is until the VM
             starts;
  connected  a vhost-user front-end (tests/vhost_frontend.py: memfd guest memory, split
             rings, eventfds) connected, negotiated features, memory table and rings, and
             the FUSE session initialised (FUSE_INIT): an idle guest;
  busy       after each back-end served `iterations` x 10 FUSE requests (LOOKUP, GETATTR,
             OPEN, READ, WRITE, SETLK write + unlock, FLUSH, RELEASE, STATFS; Rust
             virtiofsd answers the locks ENOSYS: it has no host locks).
A back-end's memory is the sum over every process it is made of (with the default
namespace sandbox both fork a child in a new PID namespace; descendants are counted too),
read from /proc/PID/smaps_rollup: PSS (shared pages divided among the processes mapping
them: what one more back-end costs the host) and RSS (summed over the processes: it
counts a page the parent and child share twice). The guest's RAM (the front-end's memfd,
mapped by the back-end) is left out of both: it is the guest's memory, not the
back-end's, and QEMU accounts for it. Our modules are byte-compiled first, as an
installed package has them. Printed and returned: per-back-end median (min/max) for
every kind, N and state, and the ratio ours/Rust.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from vhost_frontend import Frontend  # noqa: E402

from lockd.fuse import abi as P  # noqa: E402

VFS_LOCKD = [sys.executable, "-c", "import sys; from lockd.cli import main; sys.exit(main())"]
DROPIN = [sys.executable, "-c", "from fuse_server.virtiofs_cli import main; main()"]
RUST_VIRTIOFSD = REPO / "scripts" / "rust-virtiofsd"
READY = b"Waiting for vhost-user socket connection"
GUEST_RAM = "memfd:vhost-frontend-guest"  # tests/vhost_frontend.py's memfd name
# `vfs-lockd virtiofs` (the verb) and `vfs-lockd-virtiofsd` (the drop-in that libvirt and
# Kata run): the same back-end, started through different commands.
KINDS = ("vfs-lockd", "vfs-lockd-virtiofsd", "rust-virtiofsd")
LABELS = {"vfs-lockd": "vfs-lockd virtiofs", "vfs-lockd-virtiofsd": "vfs-lockd-virtiofsd",
          "rust-virtiofsd": "Rust virtiofsd"}
STATES = ("waiting", "connected", "busy")
RELEASE_IN = P.FLUSH_IN  # fh, flags, release_flags, lock_owner: the same layout
REQ = 1  # the first request queue


# ---------------------------------------------------------------- /proc
def processes(pid: int) -> list[int]:
    """`pid` and every descendant (through /proc/PID/task/TID/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tids:
            with contextlib.suppress(OSError), open(f"/proc/{p}/task/{t}/children") as f:
                todo += [int(c) for c in f.read().split()]
    return out


def _rollup(pid: int) -> tuple[int, int]:
    """(Pss, Rss) of one process in KiB."""
    pss = rss = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                pss = int(line.split()[1])
            elif line.startswith("Rss:"):
                rss = int(line.split()[1])
    return pss, rss


def smaps(pid: int) -> list[tuple[str, dict[str, int]]]:
    """Every mapping of `pid`: (name, {field: KiB}); anonymous mappings are named ""."""
    out: list[tuple[str, dict[str, int]]] = []
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head, _, rest = line.partition(" ")
            if "-" in head and not head.endswith(":"):
                parts = line.split(None, 5)
                out.append((parts[5].strip() if len(parts) > 5 else "", {}))
            elif head.endswith(":") and out and rest.strip().endswith("kB"):
                out[-1][1][head[:-1]] = int(rest.split()[0])
    return out


def footprint(pid: int) -> tuple[int, int, int]:
    """(PSS, RSS, processes) of the back-end whose first process is `pid`, in KiB, the
    guest's RAM left out."""
    pss = rss = 0
    procs = processes(pid)
    for p in procs:
        a, b = _rollup(p)
        pss, rss = pss + a, rss + b
        for name, f in smaps(p):
            if name.startswith(f"/{GUEST_RAM}") or name.startswith(GUEST_RAM):
                pss -= f.get("Pss", 0)
                rss -= f.get("Rss", 0)
    return pss, rss, len(procs)


def category(name: str) -> str:
    """A smaps mapping's share of the breakdown."""
    if not name:
        return "anonymous (Python heap arenas, mmap'd malloc, thread stacks)"
    if name == "[heap]":
        return "[heap] (brk: malloc)"
    if name.startswith("[stack"):
        return "[stack] (main thread)"
    if "libpython" in name:
        return "libpython"
    if name.endswith(".so") or ".so." in name or ".cpython-" in name:
        return f"shared object {os.path.basename(name)}"
    if name.startswith("[") or name.startswith("/dev/") or name.startswith("/memfd:"):
        return name.split()[0]
    return "other files"


def breakdown(pid: int) -> list[tuple[str, int, int]]:
    """(category, PSS, RSS) in KiB over the back-end's processes, largest PSS first."""
    acc: dict[str, list[int]] = {}
    for p in processes(pid):
        for name, f in smaps(p):
            if GUEST_RAM in name:
                continue
            c = acc.setdefault(category(name), [0, 0])
            c[0] += f.get("Pss", 0)
            c[1] += f.get("Rss", 0)
    return sorted(((k, v[0], v[1]) for k, v in acc.items()), key=lambda x: -x[1])


# ---------------------------------------------------------------- back-ends
class Backend:
    def __init__(self, kind: str, work: Path, share: Path, n: int,
                 sockets: Path | None = None, extra: tuple[str, ...] = ()) -> None:
        self.kind = kind
        self.sock = (sockets or work) / f"{n}.sock"
        self.log = work / f"{kind}-{n}.log"
        self.fe: Frontend | None = None
        if kind == "vfs-lockd":
            cmd = [*VFS_LOCKD, "virtiofs", "--socket-path", str(self.sock),
                   "--shared-dir", str(share)]
        elif kind == "vfs-lockd-virtiofsd":
            cmd = [*DROPIN, f"--socket-path={self.sock}", f"--shared-dir={share}"]
        else:
            cmd = [str(RUST_VIRTIOFSD), f"--socket-path={self.sock}", f"--shared-dir={share}"]
        cmd += [] if kind == "rust-virtiofsd" else list(extra)
        env = dict(os.environ, PYTHONPATH=str(REPO))
        with open(self.log, "wb") as logf:
            self.proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env, cwd=REPO,
                                         start_new_session=True)

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.kind} back-end exited {self.proc.returncode}:\n"
                               f"{self.log.read_text(errors='replace')[-2000:]}")
        out = self.log.read_bytes()
        if not (self.sock.exists() and READY in out):
            return False
        if self.kind.startswith("vfs-lockd") and b"locks: embedded lock manager" not in out:
            # the drop-in joins a daemon listening on the default socket: another setup
            raise RuntimeError(f"{self.kind}: not the embedded lock manager:\n"
                               f"{out[-1500:].decode(errors='replace')}")
        return True

    def stop(self) -> None:
        if self.fe is not None:
            with contextlib.suppress(OSError):
                self.fe.close()  # the back-end exits when its front-end goes
            self.fe = None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def _wait(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out: {what}")
        time.sleep(0.05)


def connect(b: Backend) -> None:
    """Front-end connected and negotiated, FUSE session initialised."""
    b.fe = Frontend(str(b.sock), timeout=30)
    body = P.INIT_IN.pack(7, 38, 65536, 0xFFFFFFFF) + bytes(48)
    r = b.fe.fuse(REQ, P.INIT, body, timeout=30)
    if r.error:
        raise RuntimeError(f"{b.kind}: FUSE_INIT answered {os.strerror(r.error)}")


def _ok(r, what: str, kind: str, allowed: tuple[int, ...] = ()) -> bytes:  # noqa: ANN001
    if r.error and r.error not in allowed:
        raise RuntimeError(f"{kind}: {what} answered {os.strerror(r.error)}")
    return r.data[16:r.used_len] if not r.error else b""


def work(b: Backend, iterations: int, name: bytes) -> int:
    """`iterations` rounds of 10 FUSE requests on the file `name`; the number sent."""
    fe, k = b.fe, b.kind
    assert fe is not None
    sent = 0
    block = bytes(range(256)) * 16
    # The front-end's guest memory is a bump allocator: every request takes new buffers.
    # Each request here is answered before the next is posted, so a round's buffers are
    # free when it ends: the next round reuses them (any number of rounds fits).
    mark = fe.mem.next
    for i in range(iterations):
        fe.mem.next = mark
        out = _ok(fe.fuse(REQ, P.LOOKUP, name + b"\0"), "LOOKUP", k)
        nodeid = P.ENTRY_OUT.unpack_from(out)[0]
        _ok(fe.fuse(REQ, P.GETATTR, P.GETATTR_IN.pack(0, 0, 0), nodeid), "GETATTR", k)
        out = _ok(fe.fuse(REQ, P.OPEN, P.OPEN_IN.pack(os.O_RDWR, 0), nodeid), "OPEN", k)
        fh = P.OPEN_OUT.unpack_from(out)[0]
        off = (i % 16) * 4096
        _ok(fe.fuse(REQ, P.READ, P.READ_IN.pack(fh, off, 4096, 0, 0, os.O_RDWR, 0), nodeid,
                    out=4096 + 16), "READ", k)
        _ok(fe.fuse(REQ, P.WRITE, P.WRITE_IN.pack(fh, off, 4096, 0, 0, os.O_RDWR, 0) + block,
                    nodeid), "WRITE", k)
        owner = 0x1000 + i
        for typ in (1, 2):  # F_WRLCK, F_UNLCK; Rust virtiofsd: ENOSYS (no host locks)
            _ok(fe.fuse(REQ, P.SETLK, P.LK_IN.pack(fh, owner, 0, 99, typ, 4242, 0), nodeid),
                "SETLK", k, (38,))
        _ok(fe.fuse(REQ, P.FLUSH, P.FLUSH_IN.pack(fh, 0, 0, owner), nodeid), "FLUSH", k,
            (38,))
        _ok(fe.fuse(REQ, P.RELEASE, RELEASE_IN.pack(fh, os.O_RDWR, 0, owner), nodeid),
            "RELEASE", k)
        _ok(fe.fuse(REQ, P.STATFS, b"", nodeid), "STATFS", k)
        sent += 10
    return sent


def measure(kind: str, n: int, iterations: int, work_dir: Path,
            log: Callable[[str], None],
            extra: tuple[str, ...] = ()) -> dict[str, list[tuple[int, int, int]]]:
    """{state: [(PSS, RSS, processes) per back-end]} for n back-ends of `kind`."""
    d = Path(tempfile.mkdtemp(prefix=f"{kind}-{n}-", dir=work_dir))
    share = d / "share"
    share.mkdir()
    names = []
    for i in range(n):
        name = f"file{i}".encode()
        (share / name.decode()).write_bytes(bytes(64 * 1024))
        names.append(name)
    backends: list[Backend] = []
    res: dict[str, list[tuple[int, int, int]]] = {}
    # sun_path holds 108 bytes: deep work directories (pytest's) get a short one
    sockets = d if len(str(d)) < 90 else Path(tempfile.mkdtemp(prefix="vlmem-", dir="/tmp"))
    try:
        for i in range(n):
            backends.append(Backend(kind, d, share, i, sockets, extra))
        for b in backends:
            _wait(b.ready, 120, f"{kind} back-end listening on {b.sock}")
        res["waiting"] = [footprint(b.proc.pid) for b in backends]
        for b in backends:
            connect(b)
        res["connected"] = [footprint(b.proc.pid) for b in backends]
        sent = sum(work(b, iterations, nm) for b, nm in zip(backends, names, strict=True))
        res["busy"] = [footprint(b.proc.pid) for b in backends]
        log(f"{kind} x{n}: {sent // n} FUSE requests per back-end")
    finally:
        for b in backends:
            b.stop()
        shutil.rmtree(d, ignore_errors=True)
        shutil.rmtree(sockets, ignore_errors=True)
    return res


def compile_package() -> None:
    """Byte-compile lockd/ and fuse_server/ as an installed package is (dh_python3, pip):
    a module compiled from source at every start leaves its compiler's garbage in the
    heap (~3 MiB per back-end), which no installed back-end pays."""
    import compileall

    for pkg in ("lockd", "fuse_server"):
        compileall.compile_dir(str(REPO / pkg), quiet=1)


def rust_missing() -> str | None:
    r = subprocess.run([str(RUST_VIRTIOFSD), "--version"], capture_output=True, text=True)
    if r.returncode != 0 or not r.stdout.startswith("virtiofsd"):
        return f"scripts/rust-virtiofsd --version failed: {(r.stdout + r.stderr)[-300:]}"
    return None


def run(counts: tuple[int, ...] = (10, 50), iterations: int = 40, work: Path | None = None,
        log: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
        kinds: tuple[str, ...] = KINDS, extra: tuple[str, ...] = ()) -> dict:
    """{"rows": [{"name", "unit", "samples" (MiB per back-end), "vs"}], "notes", "raw"}:
    the shape scripts/bench's sections take."""
    why = rust_missing() if "rust-virtiofsd" in kinds else None
    if why:
        kinds = tuple(k for k in kinds if k != "rust-virtiofsd")
    compile_package()
    own = work is None
    work = Path(tempfile.mkdtemp(prefix="bench-memory-")) if own else Path(work)
    work.mkdir(parents=True, exist_ok=True)
    raw: dict[str, dict[str, dict[str, list]]] = {}
    try:
        for n in counts:
            for kind in kinds:
                log(f"memory: {n} {kind} back-ends")
                raw.setdefault(kind, {})[str(n)] = measure(kind, n, iterations, work, log, extra)
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)
    rows = []
    label = LABELS
    for n in counts:
        for state in STATES:
            for metric, idx in (("PSS", 0), ("RSS", 1)):
                for kind in kinds:
                    name = f"{label[kind]}, {n} back-ends, {state}, {metric}"
                    vs = [] if kind == "rust-virtiofsd" or "rust-virtiofsd" not in kinds else \
                        [f"{label['rust-virtiofsd']}, {n} back-ends, {state}, {metric}"]
                    samples = [x[idx] / 1024 for x in raw[kind][str(n)][state]]
                    rows.append({"name": name, "unit": "MiB", "samples": samples, "vs": vs})
    procs = {k: sorted({x[2] for v in raw[k].values() for s in v.values() for x in s})
             for k in kinds}
    notes = ["per back-end: median (min/max) over the N back-ends; processes per back-end: "
             + ", ".join(f"{label[k]} {'/'.join(map(str, procs[k]))}" for k in kinds),
             f"busy: {iterations * 10} FUSE requests per back-end (LOOKUP, GETATTR, OPEN, "
             "READ, WRITE, SETLK pair, FLUSH, RELEASE, STATFS) through tests/vhost_frontend.py",
             "our modules byte-compiled first, as an installed package has them",
             "PSS and RSS summed over a back-end's processes, the guest's RAM (front-end memfd) "
             "left out; RSS counts pages a parent and its child share once per process"]
    if why:
        notes.append(f"Rust virtiofsd not measured: {why}")
    if extra:
        notes.append(f"our back-ends with {' '.join(extra)}")
    return {"rows": rows, "notes": notes, "raw": raw}


def report(res: dict) -> list[str]:
    rows = {r["name"]: r for r in res["rows"]}
    out = []
    for r in res["rows"]:
        xs = r["samples"]
        line = (f"{r['name']:<52} {statistics.median(xs):8.2f} MiB "
                f"({min(xs):.2f}/{max(xs):.2f})")
        for v in r["vs"]:
            base = rows.get(v)
            if base and base["samples"]:
                line += f"  {statistics.median(xs) / statistics.median(base['samples']):.2f}x Rust"
        out.append(line)
    return out + [f"* {n}" for n in res["notes"]]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--counts", default="10,50", help="numbers of back-ends (default 10,50)")
    ap.add_argument("--iterations", type=int, default=40,
                    help="busy: rounds of 10 FUSE requests per back-end")
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--ours", default="", metavar="ARGS",
                    help="more options for our back-ends (e.g. --sandbox=chroot, libvirt's)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--breakdown", action="store_true",
                    help="one of ours, connected and busy: its smaps by category")
    args = ap.parse_args()
    if args.breakdown:
        compile_package()
        with tempfile.TemporaryDirectory(prefix="bench-memory-") as t:
            share = Path(t) / "share"
            share.mkdir()
            (share / "f").write_bytes(bytes(64 * 1024))
            kind = args.kinds.split(",")[0]
            b = Backend(kind, Path(t), share, 0, extra=tuple(args.ours.split()))
            try:
                _wait(b.ready, 60, "back-end listening")
                for state in STATES:
                    if state == "connected":
                        connect(b)
                    elif state == "busy":
                        work(b, args.iterations, b"f")
                    pss, rss, np = footprint(b.proc.pid)
                    print(f"== {kind}, {state}: PSS {pss / 1024:.2f} MiB, RSS {rss / 1024:.2f} "
                          f"MiB, {np} processes")
                    for cat, p, r in breakdown(b.proc.pid):
                        if p >= 64:
                            print(f"   {p / 1024:7.2f} {r / 1024:7.2f}  {cat}")
            finally:
                b.stop()
        return 0
    kinds = tuple(k for k in args.kinds.split(",") if k in KINDS)
    res = run(tuple(int(c) for c in args.counts.split(",")), args.iterations, kinds=kinds,
              extra=tuple(args.ours.split()))
    print("\n".join(report(res)))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

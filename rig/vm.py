"""Real VM guests on a share: QEMU (TCG) with a vhost-user-fs device served by
`vfs-lockd virtiofs` (or, as the baseline, QEMU's legacy C virtiofsd), booting the image
of `scripts/guest-image`, with the static lock probe (scripts/guest/vlprobe.c) driven
over a virtio-serial port.

    with VmGuest.start("g1", share, workdir, backend="vfs-lockd", lockd=sock) as g:
        assert g.do("a", "open 0 /mnt/f create") == "ok"
        assert g.do("a", "lock 0 posix w 0 0") == "ok"
        tag = g.send("b", "lock 0 posix w 0 0 wait")    # answered later
        ...
        g.result(tag, timeout=5)                           # "ok" | "err 35 EDEADLK"

The control channel is a Unix socket this process listens on; QEMU connects to it as
the host side of the port (so it exists before QEMU starts and no connect race exists).
Answers are matched to requests by tag, so several owners (probe child processes, each
its own lock owner) can have requests outstanding at once.

Why TCG only: the stock Debian kernel does not boot under this machine's KVM, and TCG
works everywhere QEMU does. The kernel is booted as an ELF through its PVH entry (no
decompression) with qboot and acpi=off: about 2.5 s to a running probe.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
IMAGE_DIR = REPO / "build" / "guest"
GUEST_IMAGE = REPO / "scripts" / "guest-image"
QEMU = "qemu-system-x86_64"
LEGACY_VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
# Rust virtiofsd (Debian 13's package; fetched from trixie on Debian 12): the reference.
RUST_VIRTIOFSD = REPO / "scripts" / "rust-virtiofsd"
QBOOT = "/usr/share/qemu/qboot.rom"
VFS_LOCKD = [sys.executable, "-c", "import sys; from lockd.cli import main; sys.exit(main())"]
# Kernel parameters that shorten a TCG boot: no ACPI tables to parse (PCI works from the
# BIOS tables), no keyboard controller probing, no TSC calibration checks.
FAST_BOOT = ("console=ttyS0 quiet loglevel=3 acpi=off panic=-1 i8042.noaux i8042.nokbd "
             "i8042.nopnp tsc=reliable no_timer_check mitigations=off")
PROBE_CMD = "vlprobe /dev/port-ctl"


class VmError(Exception):
    pass


def socket_dir(workdir: Path) -> Path:
    """workdir, or a short private directory when socket paths there would pass the
    108-byte sun_path limit (deep pytest/rig temp dirs)."""
    if len(str(workdir)) + len("/vm00.vhost.sock") < 100:
        return workdir
    import tempfile

    return Path(tempfile.mkdtemp(prefix="vlvm-"))


def qemu_missing() -> str | None:
    """Why VM guests cannot run here (None: they can)."""
    if os.geteuid() != 0:
        return "VM guests need root (vhost-user backends, the guest image build)"
    if shutil.which(QEMU) is None:
        return f"{QEMU} not installed"
    return None


def ensure_image(out: Path = IMAGE_DIR, quiet: bool = True) -> tuple[Path, Path]:
    """(kernel, initramfs) of the guest image, built or refreshed by scripts/guest-image
    (cached: a no-op when up to date)."""
    cmd = [sys.executable, str(GUEST_IMAGE), "--out", str(out)] + (["--quiet"] if quiet else [])
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise VmError(f"scripts/guest-image failed:\n{r.stdout}{r.stderr}")
    kernel = out / "vmlinux" if (out / "vmlinux").exists() else out / "vmlinuz"
    return kernel, out / "initramfs.cpio.gz"


def legacy_virtiofsd_present() -> bool:
    """QEMU's C virtiofsd is here (Debian 12's qemu-system-common). On Debian 13 the old
    path is the virtiofsd package's symlink to Rust virtiofsd, which is not it."""
    p = LEGACY_VIRTIOFSD
    return os.path.isfile(p) and os.path.realpath(p) == p


def rust_virtiofsd_missing() -> str | None:
    """Why Rust virtiofsd cannot run here (None: it can; fetched once when needed)."""
    r = subprocess.run([str(RUST_VIRTIOFSD), "--version"], capture_output=True, text=True)
    if r.returncode != 0 or not r.stdout.startswith("virtiofsd"):
        return f"scripts/rust-virtiofsd --version failed: {(r.stdout + r.stderr)[-500:]}"
    return None


def errno_of(answer: str) -> int:
    """0 for "ok ...", the errno of "err N NAME"."""
    if answer.startswith("ok"):
        return 0
    parts = answer.split()
    if len(parts) >= 2 and parts[0] == "err" and parts[1].isdigit():
        return int(parts[1])
    raise VmError(f"not a probe answer: {answer!r}")


class Backend:
    """A vhost-user-fs server process: `vfs-lockd virtiofs` ("vfs-lockd"), the legacy C
    virtiofsd with posix_lock/flock ("virtiofsd") or Rust virtiofsd as it ships
    ("rust-virtiofsd": no lock options exist, the guest keeps its locks local). It
    listens on socket_path; QEMU connects; it exits when QEMU disconnects."""

    def __init__(self, kind: str, socket_path: Path, shared_dir: Path, guest: str, log: Path,
                 lockd: str | Path | None = None, cache: str = "none",
                 extra: list[str] | None = None) -> None:
        self.kind, self.socket_path, self.log = kind, Path(socket_path), Path(log)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        if kind == "vfs-lockd":
            cmd = [*VFS_LOCKD, "virtiofs", "--socket-path", str(socket_path),
                   "--shared-dir", str(shared_dir), "--guest", guest, "--cache", cache]
            if lockd:
                cmd += ["--lockd", str(lockd)]
        elif kind == "virtiofsd":
            cmd = [LEGACY_VIRTIOFSD, f"--socket-path={socket_path}", "-o",
                   f"source={shared_dir}", "-o", "posix_lock", "-o", "flock", "-o",
                   f"cache={'none' if cache == 'none' else 'auto'}"]
        elif kind == "rust-virtiofsd":
            cmd = [str(RUST_VIRTIOFSD), f"--socket-path={socket_path}",
                   f"--shared-dir={shared_dir}",
                   f"--cache={'never' if cache == 'none' else cache}"]
        else:
            raise ValueError(f"unknown backend {kind!r}")
        cmd += list(extra or [])
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"]
                                         if env.get("PYTHONPATH") else "")
        self._logf = open(self.log, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self._logf, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env, cwd=REPO,
                                     start_new_session=True)
        deadline = time.monotonic() + 20
        while not self.socket_path.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                out = self.output()
                self.stop()
                raise VmError(f"{kind} backend did not create {socket_path}:\n{out[-3000:]}")
            time.sleep(0.02)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM, then SIGKILL; never raises."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._logf.close()
        return self.proc.returncode


class VmGuest:
    """One QEMU guest running the lock probe (or any command). Use start() to get a
    guest together with its backend; close() stops QEMU, then the backend."""

    def __init__(self, name: str, vhost_socket: Path, workdir: Path, tag: str = "share",
                 cmd: str | None = PROBE_CMD, log: Path | None = None,
                 kernel: Path | None = None, initrd: Path | None = None, mem_mb: int = 512,
                 backend: Backend | None = None, boot_timeout: float = 90.0,
                 append: str = "", qemu: list[str] | None = None,
                 incoming: bool = False) -> None:
        # qemu: another QEMU command (a live migration needs 8.2+: scripts/qemu-migratable);
        # incoming: a migration's destination (-incoming defer), not booted here.
        self.name, self.tag, self.backend = name, tag, backend
        self.workdir = Path(workdir)
        self.log = Path(log) if log else self.workdir / f"{name}.console.log"
        if kernel is None or initrd is None:
            kernel, initrd = ensure_image()
        self.sockdir = socket_dir(self.workdir)
        self.ctl_path = self.sockdir / f"{name}.ctl"
        self.qmp_path = self.sockdir / f"{name}.qmp"
        for p in (self.ctl_path, self.qmp_path):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        self._probe_client_state()
        self.qemu: subprocess.Popen | None = None
        self.probe = cmd == PROBE_CMD
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(self.ctl_path))
            listener.listen(1)
            listener.settimeout(0.2)
            args = [*(qemu or [QEMU]), "-accel", "tcg", "-m", str(mem_mb), "-smp", "1",
                    "-object", f"memory-backend-memfd,id=mem,size={mem_mb}M,share=on",
                    "-numa", "node,memdev=mem",
                    "-chardev", f"socket,id=fs,path={vhost_socket}",
                    "-device", f"vhost-user-fs-pci,chardev=fs,tag={tag}",
                    "-chardev", f"socket,id=ctl,path={self.ctl_path}",
                    "-device", "virtio-serial-pci",
                    "-device", "virtserialport,chardev=ctl,name=ctl",
                    "-chardev", f"file,id=con,path={self.log}", "-serial", "chardev:con",
                    "-kernel", str(kernel), "-initrd", str(initrd),
                    "-append", self._append(cmd, append),
                    "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
                    "-display", "none", "-no-reboot", "-nodefaults", "-no-user-config"]
            if os.path.exists(QBOOT):
                at = len(qemu or [QEMU])
                args[at:at] = ["-bios", QBOOT]  # a minimal firmware: boots faster than SeaBIOS
            if incoming:
                args += ["-incoming", "defer"]
            self._qlog = open(self.workdir / f"{name}.qemu.log", "ab")  # noqa: SIM115
            self.qemu = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=self._qlog,
                                         stderr=subprocess.STDOUT, start_new_session=True)
            deadline = time.monotonic() + boot_timeout
            while self._conn is None:
                if self.qemu.poll() is not None or time.monotonic() > deadline:
                    raise VmError(f"QEMU of {name} did not connect its control port:\n"
                                  + self.diagnostics())
                try:
                    self._conn, _ = listener.accept()
                except TimeoutError:
                    continue
            self._reader = threading.Thread(target=self._read, daemon=True,
                                            name=f"vm-{name}")
            self._reader.start()
            if self.probe and not incoming:
                self._wait_event("* ready", deadline)
        except BaseException:
            self.close()
            raise
        finally:
            listener.close()

    def _probe_client_state(self) -> None:
        """The probe client's state before the guest's channel connects."""
        self._answers: dict[str, str] = {}
        self.events: list[str] = []
        self._cond = threading.Condition()
        self._send_lock = threading.Lock()
        self._tag = 0
        self._conn: socket.socket | None = None
        self._reader: threading.Thread | None = None
        self._closed = False

    @classmethod
    def start(cls, name: str, share: Path, workdir: Path, backend: str = "vfs-lockd",
              lockd: str | Path | None = None, cache: str = "none",
              backend_extra: list[str] | None = None, **kw) -> VmGuest:  # noqa: ANN003
        """A backend serving share for this guest, then the guest on it."""
        workdir = Path(workdir)
        b = Backend(backend, socket_dir(workdir) / f"{name}.vhost.sock", share, name,
                    workdir / f"{name}.{backend}.log", lockd=lockd, cache=cache,
                    extra=backend_extra)
        try:
            return cls(name, b.socket_path, workdir, backend=b, **kw)
        except BaseException:
            b.stop()
            raise

    def _append(self, cmd: str | None, extra: str) -> str:
        parts = [FAST_BOOT, f"vfs.tag={self.tag}", "vfs.ports=ctl"]  # (-device virtserialport)
        if cmd:
            # base64: kernel parameters cannot carry spaces or quotes.
            parts.append("vfs.cmd=" + base64.b64encode(cmd.encode()).decode())
        if extra:
            parts.append(extra)
        return " ".join(parts)

    # ------------------------------------------------------------------ channel
    def _read(self) -> None:
        buf = b""
        conn = self._conn
        assert conn is not None
        while True:
            try:
                data = conn.recv(65536)
            except OSError:
                data = b""
            if not data:
                with self._cond:
                    self.events.append("* eof")
                    self._cond.notify_all()
                return
            buf += data
            *lines, buf = buf.split(b"\n")
            with self._cond:
                for raw in lines:
                    line = raw.decode(errors="replace").strip()
                    if not line:
                        continue
                    if line.startswith("*"):
                        self.events.append(line)
                    else:
                        tag, _, rest = line.partition(" ")
                        self._answers[tag] = rest
                self._cond.notify_all()

    def _wait_event(self, event: str, deadline: float) -> None:
        with self._cond:
            while event not in self.events:
                if "* eof" in self.events or (self.qemu and self.qemu.poll() is not None):
                    raise VmError(f"guest {self.name} ended before {event!r}:\n"
                                  + self.diagnostics())
                left = deadline - time.monotonic()
                if left <= 0:
                    raise VmError(f"guest {self.name}: no {event!r} in time:\n"
                                  + self.diagnostics())
                self._cond.wait(min(left, 0.2))

    # ------------------------------------------------------------------ QMP
    def qmp(self, command: str, **arguments: object) -> object:
        """Run one QMP command on this guest's QEMU; its "return" value."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(30)
            s.connect(str(self.qmp_path))
            f = s.makefile("rwb")
            json.loads(f.readline())  # the greeting
            for cmd in ({"execute": "qmp_capabilities"},
                        {"execute": command, "arguments": arguments}):
                f.write(json.dumps(cmd).encode() + b"\n")
                f.flush()
                while True:
                    msg = json.loads(f.readline())
                    if "event" in msg:
                        continue
                    if "error" in msg:
                        raise VmError(f"QMP {command}: {msg['error']}")
                    break
            return msg.get("return")

    def qmp_ready(self) -> bool:
        """Whether QMP answers (a QEMU started with -incoming opens it after its chardevs)."""
        try:
            self.qmp("query-status")
            return True
        except (OSError, VmError):
            return False

    def migrate_to(self, dst: VmGuest, uri: str) -> None:
        """Start a live migration of this guest to `dst` (a QEMU started `incoming`) over
        `uri`, with return-path on both sides (a destination that fails makes the source
        resume by itself). Follow it with migration()."""
        for g in (self, dst):
            g.qmp("migrate-set-capabilities",
                  capabilities=[{"capability": "return-path", "state": True}])
        dst.qmp("migrate-incoming", uri=uri)
        self.qmp("migrate", uri=uri)

    def migration(self) -> dict:
        """query-migrate on this (the source) QEMU; its "status" is "completed", "failed"
        or "cancelled" once the migration has ended."""
        return self.qmp("query-migrate")  # type: ignore[return-value]

    def carry_channel_to(self, dst: VmGuest) -> None:
        """After a migration, requests sent before it are answered on `dst`'s channel: the
        tag counter and the answers so far move there, so tags stay unique."""
        dst._tag = self._tag
        with self._cond:
            answers = dict(self._answers)
        with dst._cond:
            dst._answers.update(answers)

    def pause(self) -> None:
        """`virsh suspend`: QMP stop (the vhost-user rings are stopped)."""
        self.qmp("stop")

    def resume(self) -> None:
        """`virsh resume`: QMP cont."""
        self.qmp("cont")

    def send(self, owner: str, line: str) -> str:
        """Send one command for OWNER; returns its tag (see result())."""
        if self._conn is None or self._closed:
            raise VmError(f"guest {self.name} is closed")
        with self._send_lock:  # whole lines from concurrent threads
            self._tag += 1
            tag = str(self._tag)
            self._conn.sendall(f"{tag} {owner} {line}\n".encode())
        return tag

    def result(self, tag: str, timeout: float = 15.0) -> str:
        """The answer to tag: "ok ..." or "err ERRNO NAME"; TimeoutError if none came."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while tag not in self._answers:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"guest {self.name}: no answer to request {tag}")
                if "* eof" in self.events:
                    raise VmError(f"guest {self.name}: control channel closed")
                self._cond.wait(min(left, 0.2))
            return self._answers.pop(tag)

    def pending(self, tag: str, wait: float = 0.3) -> bool:
        """True when tag is still unanswered after `wait` seconds."""
        deadline = time.monotonic() + wait
        with self._cond:
            while tag not in self._answers:
                left = deadline - time.monotonic()
                if left <= 0:
                    return True
                self._cond.wait(left)
            return False

    def do(self, owner: str, line: str, timeout: float = 15.0) -> str:
        return self.result(self.send(owner, line), timeout)

    def console(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def diagnostics(self) -> str:
        out = [f"--- console ({self.log}):", self.console()[-3000:]]
        qlog = self.workdir / f"{self.name}.qemu.log"
        with contextlib.suppress(OSError):
            out += ["--- qemu:", qlog.read_text(errors="replace")[-2000:]]
        if self.backend is not None:
            out += [f"--- backend {self.backend.kind}:", self.backend.output()[-3000:]]
        return "\n".join(out)

    # ------------------------------------------------------------------ lifecycle
    def kill(self) -> None:
        """kill -9 QEMU (the guest dies at once; the backend sees the disconnect)."""
        if self.qemu is not None and self.qemu.poll() is None:
            self.qemu.kill()
            self.qemu.wait()

    def wait_exit(self, timeout: float) -> int | None:
        """QEMU's exit status after the guest powered off by itself (None: still runs)."""
        assert self.qemu is not None
        try:
            return self.qemu.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def close(self, grace: float = 3.0) -> None:
        """Ask the probe to quit (the guest then powers off), kill QEMU if it does not end
        in `grace` seconds, then stop the backend. Never raises; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.qemu is not None and self.qemu.poll() is None and self._conn is not None:
            with contextlib.suppress(OSError):
                if self.probe:
                    self._conn.sendall(b"0 - quit\n")
            try:
                self.qemu.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        if self.qemu is not None:
            if self.qemu.poll() is None:
                self.qemu.kill()
            self.qemu.wait()
            self._qlog.close()
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.close()
        if self._reader is not None:
            self._reader.join(2)
        if self.backend is not None:
            self.backend.stop()
        with contextlib.suppress(FileNotFoundError):
            self.ctl_path.unlink()
        for d in {self.sockdir, self.backend.socket_path.parent if self.backend else None}:
            if d is not None and d != self.workdir and d.name.startswith("vlvm-"):
                shutil.rmtree(d, ignore_errors=True)

    def __enter__(self) -> VmGuest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_once(cmd: str, share: Path, workdir: Path, backend: str = "virtiofsd",
             timeout: float = 120.0, **kw) -> tuple[int | None, str]:  # noqa: ANN003
    """Boot a guest that runs a shell command and powers off: (exit code from the
    console's "vfs: exit RC" line or None, console text)."""
    g = VmGuest.start("once", share, workdir, backend=backend, cmd=cmd, **kw)
    try:
        g.wait_exit(timeout)
        text = g.console()
    finally:
        g.close(grace=0)
    rc = None
    for line in text.splitlines():
        if line.startswith("vfs: exit "):
            with contextlib.suppress(ValueError):
                rc = int(line.split()[2])
    return rc, text




# ---------------------------------------------------------------------------- the rig
class RigVms:
    """VM guests in `vfs-lockd rig --vm-guests N`: each a QEMU guest on its own
    `vfs-lockd virtiofs --lockd` backend, with `procs` probe owners that run the rig's
    counter and flock workloads on the rig's own files, in batches, until the end of the
    run. There is no Python in the guest, so the checks that need per-operation records
    with host timestamps (critical-section overlap, ranges, sqlite) do not apply; what
    does: every increment a guest made is counted into the rig's counter check (the final
    value must equal all increments from every origin), the probe checks the flock
    markers itself (and host/FUSE workers see a VM holder's marker as a violation), and
    any failed lock call is an error. Results are merged into the rig's Stats by the
    main thread (merge()), so the driver threads never touch it."""

    WORKLOADS = ("counter", "flock")
    BATCH = 10

    def __init__(self, n: int, procs: int, share: Path, sub: str, workdir: Path,
                 lockd: str, workloads: tuple[str, ...], cache: str = "none") -> None:
        self.n, self.procs, self.share, self.sub = n, procs, share, sub
        self.workdir, self.lockd, self.cache = Path(workdir), lockd, cache
        self.workloads = [w for w in workloads if w in self.WORKLOADS]
        self.guests: list[VmGuest] = []
        self.threads: list[threading.Thread] = []
        self.lock = threading.Lock()
        self.increments = 0
        self.ops: dict[str, int] = {w: 0 for w in self.WORKLOADS}
        self.per_op_us: dict[str, list[float]] = {w: [] for w in self.WORKLOADS}
        self.violations: list[str] = []
        self.errors: list[str] = []
        self.boot_s = 0.0

    def start(self) -> None:
        """Boot the guests (sequentially: TCG boots are CPU-bound) and open the files."""
        if not self.workloads:
            raise VmError("VM guests run only the counter and flock workloads")
        t0 = time.monotonic()
        kernel, initrd = ensure_image()
        for i in range(self.n):
            g = VmGuest.start(f"vm{i}", self.share, self.workdir, backend="vfs-lockd",
                              lockd=self.lockd, cache=self.cache, kernel=kernel,
                              initrd=initrd)
            self.guests.append(g)
            for j in range(self.procs):
                for slot, name in ((0, "counter"), (1, "flock.dat")):
                    ans = g.do(f"p{j}", f"open {slot} /mnt/{self.sub}/{name}")
                    if ans != "ok":
                        raise VmError(f"{g.name}: open {name}: {ans}")
        self.boot_s = time.monotonic() - t0

    def run_until(self, t_end_ns: int) -> None:
        """Start one driver thread per probe owner."""
        for g in self.guests:
            for j in range(self.procs):
                t = threading.Thread(target=self._drive, args=(g, f"p{j}", j, t_end_ns),
                                     daemon=True, name=f"rig-{g.name}-p{j}")
                t.start()
                self.threads.append(t)

    def _drive(self, g: VmGuest, owner: str, j: int, t_end_ns: int) -> None:
        k = j
        who = f"{g.name}.p{j}"
        while time.monotonic_ns() < t_end_ns:
            wl = self.workloads[k % len(self.workloads)]
            k += 1
            cmd = (f"counter 0 posix {self.BATCH}" if wl == "counter"
                   else f"flockmark 1 {self.BATCH} {who}")
            t0 = time.monotonic_ns()
            try:
                ans = g.do(owner, cmd, timeout=120).split()
            except (VmError, TimeoutError, OSError) as exc:
                with self.lock:
                    self.errors.append(f"{who}: {exc}")
                return
            dt = time.monotonic_ns() - t0
            with self.lock:
                if ans[0] != "ok":
                    self.errors.append(f"{who} {wl}: {' '.join(ans)}")
                    continue
                done = int(ans[1])
                self.ops[wl] += done
                if done:
                    self.per_op_us[wl].append(dt / done / 1000)
                if wl == "counter":
                    self.increments += done
                    if int(ans[3]):
                        self.violations.append(f"{who} (counter): {ans[3]} unreadable counter "
                                               "values under the lock")
                elif int(ans[2]):
                    self.violations.append(f"{who} (flock): {ans[2]} foreign or changed "
                                           "markers while holding flock")
                err = int(ans[-1])
                if err:
                    self.errors.append(f"{who} {wl}: lock call failed: "
                                       f"{errno.errorcode.get(err, err)}")
            if ans[0] == "ok" and int(ans[-1]):
                time.sleep(0.05)

    def join(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                self.errors.append(f"{t.name} still busy at the end")

    def merge(self, stats: object) -> None:
        """Add the guests' results to the rig's Stats (main thread only)."""
        with self.lock:
            stats.counter_intents += self.increments  # type: ignore[attr-defined]
            stats.counter_done += self.increments  # type: ignore[attr-defined]
            for wl, n in self.ops.items():
                stats.ops[wl] += n  # type: ignore[attr-defined]
            stats.violations.extend(self.violations)  # type: ignore[attr-defined]
            for e in self.errors:
                stats.errors["vm:" + e.split(":")[-1].strip()[:40]] += 1  # type: ignore[attr-defined]
                if len(stats.error_samples) < 20:  # type: ignore[attr-defined]
                    stats.error_samples.append(e)  # type: ignore[attr-defined]
            self.increments, self.violations, self.errors = 0, [], []
            self.ops = {w: 0 for w in self.WORKLOADS}

    def summary(self) -> dict:
        import statistics

        return {"guests": self.n, "owners_per_guest": self.procs,
                "boot_s": round(self.boot_s, 2),
                "per_op_us_median": {w: round(statistics.median(v), 1)
                                     for w, v in self.per_op_us.items() if v}}

    def close(self) -> None:
        for g in self.guests:
            g.close(grace=2)


__all__ = ["Backend", "RigVms", "VmError", "VmGuest", "ensure_image", "errno_of",
           "legacy_virtiofsd_present", "qemu_missing", "run_once", "rust_virtiofsd_missing"]

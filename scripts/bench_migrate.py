#!/usr/bin/env python3
"""Live-migration downtime of one guest between two back-ends on this host: vfs-lockd
(embedded lock manager, and central with --lockd) against Rust virtiofsd 1.13
(scripts/rust-virtiofsd, --migration-mode=find-paths), same guest image, same QEMU
(scripts/qemu-migratable: 8.2+) with identical arguments and capabilities (return-path
on both sides), interleaved rounds in one run.

    .venv/bin/python scripts/bench_migrate.py [--rounds 3] [--json FILE] [--trace-vhost]

Per back-end one chain of guests: a guest boots on its back-end, then each migration
moves it to a fresh QEMU (-incoming defer) on a fresh back-end, and the old QEMU and
back-end end. Per round and back-end (the order rotates per round) two migrations:
  idle   nothing runs in the guest across the switch-over;
  busy   the probe's `counter` loop (F_SETLKW, pread, pwrite, unlock) runs across it:
         sized from a timed calibration run so that it lasts well past the migration,
         its answer must come from the destination (else the sample is marked).
After every migration a descriptor opened in the guest before the first migration is
written and read back through the destination (and the host checks the bytes), for both
back-ends. Reported from the source's final `query-migrate`: downtime and total-time
(ms), medians with min/max, ratio ours/Rust (`run()` feeds `scripts/bench --vm`). Where
the QEMU has the trace point (8.2+), also its own account of the source's downtime
(vmstate_downtime_checkpoint): the same downtime less QEMU's last RAM pass, which is
QEMU's alone, the same for every back-end and the part that varies most (0-20 ms here:
the guest's dirty pages); and the stop, devices and destination parts (notes).

--trace-vhost also traces QEMU's vhost-user messages and per-device save/load times
(vhost_user_read/write, vmstate_downtime_save/load, vhost_dev_start/stop) and reports,
for every back-end alike, what the back-end's own steps of the switch-over cost as QEMU
saw them (vhost_phases): the device stop, the state's save and load, the device start.

Guests under TCG (no KVM here): the copy of guest RAM and the guest's own work are
emulated, which inflates total time for every back-end alike.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
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
sys.path.insert(0, str(REPO))

from rig.vm import (  # noqa: E402
    VFS_LOCKD,
    Backend,
    VmError,
    VmGuest,
    ensure_image,
    errno_of,
    qemu_missing,
    rust_virtiofsd_missing,
    socket_dir,
)

QEMU_MIGRATABLE = REPO / "scripts" / "qemu-migratable"
MEM_MB = 256
CONFIGS = ("rust-virtiofsd", "vfs-lockd", "vfs-lockd-central")
MODES = ("idle", "busy")
BUSY_MARGIN_S = 8.0  # the busy loop's planned length beyond a migration's expected time
COUNTER_WIDTH = 20  # vlprobe's counter format: right-justified, newline


def _label(config: str, rust_version: str) -> str:
    return {"rust-virtiofsd": f"Rust virtiofsd {rust_version}",
            "vfs-lockd": "vfs-lockd embedded",
            "vfs-lockd-central": "vfs-lockd central (--lockd)"}[config]


def _wait(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise VmError(f"timed out: {what}")
        time.sleep(0.02)


# QEMU's own checkpoints of a switch-over (vmstate_downtime_checkpoint, QEMU 8.2+), logged
# with their time to the QEMU's log (VmGuest: NAME.qemu.log): a few lines per migration.
TRACE = ["-trace", "enable=vmstate_downtime_checkpoint", "-msg", "timestamp=on"]
_CHECKPOINT = re.compile(r"^\d+@(\d+\.\d+):vmstate_downtime_checkpoint (\S+)", re.M)
SWITCHOVER = {  # what switchover() reports (ms)
    "stop": "the source stops (its vCPUs and devices: our rings' GET_VRING_BASE)",
    "ram": "QEMU's last RAM pass",
    "devices": "the devices' state saved (ours: SET_DEVICE_STATE_FD, the pipe, "
               "CHECK_DEVICE_STATE), streamed to the destination",
    "destination": "-> the destination loaded and started it (its device state load, "
                   "vhost start) and said so on the return path",
    "without ram": "the downtime less QEMU's last RAM pass",
}


TRACE_VHOST = [a for ev in ("vhost_user_read", "vhost_user_write", "vmstate_downtime_save",
                            "vmstate_downtime_load", "vhost_dev_start", "vhost_dev_stop")
               for a in ("-trace", f"enable={ev}")]
_EVENT = re.compile(r"^\d+@(\d+\.\d+):(\S+) ?(.*)$", re.M)
_MSG = re.compile(r"req:(\d+) flags:0x[0-9a-f]+")
GET_VRING_BASE, SET_VRING_ENABLE, CHECK_DEVICE_STATE = 11, 18, 43
VHOST_PHASES = {  # what vhost_phases() reports (ms), as QEMU saw each back-end
    "src stop": "source: the device stop (vhost_dev_stop -> the last GET_VRING_BASE "
                "answered: the rings disabled and stopped)",
    "src save": "source: the vhost-user-fs device's state saved (QEMU's own part, then "
                "SET_DEVICE_STATE_FD, the pipe, CHECK_DEVICE_STATE)",
    "dst load": "destination: that device's state loaded (SET_DEVICE_STATE_FD, the pipe, "
                "CHECK_DEVICE_STATE: the back-end's load)",
    "dst check": "destination: CHECK_DEVICE_STATE sent -> answered (the back-end's load)",
    "dst start": "destination: the device start (vhost_dev_start -> the last "
                 "SET_VRING_ENABLE answered)",
}


def vhost_phases(src_log: str, dst_log: str) -> dict[str, float]:
    """The back-end's steps of the last switch-over, from the two QEMUs' traces (ms;
    --trace-vhost): both QEMUs stamp with the same clock."""
    def events(log: str) -> list[tuple[float, str, str]]:
        return [(float(m[1]) * 1000, m[2], m[3]) for m in _EVENT.finditer(log)]

    src, dst = events(src_log), events(dst_log)
    starts = [t for t, e, a in src if e == "vmstate_downtime_checkpoint"
              and a == "src-downtime-start"]
    if not starts:
        return {}
    t0 = starts[-1]
    ends = [t for t, e, a in src if a == "src-downtime-end" and t >= t0]
    if not ends:
        return {}
    t1 = ends[0]
    src = [x for x in src if t0 <= x[0] <= t1]
    dst = [x for x in dst if t0 - 5 <= x[0] <= t1]

    def msg(ev: tuple[float, str, str], kind: str, req: int) -> bool:
        m = _MSG.search(ev[2])
        return ev[1] == f"vhost_user_{kind}" and m is not None and int(m[1]) == req

    out: dict[str, float] = {}
    stop = [t for t, e, _ in src if e == "vhost_dev_stop"]
    based = [ev[0] for ev in src if msg(ev, "read", GET_VRING_BASE)]
    if stop and based:
        out["src stop"] = based[-1] - stop[0]
    for name, evs, kind in (("src save", src, "vmstate_downtime_save"),
                            ("dst load", dst, "vmstate_downtime_load")):
        for _, e, a in evs:
            if e == kind and "vhost-user-fs" in a:
                out[name] = int(a.rsplit("downtime=", 1)[1]) / 1000
    sent = [ev[0] for ev in dst if msg(ev, "write", CHECK_DEVICE_STATE)]
    got = [ev[0] for ev in dst if msg(ev, "read", CHECK_DEVICE_STATE)]
    if sent and got and got[-1] >= sent[-1]:
        out["dst check"] = got[-1] - sent[-1]
    start = [t for t, e, _ in dst if e == "vhost_dev_start"]
    enabled = [ev[0] for ev in dst if msg(ev, "read", SET_VRING_ENABLE)]
    if start and enabled and enabled[-1] >= start[-1]:
        out["dst start"] = enabled[-1] - start[-1]
    return {k: round(v, 2) for k, v in out.items()}


def traced(qemu: list[str]) -> list[str]:
    """`qemu` with the switch-over's checkpoints traced, when this QEMU has them."""
    r = subprocess.run([*qemu, "-trace", "help"], capture_output=True, text=True, timeout=60)
    return [*qemu, *TRACE] if "vmstate_downtime_checkpoint" in r.stdout + r.stderr else qemu


def switchover(qemu_log: str) -> dict[str, float]:
    """The source QEMU's account of its last outgoing switch-over, from its checkpoints
    (ms; {} without them): the downtime is src-downtime-start -> src-downtime-end (what
    query-migrate reports, to the ms)."""
    cps = [(m[2], float(m[1]) * 1000) for m in _CHECKPOINT.finditer(qemu_log)]
    starts = [i for i, (name, _) in enumerate(cps) if name == "src-downtime-start"]
    if not starts:
        return {}
    at: dict[str, float] = {}
    for name, t in cps[starts[-1]:]:
        at.setdefault(name, t)
    keys = ("src-downtime-start", "src-vm-stopped", "src-iterable-saved",
            "src-non-iterable-saved", "src-downtime-end")
    if any(k not in at for k in keys):
        return {}
    start, stopped, ram, devices, end = (at[k] for k in keys)
    return {"stop": round(stopped - start, 2), "ram": round(ram - stopped, 2),
            "devices": round(devices - ram, 2), "destination": round(end - devices, 2),
            "without ram": round((end - start) - (ram - stopped), 2)}


def _ok(g: VmGuest, owner: str, line: str, timeout: float = 60) -> str:
    ans = g.do(owner, line, timeout)
    if errno_of(ans):
        raise VmError(f"{g.name}: {line!r} answered {ans!r}")
    return ans


class Chain:
    """One back-end kind's guest, moved from back-end to back-end."""

    def __init__(self, config: str, share: Path, work: Path, qemu: list[str],
                 kernel: Path, initrd: Path, lockd: Path | None, verbose: bool = False) -> None:
        self.config, self.share, self.work, self.qemu = config, share, work, qemu
        self.kernel, self.initrd, self.lockd = kernel, initrd, lockd
        self.n = 0
        self.verbose = verbose
        self.prefix = {"rust-virtiofsd": "rv", "vfs-lockd": "ve",
                       "vfs-lockd-central": "vc"}[config]
        self.fd_file = share / f"{self.prefix}-fd"
        self.counter_file = share / f"{self.prefix}-counter"
        self.fd_file.write_bytes(b"-" * 64)
        self.counter_file.write_bytes(f"{0:>{COUNTER_WIDTH}}\n".encode())
        self.guest: VmGuest | None = None
        self.guest = self._new(incoming=False)
        g = self.guest
        _ok(g, "fd", f"open 1 /mnt/{self.fd_file.name} rw")  # kept across every migration
        _ok(g, "busy", f"open 2 /mnt/{self.counter_file.name} rw")
        self.rate = self._calibrate()

    def _new(self, incoming: bool) -> VmGuest:
        self.n += 1
        name = f"{self.prefix}{self.n}"
        sd = socket_dir(self.work)
        if self.config == "rust-virtiofsd":
            b = Backend("rust-virtiofsd", sd / f"{name}.vhost.sock", self.share, name,
                        self.work / f"{name}.backend.log", cache="none",
                        extra=["--migration-mode=find-paths"])
        else:
            b = Backend("vfs-lockd", sd / f"{name}.vhost.sock", self.share, name,
                        self.work / f"{name}.backend.log", cache="none",
                        lockd=self.lockd if self.config == "vfs-lockd-central" else None,
                        extra=["-v"] if self.verbose else None)
        try:
            return VmGuest(name, b.socket_path, self.work, backend=b, kernel=self.kernel,
                           initrd=self.initrd, mem_mb=MEM_MB, qemu=self.qemu,
                           incoming=incoming)
        except BaseException:
            b.stop()
            raise

    def counter_value(self) -> int:
        try:
            return int(self.counter_file.read_bytes()[:COUNTER_WIDTH])
        except (OSError, ValueError):
            return -1

    def _calibrate(self) -> float:
        """Iterations per second of the busy loop in this guest."""
        assert self.guest is not None
        n = 200
        t0 = time.monotonic()
        ans = _ok(self.guest, "busy", f"counter 2 posix {n}", 120)
        dt = time.monotonic() - t0
        if ans.split()[1] != str(n):
            raise VmError(f"{self.guest.name}: calibration counter answered {ans!r}")
        return n / max(dt, 1e-3)

    def migrate(self, busy: bool, expect_s: float, token: str) -> dict:
        """One migration to a fresh destination; its measurements."""
        src = self.guest
        assert src is not None
        dst = self._new(incoming=True)
        out: dict = {"src": src.name, "dst": dst.name}
        try:
            _wait(dst.qmp_ready, 60, f"{dst.name}'s QMP")
            loop_tag = None
            if busy:
                n = max(500, int(self.rate * (expect_s + BUSY_MARGIN_S)))
                before = self.counter_value()
                loop_tag = src.send("busy", f"counter 2 posix {n}")
                # running: the host sees the counter move before the migration starts
                _wait(lambda: self.counter_value() > before + 5, 60,
                      f"{src.name}'s busy loop to start")
                out["loop_n"] = n
            uri = f"unix:{socket_dir(self.work)}/{dst.name}.migrate"
            src.migrate_to(dst, uri)
            info: dict = {}

            def finished() -> bool:
                info.clear()
                info.update(src.migration())
                return info.get("status") in ("completed", "failed", "cancelled")

            _wait(finished, 300, f"migration {src.name} -> {dst.name}")
            if info.get("status") != "completed":
                raise VmError(f"migration {src.name} -> {dst.name}: {info}\n"
                              + (dst.backend.output()[-2000:] if dst.backend else ""))
            for k in ("downtime", "total-time", "setup-time"):
                out[k] = info.get(k)
            with contextlib.suppress(OSError):
                src_qlog = (src.workdir / f"{src.name}.qemu.log").read_text(errors="replace")
                out["qemu"] = switchover(src_qlog)
                if "vhost_user_write" in src_qlog:  # --trace-vhost
                    out["vhost"] = vhost_phases(src_qlog, (
                        dst.workdir / f"{dst.name}.qemu.log").read_text(errors="replace"))
            loop_done_early = loop_tag is not None and loop_tag in src._answers
            src.carry_channel_to(dst)  # requests sent before are answered there
            _wait(lambda: dst.qmp("query-status")["status"] == "running", 60,
                  f"{dst.name} running")
            self.guest = dst
            src.kill()  # paused for good: its back-end sees QEMU go
            src.close()
            if loop_tag is not None:
                ans = dst.result(loop_tag, 600)
                parts = ans.split()
                # "ok DONE LAST BAD ERR": every iteration done, none read a bad counter
                if (errno_of(ans) or parts[1] != str(out["loop_n"]) or parts[3:5] != ["0", "0"]):
                    raise VmError(f"busy loop across the migration answered {ans!r}")
                out["loop_spanned"] = not loop_done_early
            # the descriptor opened before the first migration, through the destination
            _ok(dst, "fd", f"write 1 0 {token}")
            got = _ok(dst, "fd", f"read 1 0 {len(token)}")
            host = self.fd_file.read_bytes()[:len(token)].decode()
            out["fd_ok"] = got == f"ok {token}" and host == token
            if not out["fd_ok"]:
                raise VmError(f"descriptor after migration: guest read {got!r}, host {host!r}")
            if dst.backend is not None and self.config != "rust-virtiofsd":
                out["phases"] = phases(src.backend.output() if src.backend else "",
                                       dst.backend.output())
            return out
        except BaseException:
            if self.guest is not dst:
                dst.close()
            raise

    def close(self) -> None:
        if self.guest is not None:
            self.guest.close()
            self.guest = None


PHASES = {  # what phases() reports, in the order of the switch-over
    "save": "our save (SET_DEVICE_STATE_FD on the source)",
    "saved->loaded": "-> the destination loaded it (QEMU's copy, our load)",
    "collect": "the descriptors' SCM_RIGHTS rendezvous (destination)",
    "load": "our whole load (CHECK_DEVICE_STATE on the destination)",
    "loaded->runs": "-> the destination's first ring started: the guest is its",
    "takeover": "central: the daemon session takeover (off the ring start)",
    "loaded->takeover": "central: loaded -> the takeover done",
}
_TS = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ")


def _ts(line: str) -> float | None:
    m = _TS.match(line)
    if not m:
        return None
    t = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S"))
    return t + int(m.group(2)) / 1000


def phases(src_log: str, dst_log: str) -> dict[str, float]:
    """The switch-over as our back-ends logged it (ms, from their log timestamps, which
    have ms resolution): state saved (source) -> state loaded (destination) -> its first
    ring started, the guest runs there (-> central: the takeover done). (The rings'
    stops and starts log at debug only: a log line costs the switch-over.)"""
    def last(log: str, pat: str) -> float | None:
        ts = [_ts(x) for x in log.splitlines() if pat in x]
        ts = [t for t in ts if t is not None]
        return ts[-1] if ts else None

    def first_after(log: str, pat: str, after: float | None) -> float | None:
        for x in log.splitlines():
            t = _ts(x)
            if pat in x and t is not None and (after is None or t >= after):
                return t
        return None

    saved = last(src_log, "state saved in ")
    loaded = first_after(dst_log, "state loaded in ", None)
    runs = first_after(dst_log, "the guest runs here now", loaded)
    ours = first_after(dst_log, "lock session is ours", loaded)
    out: dict[str, float] = {}
    for name, a, b in (("saved->loaded", saved, loaded), ("loaded->runs", loaded, runs),
                       ("loaded->takeover", loaded, ours)):
        if a is not None and b is not None:
            out[name] = round((b - a) * 1000, 1)
    for name, log, pat in (("save", src_log, "state saved in "), ("load", dst_log,
                                                                  "state loaded in "),
                           ("collect", dst_log, "collected from the source in "),
                           ("takeover", dst_log, "(takeover ")):
        ms = [float(m.group(1)) for m in re.finditer(re.escape(pat) + r"([0-9.]+) ms", log)]
        if ms:
            out[name] = ms[-1] if log is src_log else ms[0]
    return out


def run(rounds: int = 3, quick: bool = False, work: Path | None = None,
        configs: tuple[str, ...] = CONFIGS, verbose: bool = False, trace_vhost: bool = False,
        log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)) -> dict:
    """{"rows": [{name, unit, samples, vs, short}], "notes": [...], "raw": {...}}."""
    why = qemu_missing() or rust_virtiofsd_missing()
    if why:
        return {"rows": [], "notes": [f"skipped: {why}"]}
    r = subprocess.run([str(QEMU_MIGRATABLE), "--where"], capture_output=True, text=True)
    if r.returncode != 0:
        return {"rows": [], "notes": [f"skipped: no QEMU 8.2+: {r.stderr.strip()}"]}
    qemu = r.stdout.split()
    qv = subprocess.run([*qemu, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    qemu = traced(qemu) + (TRACE_VHOST if trace_vhost else [])
    rv = subprocess.run([str(REPO / "scripts" / "rust-virtiofsd"), "--version"],
                        capture_output=True, text=True).stdout.strip().split()[-1]
    kernel, initrd = ensure_image(quiet=True)
    base = Path(work) if work else Path(tempfile.mkdtemp(prefix="vlmb-"))
    base.mkdir(parents=True, exist_ok=True)
    share = base / "share"
    share.mkdir(exist_ok=True)
    serve = None
    chains: dict[str, Chain] = {}
    samples: dict[str, dict[str, list[dict]]] = {c: {m: [] for m in MODES} for c in configs}
    try:
        lockd = None
        if "vfs-lockd-central" in configs:
            lockd = socket_dir(base) / "lockd.sock"
            serve = subprocess.Popen(
                [*VFS_LOCKD, "serve", "--socket", str(lockd), "--journal",
                 str(base / "journal.sqlite")], stdout=open(base / "lockd.log", "ab"),  # noqa: SIM115
                stderr=subprocess.STDOUT, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                start_new_session=True)
            _wait(lambda: lockd.exists() or serve.poll() is not None, 20, "vfs-lockd serve")
            if not lockd.exists():
                raise VmError("vfs-lockd serve did not start")
        for c in configs:
            chains[c] = Chain(c, share, base, qemu, kernel, initrd, lockd, verbose)
            log(f"vm-migrate: {c} booted (busy loop {chains[c].rate:.0f} iterations/s)")
        expect = 5.0
        k = 0
        for rnd in range(rounds):
            order = list(configs[rnd % len(configs):] + configs[:rnd % len(configs)])
            for c in order:
                for mode in MODES:
                    k += 1
                    m = chains[c].migrate(mode == "busy", expect, f"r{rnd}{mode}{k:04d}")
                    samples[c][mode].append(m)
                    expect = max(expect, (m.get("total-time") or 0) / 1000)
                    log(f"vm-migrate round {rnd + 1}/{rounds} {c} {mode}: downtime "
                        f"{m['downtime']} ms, total {m['total-time']} ms"
                        + (f", QEMU {m['qemu']}" if m.get("qemu") else "")
                        + (f", {m['phases']}" if m.get("phases") else ""))
    finally:
        for ch in chains.values():
            with contextlib.suppress(Exception):
                ch.close()
        if serve is not None:
            serve.send_signal(signal.SIGTERM)
            try:
                serve.wait(10)
            except subprocess.TimeoutExpired:
                serve.kill()
                serve.wait()
        if work is None:
            shutil.rmtree(base, ignore_errors=True)

    def value(s: dict, key: str) -> float | None:
        v = s.get("qemu", {}).get(key) if key == "without ram" else s.get(key)
        return None if v is None else float(v)

    rows = []
    ref = "rust-virtiofsd"
    for metric, key in (("downtime", "downtime"),
                        ("downtime less QEMU's last RAM pass", "without ram"),
                        ("total time", "total-time")):
        for mode in MODES:
            refname = f"{_label(ref, rv)}: {metric}, {mode}" if ref in configs else None
            for c in configs:
                vals = [v for s in samples[c][mode] if (v := value(s, key)) is not None]
                if not vals and key == "without ram":
                    continue  # a QEMU without the checkpoints
                rows.append({"name": f"{_label(c, rv)}: {metric}, {mode}", "unit": "ms",
                             "samples": vals,
                             "vs": [refname] if refname and c != ref else [],
                             "short": "Rust" if c == ref else ""})
    spanned = sum(1 for c in configs for s in samples[c]["busy"] if s.get("loop_spanned"))
    busy_n = sum(len(samples[c]["busy"]) for c in configs)
    fds = sum(1 for c in configs for m in MODES for s in samples[c][m] if s.get("fd_ok"))
    total = sum(len(samples[c][m]) for c in configs for m in MODES)
    notes = [f"{rounds} interleaved rounds; per round and back-end one idle and one busy "
             f"migration of the same guest ({MEM_MB} MiB, TCG, 1 vCPU) to a fresh QEMU and "
             f"back-end on this host; {qv}; capabilities: return-path on both sides, QEMU's "
             "defaults otherwise; identical QEMU arguments for every back-end.",
             f"Rust virtiofsd {rv} with --migration-mode=find-paths --cache=never; vfs-lockd "
             "with --cache none, embedded or --lockd (one `vfs-lockd serve`).",
             "busy: the guest runs F_SETLKW + pread + pwrite + unlock in a loop across the "
             f"switch-over ({spanned} of {busy_n} loops answered from the destination, all "
             "without error); Rust virtiofsd's locks stay in the guest kernel (it offers no "
             "FUSE lock support), ours go to the host.",
             f"A descriptor opened before the first migration wrote and read back after "
             f"{fds} of {total} migrations (checked in the guest and on the host).",
             "downtime and total time from the source's query-migrate (ms)."]
    if any(s.get("qemu") for c in configs for m in MODES for s in samples[c][m]):
        notes.append("QEMU's own account of the source's downtime (its "
                     "vmstate_downtime_checkpoint trace points), median ms over idle and "
                     "busy: " + "; ".join(f"{k}: {v}" for k, v in SWITCHOVER.items()) + ".")
        for c in configs:
            qs = [s["qemu"] for m in MODES for s in samples[c][m] if s.get("qemu")]
            if qs:
                notes.append(f"{_label(c, rv)}: " + ", ".join(
                    f"{k} {statistics.median([q[k] for q in qs]):.1f}" for k in SWITCHOVER))
    if any(s.get("vhost") for c in configs for m in MODES for s in samples[c][m]):
        notes.append("The back-ends' steps as QEMU saw them (--trace-vhost: its vhost-user "
                     "message and device save/load trace points), median (min-max) ms over "
                     "idle and busy: " + "; ".join(f"{k}: {v}" for k, v in VHOST_PHASES.items())
                     + ".")
        for c in configs:
            vs = [s["vhost"] for m in MODES for s in samples[c][m] if s.get("vhost")]
            if vs:
                notes.append(f"{_label(c, rv)}: " + ", ".join(
                    f"{k} {statistics.median(x):.2f} ({min(x):.2f}-{max(x):.2f})"
                    for k in VHOST_PHASES if (x := [v[k] for v in vs if k in v])))
    for c in configs:
        ph = [s["phases"] for m in MODES for s in samples[c][m] if s.get("phases")]
        keys = [k for k in PHASES if any(k in p for p in ph)]
        if keys:
            notes.append(f"{_label(c, rv)}, the switch-over as its back-ends logged it "
                         "(median ms over idle and busy): " + ", ".join(
                             f"{k} {statistics.median([p[k] for p in ph if k in p]):.1f}"
                             for k in keys))
    return {"rows": rows, "notes": notes, "raw": {"samples": samples, "qemu": qv,
                                                  "rust_virtiofsd": rv}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--configs", default=",".join(CONFIGS),
                    help=f"comma-separated back-ends to compare, of: {', '.join(CONFIGS)}")
    ap.add_argument("--json", dest="json_path", default=None)
    ap.add_argument("--work", type=Path, default=None,
                    help="keep the guests' and back-ends' logs in this directory")
    ap.add_argument("--verbose-backends", action="store_true",
                    help="vfs-lockd back-ends log every vhost-user message (-v)")
    ap.add_argument("--trace-vhost", action="store_true",
                    help="trace QEMU's vhost-user messages: the back-ends' steps of the "
                         "switch-over as QEMU saw them, for every back-end alike")
    args = ap.parse_args()
    configs = tuple(c for c in args.configs.split(",") if c)
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown or not configs:
        ap.error(f"--configs: unknown {', '.join(unknown) or '(none given)'}; "
                 f"choose from {', '.join(CONFIGS)}")
    res = run(rounds=args.rounds, configs=configs,
              work=args.work, verbose=args.verbose_backends, trace_vhost=args.trace_vhost)
    print("live migration on one host: median (min-max) over rounds")
    byname = {r["name"]: r for r in res["rows"]}
    for r in res["rows"]:
        if not r["samples"]:
            continue
        med = statistics.median(r["samples"])
        line = (f"  {r['name']:50s} {med:8.1f} ms ({min(r['samples']):.0f}-"
                f"{max(r['samples']):.0f})")
        for v in r["vs"]:
            b = byname.get(v)
            if b and b["samples"]:
                line += f"  {med / statistics.median(b['samples']):.2f}x Rust"
        print(line)
    for c, per in res.get("raw", {}).get("samples", {}).items():
        for mode, ss in per.items():
            ph = [s["phases"] for s in ss if s.get("phases")]
            if ph:
                keys = sorted({k for p in ph for k in p})
                print(f"  {c} {mode} switch-over: " + ", ".join(
                    f"{k} {statistics.median([p[k] for p in ph if k in p]):.0f} ms"
                    for k in keys))
    for n in res["notes"]:
        print(f"  * {n}")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(res, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())

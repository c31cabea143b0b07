#!/usr/bin/env python3
"""Lock+unlock pairs inside a VM guest: vfs-lockd's vhost-user-fs backend against Rust
virtiofsd 1.13 (the reference: what a user would run instead; scripts/rust-virtiofsd) and,
where it is still installed (Debian 12), QEMU's legacy C virtiofsd (-o posix_lock -o
flock), kept as history; same guest image, same run, interleaved rounds; plus the
guest-local baseline (a tmpfs file inside the guest).

Rust virtiofsd keeps no host locks: it leaves FUSE_POSIX_LOCKS/FUSE_FLOCK_LOCKS out of
INIT, so the guest kernel keeps every lock local (nothing reaches the host or another
guest). Its lock rows are labelled guest-local: they measure the guest's own lock code,
not a lock service.

    .venv/bin/python scripts/bench_vm.py [--rounds 5] [--pairs 2000] [--cache none]
                                          [--central] [--json FILE]
    .venv/bin/python scripts/bench_vm.py --data [--rounds 3] [--quick] [--json FILE]

--data measures the data path instead (run_data(); what `scripts/bench --vm` shows in its
vm-data section): per cache mode (none, auto) one guest on each back-end (vfs-lockd twice:
as it ships, with its native fast path, and with --no-native, every request through the
Python session), same image, booted together; interleaved rounds of stat, create+write
4 KiB+close, unlink, 4 KiB random O_DIRECT reads and writes, and a 256 MiB sequential
write (+fsync) and read (the guest's and the host's cached pages of the file dropped
first).

The guests boot at once on one share (different files); each round runs the probe's
`bench` command (N x F_SETLK write whole file + F_SETLK unlock, timed inside the guest
with CLOCK_MONOTONIC) in each guest in turn, the order rotating per round. Medians (min,
max) over rounds are printed with the ratios. The guests run under TCG (no KVM for the stock
kernel here): every guest instruction is emulated, which inflates both backends' figures
(the guest's FUSE/virtio path is emulated; the backends themselves run natively), so the
absolute numbers are not what KVM guests would see; the ratio is the comparison.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from rig.vm import (  # noqa: E402
    RUST_VIRTIOFSD,
    VFS_LOCKD,
    VmError,
    VmGuest,
    ensure_image,
    errno_of,
    legacy_virtiofsd_present,
    qemu_missing,
    rust_virtiofsd_missing,
)

GUEST_LOCAL = "guest-local: Rust virtiofsd keeps no host locks"


def backends() -> list[str]:
    """The back-ends of this host's run: vfs-lockd, Rust virtiofsd (fetched by
    scripts/rust-virtiofsd when the host has no package), the legacy C virtiofsd if
    installed."""
    why = rust_virtiofsd_missing()
    if why:
        raise VmError(why)
    return ["vfs-lockd", "rust-virtiofsd"] + (["virtiofsd"] if legacy_virtiofsd_present()
                                               else [])


@functools.cache
def rust_version() -> str:
    r = subprocess.run([str(RUST_VIRTIOFSD), "--version"], capture_output=True, text=True)
    return r.stdout.strip().split()[-1] if r.returncode == 0 and r.stdout.strip() else "?"


def label(backend: str) -> str:
    return {"vfs-lockd": "vfs-lockd", "rust-virtiofsd": f"Rust virtiofsd {rust_version()}",
            "virtiofsd": "legacy C virtiofsd", NO_NATIVE: "vfs-lockd --no-native"}[backend]


# The data bench's second vfs-lockd back-end: the same server with its native fast path
# off, so the fast path's share of each row shows beside the reference.
NO_NATIVE = "vfs-lockd-no-native"
SHORT = {"rust-virtiofsd": "Rust virtiofsd", "virtiofsd": "legacy", NO_NATIVE: "no-native"}
PREFIX = {"vfs-lockd": "vl", "rust-virtiofsd": "rv", "virtiofsd": "vf", NO_NATIVE: "vn"}
# back-end -> (rig.vm.Backend kind, extra arguments)
LAUNCH = {NO_NATIVE: ("vfs-lockd", ["--no-native"])}


def bench(g: VmGuest, owner: str, kind: str, pairs: int) -> float | str:
    """us per lock+unlock pair, or the error the backend answered."""
    ans = g.do(owner, f"bench 0 {kind} {pairs}", timeout=600)
    if errno_of(ans):
        return ans.split()[2]
    return int(ans.split()[2]) / 1000.0


# ------------------------------------------------------------------ the data path
DATA_KINDS = ("stat", "create", "unlink", "rand read 4k", "rand write 4k", "seq write",
              "seq read")
DATA_UNITS = {"stat": "us/op", "create": "us/op", "unlink": "us/op", "rand read 4k": "us/op",
              "rand write 4k": "us/op", "seq write": "MiB/s", "seq read": "MiB/s"}


def _ok(g: VmGuest, line: str, timeout: float = 600) -> list[str]:
    ans = g.do("d", line, timeout=timeout)
    if errno_of(ans):
        raise VmError(f"{g.name}: {line!r} answered {ans!r}")
    return ans.split()[1:]


def data_round(g: VmGuest, host_dir: Path, sizes: dict, cache: str = "none") -> dict[str, float]:
    """One round of every data measurement in guest g, whose share holds host_dir as
    /mnt/<host_dir.name>: us per op, or MiB/s."""
    sub = f"/mnt/{host_dir.name}"
    out: dict[str, float] = {}
    # A cached stat costs ~10 us: too few of them span only a few ticks of the guest's
    # clock (4 ms under TCG), and the median is then the tick, not the stat.
    n = sizes["stats"] if cache == "none" else sizes["cached stats"]
    out["stat"] = int(_ok(g, f"dstat {sub}/statfile {n}")[1]) / 1000
    files = sizes["files"]
    _ok(g, f"dcreate {sub}/small {files} 0")  # a warm-up pass, not timed
    _ok(g, f"dunlink {sub}/small {files}")
    out["create"] = int(_ok(g, f"dcreate {sub}/small {files} 4096")[1]) / 1000
    out["unlink"] = int(_ok(g, f"dunlink {sub}/small {files}")[1]) / 1000
    for kind, rw in (("rand read 4k", "r"), ("rand write 4k", "w")):
        out[kind] = int(_ok(g, f"drand {sub}/randfile {sizes['rand']} 4096 {rw}")[1]) / 1000
    mib = sizes["mib"]
    nbytes, ns = map(int, _ok(g, f"dseqw {sub}/big {mib}"))
    out["seq write"] = nbytes / (1 << 20) / (ns / 1e9)
    fd = os.open(host_dir / "big", os.O_RDONLY)  # the host's pages too: a cold read
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    nbytes, ns = map(int, _ok(g, f"dseqr {sub}/big"))
    out["seq read"] = nbytes / (1 << 20) / (ns / 1e9)
    return out


def run_data(rounds: int = 3, quick: bool = False, work: Path | None = None,
             caches: tuple[str, ...] = ("none", "auto"),
             log=lambda m: print(m, file=sys.stderr, flush=True)) -> dict:  # noqa: ANN001
    """The data path in QEMU guests: vfs-lockd's back-end vs Rust virtiofsd (and the legacy
    C virtiofsd where installed), per cache mode.
    {"rows": [{name, unit, samples, vs, short}], "notes": [...], "raw": {...}}."""
    why = qemu_missing()
    if why:
        return {"rows": [], "notes": [f"skipped: {why}"]}
    sizes = ({"stats": 200, "cached stats": 20000, "files": 50, "rand": 200, "mib": 16}
             if quick else
             {"stats": 1000, "cached stats": 100000, "files": 200, "rand": 1000, "mib": 256})
    kernel, initrd = ensure_image(quiet=True)
    kinds = backends()
    kinds.insert(1, NO_NATIVE)
    names = {b: label(b) for b in kinds}
    base = Path(work) if work else Path(tempfile.mkdtemp(prefix="vfs-lockd-benchvm-"))
    base.mkdir(parents=True, exist_ok=True)
    share = base / "share"
    share.mkdir(exist_ok=True)
    results: dict[str, dict[str, dict[str, list[float]]]] = {}
    boot: dict[str, float] = {}
    try:
        for cache in caches:
            guests: dict[str, VmGuest] = {}
            dirs: dict[str, Path] = {}
            try:
                t0 = time.monotonic()
                for backend in kinds:
                    name = f"{PREFIX[backend]}-{cache}"
                    d = share / name
                    d.mkdir(exist_ok=True)
                    (d / "small").mkdir(exist_ok=True)
                    (d / "statfile").write_bytes(b"x")
                    with open(d / "randfile", "wb") as f:  # 64 MiB, really allocated
                        for _ in range(64):
                            f.write(os.urandom(1 << 20))
                    dirs[backend] = d
                    kind, extra = LAUNCH.get(backend, (backend, []))
                    guests[backend] = VmGuest.start(name, share, base, backend=kind,
                                                    backend_extra=extra, cache=cache,
                                                    kernel=kernel, initrd=initrd, mem_mb=768)
                boot[cache] = time.monotonic() - t0
                per = {b: {k: [] for k in DATA_KINDS} for b in guests}
                order = list(guests)
                for r in range(rounds):
                    for b in (order if r % 2 == 0 else order[::-1]):
                        for k, v in data_round(guests[b], dirs[b], sizes, cache).items():
                            per[b][k].append(v)
                    log(f"vm-data cache={cache}: round {r + 1}/{rounds}: " + "  ".join(
                        f"{b} {k} {per[b][k][-1]:.1f}" for b in order
                        for k in ("stat", "seq read")))
                results[cache] = per
            finally:
                for g in guests.values():
                    g.close()
                for d in dirs.values():
                    shutil.rmtree(d, ignore_errors=True)
    finally:
        if work is None:
            shutil.rmtree(base, ignore_errors=True)
    rows = []
    for cache, per in results.items():
        for k in DATA_KINDS:
            refs = []
            for b in ("rust-virtiofsd", "virtiofsd"):
                if b in per:
                    refs.append(f"{names[b]}, cache={cache}: {k}")
                    rows.append({"name": refs[-1], "unit": DATA_UNITS[k], "samples": per[b][k],
                                 "vs": [], "short": SHORT[b]})
            # ratios: each vfs-lockd row against the references; native against no-native
            slow = f"{names[NO_NATIVE]}, cache={cache}: {k}"
            rows.append({"name": slow, "unit": DATA_UNITS[k], "samples": per[NO_NATIVE][k],
                         "vs": refs, "short": SHORT[NO_NATIVE]})
            rows.append({"name": f"vfs-lockd, cache={cache}: {k}", "unit": DATA_UNITS[k],
                         "samples": per["vfs-lockd"][k], "vs": [*refs, slow], "short": ""})
    notes = [f"{rounds} interleaved rounds per cache mode; per round: {sizes['stats']} stats "
             f"(cache=none; {sizes['cached stats']} with cache=auto), "
             f"{sizes['files']} files created (4 KiB each) then unlinked, {sizes['rand']} "
             f"random 4 KiB O_DIRECT reads and writes in a 64 MiB file, {sizes['mib']} MiB "
             "written (+fsync) and read back cold (guest and host pages dropped).",
             f"Back-ends: {', '.join(names.values())}"
             + ("" if "virtiofsd" in names else " (the legacy C virtiofsd is not installed "
                "here)") + "; Rust virtiofsd runs as shipped (scripts/rust-virtiofsd), cache "
             "none = its --cache=never. vfs-lockd --no-native: the same back-end with its "
             "native fast path (native/vl_serve.c) off, every request through the Python "
             "session; vfs-lockd's rows give its ratio too (native / no-native).",
             "Guests under TCG (no KVM here): every guest instruction is emulated, so absolute "
             "numbers are inflated for every back-end; the ratio is the comparison "
             "(us/op: lower is better; MiB/s: higher is better).",
             "Boot of the guests: " + ", ".join(f"cache={c} {t:.1f} s" for c, t in boot.items())]
    return {"rows": rows, "notes": notes, "raw": {"sizes": sizes, "results": results}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--pairs", type=int, default=2000, help="lock+unlock pairs per round")
    ap.add_argument("--local-pairs", type=int, default=20000,
                    help="pairs per round of guest-local locks (the tmpfs file, Rust "
                         "virtiofsd)")
    ap.add_argument("--cache", choices=["none", "auto", "always"], default="none")
    ap.add_argument("--central", action="store_true",
                    help="vfs-lockd backend with --lockd to a `vfs-lockd serve` daemon "
                         "(default: the embedded manager)")
    ap.add_argument("--kinds", default="posix,flock")
    ap.add_argument("--json", dest="json_path", default=None)
    ap.add_argument("--data", action="store_true", help="the data path instead of locks")
    ap.add_argument("--quick", action="store_true", help="--data: small sizes")
    args = ap.parse_args()
    if args.data:
        return data_main(args)
    why = qemu_missing()
    if why:
        raise SystemExit(f"bench_vm: {why}")
    kernel, initrd = ensure_image(quiet=False)
    work = Path(tempfile.mkdtemp(prefix="vfs-lockd-benchvm-"))
    share = work / "share"
    share.mkdir()
    serve = None
    guests: dict[str, VmGuest] = {}
    kinds = [k for k in args.kinds.split(",") if k]
    results: dict[str, dict[str, list]] = {}
    try:
        lockd = None
        if args.central:
            lockd = work / "lockd.sock"
            serve = subprocess.Popen(
                [*VFS_LOCKD, "serve", "--socket", str(lockd), "--journal",
                 str(work / "journal.sqlite")], stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
            deadline = time.monotonic() + 20
            while not lockd.exists():
                if serve.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("bench_vm: vfs-lockd serve did not start")
                time.sleep(0.05)
        kinds_b = backends()
        t0 = time.monotonic()
        for b in kinds_b:
            guests[b] = VmGuest.start(b, share, work, backend=b,
                                      lockd=lockd if b == "vfs-lockd" else None,
                                      cache=args.cache, kernel=kernel, initrd=initrd)
        print(f"# {len(guests)} guests booted in {time.monotonic() - t0:.1f} s (TCG)",
              file=sys.stderr)
        for name, g in guests.items():
            (share / f"bench-{name}").write_bytes(b"")
            for kind in kinds:
                assert g.do(kind, f"open 0 /mnt/bench-{name}") == "ok"
            assert g.do("local", "open 0 /tmp/bench-local create") == "ok"
            results[name] = {k: [] for k in kinds}
        results["guest-local"] = {"posix": []}
        names = list(guests)
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]  # rotate who goes first
            for name in order:
                # Guest-local locks are ~100x quicker: they need the local count of pairs
                # to span many ticks of the guest's clock (4 ms under TCG).
                n = args.local_pairs if name == "rust-virtiofsd" else args.pairs
                for kind in kinds:
                    results[name][kind].append(bench(guests[name], kind, kind, n))
            g = guests[names[r % len(names)]]
            results["guest-local"]["posix"].append(
                bench(g, "local", "posix", args.local_pairs))
            print(f"# round {r + 1}/{args.rounds}: " + "  ".join(
                f"{n}/{k} {v[-1] if isinstance(v[-1], str) else f'{v[-1]:.1f} us'}"
                for n, per in results.items() for k, v in per.items()), file=sys.stderr)
    finally:
        for g in guests.values():
            g.close()
        if serve is not None:
            serve.send_signal(signal.SIGTERM)
            try:
                serve.wait(10)
            except subprocess.TimeoutExpired:
                serve.kill()
        shutil.rmtree(work, ignore_errors=True)

    summary = {n: {k: median(v) for k, v in per.items()} for n, per in results.items()}
    labels = {n: label(n) for n in results if n != "guest-local"}
    mode = "central daemon" if args.central else "embedded manager"
    print(f"lock+unlock pair inside a TCG guest, median (min-max) of {args.rounds} interleaved "
          f"rounds ({args.pairs} pairs; cache={args.cache}; vfs-lockd backend with {mode})")
    for kind in kinds:
        for n, lab in labels.items():
            note = f"  [{GUEST_LOCAL}]" if n == "rust-virtiofsd" else ""
            pairs = f"  ({args.local_pairs} pairs)" if n == "rust-virtiofsd" else ""
            print(f"  {kind:6s} {lab:24s} {_fmt(summary[n][kind]):>12s} "
                  f"{_span(results[n][kind])}{pairs}{note}")
        ours = summary["vfs-lockd"][kind]
        ratios = [f"vfs-lockd/{SHORT[n]}{' (guest-local)' if n == 'rust-virtiofsd' else ''} "
                  f"{ours / summary[n][kind]:.2f}x" for n in labels
                  if n != "vfs-lockd" and isinstance(ours, float)
                  and isinstance(summary[n][kind], float)]
        if ratios:
            print(f"  {kind:6s} ratio {', '.join(ratios)}")
    print(f"  guest-local tmpfs posix {_fmt(summary['guest-local']['posix'])} "
          f"{_span(results['guest-local']['posix'])} ({args.local_pairs} pairs)")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"config": vars(args), "rounds": results, "medians_us": summary,
                       "labels": labels, "guest_local": ["rust-virtiofsd", "guest-local"]},
                      f, indent=2)
    return 0


def median(vals: list) -> float | str:
    nums = [v for v in vals if not isinstance(v, str)]
    return statistics.median(nums) if nums else (vals[0] if vals else "-")


def _span(vals: list) -> str:
    nums = [v for v in vals if not isinstance(v, str)]
    return f"({min(nums):.1f}-{max(nums):.1f})" if nums else ""


def data_main(args: argparse.Namespace) -> int:
    res = run_data(rounds=args.rounds if args.rounds != 5 else 3, quick=args.quick)
    print("data path inside TCG guests: median (min-max) over rounds")
    for r in res["rows"]:
        med = statistics.median(r["samples"]) if r["samples"] else float("nan")
        line = f"  {r['name']:50s} {med:10.1f} {r['unit']:5s} {_span(r['samples']):>18s}"
        for v in r["vs"]:
            base = next(x for x in res["rows"] if x["name"] == v)
            if base["samples"]:
                line += f"  {med / statistics.median(base['samples']):.2f}x {base['short']}"
        print(line)
    for n in res["notes"]:
        print(f"  * {n}")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(res, f, indent=2)
    return 0


def _fmt(v: float | str) -> str:
    return f"{v:.1f} us" if isinstance(v, float) else f"n/a ({v})"


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Lock+unlock pairs inside a VM guest: vfs-lockd's vhost-user-fs backend against QEMU's
legacy C virtiofsd (-o posix_lock -o flock), same guest image, same run, interleaved
rounds; plus the guest-local baseline (a tmpfs file inside the guest).

    .venv/bin/python scripts/bench_vm.py [--rounds 5] [--pairs 2000] [--cache none]
                                          [--central] [--json FILE]

Both guests boot at once on one share (different files); each round runs the probe's
`bench` command (N x F_SETLK write whole file + F_SETLK unlock, timed inside the guest
with CLOCK_MONOTONIC) in one guest then the other, alternating who goes first. Medians
over rounds are printed with the ratio. The guests run under TCG (no KVM for the stock
kernel here): every guest instruction is emulated, which inflates both backends' figures
(the guest's FUSE/virtio path is emulated; the backends themselves run natively), so the
absolute numbers are not what KVM guests would see; the ratio is the comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from rig.vm import VFS_LOCKD, VmGuest, ensure_image, errno_of, qemu_missing  # noqa: E402


def bench(g: VmGuest, owner: str, kind: str, pairs: int) -> float | str:
    """us per lock+unlock pair, or the error the backend answered."""
    ans = g.do(owner, f"bench 0 {kind} {pairs}", timeout=600)
    if errno_of(ans):
        return ans.split()[2]
    return int(ans.split()[2]) / 1000.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--pairs", type=int, default=2000, help="lock+unlock pairs per round")
    ap.add_argument("--local-pairs", type=int, default=20000,
                    help="pairs per round on the guest-local tmpfs file")
    ap.add_argument("--cache", choices=["none", "auto", "always"], default="none")
    ap.add_argument("--central", action="store_true",
                    help="vfs-lockd backend with --lockd to a `vfs-lockd serve` daemon "
                         "(default: the embedded manager)")
    ap.add_argument("--kinds", default="posix,flock")
    ap.add_argument("--json", dest="json_path", default=None)
    args = ap.parse_args()
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
        t0 = time.monotonic()
        guests["vfs-lockd"] = VmGuest.start("vfs-lockd", share, work, backend="vfs-lockd",
                                            lockd=lockd, cache=args.cache, kernel=kernel,
                                            initrd=initrd)
        guests["virtiofsd"] = VmGuest.start("virtiofsd", share, work, backend="virtiofsd",
                                            cache=args.cache, kernel=kernel, initrd=initrd)
        print(f"# two guests booted in {time.monotonic() - t0:.1f} s (TCG)", file=sys.stderr)
        for name, g in guests.items():
            (share / f"bench-{name}").write_bytes(b"")
            for kind in kinds:
                assert g.do(kind, f"open 0 /mnt/bench-{name}") == "ok"
            assert g.do("local", "open 0 /tmp/bench-local create") == "ok"
            results[name] = {k: [] for k in kinds}
        results["guest-local"] = {"posix": []}
        names = list(guests)
        for r in range(args.rounds):
            order = names if r % 2 == 0 else names[::-1]
            for name in order:
                for kind in kinds:
                    results[name][kind].append(bench(guests[name], kind, kind, args.pairs))
            g = guests[names[r % 2]]
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
        import shutil

        shutil.rmtree(work, ignore_errors=True)

    def median(vals: list) -> float | str:
        nums = [v for v in vals if not isinstance(v, str)]
        return statistics.median(nums) if nums else (vals[0] if vals else "-")

    summary = {n: {k: median(v) for k, v in per.items()} for n, per in results.items()}
    mode = "central daemon" if args.central else "embedded manager"
    print(f"lock+unlock pair inside a TCG guest, medians of {args.rounds} interleaved rounds "
          f"({args.pairs} pairs; cache={args.cache}; vfs-lockd backend with {mode})")
    for kind in kinds:
        ours, legacy = summary["vfs-lockd"][kind], summary["virtiofsd"][kind]
        line = f"  {kind:6s} vfs-lockd {_fmt(ours)}  legacy virtiofsd {_fmt(legacy)}"
        if isinstance(ours, float) and isinstance(legacy, float):
            line += f"  ratio vfs-lockd/virtiofsd {ours / legacy:.2f}x"
        print(line)
    print(f"  guest-local tmpfs posix {_fmt(summary['guest-local']['posix'])} "
          f"({args.local_pairs} pairs)")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"config": vars(args), "rounds": results, "medians_us": summary}, f,
                      indent=2)
    return 0


def _fmt(v: float | str) -> str:
    return f"{v:.1f} us" if isinstance(v, float) else f"n/a ({v})"


if __name__ == "__main__":
    sys.exit(main())

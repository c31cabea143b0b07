"""The command line of scripts/gluster-hosts and scripts/ceph-hosts (one for both):

    SCRIPT setup [--hosts 2] [--guests 0] [--base DIR] [--ping-timeout S | --evict-after S]
    SCRIPT status [--base DIR] [--json]
    SCRIPT partition|heal HOST_INDEX [--base DIR]
    SCRIPT teardown [--base DIR]

setup: the hosts and the cluster file system (rig/cluster.py and the file system's
module); with --guests M, also one `vfs-lockd serve` per host and M guests per host
(`vfs-lockd mount BASE/hostI BASE/guests/hostI/hostI-gJ`). Idempotent; prints the time
it took and the memory of the file system's processes. teardown: kills what setup
started, unmounts, deletes namespaces, veths and BASE.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from rig.cluster import PKG_ROOT, ClusterHosts, HostsError, cluster_class, lockd_answers


def _reexec_in_venv() -> None:
    """Run by the system python: restart under the repository's venv, which has what the
    daemons and guests this starts (with this interpreter) need."""
    py = Path(PKG_ROOT) / ".venv" / "bin" / "python"
    if py.exists() and Path(sys.prefix).resolve() != py.parent.parent.resolve():
        os.execv(str(py), [str(py), os.path.abspath(sys.argv[0]), *sys.argv[1:]])


def _add_kind_options(ap: argparse.ArgumentParser, kind: str) -> None:
    if kind == "gluster":
        ap.add_argument("--ping-timeout", type=int, default=42,
                        help="seconds until a silent host's locks are given away")
    else:
        ap.add_argument("--evict-after", type=int, default=300,
                        help="seconds until the MDS evicts (and blocklists) a silent host "
                             "and gives its locks away (Ceph's session_autoclose; >= 30)")


def _make(kind: str, a: argparse.Namespace) -> ClusterHosts:
    cls = cluster_class(kind)
    if kind == "gluster":
        return cls(a.base, a.hosts, a.ping_timeout)
    return cls(a.base, a.hosts, a.evict_after)


def _print_status(st: dict) -> None:
    where = st.get("volume") or st.get("fs")
    print(f"{st['kind']} {where} on {st['server']} under {st['base']}"
          + (f" (set up in {st['setup_seconds']} s)" if st.get("setup_seconds") else ""))
    for h in st["hosts"]:
        extra = f", client {h['client']}" if h.get("client") else ""
        extra += f", MDS sessions {','.join(h['sessions'])}" if h.get("sessions") else ""
        print(f"  {h['name']}: netns {h['netns']}, mount {h['mount']} "
              f"({'live' if h['live'] else 'DOWN'}){extra}")
    for name, d in st["lockd"].items():
        print(f"  vfs-lockd serve {name}: {d['path']} (pid {d['pid']})")
    for name, g in st["guests"].items():
        print(f"  guest {name}: {g['path']} (pid {g['pid']})")
    mem = st.get("memory_kib")
    if mem:
        print(f"  memory (RSS): {sum(mem.values()) / 1024:.0f} MiB: " + ", ".join(
            f"{k} {v / 1024:.0f}" for k, v in sorted(mem.items())))


def main(kind: str, doc: str, argv: list[str] | None = None) -> int:
    """`kind` is "gluster" or "ceph"."""
    _reexec_in_venv()
    ap = argparse.ArgumentParser(description=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["setup", "status", "teardown", "partition", "heal"])
    ap.add_argument("host", nargs="?", type=int, help="host index (partition/heal)")
    ap.add_argument("--base", default=cluster_class(kind).DEFAULT_BASE)
    ap.add_argument("--hosts", type=int, default=2)
    ap.add_argument("--guests", type=int, default=0, help="guests per host (setup)")
    _add_kind_options(ap, kind)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    script = f"{kind}-hosts"
    try:
        if a.command == "setup":
            t0 = time.monotonic()
            c = _make(kind, a).setup()
            if a.guests:
                st = c.status()
                for h in c.hosts:
                    if not lockd_answers(c.lockd_paths(h)[0]):
                        c.start_lockd(h)
                    for j in range(a.guests):
                        name = f"{h.name}-g{j}"
                        if name not in st["guests"]:
                            c.start_guest(h, name)
            print(f"{script}: setup took {time.monotonic() - t0:.1f} s", file=sys.stderr)
        else:
            c = cluster_class(kind).load(a.base)
        if a.command == "teardown":
            problems = c.teardown()
            for p in problems:
                print(f"teardown: {p}", file=sys.stderr)
            return 1 if problems else 0
        if a.command in ("partition", "heal"):
            if a.host is None:
                ap.error(f"{a.command} needs a host index")
            if a.command == "partition":
                c.partition(a.host)
            else:
                outcome = c.heal(a.host)
                if outcome:
                    print(f"{script}: host{a.host}: {outcome}", file=sys.stderr)
    except HostsError as exc:
        print(f"{script}: {exc}", file=sys.stderr)
        return 1
    st = c.status()
    if a.json:
        print(json.dumps(st, indent=1))
    else:
        _print_status(st)
    return 0

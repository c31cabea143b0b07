#!/usr/bin/env python3
"""Cross-host locking through vfs-lockd over CephFS vs bare ceph-fuse mounts, beside the
same on GlusterFS, in one run (issue 20).

Two CephFS hosts (rig/ceph.py) and two GlusterFS hosts (rig/hosts.py), one `vfs-lockd
serve` and one guest per host each; interleaved rounds (every round visits the four
targets: CephFS bare, CephFS vfs-lockd, GlusterFS bare, GlusterFS vfs-lockd) of lock+unlock
pairs from host 1, cross-host handoffs and ping_pong steps across hosts. This is
scripts/bench_hosts.py with both file systems by default (`--cluster ceph` for CephFS
alone).

Run as root: .venv/bin/python scripts/bench_ceph.py [--cluster ceph,gluster] [--rounds 5]
    [--pairs 300] [--handoffs 20] [--steps 300] [--json OUT]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_hosts  # noqa: E402

if __name__ == "__main__":
    sys.exit(bench_hosts.main(default_kinds=("ceph", "gluster"), doc=__doc__))

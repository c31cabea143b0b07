#!/usr/bin/env python3
"""Cross-host locking through vfs-lockd vs bare GlusterFS mounts (Part 9).

Two GlusterFS hosts (rig/hosts.py), one `vfs-lockd serve` and one guest per host;
interleaved rounds of lock+unlock pairs from host 1, cross-host handoffs and ping_pong
steps, vfs-lockd vs bare. This is scripts/bench_hosts.py for GlusterFS alone (see there;
`scripts/bench_ceph.py` compares CephFS with it side by side).

Run as root: .venv/bin/python scripts/bench_gluster.py [--rounds 5] [--pairs 300]
    [--handoffs 20] [--steps 300] [--json OUT]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_hosts  # noqa: E402

if __name__ == "__main__":
    sys.exit(bench_hosts.main(default_kinds=("gluster",), doc=__doc__))

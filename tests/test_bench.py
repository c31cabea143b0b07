"""Smoke test of scripts/bench: a --quick run of four sections produces the Markdown table,
the PNG and the JSON, and every number in them parses. No timing is asserted: the machine
running the tests is shared and noisy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def num(cell: str) -> float:
    return float(cell.replace(",", ""))


@pytest.mark.fuse
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_quick_codec_pair_recovery_data(fuse_ok, tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "bench"), "--quick", "--only",
                        "codec,pair,recovery,data", "--out", str(out)], capture_output=True,
                       text=True, timeout=280, cwd=REPO,
                       # its work dir (mounts, daemons) under tmp_path, to check the cleanup
                       env=dict(os.environ, PYTHONPATH=str(REPO), TMPDIR=str(tmp_path)))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    md = (out / "bench.md").read_text()
    assert "Machine:" in md and "cores" in md and "Command: `scripts/bench --quick" in md
    tables: dict[str, list[list[str]]] = {}
    title = None
    for line in md.splitlines():
        if line.startswith("## "):
            title = line[3:]
            tables[title] = []
        elif line.startswith("| ") and title is not None:
            tables[title].append([c.strip() for c in line.strip("|").split("|")])
    assert len(tables) == 4, list(tables)
    for rows in tables.values():
        head, body = rows[0], rows[1:]
        assert head[0] == "what" and head[1].startswith("median")
        assert body, "a section without rows"
        for cells in body:
            med, lo, hi = num(cells[1]), num(cells[2]), num(cells[3])
            assert 0 < lo <= med <= hi, cells
            assert int(cells[4]) >= 1
    pair = next(rows for t, rows in tables.items() if t.startswith("Lock+unlock"))
    names = [cells[0] for cells in pair[1:]]
    assert "host POSIX (fcntl F_SETLK)" in names
    assert any(n.startswith("vfs-lockd mount, embedded") for n in names)
    assert any(n.startswith("vfs-lockd mount, central") for n in names)

    png = (out / "bench.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 1000

    data = json.loads((out / "bench.json").read_text())
    assert {s["key"] for s in data["sections"]} == {"codec", "pair", "recovery", "data"}
    for s in data["sections"]:
        for row in s["rows"]:
            assert row["samples"] and all(x > 0 for x in row["samples"])
    assert data["machine"]["cores"] >= 1 and data["machine"]["kernel"]

    # Everything it mounted is gone, and so is its work dir.
    assert str(tmp_path) not in Path("/proc/mounts").read_text()
    assert not list(tmp_path.glob("vfs-lockd-bench-*"))


def _alive_under(tmp_path: Path) -> list[int]:
    """Processes whose command line names tmp_path (a back-end the bench left behind)."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if str(tmp_path).encode() in f.read():
                    out.append(int(pid))
        except OSError:
            continue
    return out


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_quick_memory(tmp_path: Path) -> None:
    """`--only memory --quick`: four back-ends of each kind, waiting, connected and busy, a
    row per kind, state and metric, every back-end measured (n = 4), ours against Rust
    virtiofsd; all of them stopped afterwards."""
    if os.geteuid() != 0:  # the default sandbox of every back-end needs root
        if os.environ.get("CI") == "true":
            pytest.fail("the memory section needs root (CI=true)")
        pytest.skip("the memory section needs root")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "bench"), "--quick", "--only",
                        "memory", "--out", str(out)], capture_output=True, text=True,
                       timeout=280, cwd=REPO,
                       env=dict(os.environ, PYTHONPATH=str(REPO), TMPDIR=str(tmp_path)))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    data = json.loads((out / "bench.json").read_text())
    (sec,) = data["sections"]
    assert sec["key"] == "memory" and sec["unit"] == "MiB"
    rows = {row["name"]: row for row in sec["rows"]}
    for kind in ("vfs-lockd virtiofs", "vfs-lockd-virtiofsd", "Rust virtiofsd"):
        for state in ("waiting", "connected", "busy"):
            for metric in ("PSS", "RSS"):
                row = rows[f"{kind}, 4 back-ends, {state}, {metric}"]
                assert len(row["samples"]) == 4 and all(x > 0 for x in row["samples"])
                if kind != "Rust virtiofsd":
                    assert row["ratio"].endswith("x Rust"), row
    # PSS divides shared pages among the processes: never above RSS.
    for name, row in rows.items():
        if name.endswith("PSS"):
            assert row["median"] <= rows[name[:-3] + "RSS"]["median"], name
    # Every back-end is counted with its sandboxed child.
    assert "vfs-lockd virtiofs 2, vfs-lockd-virtiofsd 2, Rust virtiofsd 2" in " ".join(sec["notes"])
    assert "## Memory per virtio-fs back-end" in (out / "bench.md").read_text()
    assert not _alive_under(tmp_path)
    assert not list(tmp_path.glob("vfs-lockd-bench-*"))

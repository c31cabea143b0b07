"""The passthrough on a real mount: file operations, real programs, no escape from SOURCE."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import tarfile

import pytest

pytestmark = pytest.mark.fuse


def test_basic_operations(mounts) -> None:
    src, (m,) = mounts(1)
    mp = m.path
    (mp / "a.txt").write_text("hello")
    assert (src / "a.txt").read_text() == "hello"
    (src / "b.txt").write_text("from host")
    assert (mp / "b.txt").read_text() == "from host"
    (mp / "d" / "e").mkdir(parents=True)
    os.symlink("../a.txt", mp / "d" / "l")
    assert os.readlink(src / "d" / "l") == "../a.txt"
    assert (mp / "d" / "l").read_text() == "hello"
    os.link(mp / "a.txt", mp / "hard")
    assert os.stat(mp / "a.txt").st_nlink == 2
    os.rename(mp / "hard", mp / "d" / "moved")
    assert (src / "d" / "moved").exists() and not (src / "hard").exists()
    os.chmod(mp / "a.txt", 0o600)
    assert os.stat(src / "a.txt").st_mode & 0o777 == 0o600
    os.chown(mp / "a.txt", 1234, 5678)
    assert (os.stat(src / "a.txt").st_uid, os.stat(src / "a.txt").st_gid) == (1234, 5678)
    os.utime(mp / "a.txt", ns=(1_000_000_123, 2_000_000_456))
    st = os.stat(src / "a.txt")
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_123, 2_000_000_456)
    os.truncate(mp / "a.txt", 2)
    assert (src / "a.txt").read_text() == "he"
    with open(mp / "a.txt", "r+b") as f:
        f.seek(10)
        f.write(b"X")
        f.flush()
        os.fsync(f.fileno())
        assert os.lseek(f.fileno(), 0, os.SEEK_END) == 11
        os.posix_fallocate(f.fileno(), 0, 8192)
    assert os.stat(src / "a.txt").st_size == 8192
    os.setxattr(mp / "a.txt", "user.k", b"v")
    assert os.getxattr(src / "a.txt", "user.k") == b"v"
    assert "user.k" in os.listxattr(mp / "a.txt")
    os.removexattr(mp / "a.txt", "user.k")
    assert "user.k" not in os.listxattr(src / "a.txt")
    os.mkfifo(mp / "fifo")
    assert (src / "fifo").is_fifo()
    assert sorted(os.listdir(mp)) == sorted(os.listdir(src))
    assert os.statvfs(mp).f_blocks == os.statvfs(src).f_blocks
    os.unlink(mp / "fifo")
    shutil.rmtree(mp / "d")
    assert not (src / "d").exists()
    with pytest.raises(FileNotFoundError):
        os.stat(mp / "nope")
    with pytest.raises(OSError) as e:
        os.rmdir(mp / "b.txt")
    assert e.value.errno == errno.ENOTDIR
    # A big directory comes back complete through several READDIR(PLUS) calls.
    (mp / "many").mkdir()
    for i in range(600):
        (src / "many" / f"file-with-a-longish-name-{i:04d}").touch()
    assert len(os.listdir(mp / "many")) == 600


def test_symlinks_are_text(mounts, tmp_path) -> None:
    """Links are returned as text; the guest kernel resolves them in its own namespace
    (for an escape check at the server, see test_fuse_session)."""
    src, (m,) = mounts(1)
    os.symlink("/etc", src / "abs")
    os.symlink("../outside", src / "rel")
    assert os.readlink(m.path / "abs") == "/etc"
    assert os.readlink(m.path / "rel") == "../outside"
    assert os.lstat(m.path / "abs").st_mode & 0o170000 == 0o120000
    assert os.stat(m.path / "." / ".").st_ino == os.stat(m.path).st_ino


def test_real_programs(mounts, tmp_path) -> None:
    src, (m,) = mounts(1)
    mp = m.path
    # tar extract
    tree = tmp_path / "tree"
    for i in range(30):
        d = tree / f"d{i % 5}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}.txt").write_text(f"content {i}\n" * (i + 1))
    os.symlink("d0/f0.txt", tree / "link")
    tarball = tmp_path / "t.tar"
    with tarfile.open(tarball, "w") as t:
        t.add(tree, arcname="tree")
    subprocess.run(["tar", "-xf", str(tarball), "-C", str(mp)], check=True)
    r = subprocess.run(["diff", "-r", "--no-dereference", str(tree), str(mp / "tree")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    # git
    repo = mp / "repo"
    repo.mkdir()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@e", "-c", "init.defaultBranch=main"]
    subprocess.run([*git, "init", "-q"], cwd=repo, check=True)
    shutil.copytree(tree, repo / "tree", symlinks=True)
    subprocess.run([*git, "add", "-A"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "first"], cwd=repo, check=True)
    r = subprocess.run([*git, "fsck", "--strict"], cwd=src / "repo", capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    log = subprocess.run([*git, "log", "--oneline"], cwd=src / "repo", capture_output=True, text=True)
    assert "first" in log.stdout
    # python -m compileall
    pkg = mp / "pkg"
    pkg.mkdir()
    for i in range(20):
        (pkg / f"m{i}.py").write_text(f"X = {i}\ndef f():\n    return X * 2\n")
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(pkg)], check=True)
    assert len(list((src / "pkg" / "__pycache__").glob("*.pyc"))) == 20

#!/usr/bin/env bash
# Sets up a fresh machine (as root) for vfs-lockd: a virtualenv in .venv with the package
# (its cffi module compiled by pip) and the test/plot extras. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v gcc >/dev/null || ! python3 -c 'import sysconfig,os,sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'; then
    apt-get update -qq && apt-get install -y -qq gcc python3-dev
fi
if ! python3 -m venv --help >/dev/null 2>&1; then
    apt-get update -qq && apt-get install -y -qq python3-venv
fi
# Debian packages the tests, demo and benchmarks drive for real: bindfs (the FUSE
# baseline), QEMU + busybox (VM guests over vhost-user-fs, Part 6), GlusterFS (several
# hosts on one cluster volume, Part 9), libvirt (launching vfs-lockd-virtiofsd as
# virtiofsd), Ceph 16 (several hosts on one CephFS, issue 20). Install only what is missing.
debs=(bindfs qemu-system-x86 busybox-static glusterfs-server glusterfs-client iproute2 cpio
      libvirt-daemon-system libvirt-clients
      ceph-mon ceph-mgr ceph-osd ceph-mds ceph-fuse ceph-common
      # `make deb` (tests/test_package.py builds the package): debian/control's
      # Build-Depends, and systemd's unit checker
      build-essential dpkg-dev debhelper python3-dev python3-cffi python3-setuptools python3-wheel
      python3-pip python3-click systemd)
# Rust virtiofsd, the reference back-end of the VM benchmarks: Debian 13's `virtiofsd`
# package. A release without one (Debian 12) gets trixie's from scripts/rust-virtiofsd.
if apt-cache show virtiofsd >/dev/null 2>&1; then debs+=(virtiofsd); fi
missing=()
for d in "${debs[@]}"; do
    dpkg-query -W -f='${Status}' "$d" 2>/dev/null | grep -q 'install ok installed' || missing+=("$d")
done
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# A QEMU that can live-migrate vhost-user-fs (8.2+) for the migration tests: the host's
# when new enough (Debian 13), else bookworm-backports' unpacked in build/ (Debian 12).
scripts/qemu-migratable --where >/dev/null
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/pip install -q -e '.[test,plot]'
# FUSE needs the kernel module; it is built in on most kernels.
[ -e /dev/fuse ] || modprobe fuse 2>/dev/null || true
.venv/bin/python -c 'from lockd.engine import ofd; assert ofd.HAVE_NATIVE, "native module not built"'

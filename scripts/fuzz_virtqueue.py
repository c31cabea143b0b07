#!/usr/bin/env python3
"""Fuzz the native split-virtqueue walker (vl_vq_pop / vl_vq_push) with atheris,
differentially against a pure-Python model of the same rules.

    python scripts/fuzz_virtqueue.py [--seconds N] [--asan] [-- extra libFuzzer args]

Each input lays out a ring (size 1..16, last_avail, avail index and entries), a
descriptor table and an indirect table whose descriptors point into two adjacent guest
memory regions, beside them or anywhere, with any flags and next indexes; then pops up
to four chains with a random buffer capacity and segment limit and pushes a reply into
each. Every result (return value, head, error, bytes gathered, writable segments,
descriptors walked, ring state) and the memory after every push must equal the model's;
any difference, exception or sanitizer report fails (exit != 0). Half the inputs run
with the dirty log on (live migration: a log of 0..3 words, the used ring logged or
not): the log after every push must equal the model's too. Half run with
VIRTIO_RING_F_EVENT_IDX: an empty pop must publish avail_event (and log it), and every
push (with a real call eventfd) must signal exactly when the model's used_event rule
says, the driver's used_event and avail flags changing between pushes; without it the
NO_INTERRUPT flag decides. A third of the inputs run the ring's native reader loop
instead (vl_ring_serve, native/vl_ring.c: pop, answer natively, push, until a chain is
the session's): with no table, or with a table that answers GETATTR and STATFS of a
real directory and READDIR/READDIRPLUS of a handle of it, offset 0 taking a new
snapshot (requests planted where descriptors may point), the ring running or not;
it must return, push and leave memory as the model's pop, vl_serve on the model's bytes
and the model's push do. The regions are
separate heap blocks, so with --asan (the native module rebuilt with ASan/UBSan, as in
scripts/fuzz_codec.py) any access outside them is reported.
"""

from __future__ import annotations

import os
import struct
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

from fuzz_codec import load_native_from, run  # noqa: E402

REGION = 1024
# Adjacent: a buffer may straddle them. A 4 KiB page boundary (the dirty log's unit)
# falls inside region A's data, so writes on either side of it mark different bits.
GPA_A = 0x10000 - 768
GPA_B = GPA_A + REGION
DESC_OFF, AVAIL_OFF, USED_OFF, DATA_A = 0, 256, 320, 512  # in region A
INDIRECT_OFF, NINDIRECT = 0, 8  # an indirect table at the start of region B
DESC = struct.Struct("<QIHH")
U16 = struct.Struct("<H")
EINVAL, EFAULT, E2BIG, ELOOP, EIO = 22, 14, 7, 40, 5
LOOKUP, GETATTR, STATFS, READDIR, READDIRPLUS = 1, 3, 17, 28, 44  # the ring inputs' table's
DIR_FH = 5  # its directory handle (with a snapshot: READDIR past offset 0)


class Model:
    """The walk of vl_vq_pop/vl_vq_push in Python, on bytearrays standing for the regions."""

    def __init__(self, mem: list[bytearray], num: int, last_avail: int, used_idx: int,
                 max_indirect: int, log: bytearray | None = None, log_used: bool = False,
                 event_idx: bool = False) -> None:
        self.mem = mem
        self.log, self.log_used = log, log_used
        self.event_idx = event_idx
        self.signalled_used, self.signalled_valid = 0, False
        self.regions = [(GPA_A, REGION), (GPA_B, REGION)]
        self.num, self.last_avail, self.used_idx = num, last_avail, used_idx
        self.max_indirect = max_indirect
        self.broken = False

    def span(self, gpa: int, length: int) -> tuple[int, int, int] | None:
        """(region, offset, bytes in that region) of gpa, as gpa_span."""
        for i, (g, s) in enumerate(self.regions):
            off = (gpa - g) % (1 << 64)
            if off < s:
                return i, off, min(length, s - off)
        return None

    def pop(self, cap: int, max_segs: int) -> tuple:
        out = {"head": 0, "error": 0, "in_len": 0, "out_len": 0, "segs": [], "ndesc": 0,
               "data": b""}
        if self.broken:
            return -EIO, out
        a = self.mem[0]
        avail_idx = U16.unpack_from(a, AVAIL_OFF + 2)[0]
        if avail_idx == self.last_avail:
            if not self.event_idx:
                return 0, out
            # EVENT_IDX: kick me at the next entry (avail_event, after the used ring);
            # nobody changes avail idx meanwhile here, so the second look finds nothing.
            at = USED_OFF + 4 + 8 * self.num
            U16.pack_into(a, at, self.last_avail)
            if self.log_used:
                self.mark(GPA_A + at, 2)
            return 0, out
        if (avail_idx - self.last_avail) % 65536 > self.num:
            self.broken = True
            return -EIO, out
        head = U16.unpack_from(a, AVAIL_OFF + 4 + 2 * (self.last_avail % self.num))[0]
        if head >= self.num:
            self.broken = True
            return -EIO, out
        self.last_avail = (self.last_avail + 1) % 65536
        out["head"] = head
        out["error"] = self.walk(head, cap, max_segs, out)
        return 1, out

    def walk(self, head: int, cap: int, max_segs: int, out: dict) -> int:
        table = (0, DESC_OFF)
        size = limit = self.num
        count, i, indirect, seen_write = 0, head, False, False
        data = bytearray()
        try:
            while True:
                if count >= limit:
                    return ELOOP
                count += 1
                out["ndesc"] += 1
                addr, ln, flags, nxt = DESC.unpack_from(self.mem[table[0]], table[1] + 16 * i)
                if flags & 4:
                    if indirect:
                        return ELOOP
                    if flags & 1:
                        return EINVAL
                    if ln == 0 or ln % 16 or ln // 16 > self.max_indirect:
                        return EINVAL
                    sp = self.span(addr, ln)
                    if sp is None or sp[2] != ln:
                        return EFAULT
                    table = (sp[0], sp[1])
                    size = limit = ln // 16
                    count, i, indirect = 0, 0, True
                    continue
                if flags & 2:
                    seen_write = True
                    err = self.add_segs(addr, ln, max_segs, out)
                elif seen_write:
                    return EINVAL
                else:
                    err = self.gather(addr, ln, cap, data)
                    out["in_len"] = len(data)
                if err:
                    return err
                if not flags & 1:
                    return 0
                i = nxt
                if i >= size:
                    return EINVAL
        finally:
            out["data"] = bytes(data)

    def gather(self, gpa: int, ln: int, cap: int, data: bytearray) -> int:
        if ln > cap - len(data):
            return E2BIG
        while ln:
            sp = self.span(gpa, ln)
            if sp is None:
                return EFAULT
            r, off, n = sp
            data += self.mem[r][off : off + n]
            gpa, ln = gpa + n, ln - n
        return 0

    def add_segs(self, gpa: int, ln: int, max_segs: int, out: dict) -> int:
        while ln:
            sp = self.span(gpa, ln)
            if sp is None:
                return EFAULT
            if len(out["segs"]) >= max_segs:
                return E2BIG
            out["segs"].append(sp)
            out["out_len"] += sp[2]
            gpa, ln = gpa + sp[2], ln - sp[2]
        return 0

    def push(self, head: int, segs: list[tuple[int, int, int]], data: bytes) -> int:
        if head >= self.num:
            return -EINVAL
        done = 0
        for r, off, n in segs:
            if done >= len(data):
                break
            k = min(n, len(data) - done)
            self.mem[r][off : off + k] = data[done : done + k]
            self.mark(self.regions[r][0] + off, k)
            done += k
        a = self.mem[0]
        elem = USED_OFF + 4 + 8 * (self.used_idx % self.num)
        struct.pack_into("<II", a, elem, head, done)
        self.used_idx = (self.used_idx + 1) % 65536
        U16.pack_into(a, USED_OFF + 2, self.used_idx)
        if self.log_used:
            self.mark(GPA_A + elem, 8)
            self.mark(GPA_A + USED_OFF + 2, 2)
        return done

    def notify(self) -> bool:
        """vl_vq_notify with a call fd: whether it signals."""
        a = self.mem[0]
        if self.event_idx:
            event = U16.unpack_from(a, AVAIL_OFF + 4 + 2 * self.num)[0]
            old, valid = self.signalled_used, self.signalled_valid
            new = self.used_idx
            self.signalled_used, self.signalled_valid = new, True
            # the used index moving old -> new passes event: event in [old, new)
            return not valid or (new - event - 1) % 65536 < (new - old) % 65536
        return not U16.unpack_from(a, AVAIL_OFF)[0] & 1

    def mark(self, gpa: int, n: int) -> None:
        """vl_log_mark: bit page%64 of 64-bit word page//64, pages past the log left."""
        if self.log is None or not n:
            return
        for page in range(gpa // 4096, (gpa + n - 1) // 4096 + 1):
            word = page // 64
            if word >= len(self.log) // 8:
                return
            self.log[8 * word + (page % 64) // 8] |= 1 << (page % 8)


def build_input(fdp, num: int) -> tuple[bytes, bytes]:  # noqa: ANN001 - FuzzedDataProvider
    """Region contents: structured descriptors (addresses mostly inside or at the edges of
    the regions), an avail ring, then raw bytes."""
    a, b = bytearray(REGION), bytearray(REGION)

    def addr() -> int:
        pick = fdp.ConsumeIntInRange(0, 6)
        if pick == 6:
            return GPA_A + DATA_A  # where a ring input may plant a FUSE request
        if pick == 0:
            return GPA_A + DATA_A + fdp.ConsumeIntInRange(0, REGION - DATA_A)
        if pick == 1:
            return GPA_B + fdp.ConsumeIntInRange(0, REGION)
        if pick == 2:
            return GPA_B - fdp.ConsumeIntInRange(0, 64)  # straddling A/B
        if pick == 3:
            return GPA_B + INDIRECT_OFF + 16 * fdp.ConsumeIntInRange(0, NINDIRECT)
        if pick == 4:
            return GPA_A - fdp.ConsumeIntInRange(0, 64)  # just below guest memory
        return fdp.ConsumeIntInRange(0, (1 << 64) - 1)

    def desc() -> bytes:
        ln = fdp.ConsumeIntInRange(0, 300) if fdp.ConsumeBool() else fdp.ConsumeIntInRange(0, (1 << 32) - 1)
        return DESC.pack(addr(), ln, fdp.ConsumeIntInRange(0, 7), fdp.ConsumeIntInRange(0, num + 2)
                         if fdp.ConsumeBool() else fdp.ConsumeIntInRange(0, 0xFFFF))

    for i in range(num):
        a[DESC_OFF + 16 * i : DESC_OFF + 16 * i + 16] = desc()
    for i in range(NINDIRECT):
        b[INDIRECT_OFF + 16 * i : INDIRECT_OFF + 16 * i + 16] = desc()
    for i in range(num):
        U16.pack_into(a, AVAIL_OFF + 4 + 2 * i, fdp.ConsumeIntInRange(0, num + 1))
    rest = fdp.ConsumeBytes(2 * REGION)
    a[DATA_A : DATA_A + len(rest[: REGION - DATA_A])] = rest[: REGION - DATA_A]
    tail = rest[REGION - DATA_A :]
    off = INDIRECT_OFF + 16 * NINDIRECT
    b[off : off + len(tail[: REGION - off])] = tail[: REGION - off]
    return bytes(a), bytes(b)


def fuzz(seconds: int, extra: list[str]) -> None:
    so = os.environ.get("VFS_LOCKD_FUZZ_SO")
    if so:
        load_native_from(so)
    import atheris

    with atheris.instrument_imports():
        from lockd import native
    # The model's branches are the coverage signal (the C code is not instrumented).
    for name in ("pop", "walk", "gather", "add_segs", "span", "push", "notify"):
        setattr(Model, name, atheris.instrument_func(getattr(Model, name)))
    ffi, lib = native.ffi, native.lib
    if so:
        assert sys.modules["lockd._native"].__file__ == so
    call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)  # the pushes' call fd

    def signalled() -> bool:
        try:
            return os.eventfd_read(call) > 0
        except BlockingIOError:
            return False

    # The native reader loop's table: node 1 is a real directory; GETATTR and STATFS on.
    # (sysfs: nothing changes its attributes or free counts between two answers)
    share_fd = os.open("/sys/kernel/mm", os.O_PATH | os.O_CLOEXEC)
    st = os.fstat(share_fd)
    table = ffi.gc(lib.vl_tab_new(), lib.vl_tab_free)
    assert lib.vl_tab_put_inode(table, 1, os.dup(share_fd), st.st_dev, st.st_ino,
                                0o040000, 1, 0) == 0
    dir_fd = os.open("/sys/kernel/mm", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    assert lib.vl_tab_put_handle(table, DIR_FH, dir_fd, 1, 2) == 0  # (2: VL_ENT_DIR)
    out, n, count = ffi.new("uint8_t **"), ffi.new("size_t *"), ffi.new("uint64_t *")
    assert lib.vl_dir_list(dir_fd, st.st_ino, out, n, count) == 0
    assert lib.vl_tab_set_listing(table, DIR_FH, out[0], n[0], count[0]) > 0
    lib.vl_free(out[0])
    # (READDIRPLUS, with LOOKUP on for its entries: past '.' and '..' each is a new
    # inode, so it gives back what it wrote and leaves the request to the session, after
    # taking a snapshot at offset 0)
    lib.vl_tab_config(table, (1 << GETATTR) | (1 << STATFS) | (1 << READDIR) |
                      (1 << READDIRPLUS) | (1 << LOOKUP), 1, 0, 1, 0)
    stop = os.eventfd(1, os.EFD_CLOEXEC | os.EFD_NONBLOCK)  # readable: an empty ring returns
    mutex = ffi.gc(lib.vl_mutex_new(), lib.vl_mutex_free)

    def planted(fdp) -> bytes:  # noqa: ANN001
        op = fdp.PickValueInList([GETATTR, STATFS, READDIR, READDIRPLUS, 0])
        body = bytes(16) if op == GETATTR else b""
        if op in (READDIR, READDIRPLUS):  # fuse_read_in: fh, offset, size, ...
            body = struct.pack("<QQIIQII", fdp.PickValueInList([DIR_FH, DIR_FH, 6]),
                               fdp.PickValueInList([0, 1, 2, 3, 7, 1 << 40, (1 << 64) - 1]),
                               fdp.PickValueInList([0, 1, 24, 32, 100, 4096, 0xFFFFFFFF]),
                               0, 0, 0, 0)
        length = 40 + len(body)
        if fdp.ConsumeBool():
            length = fdp.ConsumeIntInRange(0, 80)
        return struct.pack("<IIQQIIIHH", length, op, 7, fdp.PickValueInList([1, 1, 2]), 0, 0,
                           1, 0, 0) + body

    def ring_params(fdp) -> dict:  # noqa: ANN001 - (consumed before build_input takes the rest)
        return {"tab": table if fdp.ConsumeIntInRange(0, 3) else ffi.NULL,
                "running": fdp.ConsumeIntInRange(0, 3) != 0,
                "cap": fdp.ConsumeIntInRange(0, 700), "max_segs": fdp.ConsumeIntInRange(0, 12),
                "outcap": fdp.ConsumeIntInRange(16, 300),
                "plant": planted(fdp) if fdp.ConsumeIntInRange(0, 3) else None,
                "room": fdp.ConsumeIntInRange(0, 300)}

    def ring_input(rp: dict, vq, model, chain, ca, cb, clog, log_bytes, logging) -> None:  # noqa: ANN001
        """vl_ring_serve against the model's pop + vl_serve + push."""
        tab, running, cap, max_segs, outcap = (rp[k] for k in ("tab", "running", "cap",
                                                               "max_segs", "outcap"))
        vq.mu, vq.running = mutex, int(running)
        rd = ffi.new("vl_reader *")
        rd.kick_fd, rd.stop_fd = stop, stop
        buf, segs = ffi.new("uint8_t[]", max(cap, 1)), ffi.new("vl_seg[]", max(max_segs, 1))
        out, reply_len = ffi.new("uint8_t[]", outcap), ffi.new("uint64_t *")
        rc = lib.vl_ring_serve(vq, rd, tab, buf, cap, segs, max_segs, chain, out, outcap,
                               reply_len)
        want_reply, want_signal = b"", False
        while True:  # the model of the loop
            prc, want = model.pop(cap, max_segs)
            if prc <= 0:
                want_rc = prc
                break
            if tab == ffi.NULL or want["error"] or want["in_len"] < 40 or want["out_len"] < 16:
                want_rc = 1
                break
            mbuf, mout = ffi.new("uint8_t[]", want["data"] or b"\0"), ffi.new("uint8_t[]", outcap)
            n = lib.vl_serve(tab, mbuf, want["in_len"], mout, min(want["out_len"], outcap))
            if n == 0:
                want_rc = 1
                break
            if not running:
                want_rc, want_reply = 2, ffi.buffer(mout, n)[:]
                break
            model.push(want["head"], want["segs"], ffi.buffer(mout, n)[:])
            want_signal |= model.notify()
        got_reply = ffi.buffer(out, reply_len[0])[:] if rc == 2 else b""
        if (rc, got_reply) != (want_rc, want_reply):
            raise AssertionError(f"ring loop returned {rc} {got_reply!r}, model {want_rc} "
                                 f"{want_reply!r}")
        if rc in (1, 2) and (chain.head, chain.error, chain.in_len, chain.out_len) != \
                (want["head"], want["error"], want["in_len"], want["out_len"]):
            raise AssertionError("the chain the ring loop returned differs")
        if (vq.last_avail, bool(vq.broken), vq.used_idx) != \
                (model.last_avail, model.broken, model.used_idx):
            raise AssertionError("ring state differs after the ring loop")
        if ffi.buffer(ca)[:] != bytes(model.mem[0]) or ffi.buffer(cb)[:] != bytes(model.mem[1]):
            raise AssertionError("guest memory differs after the ring loop")
        if logging and ffi.buffer(clog, log_bytes)[:] != bytes(model.log):
            raise AssertionError("dirty log differs after the ring loop")
        if signalled() != want_signal:
            raise AssertionError(f"the ring loop signalled {not want_signal}, model {want_signal}")

    def one_input(data: bytes) -> None:
        fdp = atheris.FuzzedDataProvider(data)
        rp = ring_params(fdp) if fdp.ConsumeIntInRange(0, 2) == 0 else None
        num = 1 << fdp.ConsumeIntInRange(0, 4)
        last_avail = fdp.ConsumeIntInRange(0, 0xFFFF)
        used_idx = fdp.ConsumeIntInRange(0, 0xFFFF)
        max_indirect = fdp.ConsumeIntInRange(0, NINDIRECT + 2)
        nadd = fdp.ConsumeIntInRange(0, num + 2) if fdp.ConsumeBool() else fdp.ConsumeIntInRange(0, 0xFFFF)
        # per pop: buffer cap, segment limit, reply, then the driver's used_event and
        # avail flags for the push (None: left as they are), whether the push notifies
        pops = [(fdp.ConsumeIntInRange(0, 700), fdp.ConsumeIntInRange(0, 12),
                 fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 300)),
                 fdp.ConsumeIntInRange(0, 0xFFFF) if fdp.ConsumeBool() else None,
                 fdp.ConsumeIntInRange(0, 3) if fdp.ConsumeBool() else None,
                 fdp.ConsumeBool()) for _ in range(4)]
        event_idx = fdp.ConsumeBool()
        first_event = fdp.ConsumeIntInRange(0, 0xFFFF)
        logging = fdp.ConsumeBool()
        log_bytes = fdp.ConsumeIntInRange(0, 24) if logging else 0
        log_used = fdp.ConsumeBool()
        ra, rb = build_input(fdp, num)
        if rp is not None and rp["plant"] is not None:
            # A well-formed request chain (what a guest sends) at the first entry popped:
            # the readable request, then a writable buffer in region B.
            req = rp["plant"]
            a = bytearray(ra)
            a[DATA_A : DATA_A + len(req)] = req
            if num >= 2:
                a[DESC_OFF : DESC_OFF + 32] = DESC.pack(GPA_A + DATA_A, len(req), 1, 1) + DESC.pack(
                    GPA_B + 256, rp["room"], 2, 0)
                U16.pack_into(a, AVAIL_OFF + 4 + 2 * (last_avail % num), 0)
                nadd = 1 + nadd % num  # and available
            ra = bytes(a)
        # Separate heap blocks (ASan redzones around each); the model works on copies.
        ca, cb = ffi.new("uint8_t[]", ra), ffi.new("uint8_t[]", rb)
        ha, hb = (int(ffi.cast("uintptr_t", c)) for c in (ca, cb))
        U16.pack_into(ffi.buffer(ca), AVAIL_OFF + 2, (last_avail + nadd) % 65536)
        U16.pack_into(ffi.buffer(ca), AVAIL_OFF + 4 + 2 * num, first_event)  # used_event
        regions = ffi.new("vl_region[]", 2)
        for r, (g, h) in zip(regions, ((GPA_A, ha), (GPA_B, hb)), strict=True):
            r.gpa, r.size, r.host = g, REGION, h
        vq = ffi.new("vl_vq *")
        vq.regions, vq.nregions, vq.num = regions, 2, num
        vq.desc, vq.avail, vq.used = ha + DESC_OFF, ha + AVAIL_OFF, ha + USED_OFF
        vq.last_avail, vq.used_idx, vq.call_fd, vq.max_indirect = last_avail, used_idx, call, max_indirect
        vq.event_idx = int(event_idx)
        clog = ffi.new("uint8_t[]", max(log_bytes, 1))  # its own block: ASan sees overruns
        if logging:
            vq.log, vq.log_size = int(ffi.cast("uintptr_t", clog)), log_bytes
            vq.log_used, vq.log_used_on = GPA_A + USED_OFF, int(log_used)
        model = Model([bytearray(ffi.buffer(ca)), bytearray(ffi.buffer(cb))], num, last_avail,
                      used_idx, max_indirect, bytearray(log_bytes) if logging else None,
                      log_used, event_idx)
        chain = ffi.new("vl_chain *")
        if rp is not None:
            ring_input(rp, vq, model, chain, ca, cb, clog, log_bytes, logging)
            return
        for cap, max_segs, reply, used_event, flags, notify in pops:
            buf = ffi.new("uint8_t[]", max(cap, 1))
            segs = ffi.new("vl_seg[]", max(max_segs, 1))
            rc = lib.vl_vq_pop(vq, buf, cap, segs, max_segs, chain)
            want_rc, want = model.pop(cap, max_segs)
            got_segs = []
            for k in range(chain.nsegs):
                host = segs[k].host
                r = 0 if ha <= host < ha + REGION else 1
                got_segs.append((r, host - (ha, hb)[r], segs[k].len))
                if segs[k].gpa != (GPA_A, GPA_B)[r] + host - (ha, hb)[r]:
                    raise AssertionError(f"segment {k}: gpa {segs[k].gpa:#x} is not its host's")
            got = {"head": chain.head, "error": chain.error, "in_len": chain.in_len,
                   "out_len": chain.out_len, "segs": got_segs, "ndesc": chain.ndesc,
                   "data": ffi.buffer(buf, chain.in_len)[:]}
            if (rc, got) != (want_rc, want):
                raise AssertionError(f"pop differs: native {rc} {got} model {want_rc} {want}")
            if (vq.last_avail, bool(vq.broken)) != (model.last_avail, model.broken):
                raise AssertionError("ring state differs after pop")
            if ffi.buffer(ca)[:] != bytes(model.mem[0]):
                raise AssertionError("guest memory differs after pop (avail_event)")
            if logging and ffi.buffer(clog, log_bytes)[:] != bytes(model.log):
                raise AssertionError("dirty log differs after pop")
            if rc != 1:
                break
            # the driver moves used_event / changes its flags meanwhile
            for value, at in ((used_event, AVAIL_OFF + 4 + 2 * num), (flags, AVAIL_OFF)):
                if value is not None:
                    U16.pack_into(ffi.buffer(ca), at, value)
                    U16.pack_into(model.mem[0], at, value)
            n = lib.vl_vq_push(vq, chain.head, segs, chain.nsegs, ffi.from_buffer(reply),
                               len(reply), int(notify))
            if n != model.push(want["head"], want["segs"], reply):
                raise AssertionError("push result differs")
            want_call = model.notify() if notify else False
            if signalled() != want_call:
                raise AssertionError(f"push signalled {not want_call}, model {want_call}")
            if (vq.signalled_used, bool(vq.signalled_valid)) != \
                    (model.signalled_used, model.signalled_valid):
                raise AssertionError("signalled state differs after push")
            if ffi.buffer(ca)[:] != bytes(model.mem[0]) or ffi.buffer(cb)[:] != bytes(model.mem[1]):
                raise AssertionError("guest memory differs after push")
            if logging and ffi.buffer(clog, log_bytes)[:] != bytes(model.log):
                raise AssertionError("dirty log differs after push")

    seeds = os.path.join(tempfile.gettempdir(), "vfs-lockd-fuzz-vq-corpus")
    os.makedirs(seeds, exist_ok=True)
    atheris.Setup([sys.argv[0], f"-max_total_time={seconds}", "-max_len=4096", seeds, *extra],
                  one_input)
    atheris.Fuzz()


def main() -> None:
    run(os.path.abspath(__file__), "the native virtqueue walker", fuzz)


if __name__ == "__main__":
    main()

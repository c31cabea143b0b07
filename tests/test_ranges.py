"""lockd.engine.ranges against the byte-level model: merge, split, upgrade, downgrade, unlock."""

from hypothesis import given
from hypothesis import strategies as st
from model import LIMIT, OFFSET_MAX, ByteModel, cells

from lockd.engine.ranges import (
    F_RDLCK,
    F_UNLCK,
    F_WRLCK,
    Coverage,
    LockRange,
    apply,
    find,
    restore_steps,
)

starts = st.integers(0, LIMIT)
req = st.tuples(st.sampled_from([F_RDLCK, F_WRLCK, F_UNLCK]), starts, st.integers(0, LIMIT + 1))


def norm(type_, s, e):
    e = OFFSET_MAX if e >= LIMIT or s >= LIMIT else max(e, s)
    return type_, s, e


def as_cells(locks):
    out = {}
    for r in locks:
        for c in cells(r.start, r.end):
            out[c] = r.type
    return out


@given(st.lists(req, max_size=30))
def test_apply_matches_byte_model(reqs):
    model = ByteModel()
    locks: list[LockRange] = []
    for r in reqs:
        t, s, e = norm(*r)
        before = list(locks)
        locks, removed, added = apply(locks, s, e, t)
        model.setlk("o", "f", t, s, e)
        assert as_cells(locks) == model.held.get(("o", "f"), {})
        assert [(x.start, x.end, x.type) for x in locks] == model.runs("o", "f")
        # the diff really transforms the old list into the new one
        assert sorted(set(before) - set(removed) | set(added)) == locks
        assert all(a.end < b.start for a, b in zip(locks, locks[1:], strict=False))


@given(st.lists(st.tuples(st.sampled_from("abc"), req), max_size=40), req)
def test_coverage_conflicts_match_model(reqs, probe):
    model = ByteModel()
    cov = Coverage()
    for owner, r in reqs:
        t, s, e = norm(*r)
        if model.setlk(owner, "f", t, s, e):
            cov.set(owner, s, e, t)
    t, s, e = norm(*probe)
    if t == F_UNLCK:
        t = F_WRLCK
    for owner in "abcd":
        expect = model.conflicting_owners(owner, "f", t, s, e)
        assert set(cov.conflicting(owner, s, e, t)) == expect
        assert cov.has_conflict(owner, s, e, t) == bool(expect)
    # the map stays minimal: no two neighbours with equal holders
    assert all(a != b for a, b in zip(cov.holders, cov.holders[1:], strict=False))


@given(st.lists(req, max_size=10), req)
def test_restore_steps_undo_a_grant(reqs, grant):
    locks: list[LockRange] = []
    for r in reqs:
        locks = apply(locks, *norm(*r)[1:], norm(*r)[0])[0]
    t, s, e = norm(*grant)
    if t == F_UNLCK:
        t = F_RDLCK
    after = apply(locks, s, e, t)[0]
    for ss, ee, tt in restore_steps(locks, s, e):
        after = apply(after, ss, ee, tt)[0]
    assert as_cells(after) == as_cells(locks)


def test_find():
    locks = [LockRange(0, 4, F_RDLCK), LockRange(10, OFFSET_MAX, F_WRLCK)]
    assert find(locks, 3) == locks[0]
    assert find(locks, 7) is None
    assert find(locks, 1 << 40) == locks[1]

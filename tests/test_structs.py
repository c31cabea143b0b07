"""lockd.structs.NamedTuple against typing.NamedTuple: the same class body makes a class
that behaves the same (fields, defaults, repr, equality, hashing, pickling, methods,
immutability, errors), so modules can take theirs without importing typing; and the
records that stopped being dataclasses keep what their users rely on."""

from __future__ import annotations

import pickle
import typing

import pytest

from lockd import structs
from lockd.api import NO_CONFLICT, Conflict, Limits


def _body(base: type) -> type:
    class Rec(base):
        """A record."""

        start: int
        end: int
        kind: str = "posix"
        pid: int | None = None
        LIMIT = 7  # a class attribute, not a field

        def span(self) -> int:
            return self.end - self.start + 1

        @classmethod
        def point(cls, at: int) -> Rec:
            return cls(at, at)

        @property
        def whole(self) -> bool:
            return self.start == 0

    return Rec


def _pair() -> tuple[type, type]:
    ours, theirs = _body(structs.NamedTuple), _body(typing.NamedTuple)
    ours.__module__ = theirs.__module__ = __name__  # where pickle finds them
    return ours, theirs


@pytest.mark.parametrize("args", [(1, 5), (0, 9, "flock"), (3, 4, "posix", 42)])
def test_same_behaviour_as_typing(args: tuple) -> None:
    ours, theirs = _pair()
    a, b = ours(*args), theirs(*args)
    assert repr(a) == repr(b).replace(theirs.__qualname__, ours.__qualname__)
    assert a == b == tuple(b) and hash(a) == hash(b)
    assert ours._fields == theirs._fields == ("start", "end", "kind", "pid")
    assert ours._field_defaults == theirs._field_defaults == {"kind": "posix", "pid": None}
    assert a._asdict() == b._asdict()
    assert a._replace(end=99) == b._replace(end=99)
    assert ours._make(list(a)) == a
    assert (a.span(), a.whole, ours.point(3), ours.LIMIT) == \
        (b.span(), b.whole, theirs.point(3), theirs.LIMIT)
    assert ours.__doc__ == theirs.__doc__ == "A record."
    assert ours.__qualname__ == theirs.__qualname__ and ours.__name__ == "Rec"
    assert list(ours.__annotations__) == list(theirs.__annotations__)
    assert ours.__mro__[1:] == (tuple, object) and isinstance(a, tuple)
    with pytest.raises(AttributeError):
        a.start = 2  # type: ignore[misc]
    with pytest.raises(TypeError):
        ours()  # `start` and `end` have no default


def test_pickles_as_typing_does() -> None:
    global Picklable
    Picklable = _body(structs.NamedTuple)  # a module-level name, as pickle needs
    Picklable.__qualname__ = "Picklable"
    r = Picklable(1, 2, "flock", 7)
    assert pickle.loads(pickle.dumps(r)) == r


def test_functional_form() -> None:
    ours = structs.NamedTuple("Fields", [("unique", int), ("nodeid", int)])
    theirs = typing.NamedTuple("Fields", [("unique", int), ("nodeid", int)])  # noqa: UP014
    assert ours(1, 2) == theirs(1, 2) and repr(ours(1, 2)) == repr(theirs(1, 2))
    assert ours.__module__ == theirs.__module__ == __name__


@pytest.mark.parametrize("base", [structs.NamedTuple, typing.NamedTuple])
def test_refuses_what_typing_refuses(base: type) -> None:
    with pytest.raises(TypeError):
        class DefaultFirst(base):
            a: int = 0
            b: int
    with pytest.raises(AttributeError):
        class Overwrites(base):
            a: int

            def _asdict(self) -> dict:
                return {}


def test_limits_and_conflict_keep_their_interface() -> None:
    """What their users rely on (the manager, the daemon's HELLO, the client's GETLK, the
    FUSE server building Limits from a HELLO): keywords and defaults, parse, immutable,
    field names and the dict of them, equality."""
    lim = Limits.parse("owners=3,reserve=10")
    assert (lim.max_owners, lim.reserved_descriptors, lim.max_locks) == (3, 10, 100_000)
    assert Limits(**lim._asdict()) == lim and Limits._fields[0] == "max_owners"
    assert Limits(**{k: v for k, v in lim._asdict().items() if k in Limits._fields}) == lim
    with pytest.raises(AttributeError):
        lim.max_owners = 4  # type: ignore[misc]
    with pytest.raises(ValueError):
        Limits.parse("bogus=1")
    assert NO_CONFLICT == Conflict(2) and Conflict(1, 0, 9, 42, "g").guest == "g"
    assert repr(Conflict(1)) == "Conflict(type=1, start=0, end=0, pid=0, guest=None)"

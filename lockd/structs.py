"""`NamedTuple` as typing spells it (class syntax: annotated fields, defaults, docstring,
methods), built on collections.namedtuple without importing `typing`.

Why: every virtio-fs back-end is its own Python process, and `typing` (the module, the
ForwardRef it makes of each string annotation, its caches) costs each one ~0.7 MiB of
heap, for nothing at run time: our annotations are strings (PEP 563) that only tools
read. Modules the back-end imports take NamedTuple from here, and `Any`/`Protocol`
only under TYPE_CHECKING.

    class LockRange(NamedTuple):
        start: int
        end: int
        type: int = 0

The class made is the collections.namedtuple itself (no extra class in between), with
the body's docstring, methods and other attributes set on it and `__annotations__` (the
strings), as typing makes it.
"""

from __future__ import annotations

import collections
import sys

# What the namedtuple machinery owns: a class body may not redefine these.
_RESERVED = frozenset({"__new__", "__init__", "__slots__", "__getnewargs__", "_fields",
                       "_field_defaults", "_make", "_replace", "_asdict", "_source"})
# Class-body entries that are not attributes to copy onto the made class.
_SKIP = frozenset({"__module__", "__qualname__", "__annotations__", "__orig_bases__"})


def _make(name: str, ns: dict, module: str | None) -> type:
    annotations = ns.get("__annotations__", {})
    defaults = []
    for field in annotations:
        if field in ns:
            defaults.append(ns[field])
        elif defaults:
            raise TypeError(f"{name}: field {field!r} without a default follows one with "
                            "a default")
    cls = collections.namedtuple(name, list(annotations), defaults=defaults, module=module)
    cls.__annotations__ = dict(annotations)
    for key, value in ns.items():
        if key in _RESERVED:
            raise AttributeError(f"{name}: cannot overwrite NamedTuple attribute {key}")
        if key not in _SKIP and key not in annotations:
            setattr(cls, key, value)
    if "__qualname__" in ns:
        cls.__qualname__ = ns["__qualname__"]
    return cls


class _Maker(type):
    """The metaclass of `class X(NamedTuple)`: returns the namedtuple class instead."""

    def __new__(mcls, name: str, bases: tuple, ns: dict) -> type:  # noqa: N804
        if ns.get("_root_", False):
            return super().__new__(mcls, name, bases, ns)
        if bases != (_Root,):
            raise TypeError(f"{name}: a NamedTuple class takes no other base")
        return _make(name, ns, ns.get("__module__"))


class _Root(metaclass=_Maker):
    _root_ = True


def NamedTuple(name: str, fields: list[tuple[str, object]]) -> type:  # noqa: N802
    """The functional form: NamedTuple("Name", [("field", type), ...])."""
    return _make(name, {"__annotations__": dict(fields)},
                 sys._getframe(1).f_globals.get("__name__"))


# `class X(NamedTuple)` names a function as its base: Python asks it for the real bases.
NamedTuple.__mro_entries__ = lambda bases: (_Root,)  # type: ignore[attr-defined]

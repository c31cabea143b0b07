"""What a FUSE session sends by itself (deferred replies, notifications), collected for
tests that drive a Session directly: replies come from other threads (the invalidator, a
lock service callback, the daemon client's reader), so tests wait for them."""

from __future__ import annotations

import threading

from fuse_server import protocol as P


class Sent:
    """What the session sent on its own (deferred replies, notifications), in order;
    the invalidator thread sends from its own thread."""

    def __init__(self) -> None:
        self.items: list[bytes] = []
        self.cv = threading.Condition()

    def __call__(self, data: bytes) -> None:
        with self.cv:
            self.items.append(data)
            self.cv.notify_all()

    def wait(self, n: int, timeout: float = 10.0) -> list[bytes]:
        with self.cv:
            assert self.cv.wait_for(lambda: len(self.items) >= n, timeout), self.items
            return list(self.items)

    def reply_to(self, unique: int, timeout: float = 10.0) -> bytes:
        def find() -> bytes | None:
            return next((b for b in self.items
                         if P.OUT_HEADER.unpack_from(b)[2] == unique), None)

        with self.cv:
            assert self.cv.wait_for(lambda: find() is not None, timeout), self.items
            return find()

    def clear(self) -> None:
        with self.cv:
            self.items.clear()

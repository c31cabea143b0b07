"""Prometheus metrics for `vfs-lockd serve --metrics HOST:PORT`.

Counters and gauges are read at scrape time from the manager's stats() and the daemon's
plain-int counters, so the hot path pays nothing; only the wait-time histogram is
observed when a wait ends (rare compared to lock operations).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# manager stats key -> (metric name, help)
_COUNTERS = {
    "locks_granted": ("vfs_lockd_locks_granted", "Lock requests granted (immediately)"),
    "locks_denied": ("vfs_lockd_locks_denied", "Non-blocking lock requests denied"),
    "waits_started": ("vfs_lockd_waits_started", "Blocking lock requests queued"),
    "waits_granted": ("vfs_lockd_waits_granted", "Queued waits granted"),
    "waits_cancelled": ("vfs_lockd_waits_cancelled", "Queued waits cancelled"),
    "deadlocks": ("vfs_lockd_deadlocks", "Requests refused with EDEADLK"),
    "evictions": ("vfs_lockd_evictions", "Guests evicted by an admin"),
    "enolck": ("vfs_lockd_enolck", "Requests refused by a limit (ENOLCK)"),
    "lost_locks": ("vfs_lockd_lost_locks", "Journaled locks that could not be re-taken"),
}
_GAUGES = {
    "held_locks": ("vfs_lockd_held_locks", "Locks held by managed owners"),
    "waiters": ("vfs_lockd_waiters", "Queued waits"),
    "owners": ("vfs_lockd_owners", "Lock owners with an open description"),
    "descriptions": ("vfs_lockd_descriptions", "Open lock descriptions"),
    "files": ("vfs_lockd_files", "Registered files"),
}


class _StatsCollector:
    def __init__(self, manager_stats: Callable[[], dict], daemon_stats: Callable[[], dict]):
        self._manager_stats = manager_stats
        self._daemon_stats = daemon_stats

    def collect(self) -> Iterator:
        stats = self._manager_stats()
        for key, (name, help_) in _COUNTERS.items():
            if key in stats:
                c = CounterMetricFamily(name, help_)
                c.add_metric([], stats[key])
                yield c
        for key, (name, help_) in _GAUGES.items():
            if key in stats:
                yield GaugeMetricFamily(name, help_, value=stats[key])
        d = self._daemon_stats()
        yield GaugeMetricFamily("vfs_lockd_guests", "Guest sessions (connected or in grace)",
                                value=d["guests"])
        yield GaugeMetricFamily("vfs_lockd_connections", "Open connections",
                                value=d["connections"])
        for key in ("frames", "protocol_errors", "connections_refused", "connections_dropped"):
            c = CounterMetricFamily(f"vfs_lockd_{key}", f"Daemon {key.replace('_', ' ')}")
            c.add_metric([], d[key])
            yield c


class Metrics:
    """The registry and HTTP endpoint; `observe_wait(seconds)` feeds the histogram."""

    def __init__(self, manager_stats: Callable[[], dict], daemon_stats: Callable[[], dict]):
        self.registry = CollectorRegistry()
        self.registry.register(_StatsCollector(manager_stats, daemon_stats))
        self.wait_seconds = Histogram(
            "vfs_lockd_wait_seconds", "Time from queueing a wait to its answer",
            registry=self.registry,
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 60, 300, float("inf")),
        )
        self._server = None

    def observe_wait(self, seconds: float) -> None:
        self.wait_seconds.observe(seconds)

    def start(self, address: str) -> tuple[str, int]:
        """Serve /metrics on HOST:PORT (port 0 picks one); answers the bound address."""
        host, _, port = address.rpartition(":")
        host = host.strip("[]") or "0.0.0.0"
        server, _thread = start_http_server(int(port), addr=host, registry=self.registry)
        self._server = server
        return server.server_address[0], server.server_address[1]

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

"""`vfs-lockd rig`: run the multi-guest locking rig and report (see rig/__init__.py)."""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any

import click

from rig import worker

PLOT_HINT = ("--plot needs matplotlib, the `plot` extra: pip install 'vfs-lockd[plot]' "
             "(from a checkout: .venv/bin/pip install -e '.[plot]')")


def _workloads(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, ...]:
    names = tuple(w.strip() for w in value.split(",") if w.strip())
    bad = [w for w in names if w not in worker.WORKLOADS]
    if bad or not names:
        raise click.BadParameter(
            f"unknown workload(s) {', '.join(bad) or '(none)'}; choose from "
            f"{','.join(worker.WORKLOADS)}")
    return names


def _check_plot_available() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise click.ClickException(PLOT_HINT) from None


@click.command("rig")
@click.option("--guests", type=click.IntRange(0, 64), default=3, show_default=True,
              help="Guest servers (mounts of the share), all on one central daemon.")
@click.option("--procs", type=click.IntRange(0, 64), default=2, show_default=True,
              help="Worker processes per guest (working inside its mount).")
@click.option("--vm-guests", type=click.IntRange(0, 16), default=0, show_default=True,
              help="Also real QEMU (TCG) guests, each on its own `vfs-lockd virtiofs` "
                   "backend on the daemon, running the counter and flock workloads in the "
                   "guest's static lock probe (--procs owners each). Needs "
                   "scripts/guest-image (built on first use).")
@click.option("--seconds", type=click.FloatRange(min=0.5), default=30.0, show_default=True,
              help="How long the workloads run.")
@click.option("--host-procs", type=click.IntRange(0, 64), default=2, show_default=True,
              help="Worker processes on the host (working on the share directly).")
@click.option("--share", type=click.Path(exists=True, file_okay=False), default=None,
              help="Directory to share (default: a temporary one). The rig works in a "
                   "subdirectory of it and removes that afterwards.")
@click.option("--workload", "workloads", default=",".join(worker.WORKLOADS),
              show_default=True, callback=_workloads,
              help="Comma-separated workloads; every worker runs them all in turn.")
@click.option("--kill-lockd-every", type=click.FloatRange(min=0), default=0.0,
              metavar="SECONDS", help="kill -9 the daemon every SECONDS and restart it.")
@click.option("--kill-guest-every", type=click.FloatRange(min=0), default=0.0,
              metavar="SECONDS",
              help="kill -9 a guest's server every SECONDS (round robin), unmount the stale "
                   "mount, remount, restart its workers.")
@click.option("--signal-every", type=click.FloatRange(min=0), default=0.2, show_default=True,
              metavar="SECONDS",
              help="Send SIGUSR1 to workers blocked in a lock wait every SECONDS (0: never).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Write the report as JSON here.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Draw lock latency over time with the faults marked (PNG; matplotlib).")
@click.option("--cache", type=click.Choice(["none", "auto"]), default="auto",
              show_default=True, help="Cache mode of the guest mounts.")
@click.option("--threads", type=click.IntRange(1, 256), default=4, show_default=True,
              help="Request threads per guest server.")
@click.option("--seed", type=int, default=None, help="Seed of the workers' choices.")
@click.option("--keep", is_flag=True, help="Keep the work directory (logs) afterwards.")
@click.option("--no-progress", is_flag=True, help="No live progress bar.")
@click.option("--unsafe-no-locks", is_flag=True,
              help="Workers skip taking locks (SQLite opened with nolock=1): the rig must "
                   "then report violations. For testing the rig.")
@click.option("--test-skip-host-lock", is_flag=True,
              help="Run the daemon and the mounts with a lock manager that grants every "
                   "lock without checking (rig/faults.py): the rig must then fail. For "
                   "testing the rig.")
@click.option("--hosts", type=click.IntRange(1, 8), default=1, show_default=True,
              help="Spread the guests over N hosts sharing a cluster file system (network "
                   "namespaces, one `vfs-lockd serve` each; rig/cluster.py).")
@click.option("--cluster", type=click.Choice(["gluster", "ceph"]), default="gluster",
              show_default=True,
              help="The hosts' cluster file system (with --hosts > 1): a GlusterFS volume "
                   "(rig/hosts.py) or a CephFS on a one-node Ceph (rig/ceph.py).")
@click.option("--journal-dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="Put the daemon's journal in DIR (e.g. a small tmpfs, to fill it up as a "
                   "fault: scripts/soak does).")
def rig_cmd(guests: int, procs: int, vm_guests: int, seconds: float, host_procs: int,
            share: str | None, workloads: tuple[str, ...], kill_lockd_every: float, kill_guest_every: float,
            signal_every: float, json_path: str | None, plot_path: str | None, cache: str,
            threads: int, seed: int | None, keep: bool, no_progress: bool,
            unsafe_no_locks: bool, test_skip_host_lock: bool, hosts: int = 1,
            cluster: str = "gluster", journal_dir: str | None = None) -> None:
    """Run guests and host processes locking one share under faults; check and report.

    Exit status 1 on any violation or lost lock, 0 otherwise."""
    from rig.runner import Rig, RigConfig, RigError

    if plot_path:
        _check_plot_available()  # fail now, not after the run
    if (guests or vm_guests) and os.geteuid() != 0:
        raise click.ClickException("the rig mounts FUSE file systems: run it as root")
    if guests * procs + host_procs + vm_guests == 0:
        raise click.UsageError("no workers: give --procs (with --guests) or --host-procs")
    cfg = RigConfig(guests=guests, procs=procs, seconds=seconds, host_procs=host_procs,
                    share=share, workloads=workloads, kill_lockd_every=kill_lockd_every,
                    kill_guest_every=kill_guest_every, signal_every=signal_every,
                    unsafe_no_locks=unsafe_no_locks, skip_host_lock=test_skip_host_lock,
                    cache=cache, threads=threads, seed=seed, keep=keep, vm_guests=vm_guests)
    cfg.hosts = hosts
    cfg.cluster = cluster
    cfg.journal_dir = journal_dir

    from rich.console import Console

    console = Console(stderr=True)
    # SIGTERM tears down like Ctrl-C does: the finally blocks unmount everything. Both
    # are ours whatever we inherited: a launcher that ignores or blocks SIGINT (a
    # background job of a script does) would otherwise leave Ctrl-C without effect.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        rig = Rig(cfg)
    except RigError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        try:
            if no_progress or not console.is_terminal:
                rig.progress = _plain_progress(console) if not no_progress else None
                rig.run()
            else:
                with _live_progress(console, seconds) as update:
                    rig.progress = update
                    rig.run()
        except RigError as exc:
            raise click.ClickException(str(exc)) from None
        except KeyboardInterrupt:
            console.print("[red]interrupted: everything torn down[/red]")
            sys.exit(130)
        report = rig.analyze()
    finally:
        rig.cleanup()
    if keep:
        console.print(f"work directory kept: {rig.work}")
    out = Console()
    if not out.is_terminal:
        out = Console(width=110)  # a pipe or a file: wide enough for one line per row
    print_report(report, out)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=2, sort_keys=True)
    if plot_path:
        plot(rig, report, plot_path)
    sys.exit(report["exit_status"])


def _interrupt(signo: int, frame: object) -> None:
    raise KeyboardInterrupt


def _status_line(rig: Any) -> str:
    st = rig.stats
    ops = sum(st.ops.values())
    return (f"ops {ops}  deadlocks {st.deadlocks}  eintr {st.eintr}  faults {len(rig.faults)}  "
            f"violations {len(st.violations)}  lost {len(st.lost_eio)}")


def _plain_progress(console: Any):  # noqa: ANN202
    """Without a terminal: one line every few seconds."""
    last = [-10.0]

    def update(rig: Any, elapsed: float) -> None:
        if elapsed - last[0] >= 5:
            last[0] = elapsed
            console.print(f"[{elapsed:5.1f}/{rig.cfg.seconds:.0f} s] {_status_line(rig)}",
                          highlight=False)

    return update


class _live_progress:  # noqa: N801 - used as a context manager like a function
    def __init__(self, console: Any, seconds: float) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("[bold]rig"), BarColumn(), TimeElapsedColumn(),
                                 TextColumn("{task.fields[status]}"), console=console,
                                 transient=False)
        self.task = self.progress.add_task("rig", total=seconds, status="starting")

    def __enter__(self):  # noqa: ANN204
        self.progress.__enter__()

        def update(rig: Any, elapsed: float) -> None:
            self.progress.update(self.task, completed=elapsed, status=_status_line(rig))

        return update

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)


def print_report(r: dict, console: Any) -> None:
    """The end-of-run table."""
    from rich.table import Table

    bad = "bold red"
    good = "green"
    t = Table(title="vfs-lockd rig", show_header=True, header_style="bold")
    t.add_column("metric")
    t.add_column("value", justify="right")
    cfg = r["config"]
    t.add_row("setup", f"{cfg['guests']} guests x {cfg['procs']} procs + "
                       f"{cfg['host_procs']} host procs, {','.join(cfg['workloads'])}")
    if r.get("vm_guests"):
        v = r["vm_guests"]
        t.add_row("VM guests (QEMU TCG)", f"{v['guests']} x {v['owners_per_guest']} probe "
                  f"owners, booted in {v['boot_s']:.1f} s, per op " + ", ".join(
                      f"{wl} {us:.0f} us" for wl, us in v["per_op_us_median"].items()))
    t.add_row("duration", f"{r['seconds']:.1f} s")
    t.add_row("operations", f"{r['operations']} ({r['ops_per_s']:.0f}/s)")
    for wl, w in r["workloads"].items():
        lat = w["latency_us"]
        t.add_row(f"  {wl}", f"{w['operations']} ops, lock p50 {lat['p50']:.0f} us, "
                            f"p99 {lat['p99']:.0f} us, max {lat['max']:.0f} us")
    lat = r["latency_us"]
    t.add_row("guest lock latency p50/p99/max",
              f"{lat['p50']:.0f} / {lat['p99']:.0f} / {lat['max']:.0f} us")
    for origin, o in r["latency_by_origin_us"].items():
        if o["count"] and origin != "guest":  # the guests' are the line above
            t.add_row(f"  {origin} processes p50/p99/max", f"{o['p50']:.0f} / {o['p99']:.0f} / "
                                             f"{o['max']:.0f} us ({o['count']} locks)")
    t.add_row("longest wait (outside faults)",
              f"{r['max_wait_us']:.0f} us ({r['max_wait_no_fault_us']:.0f} us)")
    t.add_row("deadlocks reported", str(r["deadlocks"]))
    t.add_row("signals to waiters / EINTR seen", f"{r['signals_sent']} / {r['eintr_seen']}")
    t.add_row("violations", f"[{bad if r['violations'] else good}]{r['violations']}")
    t.add_row("lost locks", f"[{bad if r['lost_locks'] else good}]{r['lost_locks']}")
    for f in r["faults"]:
        rec = "-" if f["recovery_s"] is None else f"{f['recovery_s'] * 1000:.0f} ms"
        t.add_row(f"fault {f['kind']} {f['target']} @ {f['at']:.1f} s",
                  f"ready {f['ready_s'] * 1000:.0f} ms, first lock after {rec}")
    chk = r["checks"]
    if "counter" in chk:
        c = chk["counter"]
        t.add_row("counter", f"{c['value']} = {c['increments']} increments"
                  + (f" (+{c['ambiguous']} cut by kills)" if c["ambiguous"] else "")
                  + ("" if c["ok"] else " [bold red]MISMATCH"))
    if "sqlite" in chk:
        q = chk["sqlite"]
        t.add_row("sqlite", f"{q['rows']} rows / {q['commits']} commits, integrity "
                  f"{q['integrity']}" + ("" if q["ok"] else " [bold red]FAILED"))
    t.add_row("critical sections checked", f"{chk['sections']} ({chk['overlaps']} overlaps)")
    t.add_row("errors", str(r["errors"]))
    console.print(t)
    for v in r["violation_samples"][:10]:
        console.print(f"[red]violation:[/red] {v}", highlight=False)
    if r["lost_locks"]:
        d = r["lost_detail"]
        console.print(
            f"[red]lost locks:[/red] daemon reported {d['daemon_reported']}, EIO seen "
            f"{d['eio_seen']}, prober's lock free on the host after a daemon restart "
            f"{d['probe_free_after_restart']}x, sections missing from the restarted daemon's "
            f"table {d['forgotten_sections']}", highlight=False)
    for s in r["lost_detail"]["samples"][:5]:
        console.print(f"[red]lost:[/red] {s}", highlight=False)
    for e in r["error_samples"][:5]:
        console.print(f"[yellow]error:[/yellow] {e}", highlight=False)
    verdict = "[bold green]PASS" if r["exit_status"] == 0 else "[bold red]FAIL"
    console.print(verdict)


def plot(rig: Any, report: dict, path: str) -> None:
    """Lock latency over time (log scale, one colour per workload), faults as lines."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise click.ClickException(PLOT_HINT) from None
    t0 = rig.t_start
    # Guests (through vfs-lockd) and host processes (their own kernel) in separate panels:
    # the host's microsecond locks would otherwise bury the guests' points.
    fig, axes = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    colors = {"kill-lockd": "red", "kill-guest": "orange"}
    for ax, origin in zip(axes, ("guest", "host"), strict=True):
        for wl in rig.cfg.workloads:
            pts = [((t - t0) / 1e9, max(lat, 1000) / 1e3)
                   for t, lat, w, wid in rig.stats.latencies
                   if w == wl and (wid in rig.who) == (origin == "guest")]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.scatter(xs, ys, s=3, alpha=0.5, label=wl)
        for f in report["faults"]:
            ax.axvline(f["at"], color=colors.get(f["kind"], "purple"), linestyle="--",
                       linewidth=1)
            if origin == "guest":
                ax.annotate(f"{f['kind']} {f['target']}", (f["at"], 1),
                            xycoords=("data", "axes fraction"), rotation=90, va="top",
                            ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel(f"{origin} lock latency (us)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper left", markerscale=4, fontsize=8)
    axes[-1].set_xlabel("time (s)")
    axes[0].set_title(f"vfs-lockd rig: {report['operations']} ops, violations "
                      f"{report['violations']}, lost locks {report['lost_locks']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

"""`vfs-lockd rig`: the multi-guest locking test rig.

A central `vfs-lockd serve`, N guest mounts of one share (`vfs-lockd mount --lockd`), M
worker processes per guest and K on the host run the workloads (counter, ranges, sqlite,
flock) under faults (daemon kill -9, guest server kill -9, signals to blocked waiters),
then the rig checks what they logged and reports. Modules:

- worker:  the worker process (`python -m rig.worker`): every worker runs all the
           selected workloads in turn, one operation at a time, and logs each event;
- checks:  pure checks over the logs (sweep-line overlap of critical sections, locks
           forgotten across a daemon restart, percentiles);
- runner:  processes, faults, teardown and the analysis;
- cli:     the click command, live progress, the table, --json and --plot.
"""

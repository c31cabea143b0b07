"""virtiofsd's command line, as `vfs-lockd-virtiofsd` and `vfs-lockd virtiofs` accept it.

Launchers start a virtio-fs back-end the way they start virtiofsd: libvirt as
`BIN --fd=N -o source=DIR,cache=none,sandbox=chroot,xattr,flock,posix_lock
--thread-pool-size=N [-d]`, Kata as `BIN --syslog --cache=auto --shared-dir=DIR --fd=3 ...`
or `BIN --socket-path=S --shared-dir=DIR --sandbox=none ...`. `parse()` turns such an
argument list (plus vfs-lockd's own options: --guest, --lockd, --journal, --persist,
--threads, --no-native, -v) into `Options`. Anything it does not know is an `OptionError`
naming the option; the command exits 1 with it, as virtiofsd does.

The two entry points differ only in defaults (`DROPIN` and `LEGACY`): the drop-in follows
virtiofsd (no xattrs), the historical `vfs-lockd virtiofs` keeps xattrs on. Both take
virtiofsd's namespace sandbox where it can be set up and its `kill` seccomp filter. Both forward POSIX and flock locks unless told
`no_posix_lock`/`no_flock`, and both default to cache mode `none` (see CACHE_NAMES).
"""

from __future__ import annotations

import json
import logging

# virtiofsd's cache names (Rust: auto|always|metadata|never, C: auto|always|none) -> ours.
# `metadata` (attributes cached, data direct) maps to `none`: direct data is what keeps
# locked data coherent between guests, and cached attributes (the file size) would break
# O_APPEND and SEEK_END under locks; `none` also revalidates attributes every time.
CACHE_NAMES = {"none": "none", "never": "none", "metadata": "none", "auto": "auto",
               "always": "always"}
SANDBOXES = ("namespace", "chroot", "none")
SECCOMP = ("none", "kill", "log", "trap")
INODE_FILE_HANDLES = ("never", "prefer", "mandatory", "fallback")
# virtiofsd's live migration options (fuse_server/migration.py). On one host the open
# descriptors themselves move (SCM_RIGHTS): nothing is looked up again. A destination
# that cannot collect them (another host) opens the inodes again by path or file handle
# as the mode says, with the checks and the error policy below -- only for a guest that
# holds no lock, or only shared ones (taken again there while the source still holds
# them), and waits for none; any other is refused and the source runs on.
MIGRATION_MODES = ("find-paths", "file-handles")
MIGRATION_ON_ERROR = ("abort", "guest-error")
LOG_LEVELS = {"off": logging.CRITICAL + 10, "error": logging.ERROR, "err": logging.ERROR,
              "warn": logging.WARNING, "info": logging.INFO, "debug": logging.DEBUG,
              "trace": logging.DEBUG}
MAX_THREADS = 256


class OptionError(Exception):
    """A bad command line: the message names the option (one line)."""


class Options:
    """The parsed command line. Each option is an annotated class attribute holding its
    default; an instance holds what was set (keyword arguments, `parse`). Not a dataclass:
    that import (with inspect, ast and dis) costs every back-end ~1 MiB."""

    fd: int | None = None
    socket_path: str | None = None
    socket_group: str | None = None
    shared_dir: str | None = None
    tag: str | None = None
    guest: str | None = None
    lockd: str | None = None
    journal: str | None = None
    persist: bool = False
    threads: int = 4  # request worker threads (--thread-pool-size, --threads)
    cache: str = "none"  # ours: none|auto|always
    cache_given: str | None = None  # the name as given, for the log
    sandbox: str = "namespace"
    sandbox_given: bool = False  # asked for: never replaced by a weaker one
    seccomp: str = "kill"  # virtiofsd's default (fuse_server/seccomp.py)
    seccomp_given: bool = False
    xattr: bool = False
    posix_lock: bool = True
    flock: bool = True
    # POSIX ACLs enforced by the guest kernel as on the host (FUSE_POSIX_ACL); on by
    # default, unlike virtiofsd's --posix-acl: a share's ACLs should mean what they mean.
    posix_acl: bool = True
    # FUSE_HANDLE_KILLPRIV_V2: on by default, unlike virtiofsd's --killpriv-v2 (the guest
    # then sends no GETXATTR of security.capability before each buffered write).
    killpriv_v2: bool = True
    readonly: bool = False
    # vfs-lockd's own: the native fast path (native/vl_serve.c) answers the hot requests
    # of known files; --no-native keeps every request in the Python session.
    native: bool = True
    log_level: int = logging.INFO
    syslog: bool = False
    rlimit_nofile: int | None = None
    # Join the daemon of $VFS_LOCKD_SOCKET or the default socket without --lockd (the
    # drop-in); the historical verb stays embedded unless told --lockd.
    discover_daemon: bool = True
    print_capabilities: bool = False
    # virtiofsd's migration options: accepted with their meanings (see MIGRATION_MODES)
    migration_mode: str = "find-paths"
    migration_on_error: str = "abort"
    migration_verify_handles: bool = False
    migration_confirm_paths: bool = False
    version: bool = False
    help: bool = False
    # Options accepted for compatibility that change nothing here: logged once each.
    ignored: list[str]  # per instance (__init__)

    def __init__(self, **values: object) -> None:
        for name, value in values.items():
            if name not in _OPTION_NAMES:
                raise TypeError(f"Options() got an unexpected keyword argument {name!r}")
            setattr(self, name, value)
        self.ignored = list(values.get("ignored", ()))  # a list of its own

    def replace(self, **changes: object) -> Options:
        """A copy with `changes` (what dataclasses.replace did)."""
        return Options(**{**self.__dict__, **changes})

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not Options:
            return NotImplemented
        return all(getattr(self, n) == getattr(other, n) for n in _OPTION_NAMES)

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return "Options(" + ", ".join(f"{n}={getattr(self, n)!r}" for n in _OPTION_NAMES) + ")"

    def ignore(self, what: str) -> None:
        if what not in self.ignored:
            self.ignored.append(what)


_OPTION_NAMES = tuple(Options.__annotations__)  # every option, in declaration order
DROPIN = Options()
# (The sandbox: namespace where it can be set up, for both; see launch.choose_sandbox.)
LEGACY = Options(xattr=True, discover_daemon=False)


def split_o(value: str) -> list[str]:
    """One `-o` argument: items separated by ',', where ',,' is a comma inside an item
    (libvirt doubles the commas of a path)."""
    items, cur, i = [], [], 0
    while i < len(value):
        c = value[i]
        if c == ",":
            if value[i + 1:i + 2] == ",":
                cur.append(",")
                i += 2
                continue
            items.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    items.append("".join(cur))
    return [it for it in items if it]


def _choice(opt: str, value: str, choices) -> str:  # noqa: ANN001 - a collection of str
    if value not in choices:
        raise OptionError(f"invalid value {value!r} for {opt} (expected {'|'.join(choices)})")
    return value


def _int(opt: str, value: str, lo: int = 0, hi: int | None = None) -> int:
    try:
        n = int(value, 10)
    except ValueError:
        raise OptionError(f"invalid value {value!r} for {opt} (expected a number)") from None
    if n < lo or (hi is not None and n > hi):
        span = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise OptionError(f"invalid value {value!r} for {opt} (expected {span})")
    return n


def _text(opt: str, value: str) -> str:
    if not value:
        raise OptionError(f"empty value for {opt}")
    return value


def _cache(o: Options, opt: str, value: str) -> None:
    o.cache = CACHE_NAMES[_choice(opt, value, tuple(CACHE_NAMES))]
    o.cache_given = value


def _threads(o: Options, opt: str, value: str) -> None:
    n = _int(opt, value, 0, MAX_THREADS)
    if n == 0:
        # virtiofsd: 0 = no pool, requests handled on the queue's thread. Our queue
        # thread must never block on file I/O, so 0 means one worker.
        o.ignore(f"{opt}=0 (one worker thread: queue threads never do file I/O)")
        n = 1
    o.threads = n


def _legacy_threads(o: Options, opt: str, value: str) -> None:
    o.threads = _int(opt, value, 1, MAX_THREADS)


def _log_level(o: Options, opt: str, value: str) -> None:
    o.log_level = LOG_LEVELS[_choice(opt, value.lower(), tuple(LOG_LEVELS))]


def _setter(attr: str, conv=_text):  # noqa: ANN001, ANN202 - conv(opt, value) -> value
    def set_(o: Options, opt: str, value: str) -> None:
        setattr(o, attr, conv(opt, value))
    return set_


def _flag(attr: str, value: object = True):  # noqa: ANN202
    def set_(o: Options, opt: str) -> None:
        setattr(o, attr, value)
    return set_


def _noop(what: str | None = None):  # noqa: ANN202
    def set_(o: Options, opt: str, value: str | None = None) -> None:
        o.ignore(what or (opt if value is None else f"{opt}={value}"))
    return set_


def _seccomp(o: Options, opt: str, value: str) -> None:
    o.seccomp = _choice(opt, value, SECCOMP)
    o.seccomp_given = True


def _sandbox(o: Options, opt: str, value: str) -> None:
    o.sandbox = _choice(opt, value, SANDBOXES)
    o.sandbox_given = True


def _inode_fh(o: Options, opt: str, value: str) -> None:
    _choice(opt, value, INODE_FILE_HANDLES)
    o.ignore(f"{opt}={value} (inodes are always O_PATH descriptors)")


def _migration_mode(o: Options, opt: str, value: str) -> None:
    o.migration_mode = _choice(opt, value, MIGRATION_MODES)


def _migration_on_error(o: Options, opt: str, value: str) -> None:
    o.migration_on_error = _choice(opt, value, MIGRATION_ON_ERROR)


def _verbose(o: Options, opt: str) -> None:
    o.log_level = logging.DEBUG


# Long options taking a value: name -> setter(o, opt, value).
VALUE_OPTS = {
    "--fd": _setter("fd", lambda opt, v: _int(opt, v, 0)),
    "--socket-path": _setter("socket_path"),
    "--socket": _setter("socket_path"),  # virtiofsd's deprecated spelling
    "--socket-group": _setter("socket_group"),
    "--shared-dir": _setter("shared_dir"),
    "--tag": _setter("tag"),
    "--thread-pool-size": _threads,
    "--cache": _cache,
    "--sandbox": _sandbox,
    "--seccomp": _seccomp,
    "--inode-file-handles": _inode_fh,
    "--log-level": _log_level,
    "--rlimit-nofile": _setter("rlimit_nofile", lambda opt, v: _int(opt, v, 0)),
    "--migration-mode": _migration_mode,
    "--migration-on-error": _migration_on_error,
    # vfs-lockd's own
    "--guest": _setter("guest"),
    "--lockd": _setter("lockd"),
    "--journal": _setter("journal"),
    "--threads": _legacy_threads,
}
# Long and short options without a value: name -> setter(o, opt).
FLAG_OPTS = {
    "--xattr": _flag("xattr"),
    "--readonly": _flag("readonly"),
    "--posix-acl": _flag("posix_acl"),
    "--no-posix-acl": _flag("posix_acl", False),
    "--killpriv-v2": _flag("killpriv_v2"),
    "--no-killpriv-v2": _flag("killpriv_v2", False),
    "--syslog": _flag("syslog"),
    "--print-capabilities": _flag("print_capabilities"),
    "--migration-verify-handles": _flag("migration_verify_handles"),
    "--migration-confirm-paths": _flag("migration_confirm_paths"),
    "--announce-submounts": _noop("--announce-submounts (submounts are not announced)"),
    "--writeback": _noop("--writeback (no writeback cache)"),
    "--no-readdirplus": _noop(),
    "--allow-direct-io": _noop(),
    "--persist": _flag("persist"),
    "--native": _flag("native"),
    "--no-native": _flag("native", False),
    "--verbose": _verbose,
    "--version": _flag("version"),
    "--help": _flag("help"),
    "-V": _flag("version"),
    "-h": _flag("help"),
    "-d": _verbose,
    "-f": lambda o, opt: None,  # foreground: always
}


def _o_item(o: Options, item: str) -> None:
    """One item of a `-o` list (virtiofsd's legacy options)."""
    key, eq, value = item.partition("=")
    where = f"-o {key}"
    if eq:
        if key == "source":
            o.shared_dir = _text(where, value)
        elif key == "cache":
            _cache(o, where, value)
        elif key == "sandbox":
            _sandbox(o, where, value)
        elif key in ("loglevel", "log_level"):
            _log_level(o, where, value)
        else:
            raise OptionError(f"unknown -o option {key!r}")
        return
    singles = {
        "xattr": ("xattr", True), "no_xattr": ("xattr", False),
        "flock": ("flock", True), "no_flock": ("flock", False),
        "posix_lock": ("posix_lock", True), "no_posix_lock": ("posix_lock", False),
        "posix_acl": ("posix_acl", True), "no_posix_acl": ("posix_acl", False),
        "killpriv_v2": ("killpriv_v2", True), "no_killpriv_v2": ("killpriv_v2", False),
    }
    if key in singles:
        attr, val = singles[key]
        setattr(o, attr, val)
    elif key == "debug":
        o.log_level = logging.DEBUG
    elif key in ("announce_submounts", "writeback", "no_writeback", "readdirplus",
                 "no_readdirplus"):
        o.ignore(f"-o {key}")
    else:
        raise OptionError(f"unknown -o option {key!r}")


def parse(argv: list[str], defaults: Options = DROPIN) -> Options:
    """The options of `argv` (without the program name) over `defaults`."""
    o = defaults.replace(ignored=[])
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "-o" or (arg.startswith("-o") and not arg.startswith("--")):
            value = arg[2:]
            if not value:
                if i >= len(argv):
                    raise OptionError("option '-o' needs a value")
                value = argv[i]
                i += 1
            for item in split_o(value):
                _o_item(o, item)
            continue
        if arg.startswith("-v") and not arg.startswith("--") and set(arg[1:]) == {"v"}:
            o.log_level = logging.DEBUG  # -v, -vv: vfs-lockd's verbose flag
            continue
        name, eq, value = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        if name in VALUE_OPTS:
            if not eq:
                if i >= len(argv):
                    raise OptionError(f"option {name!r} needs a value")
                value = argv[i]
                i += 1
            VALUE_OPTS[name](o, name, value)
        elif name in FLAG_OPTS:
            if eq:
                raise OptionError(f"option {name!r} takes no value")
            FLAG_OPTS[name](o, name)
        elif arg.startswith("-"):
            raise OptionError(f"unknown option {name!r}")
        else:
            raise OptionError(f"unexpected argument {arg!r}")
    return o


def check(o: Options) -> None:
    """What a serving command line must have (after --help/-V/--print-capabilities)."""
    if o.fd is not None and o.socket_path:
        raise OptionError("--fd and --socket-path exclude each other")
    if o.fd is None and not o.socket_path:
        raise OptionError("missing --socket-path or --fd")
    if o.socket_group and o.fd is not None:
        raise OptionError("--socket-group applies to --socket-path only, not to --fd")
    if not o.shared_dir:
        raise OptionError("missing --shared-dir or -o source")
    if o.lockd and o.journal:
        raise OptionError("--journal is for the embedded lock manager; --lockd's daemon "
                          "keeps its own")
    # as virtiofsd (1.13): both checks are find-paths' (file handles need neither)
    for given, name in ((o.migration_verify_handles, "--migration-verify-handles"),
                        (o.migration_confirm_paths, "--migration-confirm-paths")):
        if given and o.migration_mode == "file-handles":
            raise OptionError(f"cannot use {name} with --migration-mode=file-handles "
                              "(it is for find-paths)")


def migration_summary(o: Options) -> str:
    """What the migration options mean here (logged at start)."""
    checks = [c for c, on in (("verify-handles", o.migration_verify_handles),
                              ("confirm-paths", o.migration_confirm_paths)) if on]
    return (f"migration: --migration-mode={o.migration_mode}"
            f"{''.join(' --migration-' + c for c in checks)}, --migration-on-error="
            f"{o.migration_on_error}: on one host the guest's open descriptions move as "
            "they are (locks included); a destination that cannot collect them (another "
            "host) opens the inodes again by "
            + ("file handle" if o.migration_mode == "file-handles" else "path")
            + " and takes its shared locks again if the guest holds no write lock and "
            "waits for none, else it refuses the state and the source runs on")


def capabilities() -> str:
    """--print-capabilities: the vhost-user.json capabilities of this back-end.
    "migrate-precopy": the device state moves (fuse_server/migration.py; libvirt offers
    migration only with it). Not "separate-options", so that libvirt keeps passing the
    `-o` list, the only form that carries `<lock posix flock>` (libvirt refuses those for
    a daemon with separate options)."""
    return json.dumps({"type": "fs", "features": ["migrate-precopy"]}, indent=2)


def usage(prog: str, defaults: Options = DROPIN) -> str:
    d = defaults
    return f"""usage: {prog} (--socket-path=PATH | --fd=N) --shared-dir=DIR [options]

A virtio-fs (vhost-user-fs) back-end with virtiofsd's command line, whose POSIX and flock
locks are real host locks, coherent across guests and host processes (vfs-lockd).

  --socket-path=PATH        listen on PATH (writes PATH.pid, locked while serving)
  --fd=N                    serve the inherited, already listening socket N
  --socket-group=GROUP      group of the --socket-path socket (mode 0660)
  --shared-dir=DIR          the directory to share (-o source=DIR)
  --tag=TAG                 names this guest for the lock manager (see --guest)
  --thread-pool-size=N      worker threads for file I/O (0 = 1); default {d.threads}
  --cache=auto|always|metadata|never   default never (coherent under locks);
                            metadata is served as never
  --sandbox=namespace|chroot|none      confine to DIR (default namespace where it can
                            be set up, else the strongest that can, said on stderr)
  --seccomp=none|kill|log|trap         system call allowlist; what another call gets
                            (default {d.seccomp}; log: made and logged by the kernel)
  --xattr                   extended attributes (default {'on' if d.xattr else 'off'}; -o no_xattr)
  --readonly                refuse every change with EROFS
  --posix-acl, --no-posix-acl   the guest enforces the share's POSIX ACLs (default
                            {'on' if d.posix_acl else 'off'}; -o posix_acl|no_posix_acl)
  --killpriv-v2, --no-killpriv-v2   the server clears setuid/setgid on the guest's word
                            (FUSE_HANDLE_KILLPRIV_V2: one request per buffered write;
                            default {'on' if d.killpriv_v2 else 'off'}; -o killpriv_v2|no_killpriv_v2)
  --inode-file-handles=..., --announce-submounts
                            accepted; no effect here (logged)
  --log-level=error|warn|info|debug|trace, -d (debug), --syslog, -f (foreground: always)
  --rlimit-nofile=N         RLIMIT_NOFILE (0: up to the hard limit given; default:
                            min(1000000, fs.nr_open), as virtiofsd)
  --migration-mode=find-paths|file-handles, --migration-on-error=abort|guest-error,
  --migration-verify-handles, --migration-confirm-paths
                            virtiofsd's live migration options; on one host the open
                            files themselves move with their locks; across hosts the
                            inodes are found again as the mode says, and a guest
                            holding a lock or waiting for one is refused (aborts)
  --print-capabilities, -V/--version, -h/--help
  -o LIST                   virtiofsd's legacy options: source=DIR, cache=, sandbox=,
                            xattr|no_xattr, flock|no_flock, posix_lock|no_posix_lock,
                            posix_acl|no_posix_acl, killpriv_v2|no_killpriv_v2,
                            announce_submounts, [no_]writeback, [no_]readdirplus,
                            loglevel=LEVEL (',,' is a comma inside a value)
vfs-lockd's own:
  --guest=NAME              lock manager name of this guest (default: from --tag or the
                            socket's path, plus @PID: unique per back-end)
  --lockd=SOCKET            the central `vfs-lockd serve` (else $VFS_LOCKD_SOCKET, else
                            /run/vfs-lockd/lockd.sock if a daemon listens, else embedded)
  --journal=PATH            SQLite journal of the embedded lock manager
  --persist                 after a front-end disconnects, wait for the next
  --native, --no-native     answer attribute, lookup, read, write and statfs requests
                            of known files in C without Python (native/vl_serve.c);
                            --no-native: every request through the Python session (for
                            comparison and diagnosis); default {'on' if d.native else 'off'}
  --threads=N, -v           as --thread-pool-size=N, -d
"""

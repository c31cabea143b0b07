"""The man pages vfs-lockd(1) and vfs-lockd-virtiofsd(1), in roff, generated from the
commands themselves: every verb, argument and option with its help as click knows it, and
vfs-lockd-virtiofsd's own usage text. The prose around them is written here, briefly.

    python3 packaging/manpages.py OUTDIR    # writes OUTDIR/vfs-lockd.1, vfs-lockd-virtiofsd.1
"""

from __future__ import annotations

import os
import sys

import click

DATE = "2026-12-06"


def esc(text: str) -> str:
    """Text for roff: backslashes, minus signs, and a line starting with a control char."""
    out = []
    for line in text.replace("\\", "\\e").replace("-", "\\-").split("\n"):
        if line.startswith((".", "'")):
            line = "\\&" + line
        out.append(line)
    return "\n".join(out)


def _paragraphs(text: str) -> str:
    """click help text: blank-line paragraphs; a "\\b" paragraph keeps its lines."""
    out = []
    for para in (text or "").strip().split("\n\n"):
        if para.startswith("\b"):
            out.append(".PP\n.nf\n" + esc(para[1:].strip("\n")) + "\n.fi")
        else:
            out.append(".PP\n" + esc(" ".join(line.strip() for line in para.splitlines())))
    return "\n".join(out)


def _command(cmd: click.Command, ctx: click.Context, words: str) -> list[str]:
    usage = " ".join(cmd.collect_usage_pieces(ctx))
    lines = [f'.SS "{esc(words)}"', f".B {esc(words)}\n{esc(usage)}"]
    lines.append(_paragraphs(cmd.help or cmd.short_help or ""))
    for param in cmd.get_params(ctx):
        record = param.get_help_record(ctx)
        if record is None or "--help" in getattr(param, "opts", ()):
            continue
        opts, help_text = record
        lines += [".TP", f".B {esc(opts)}", esc(help_text or "")]
    if isinstance(cmd, click.Group):
        for name in cmd.list_commands(ctx):
            sub = cmd.get_command(ctx, name)
            if sub is not None and not sub.hidden:
                lines += _command(sub, click.Context(sub, info_name=name, parent=ctx),
                                  f"{words} {name}")
    return lines


def vfs_lockd() -> str:
    from lockd.cli import group

    main = group()  # the click group (lockd.cli.main is the console script's function)
    root = click.Context(main, info_name="vfs-lockd")
    body = []
    for name in main.list_commands(root):
        cmd = main.get_command(root, name)
        ctx = click.Context(cmd, info_name=name, parent=root)
        if name == "virtiofs":  # takes virtiofsd's command line, not click options
            body += [f'.SS "vfs-lockd {name}"',
                     ".B vfs\\-lockd virtiofs\n\\-\\-socket\\-path=PATH \\-\\-shared\\-dir=DIR "
                     "\\-\\-guest=NAME [\\fIOPTIONS\\fR]",
                     ".PP\n" + esc(cmd.help or ""),
                     ".PP\nThe options of \\fBvfs\\-lockd\\-virtiofsd\\fR(1); the defaults "
                     "differ: no sandbox, xattr on, and the embedded lock manager unless "
                     "\\fB\\-\\-lockd\\fR is given."]
            continue
        body += _command(cmd, ctx, f"vfs-lockd {name}")
    return "\n".join([
        f'.TH VFS\\-LOCKD 1 "{DATE}" "vfs-lockd" "User Commands"',
        ".SH NAME",
        "vfs\\-lockd \\- lock manager for virtio\\-fs shares: lock daemon, FUSE server, "
        "virtio\\-fs back\\-end",
        ".SH SYNOPSIS",
        ".B vfs\\-lockd\n.I COMMAND\n[\\fIOPTIONS\\fR] [\\fIARGS\\fR]",
        ".br\n.B vfs\\-lockd \\-\\-version",
        ".SH DESCRIPTION",
        ".PP\nvfs\\-lockd makes POSIX byte\\-range locks (\\fBfcntl\\fR(2), \\fBlockf\\fR(3)) "
        "and \\fBflock\\fR(2) on a virtio\\-fs or FUSE share real: a lock taken in any "
        "guest conflicts with every other owner in every guest and with host processes, "
        "as a host open file description lock (OFD). Blocking waits are queued fairly, "
        "deadlocks across guests are detected, a dead guest's locks are released, and a "
        "journal plus kept descriptors let a restart of the lock daemon lose no lock.",
        ".PP\nOne lock daemon (\\fBvfs\\-lockd serve\\fR) serves a host; every guest's "
        "server (\\fBvfs\\-lockd mount\\fR, \\fBvfs\\-lockd virtiofs\\fR, "
        "\\fBvfs\\-lockd\\-virtiofsd\\fR(1)) joins it. The package runs it from "
        "\\fIvfs\\-lockd.socket\\fR: systemd listens on \\fI/run/vfs\\-lockd/lockd.sock\\fR "
        "and starts \\fIvfs\\-lockd.service\\fR at the first connection.",
        ".SH COMMANDS",
        *body,
        ".SH ENVIRONMENT",
        ".TP\n.B VFS_LOCKD_SOCKET\nThe daemon a guest server joins when it is given no "
        "\\fB\\-\\-lockd\\fR.",
        ".TP\n.B NOTIFY_SOCKET, LISTEN_FDS, LISTEN_FDNAMES\n\\fBvfs\\-lockd serve\\fR under "
        "systemd: readiness, the socket unit's listening socket, and the lock descriptions "
        "kept in the file descriptor store across restarts.",
        ".SH FILES",
        ".TP\n.I /run/vfs\\-lockd/lockd.sock\nThe lock daemon's socket (mode 0600, root).",
        ".TP\n.I /var/lib/vfs\\-lockd/journal.db\nThe daemon's lock journal (SQLite, with "
        "its change logs beside it).",
        ".TP\n.I /usr/share/qemu/vhost\\-user/40\\-vfs\\-lockd.json\nThe vhost\\-user "
        "descriptor through which libvirt starts \\fBvfs\\-lockd\\-virtiofsd\\fR.",
        ".SH SEE ALSO",
        "\\fBvfs\\-lockd\\-virtiofsd\\fR(1), \\fBfcntl\\fR(2), \\fBflock\\fR(2), "
        "\\fBsystemd.socket\\fR(5), \\fBvirtlockd\\fR(8)",
        "",
    ])


def vfs_lockd_virtiofsd() -> str:
    from fuse_server.virtiofsd_options import usage

    text = usage("vfs-lockd-virtiofsd")
    head, _, options = text.partition("\n\n")  # usage line / description / option list
    desc, _, options = options.partition("\n\n")
    return "\n".join([
        f'.TH VFS\\-LOCKD\\-VIRTIOFSD 1 "{DATE}" "vfs-lockd" "User Commands"',
        ".SH NAME",
        "vfs\\-lockd\\-virtiofsd \\- virtio\\-fs back\\-end with virtiofsd's command line "
        "and host\\-wide POSIX and flock locks",
        ".SH SYNOPSIS",
        ".B vfs\\-lockd\\-virtiofsd\n" + esc(head.removeprefix("usage: vfs-lockd-virtiofsd ")),
        ".SH DESCRIPTION",
        ".PP\n" + esc(" ".join(desc.split())),
        ".PP\nlibvirt, Kata Containers and QEMU start it where they start "
        "\\fBvirtiofsd\\fR(1). With the package installed, libvirt finds it through "
        "\\fI/usr/share/qemu/vhost\\-user/40\\-vfs\\-lockd.json\\fR for a "
        "\\fB<filesystem>\\fR with \\fB<driver type='virtiofs'/>\\fR and no "
        "\\fB<binary path=...>\\fR; \\fB<binary><lock posix='on' flock='on'/></binary>\\fR "
        "asks for the locks. Its locks go to the lock daemon at "
        "\\fI/run/vfs\\-lockd/lockd.sock\\fR (\\fBvfs\\-lockd\\fR(1)), so the guests of one "
        "host exclude each other; without a daemon the locks are kept by an embedded lock "
        "manager for this guest only.",
        ".PP\nIt exits 0 when its front\\-end disconnects, releasing the guest's locks; "
        "unknown options exit 1 with one line naming the option.",
        ".SH OPTIONS",
        ".nf",
        esc(options.rstrip("\n")),
        ".fi",
        ".SH SEE ALSO",
        "\\fBvfs\\-lockd\\fR(1), \\fBvirtiofsd\\fR(1), \\fBqemu\\-system\\-x86_64\\fR(1)",
        "",
    ])


def pages() -> dict[str, str]:
    return {"vfs-lockd": vfs_lockd(), "vfs-lockd-virtiofsd": vfs_lockd_virtiofsd()}


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "."
    os.makedirs(out, exist_ok=True)
    for name, page in pages().items():
        with open(os.path.join(out, f"{name}.1"), "w", encoding="utf-8") as f:
            f.write(page)

"""vfs-lockd: POSIX and flock locks for virtio-fs shares, coherent across guests and host."""

__version__ = "0.1.0"

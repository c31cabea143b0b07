"""The FUSE protocol server: a passthrough share whose locks go through lockd."""

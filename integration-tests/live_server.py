"""Loopback servers for live tests (the package's own threaded runner)."""

from mmref.trainer.inference.threaded import free_port, serve_in_thread


def running(app, port: int | None = None):
    """Serve ``app`` on 127.0.0.1 for the length of a ``with`` block; yields the base URL."""
    return serve_in_thread(app, "127.0.0.1", port or 0)


__all__ = ["free_port", "running"]

"""hvbridge: a byte relay between TCP/Unix sockets and VM sockets (AF_VSOCK, Hyper-V sockets)."""

from __future__ import annotations

__version__ = "0.1.0"

"""Fixtures of the fault-injection suite: `hvbridge` starts real processes and stops them all.

Rules: loopback only (127.0.0.1, ::1, Unix sockets in tmp_path), port 0, every test bounded by
trio.fail_after and every loop by a count; see harness.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from .harness import Launcher

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    import trio


@pytest.fixture
async def hvbridge(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Launcher]:
    """Start hvbridge processes with `await hvbridge.forward(...)`; all get SIGTERM at teardown."""
    launcher = Launcher(nursery, tmp_path)
    try:
        yield launcher
    finally:
        await launcher.close()

"""settled(): wait until trio and the splice reactor thread are both idle (unit tests)."""

from __future__ import annotations

import trio
import trio.testing

from hvbridge.relay import splice


async def settled() -> None:
    """Wait until neither trio's tasks nor the splice reactor thread have anything left to do.

    trio.testing.wait_all_tasks_blocked() alone does not see the reactor thread (splice.py),
    which may still be moving bytes when every task is blocked. Bounded: 100 rounds.
    """
    for _ in range(100):
        await trio.testing.wait_all_tasks_blocked()
        if not splice.enabled:
            return
        mark = await splice.settle()  # None: the reactor had work ready
        await trio.testing.wait_all_tasks_blocked()
        # Quiet twice, and no socket event handled in between: any task that ran in between
        # gave the reactor nothing to do, and the reactor woke no task.
        if mark is not None and await splice.settle() == mark:
            return
    raise AssertionError("the relay never settled")

"""The relay: bytes both ways between two streams until both directions are done.

relay() is the face for two streams. pump.py runs a relay (its header holds the relay's rules)
on the recv_into path, or hands two kernel-spliceable sockets to splice.py; owned.py lets the
splice reactor serve a whole route (the supervisor uses it directly); ends.py holds the
EndReason values and the rules, shared by every path, that pick one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hvbridge.relay.ends import Transfer
from hvbridge.relay.pump import BufferPool, Relay

if TYPE_CHECKING:
    from collections.abc import Coroutine

    import trio


def relay(
    client: trio.abc.HalfCloseableStream,
    backend: trio.abc.HalfCloseableStream,
    *,
    half_close: bool = True,
    idle_timeout: float = 0.0,
    pool: BufferPool | None = None,
    transfer: Transfer | None = None,
    splice: bool = True,
) -> Coroutine[object, object, Transfer]:
    """Relay bytes between `client` and `backend` until both directions are done; close both.

    Use it as `await relay(...)`. It is not an `async def` itself but returns the relay's
    coroutine, so that every open connection carries one coroutine frame fewer (memory
    per idle connection).

    Args:
        client: The accepted connection.
        backend: The connection opened to the route's target.
        half_close: Pass EOF on as a write shutdown (True), or end both ways on the first EOF.
        idle_timeout: Seconds with no byte moving either way before closing both; 0 = never.
        pool: Where socket directions take their buffers (Backend.buffer_pool; default: a new pool).
        transfer: A Transfer to update live (so a caller can watch the byte counts).
        splice: Let two TCP/Unix sockets take the splice path where the platform has it
            (Backend.splice); False keeps the recv_into path.

    Returns:
        The Transfer: bytes each way and why the relay ended.

    Raises:
        trio.Cancelled: Only when cancelled from outside; both streams are closed first.
    """
    state = Relay(
        client,
        backend,
        half_close,
        idle_timeout,
        pool if pool is not None else BufferPool(),
        transfer if transfer is not None else Transfer(),
        splice,
    )
    return state.run()

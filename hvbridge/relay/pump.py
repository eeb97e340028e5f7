"""The relay: shovel bytes both ways between two trio streams until both directions are done.

This module owns the data path and its rules (docs/reference.md, "Relay semantics"). It knows
nothing of address families: it takes any two `trio.abc.HalfCloseableStream`s, so tests drive it
over memory streams.

Rules:
1. One task per direction (spliced sockets: rule 6). EOF from one side is passed on as
   `send_eof()` to the other while the other direction keeps flowing (tcpproxy's
   closeRead/closeWrite). With `half_close=False` the first EOF ends the connection both ways.
2. The relay ends when both directions are done, on a failure of either side, on the idle
   timeout, or when cancelled; in every case it closes both streams before returning.
3. A reset (or any other failure) on one side resets the other: SO_LINGER 0 on a socket
   stream makes close() send RST, so clients see failure as failure, never a clean EOF.
4. Memory stays bounded: a direction blocked on a slow writer stops reading (backpressure,
   no queue), and a socket direction waits for readability *before* it takes a buffer from
   the shared pool, so an idle connection holds no relay buffer. Socket reads use
   recv_into() on pooled buffers instead of allocating a bytes object per read.
5. The relay never raises for a peer's behaviour: the outcome is in Transfer.reason. Only
   cancellation (and bugs) propagate.
6. Two TCP/Unix socket streams take the Linux fast path in splice.py instead, for throughput and CPU: bytes
   move socket -> pipe -> socket inside the kernel, pipes are pooled and held only while bytes
   are in flight, one reactor thread moves every connection's bytes, and the caller's task is
   the connection's only task. Rules 1-5 hold there too (splice.py states how); everything
   else (vsock, Hyper-V sockets, stdio, memory streams) takes the recv_into path below.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import struct
from typing import TYPE_CHECKING, Final, Literal, final

import attrs
import trio

from hvbridge import splice

if TYPE_CHECKING:
    from collections.abc import Coroutine

Side = Literal["client", "backend"]

#: Default relay buffer: large enough for bulk throughput, a few of them per busy connection.
DEFAULT_BUFFER_SIZE: Final = 64 * 1024
_LINGER_RESET: Final = struct.pack("ii", 1, 0)
# ENOTCONN: shutdown() or send() on a socket whose peer has already reset the connection.
_RESET_ERRNOS: Final = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED, errno.ENOTCONN})


@final
class BufferPool:
    """Reusable relay buffers. Buffers are taken only while bytes are in flight.

    Args:
        size: Bytes per buffer.
        max_free: Free buffers kept for reuse; beyond that, returned buffers are dropped.
    """

    def __init__(self, size: int = DEFAULT_BUFFER_SIZE, *, max_free: int = 64) -> None:
        self.size = size
        self.max_free = max_free
        self._free: list[bytearray] = []

    def take(self) -> bytearray:
        """Return a free buffer, allocating one if none is free."""
        return self._free.pop() if self._free else bytearray(self.size)

    def give_back(self, buffer: bytearray) -> None:
        """Return a buffer taken with take()."""
        if len(self._free) < self.max_free:
            self._free.append(buffer)

    @property
    def free(self) -> int:
        """How many buffers wait for reuse."""
        return len(self._free)


_default_pools: dict[int, BufferPool] = {}


def buffer_pool(size: int = DEFAULT_BUFFER_SIZE) -> BufferPool:
    """The process-wide pool for buffers of `size` bytes (one per size)."""
    pool = _default_pools.get(size)
    if pool is None:
        pool = _default_pools[size] = BufferPool(size)
    return pool


@attrs.define(eq=False)  # hashable by identity: the supervisor keeps live ones in a set
class Transfer:
    """What a relay moved, updated live while it runs (metrics read it) and final after.

    Attributes:
        client_to_backend: Bytes written to the backend.
        backend_to_client: Bytes written to the client.
        reason: Why the connection ended: `closed`, `closed by client`, `closed by backend`,
            `idle timeout`, `reset by client`, `reset by backend`, `client error: ...`,
            `backend error: ...` or `cancelled`. Empty while running.
    """

    client_to_backend: int = 0
    backend_to_client: int = 0
    reason: str = ""


class _SideFailed(Exception):
    """A read from or write to one side failed; carries which side and why."""

    def __init__(self, side: Side, cause: BaseException) -> None:
        self.side = side
        self.cause = cause
        super().__init__(side, cause)


def _is_reset(exc: BaseException) -> bool:
    current: BaseException | None = exc
    while current is not None:
        if isinstance(current, OSError) and current.errno in _RESET_ERRNOS:
            return True
        if isinstance(current, trio.BrokenResourceError) and current.__cause__ is None:
            # trio's own streams (memory streams, pipes) say "broken" without an errno.
            return True
        current = current.__cause__ or current.__context__
    return False


def _describe(exc: BaseException) -> str:
    cause = exc.__cause__ if exc.__cause__ is not None else exc
    if isinstance(cause, OSError) and cause.errno is not None:
        return f"{errno.errorcode.get(cause.errno, cause.errno)} {cause.strerror}"
    return f"{type(cause).__name__}: {cause}" if str(cause) else type(cause).__name__


def _raw_socket(stream: trio.abc.Stream) -> trio.socket.SocketType | None:
    return stream.socket if isinstance(stream, trio.SocketStream) else None


async def abort(stream: trio.abc.AsyncResource) -> None:
    """Close `stream` so that its peer sees a reset (RST) rather than a clean EOF."""
    # Any stream with a socket: trio.SocketStream, and the thread-pumped Hyper-V stream.
    sock = getattr(stream, "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError, TypeError):  # closed; no SO_LINGER; AF_VSOCK takes only ints
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    await trio.aclose_forcefully(stream)


async def _close(client: trio.abc.AsyncResource, backend: trio.abc.AsyncResource) -> None:
    """Close both streams, the second one even if closing the first fails or is cancelled."""
    if isinstance(client, trio.SocketStream) and isinstance(backend, trio.SocketStream):
        # What SocketStream.aclose() does, without its checkpoint: under aclose_forcefully()
        # that is a cancel scope, two trips through the scheduler and a Cancelled raised and
        # caught per stream, on every connection's way out, which costs connections per second.
        try:
            client.socket.close()
        finally:
            backend.socket.close()
        return
    # aclose_forcefully() closes, then raises Cancelled if an outer scope is cancelled:
    # without the nested finally that would skip the backend.
    try:
        await trio.aclose_forcefully(client)
    finally:
        await trio.aclose_forcefully(backend)


@final
@attrs.define(eq=False)
class _Relay:
    client: trio.abc.HalfCloseableStream
    backend: trio.abc.HalfCloseableStream
    half_close: bool
    idle_timeout: float
    pool: BufferPool
    transfer: Transfer
    last_activity: float = 0.0
    directions_open: int = 2
    _scope: trio.CancelScope = attrs.field(init=False)  # the nursery's; set by run()

    async def run(self) -> Transfer:
        self.last_activity = trio.current_time()
        failed: _SideFailed | None = None
        try:
            if splice.spliceable(self.client, self.backend):  # rule 6
                conn = splice.Connection(
                    self.client,
                    self.backend,
                    half_close=self.half_close,
                    idle_timeout=self.idle_timeout,
                    counts=self.transfer,
                )
                # Parked right here, not in a helper coroutine: a frame less of memory per idle
                # connection. The reactor wakes this task when the relay ends, and only then: a
                # cancellation asks it to end the relay and waits for that.
                await trio.lowlevel.wait_task_rescheduled(conn.park())
                self.transfer.reason = conn.result()
                if conn.aborted:
                    await trio.lowlevel.checkpoint_if_cancelled()  # raises the Cancelled
                return self.transfer
            async with trio.open_nursery() as nursery:
                self._scope = nursery.cancel_scope
                nursery.start_soon(self._pump, self.client, self.backend, "client", "backend")
                nursery.start_soon(self._pump, self.backend, self.client, "backend", "client")
                if self.idle_timeout > 0:
                    nursery.start_soon(self._watch_idle, nursery.cancel_scope)
        except _SideFailed as exc:
            failed = exc
        except splice.SideError as exc:
            failed = _SideFailed(exc.side, exc.cause)
        except BaseExceptionGroup as group:
            # Both directions can fail at once (e.g. the client resets while a write to it
            # is pending); the first failure decides the reason. Anything else is a bug.
            match, rest = group.split(_SideFailed)
            if rest is not None:
                raise
            assert match is not None
            first = match.exceptions[0]
            while isinstance(first, BaseExceptionGroup):
                first = first.exceptions[0]
            assert isinstance(first, _SideFailed)
            failed = first
        finally:
            if not self.transfer.reason:
                self.transfer.reason = "cancelled"
            if failed is not None:
                await self._fail(failed)
            else:
                await _close(self.client, self.backend)
        return self.transfer

    async def _fail(self, failed: _SideFailed) -> None:
        reset = _is_reset(failed.cause)
        self.transfer.reason = f"reset by {failed.side}" if reset else f"{failed.side} error: {_describe(failed.cause)}"
        other = self.backend if failed.side == "client" else self.client
        mine = self.client if failed.side == "client" else self.backend
        try:
            await abort(other)
        finally:
            await abort(mine)  # even if cancelled from outside while closing `other`

    async def _pump(
        self,
        src: trio.abc.HalfCloseableStream,
        dst: trio.abc.HalfCloseableStream,
        src_side: Side,
        dst_side: Side,
    ) -> None:
        upstream = src_side == "client"
        sock = _raw_socket(src)
        while True:
            if sock is not None:
                n = await self._copy_socket(sock, dst, src_side, dst_side)
            else:
                n = await self._copy_stream(src, dst, src_side, dst_side)
            if n == 0:
                break
            self.last_activity = trio.current_time()
            if upstream:
                self.transfer.client_to_backend += n
            else:
                self.transfer.backend_to_client += n
        # EOF from src.
        if not self.half_close:
            self.transfer.reason = f"closed by {src_side}"
            self._scope.cancel()
            return
        try:
            await dst.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise _SideFailed(dst_side, exc) from exc
        self.directions_open -= 1
        if self.directions_open == 0:
            self.transfer.reason = "closed"
            self._scope.cancel()  # stops the idle watcher

    async def _copy_socket(
        self,
        sock: trio.socket.SocketType,
        dst: trio.abc.HalfCloseableStream,
        src_side: Side,
        dst_side: Side,
    ) -> int:
        try:
            # Wait before taking a buffer: an idle connection holds none (rule 4).
            await trio.lowlevel.wait_readable(sock)
        except (trio.ClosedResourceError, OSError) as exc:
            raise _SideFailed(src_side, exc) from exc
        buffer = self.pool.take()
        try:
            try:
                n = await sock.recv_into(buffer)
            except (trio.ClosedResourceError, OSError) as exc:
                raise _SideFailed(src_side, exc) from exc
            if n:
                try:
                    await dst.send_all(memoryview(buffer)[:n])
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    raise _SideFailed(dst_side, exc) from exc
            return n
        finally:
            self.pool.give_back(buffer)

    async def _copy_stream(
        self,
        src: trio.abc.HalfCloseableStream,
        dst: trio.abc.HalfCloseableStream,
        src_side: Side,
        dst_side: Side,
    ) -> int:
        try:
            data = await src.receive_some(self.pool.size)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise _SideFailed(src_side, exc) from exc
        if data:
            try:
                await dst.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise _SideFailed(dst_side, exc) from exc
        return len(data)

    async def _watch_idle(self, scope: trio.CancelScope) -> None:
        while True:
            deadline = self.last_activity + self.idle_timeout
            if trio.current_time() >= deadline:
                self.transfer.reason = "idle timeout"
                scope.cancel()
                return
            await trio.sleep_until(deadline)


def relay(
    client: trio.abc.HalfCloseableStream,
    backend: trio.abc.HalfCloseableStream,
    *,
    half_close: bool = True,
    idle_timeout: float = 0.0,
    pool: BufferPool | None = None,
    transfer: Transfer | None = None,
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
        pool: Where socket directions take their buffers (default: the process-wide pool).
        transfer: A Transfer to update live (so a caller can watch the byte counts).

    Returns:
        The Transfer: bytes each way and why the relay ended.

    Raises:
        trio.Cancelled: Only when cancelled from outside; both streams are closed first.
    """
    state = _Relay(
        client,
        backend,
        half_close,
        idle_timeout,
        pool if pool is not None else buffer_pool(),
        transfer if transfer is not None else Transfer(),
    )
    return state.run()

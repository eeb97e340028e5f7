"""The relay: shovel bytes both ways between two trio streams until both directions are done.

relay/__init__.py starts it (relay()); this module runs it: the recv_into path, and the hand-over
to splice.py for two kernel-spliceable sockets.

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
5. The relay never raises for a peer's behaviour: the outcome is in Transfer.end, picked by the
   rules in ends.py, which both paths call. Only cancellation (and bugs) propagate.
6. Two TCP/Unix socket streams take the Linux fast path in splice.py instead, for throughput and CPU: bytes
   move socket -> pipe -> socket inside the kernel, pipes are pooled and held only while bytes
   are in flight, one reactor thread moves every connection's bytes, and the caller's task is
   the connection's only task. Rules 1-5 hold there too (splice.py states how); everything
   else (vsock, Hyper-V sockets, stdio, memory streams) takes the recv_into path below.
"""

from __future__ import annotations

from typing import Final, final

import attrs
import trio

from hvbridge.relay import splice
from hvbridge.relay.ends import EndReason, Side, Transfer, eof_end, failure_end
from hvbridge.transports.base import abort

#: Default relay buffer: large enough for bulk throughput, a few of them per busy connection.
DEFAULT_BUFFER_SIZE: Final = 64 * 1024


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


class _SideFailed(Exception):
    """A read from or write to one side failed; carries which side and why."""

    def __init__(self, side: Side, cause: BaseException) -> None:
        self.side = side
        self.cause = cause
        super().__init__(side, cause)


def _raw_socket(stream: trio.abc.Stream) -> trio.socket.SocketType | None:
    return stream.socket if isinstance(stream, trio.SocketStream) else None


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
class Relay:
    """One relay's state; relay() makes it and awaits run()."""

    client: trio.abc.HalfCloseableStream
    backend: trio.abc.HalfCloseableStream
    half_close: bool
    idle_timeout: float
    pool: BufferPool
    transfer: Transfer
    splice: bool
    last_activity: float = 0.0
    directions_open: int = 2
    _scope: trio.CancelScope = attrs.field(init=False)  # the nursery's; set by run()

    async def run(self) -> Transfer:
        self.last_activity = trio.current_time()
        failed: _SideFailed | None = None
        try:
            if self.splice and splice.spliceable(self.client, self.backend):  # rule 6
                conn = splice.Connection.of_streams(
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
                self.transfer.end = conn.result()
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
            if self.transfer.end is None:
                self.transfer.end = EndReason.CANCELLED
            if failed is not None:
                await self._fail(failed)
            else:
                await _close(self.client, self.backend)
        return self.transfer

    async def _fail(self, failed: _SideFailed) -> None:
        self.transfer.end, self.transfer.detail = failure_end(failed.side, failed.cause)
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
        # EOF from src (ends.py rule 1).
        if self.half_close:
            try:
                await dst.send_eof()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise _SideFailed(dst_side, exc) from exc
            self.directions_open -= 1
        end = eof_end(src_side, half_close=self.half_close, directions_open=self.directions_open)
        if end is not None:
            self.transfer.end = end
            self._scope.cancel()  # stops the other direction, or the idle watcher

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
                self.transfer.end = EndReason.IDLE_TIMEOUT
                scope.cancel()
                return
            await trio.sleep_until(deadline)

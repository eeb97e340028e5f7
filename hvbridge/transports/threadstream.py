"""Blocking sockets as trio streams and listeners, each blocking call in a worker thread.

hvsock.py uses this when trio's readiness waiting does not work on AF_HYPERV sockets; nothing
here knows Hyper-V, and it is tested on Linux with TCP and Unix sockets.

Rules:
1. Each blocking call (recv, sendall, shutdown, accept, connect) runs in a worker thread
   holding a token of the trio.CapacityLimiter the caller gives (one per route, sized by the
   caller). A call's result outlives a cancelled waiter: a cancelled receive_some leaves
   its recv running and the next receive_some takes its bytes, so nothing is lost. A cancelled
   send_all cannot know how much was sent, so the send side is then broken. aclose() never
   waits for a thread: it wakes the blocked calls (closesocket on Windows cancels them; on
   Linux shutdown() does) and the socket is closed by the last call to finish, so a socket
   number is never reused while a thread may still use it.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import socket
import sys
from typing import TYPE_CHECKING, Final, Generic, TypeVar, final

import trio

from hvbridge.transports.base import Stream

if TYPE_CHECKING:
    from collections.abc import Callable

    import outcome

logger = logging.getLogger("hvbridge.threadstream")

T = TypeVar("T")

#: Bytes a pumped receive asks for when the caller gives no max_bytes.
DEFAULT_RECEIVE_SIZE: Final = 64 * 1024
#: accept() errors that concern one connection, not the listener: the next accept() may work.
#: The errno names trio.SocketListener ignores (trio/_highlevel_socket.py,
#: _ignorable_accept_errno_names), so both I/O models treat them alike. On Windows, CPython's
#: errno module gives these names their WSA numbers (Modules/errnomodule.c); the WSA numbers
#: are also listed so that the set is the same everywhere. Winsock's accept() fails with
#: WSAECONNRESET when a connection "was subsequently terminated by the remote peer prior to
#: accepting the call" (Microsoft, accept function documentation).
_ACCEPT_TRANSIENT_NAMES: Final = (
    "EPERM",
    "ECONNABORTED",
    "EPROTO",
    "ENETDOWN",
    "ENOPROTOOPT",
    "EHOSTDOWN",
    "ENONET",
    "EHOSTUNREACH",
    "EOPNOTSUPP",
    "ENETUNREACH",
    "ENOSR",
    "ESOCKTNOSUPPORT",
    "EPROTONOSUPPORT",
    "ETIMEDOUT",
    "ECONNRESET",
)
_WSA_ACCEPT_TRANSIENT: Final = {
    "WSAENOPROTOOPT": 10042,
    "WSAEPROTONOSUPPORT": 10043,
    "WSAESOCKTNOSUPPORT": 10044,
    "WSAEOPNOTSUPP": 10045,
    "WSAENETDOWN": 10050,
    "WSAENETUNREACH": 10051,
    "WSAECONNABORTED": 10053,
    "WSAECONNRESET": 10054,
    "WSAETIMEDOUT": 10060,
    "WSAEHOSTDOWN": 10064,
    "WSAEHOSTUNREACH": 10065,
}
ACCEPT_TRANSIENT_ERRNOS: Final = frozenset(
    {getattr(errno, name) for name in _ACCEPT_TRANSIENT_NAMES if hasattr(errno, name)}
    | set(_WSA_ACCEPT_TRANSIENT.values())
)
# closesocket() cancels blocking calls in other threads on Windows; on Linux close() does not
# wake them (shutdown() does), and the descriptor number could be reused under them.
_CLOSE_CANCELS_BLOCKING_CALLS: Final = sys.platform == "win32"


@final
class _Call(Generic[T]):
    """One blocking call in a worker thread. Its result waits here if nobody is waiting."""

    def __init__(self, discard: Callable[[T], None] | None = None) -> None:
        self.done = trio.Event()
        self.value: T  # set by _Pump._finish unless error is
        self.error: BaseException | None = None
        self._discard = discard

    def result(self) -> T:
        if self.error is not None:
            error, self.error = self.error, None
            raise error
        return self.value

    def discard(self) -> None:
        """Release a result nobody will take (e.g. close a connection accepted after close)."""
        if self._discard is not None and self.done.is_set() and self.error is None:
            discard, self._discard = self._discard, None
            discard(self.value)


@final
class _Pump:
    """Worker-thread calls on one blocking socket, and closing it safely under them."""

    def __init__(self, sock: socket.socket, limiter: trio.CapacityLimiter) -> None:
        self.sock = sock
        self.limiter = limiter
        self.closed = False
        self.in_flight = 0
        self._waiters: set[trio.CancelScope] = set()

    async def start(self, fn: Callable[[], T], discard: Callable[[T], None] | None = None) -> _Call[T]:
        """Start `fn` in a worker thread once a limiter token is free; return at once."""
        call: _Call[T] = _Call(discard)
        await self.limiter.acquire_on_behalf_of(call)
        self.in_flight += 1
        token = trio.lowlevel.current_trio_token()

        def deliver(result: outcome.Outcome[T]) -> None:  # runs in the worker thread
            # RunFinishedError: the run ended under this thread; nobody waits for the result.
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(self._finish, call, result)

        trio.lowlevel.start_thread_soon(fn, deliver, name="hvbridge hvsock pump")
        return call

    def _finish(self, call: _Call[T], result: outcome.Outcome[T]) -> None:
        try:
            call.value = result.unwrap()
        except BaseException as exc:  # delivered to the waiter, whatever it is
            call.error = exc
        self.in_flight -= 1
        self.limiter.release_on_behalf_of(call)
        call.done.set()
        if self.closed:
            call.discard()
            if self.in_flight == 0:
                self.sock.close()

    async def wait(self, call: _Call[T]) -> T:
        """The call's result. Cancellation leaves the call running; close() interrupts.

        Raises:
            trio.ClosedResourceError: close() was called while waiting (whatever the call did).
            OSError: What the call raised.
        """
        if call.done.is_set():
            await trio.lowlevel.checkpoint()
        else:
            with trio.CancelScope() as scope:
                self._waiters.add(scope)
                try:
                    await call.done.wait()
                finally:
                    self._waiters.discard(scope)
        if self.closed:
            call.discard()
            raise trio.ClosedResourceError("the socket was closed by another task")
        return call.result()

    def close(self, how: int) -> None:
        """Close the socket now, or wake the calls in flight and let the last one close it."""
        if self.closed:
            return
        self.closed = True
        for scope in self._waiters:
            scope.cancel()
        if self.in_flight == 0 or _CLOSE_CANCELS_BLOCKING_CALLS:
            self.sock.close()
            return
        # OSError: not connected (any more), so the calls are failing by themselves.
        with contextlib.suppress(OSError):
            self.sock.shutdown(how)


@final
class ThreadSocketStream(trio.abc.HalfCloseableStream):
    """A HalfCloseableStream over a *blocking* socket, each call run in a worker thread.

    Works on any connected SOCK_STREAM socket (AF_HYPERV when trio cannot wait on it; TCP and
    Unix sockets in tests). At most two threads per stream: one receiving, one sending.

    Args:
        sock: A connected (or, for connect(), a fresh) socket; it is made blocking.
        limiter: Where the stream's threads take their tokens.
        receive_size: Bytes a receive asks for when receive_some() gets no max_bytes.

    Attributes:
        socket: The socket, for getpeername()/setsockopt() (e.g. SO_LINGER before aclose()).
    """

    def __init__(
        self, sock: socket.socket, limiter: trio.CapacityLimiter, *, receive_size: int = DEFAULT_RECEIVE_SIZE
    ) -> None:
        sock.setblocking(True)
        self.socket = sock
        self._pump = _Pump(sock, limiter)
        self._receive_size = receive_size
        self._receive_call: _Call[bytes] | None = None
        self._send_call: _Call[None] | None = None
        self._leftover = b""
        self._at_eof = False
        self._eof_sent = False
        self._send_broken: str | None = None
        self._receiving = False
        self._sending = False

    @staticmethod
    def _error(exc: OSError) -> trio.BrokenResourceError:
        return trio.BrokenResourceError(f"socket error: {exc}")

    async def connect(self, address: tuple[object, ...] | str) -> None:
        """Connect the socket (blocking connect in a worker thread).

        Raises:
            OSError: The connect failed. On failure or cancellation the caller closes the stream.
        """
        call = await self._pump.start(functools.partial(self.socket.connect, address))
        self._send_call = call
        await self._pump.wait(call)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Receive up to `max_bytes` bytes (b"" at EOF); see trio.abc.ReceiveStream."""
        size = self._receive_size if max_bytes is None else max_bytes
        if size < 1:
            raise ValueError("max_bytes must be >= 1")
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this stream")
        self._receiving = True
        try:
            if self._pump.closed:
                raise trio.ClosedResourceError("the stream is closed")
            if self._leftover or self._at_eof:
                await trio.lowlevel.checkpoint()
            else:
                if self._receive_call is None:
                    # A call left over from a cancelled receive is reused, so no byte is lost.
                    self._receive_call = await self._pump.start(functools.partial(self.socket.recv, size))
                call = self._receive_call
                try:
                    data = await self._pump.wait(call)
                except OSError as exc:
                    self._receive_call = None
                    raise self._error(exc) from exc
                self._receive_call = None
                self._at_eof = not data
                self._leftover = data
            data, self._leftover = self._leftover[:size], self._leftover[size:]
            return data
        finally:
            self._receiving = False

    async def _send_call_in_thread(self, fn: Callable[[], None], what: str) -> None:
        call = await self._pump.start(fn)
        self._send_call = call
        try:
            await self._pump.wait(call)
        except trio.Cancelled:
            self._send_broken = f"a cancelled {what} left the send side in an unknown state"
            raise
        except OSError as exc:
            raise self._error(exc) from exc

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send all of `data`; see trio.abc.SendStream."""
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._sending = True
        try:
            self._check_sendable()
            if not data:
                await trio.lowlevel.checkpoint()
                return
            # Copy: the caller may reuse its buffer while an abandoned thread still sends it.
            await self._send_call_in_thread(functools.partial(self.socket.sendall, bytes(data)), "send_all")
        finally:
            self._sending = False

    async def send_eof(self) -> None:
        """Shut down the sending half (SHUT_WR); idempotent. See trio.abc.HalfCloseableStream."""
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._sending = True
        try:
            self._check_sendable()
            if self._eof_sent:
                await trio.lowlevel.checkpoint()
                return
            await self._send_call_in_thread(functools.partial(self.socket.shutdown, socket.SHUT_WR), "send_eof")
            self._eof_sent = True
        finally:
            self._sending = False

    def _check_sendable(self) -> None:
        if self._pump.closed:
            raise trio.ClosedResourceError("the stream is closed")
        if self._send_broken is not None:
            raise trio.BrokenResourceError(self._send_broken)

    async def wait_send_all_might_not_block(self) -> None:
        """Return at once: a blocking sendall in a thread never needs the caller to wait first."""
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        if self._pump.closed:
            raise trio.ClosedResourceError("the stream is closed")
        await trio.lowlevel.checkpoint()

    def close_now(self) -> None:
        """aclose() without the checkpoint, for cleanup paths that must not await."""
        sending = self._send_call is not None and not self._send_call.done.is_set()
        self._pump.close(socket.SHUT_RDWR if sending else socket.SHUT_RD)

    async def aclose(self) -> None:
        """Close without waiting for threads; a blocked recv/sendall is woken and then closes it."""
        self.close_now()
        await trio.lowlevel.checkpoint()


@final
class ThreadSocketListener(trio.abc.Listener[Stream]):
    """A trio Listener over a *blocking* listening socket; accept() runs in a worker thread.

    Args:
        sock: A bound, listening socket; it is made blocking.
        limiter: Shared by the accept thread and every accepted stream's threads.

    Attributes:
        socket: The listening socket (for getsockname()).
    """

    def __init__(self, sock: socket.socket, limiter: trio.CapacityLimiter) -> None:
        sock.setblocking(True)
        self.socket = sock
        self._limiter = limiter
        self._pump = _Pump(sock, limiter)
        self._accept_call: _Call[tuple[socket.socket, object]] | None = None
        self._accepting = False

    async def accept(self) -> ThreadSocketStream:
        """Accept one connection.

        accept() errors that concern one connection (ACCEPT_TRANSIENT_ERRNOS, e.g. a peer that
        reset before it was accepted) are logged at debug level and the next one is accepted.

        Raises:
            trio.ClosedResourceError: The listener is closed.
            OSError: accept() failed (trio.serve_listeners retries EMFILE and friends).
        """
        if self._accepting:
            raise trio.BusyResourceError("another task is already accepting on this listener")
        self._accepting = True
        try:
            while True:
                if self._pump.closed:
                    raise trio.ClosedResourceError("the listener is closed")
                if self._accept_call is None:
                    self._accept_call = await self._pump.start(self.socket.accept, _close_accepted)
                call = self._accept_call
                try:
                    conn, _ = await self._pump.wait(call)
                except OSError as exc:
                    self._accept_call = None  # accept() failed; the next call starts a new one
                    if exc.errno not in ACCEPT_TRANSIENT_ERRNOS:
                        raise
                    logger.debug("accept() failed for one connection, accepting the next: %s", exc)
                    continue
                self._accept_call = None
                return ThreadSocketStream(conn, self._limiter)
        finally:
            self._accepting = False

    async def aclose(self) -> None:
        """Stop listening; a blocked accept() is woken and then closes the socket."""
        self._pump.close(socket.SHUT_RDWR)
        await trio.lowlevel.checkpoint()


def _close_accepted(result: tuple[socket.socket, object]) -> None:
    result[0].close()

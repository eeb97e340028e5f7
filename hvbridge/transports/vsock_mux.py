"""Hybrid vsock: `vsock-mux:///uds:PORT`, a guest's vsock port through its VMM's Unix socket.

Rules:
1. Hybrid vsock (firecracker docs/vsock.md): connect = connect the VMM's Unix socket, send
   `CONNECT PORT\\n` in one write, read the answer one byte at a time up to the newline (so no
   relayed byte is consumed), bounded by connect_timeout; `OK <host port>` accepts, anything
   else or EOF refuses. Listen = a Unix listener at `PATH_PORT`, where the VMM delivers
   guest-initiated connections. These VMMs turn a half-close into a full close.
2. The handshake's bytes and verdicts are the sans-IO functions connect_line(),
   answer_complete() and refusal(); connect_mux() only moves the bytes.
"""

from __future__ import annotations

import re
import socket
from typing import TYPE_CHECKING, Final

import trio

from hvbridge.addresses import UnixAddress, VsockMuxAddress
from hvbridge.errors import BackendUnavailable, EndpointError
from hvbridge.transports.base import UNAVAILABLE_ERRNOS, error_text
from hvbridge.transports.unix import UnixListener, open_unix_listener

if TYPE_CHECKING:
    from hvbridge.routes import RouteOptions

_OK_LINE: Final = re.compile(rb"OK(?: [0-9]{1,10})?\n")
#: Firecracker answers `OK 1073741824\n` (14 bytes); anything this long is not an answer.
MAX_ANSWER: Final = 64


# ------------------------------------------------------------------------- the handshake (sans-IO)


def connect_line(port: int) -> bytes:
    """The request a VMM reads before it connects the guest's `port`."""
    return b"CONNECT %d\n" % port


def answer_complete(answer: bytes) -> bool:
    """Whether `answer` (the bytes read so far) is a whole answer: a line, or too long to be one."""
    return answer.endswith(b"\n") or len(answer) >= MAX_ANSWER


def refusal(answer: bytes, port: int) -> str | None:
    """None if the VMM accepted (`OK <port>`); else why not, for the user.

    Args:
        answer: What the VMM sent, up to the newline; without it if the VMM closed first.
        port: The guest port asked for.
    """
    if _OK_LINE.fullmatch(answer):
        return None
    if answer_complete(answer):
        return f"unexpected answer {answer!r} to CONNECT {port}; expected 'OK <port>'"
    return f"the VMM closed the connection: nothing listens on port {port} in the guest"


# ------------------------------------------------------------------------- listen / connect


def _reason(exc: OSError) -> str:
    """The system's text for the errno, without trio's "Error connecting to ..." prefix."""
    return error_text(exc.errno) if exc.errno else str(exc)


async def open_mux_listener(address: VsockMuxAddress, options: RouteOptions) -> UnixListener:
    """Listen for guest-initiated hybrid vsock connections on the Unix socket `PATH_PORT`.

    The file follows the Unix listener rules (docs/reference.md, "Who may connect"): created with `mode`, a stale socket
    file is replaced, anything else in the way is an error and is never deleted.

    Raises:
        EndpointError: The socket file cannot be created.
    """
    try:
        return open_unix_listener(UnixAddress(address.listen_path), options)
    except EndpointError as exc:
        raise EndpointError(str(address), "listen", f"{address.listen_path}: {exc.message}") from exc


async def connect_mux(address: VsockMuxAddress, options: RouteOptions) -> trio.SocketStream:
    """Connect to a guest port through a Firecracker / Cloud Hypervisor vsock Unix socket.

    Sends `CONNECT PORT\\n` and waits up to connect_timeout for `OK <host port>\\n` (rule 1).
    The returned stream carries only the guest's bytes: the answer line is consumed exactly.

    Raises:
        BackendUnavailable: The VMM socket is missing or refuses, nothing listens on the guest
            port (the VMM closes the connection), no answer in time, or a malformed answer.
        EndpointError: Any other failure.
    """
    try:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    except OSError as exc:
        raise EndpointError(str(address), "connect", f"cannot create a Unix socket: {_reason(exc)}") from exc
    try:
        try:
            await sock.connect(address.path)
        except OSError as exc:
            message = (
                f"cannot reach the VMM's vsock socket {address.path} ({_reason(exc)});"
                " is the VM running, and is this its vsock uds_path?"
            )
            if exc.errno in UNAVAILABLE_ERRNOS:
                raise BackendUnavailable(str(address), "connect", f"backend unavailable ({message})") from exc
            raise EndpointError(str(address), "connect", message) from exc
        stream = trio.SocketStream(sock)
        with trio.move_on_after(options.connect_timeout) as deadline:
            answer = await _read_answer(stream, address)
        if deadline.cancelled_caught:
            raise BackendUnavailable(
                str(address),
                "connect",
                f"backend unavailable (no answer to CONNECT {address.port} within"
                f" {options.connect_timeout:g}s; is the guest up, and is {address.path} a"
                " Firecracker/Cloud Hypervisor vsock socket?)",
            )
        if (why := refusal(answer, address.port)) is not None:
            raise BackendUnavailable(str(address), "connect", f"backend unavailable ({why})")
    except BaseException:
        sock.close()
        raise
    return stream


async def _read_answer(stream: trio.SocketStream, address: VsockMuxAddress) -> bytes:
    """Send the CONNECT line; return the answer up to and including its newline.

    The answer lacks the newline if the VMM closed the connection first, and stops at
    MAX_ANSWER bytes if it is not an answer at all.
    """
    try:
        await stream.send_all(connect_line(address.port))
        answer = b""
        # One byte per read: whatever follows the newline is the guest's and stays queued.
        while not answer_complete(answer):
            byte = await stream.receive_some(1)
            if not byte:
                break
            answer += byte
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        cause = exc.__cause__
        text = _reason(cause) if isinstance(cause, OSError) else str(exc)
        raise BackendUnavailable(
            str(address), "connect", f"backend unavailable (the VMM dropped the connection: {text})"
        ) from exc
    return answer

"""Linux VM sockets: `vsock://CID:PORT` (AF_VSOCK).

This module owns everything AF_VSOCK-specific: the kernel constants Python lacks, socket
options (the in-kernel connect timeout and buffer sizes), the local CID and what each vsock
errno means for the user. It returns plain trio SocketStreams and Listeners, so the relay never
learns it pumps VM sockets. Hybrid vsock (`vsock-mux://`) is Unix sockets: vsock_mux.py.

Rules:
1. CPython's `setsockopt()` on an AF_VSOCK socket accepts only an integer, which it passes as
   a u64 (the SO_VM_SOCKETS_BUFFER_* options take exactly that). The connect timeout takes a
   `struct timeval`, so it is set through libc with ctypes. The kernel's default is
   2 s whatever the route says; without this option a slow VM fails early.
2. Buffer sizes: SO_VM_SOCKETS_BUFFER_MAX_SIZE is set before SO_VM_SOCKETS_BUFFER_SIZE, because
   the kernel clamps SIZE to the current MAX (256 KiB by default). A listener's sizes are
   inherited by the connections it accepts.
3. connect() errors ECONNRESET, ETIMEDOUT, ENODEV and ENETUNREACH mean "backend unavailable"
   (docs/reference.md, "Relay semantics"): raised as BackendUnavailable, so the supervisor logs and retries them.
4. This module never connects anything at import time or to probe; the local CID comes from
   an ioctl on /dev/vsock, which is not a connection.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
import sys
from typing import TYPE_CHECKING, Final

import trio

from hvbridge.addresses import VMADDR_CID_ANY, VsockAddress
from hvbridge.errors import AddressFamilyUnavailable, BackendUnavailable, EndpointError
from hvbridge.transports.base import BACKLOG, UNAVAILABLE_ERRNOS, family_unavailable

if TYPE_CHECKING:
    from hvbridge.routes import RouteOptions

# ------------------------------------------------------------------ constants (linux/vm_sockets.h)

#: The address family number; socket.AF_VSOCK where Python has it.
AF_VSOCK: Final = 40
#: Socket option level of every SO_VM_SOCKETS_* option: the family number itself.
SOL_VSOCK_OPTIONS: Final = AF_VSOCK
SO_VM_SOCKETS_BUFFER_SIZE: Final = 0
SO_VM_SOCKETS_BUFFER_MIN_SIZE: Final = 1
SO_VM_SOCKETS_BUFFER_MAX_SIZE: Final = 2
#: Takes `struct __kernel_old_timeval` ({long tv_sec; long tv_usec}).
SO_VM_SOCKETS_CONNECT_TIMEOUT_OLD: Final = 6
#: Takes `struct __kernel_sock_timeval` ({s64 tv_sec; s64 tv_usec}); Linux >= 5.1.
SO_VM_SOCKETS_CONNECT_TIMEOUT_NEW: Final = 8
#: `_IO(7, 0xb9)`, on the /dev/vsock character device: writes the local CID as a u32.
IOCTL_VM_SOCKETS_GET_LOCAL_CID: Final = 0x7B9
#: The kernel's connect timeout when none is set (VSOCK_DEFAULT_CONNECT_TIMEOUT, 2 s).
KERNEL_DEFAULT_CONNECT_TIMEOUT: Final = 2.0


class _OldTimeval(ctypes.Structure):
    """`struct __kernel_old_timeval`: what SO_VM_SOCKETS_CONNECT_TIMEOUT_OLD takes."""

    _fields_ = (("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long))


class _SockTimeval(ctypes.Structure):
    """`struct __kernel_sock_timeval`: what SO_VM_SOCKETS_CONNECT_TIMEOUT_NEW takes."""

    _fields_ = (("tv_sec", ctypes.c_int64), ("tv_usec", ctypes.c_int64))


# linux/vm_sockets.h: SO_VM_SOCKETS_CONNECT_TIMEOUT is _OLD where `long` is 64 bits (its
# timeval is then y2038-safe) and _NEW elsewhere. Mirror that choice, and the struct with it.
_LONG_IS_64_BITS: Final = ctypes.sizeof(ctypes.c_long) == 8
SO_VM_SOCKETS_CONNECT_TIMEOUT: Final = (
    SO_VM_SOCKETS_CONNECT_TIMEOUT_OLD if _LONG_IS_64_BITS else SO_VM_SOCKETS_CONNECT_TIMEOUT_NEW
)
_Timeval: Final[type[ctypes.Structure]] = _OldTimeval if _LONG_IS_64_BITS else _SockTimeval

#: The kernel refuses timeouts of MAX_SCHEDULE_TIMEOUT / HZ seconds or more; a year is plenty.
_MAX_TIMEOUT: Final = 365 * 24 * 3600

#: Which module gives AF_VSOCK a transport, per setup; named in errors and docs/vsock.md.
TRANSPORT_MODULES: Final = (
    "vmw_vsock_virtio_transport (a guest of KVM/QEMU, Firecracker or Cloud Hypervisor), "
    "hv_sock (a Hyper-V guest, WSL2), vhost_vsock (a KVM host reaching its guests), "
    "vsock_loopback (CID 1 on this machine)"
)
_SECCOMP_HINT: Final = (
    "in a container this is the runtime's default seccomp profile, which blocks socket(AF_VSOCK)"
    " (moby/moby#44562): run with --security-opt seccomp=PROFILE.json, a copy of the default"
    " profile whose socket rule also allows family 40, or --security-opt seccomp=unconfined;"
    " an AppArmor or SELinux policy can deny it too (see docs/vsock.md)"
)


# ------------------------------------------------------------------------------- helpers


def timeval_for(seconds: float) -> tuple[int, int]:
    """Split a timeout into (tv_sec, tv_usec), rounding up and clamping to what Linux accepts.

    Zero or less becomes 1 µs: the kernel would read 0 as "use the 2 s default".

    Args:
        seconds: The timeout; `inf` and anything beyond a year become a year.

    Returns:
        Whole seconds and microseconds (0..999999), never both zero.
    """
    if not seconds < _MAX_TIMEOUT:  # also catches inf and nan
        return _MAX_TIMEOUT, 0
    if seconds <= 0:
        return 0, 1
    micros = max(1, -(-round(seconds * 1_000_000_000) // 1000))  # ceil, via integer nanoseconds
    return divmod(micros, 1_000_000)


def pack_timeval(seconds: float) -> bytes:
    """The bytes SO_VM_SOCKETS_CONNECT_TIMEOUT takes for `seconds` on this platform."""
    return bytes(_Timeval(*timeval_for(seconds)))


def unpack_timeval(data: bytes) -> float:
    """Seconds from SO_VM_SOCKETS_CONNECT_TIMEOUT's bytes (as getsockopt returns them)."""
    tv = _Timeval.from_buffer_copy(data)
    sec: int = tv.tv_sec
    usec: int = tv.tv_usec
    return sec + usec / 1_000_000


def _libc() -> ctypes.CDLL:
    # dlopen(NULL): the running program's symbols, libc included, without find_library()
    # (which may run gcc or ldconfig).
    return ctypes.CDLL(None, use_errno=True)


def set_connect_timeout(sock: trio.socket.SocketType | socket.socket, seconds: float) -> None:
    """Set the kernel's connect timeout of an AF_VSOCK socket (rule 1).

    Raises:
        OSError: setsockopt failed.
    """
    tv = _Timeval(*timeval_for(seconds))
    setsockopt = _libc().setsockopt
    setsockopt.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_uint32)
    setsockopt.restype = ctypes.c_int
    if setsockopt(sock.fileno(), SOL_VSOCK_OPTIONS, SO_VM_SOCKETS_CONNECT_TIMEOUT, ctypes.byref(tv), ctypes.sizeof(tv)):
        code = ctypes.get_errno()
        raise OSError(code, f"setting the vsock connect timeout: {os.strerror(code)}")


def get_connect_timeout(sock: trio.socket.SocketType | socket.socket) -> float:
    """Read back the kernel's connect timeout of an AF_VSOCK socket (tests and diagnostics).

    Raises:
        OSError: getsockopt failed.
    """
    tv = _Timeval()
    size = ctypes.c_uint32(ctypes.sizeof(tv))
    getsockopt = _libc().getsockopt
    getsockopt.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
    getsockopt.restype = ctypes.c_int
    if getsockopt(
        sock.fileno(), SOL_VSOCK_OPTIONS, SO_VM_SOCKETS_CONNECT_TIMEOUT, ctypes.byref(tv), ctypes.byref(size)
    ):
        code = ctypes.get_errno()
        raise OSError(code, f"reading the vsock connect timeout: {os.strerror(code)}")
    return unpack_timeval(bytes(tv))


def set_buffer_size(sock: trio.socket.SocketType | socket.socket, size: int | None) -> None:
    """Set an AF_VSOCK socket's buffer size: MAX first, then SIZE (rule 2); None leaves both.

    Raises:
        OSError: setsockopt failed.
    """
    if size is None:
        return
    # CPython passes the integer as the u64 these options take.
    sock.setsockopt(SOL_VSOCK_OPTIONS, SO_VM_SOCKETS_BUFFER_MAX_SIZE, size)
    sock.setsockopt(SOL_VSOCK_OPTIONS, SO_VM_SOCKETS_BUFFER_SIZE, size)


def local_cid(device: str = "/dev/vsock") -> int | None:
    """This machine's own CID (IOCTL_VM_SOCKETS_GET_LOCAL_CID), for `hvbridge check`.

    Args:
        device: The vsock character device.

    Returns:
        The CID of the guest transport, else of the host transport (2), else 1 when only
        vsock_loopback is loaded; None when it cannot be known: no /dev/vsock (not Linux, the
        vsock module not loaded, a container without `--device /dev/vsock`), no permission,
        or no transport at all (the kernel answers VMADDR_CID_ANY).
    """
    import fcntl  # Unix only: imported here so the module imports on Windows

    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        answer = fcntl.ioctl(fd, IOCTL_VM_SOCKETS_GET_LOCAL_CID, bytes(4))
    except OSError:
        return None
    finally:
        os.close(fd)
    (cid,) = struct.unpack("=I", answer)
    return None if cid == VMADDR_CID_ANY else int(cid)


def describe_local_cid(device: str = "/dev/vsock") -> str:
    """One line for `hvbridge check`: the local CID, or why it is unknown and what to do."""
    cid = local_cid(device)
    if cid is not None:
        return f"local vsock CID: {cid}"
    if not os.path.exists(device):
        return (
            f"local vsock CID: unknown ({device} is missing: load the transport module for this"
            f" setup, one of {TRANSPORT_MODULES}; in a container add --device {device})"
        )
    return f"local vsock CID: unknown ({device} reports none: no vsock transport is loaded; {TRANSPORT_MODULES})"


def _reason(exc: OSError) -> str:
    """The system's text for the errno, without trio's "Error connecting to ..." prefix."""
    return os.strerror(exc.errno) if exc.errno else str(exc)


def _available() -> bool:
    return sys.platform == "linux" and hasattr(socket, "AF_VSOCK")


def unavailable_reason() -> str | None:
    """Why this OS or Python cannot use AF_VSOCK, or None if it can (for `check`)."""
    return None if hasattr(socket, "AF_VSOCK") else "AF_VSOCK needs Linux"


def _new_socket(address: VsockAddress, op: str) -> trio.socket.SocketType:
    """A new AF_VSOCK stream socket, or the error that says why the family is unusable."""
    if not _available():
        raise family_unavailable(
            address,
            f"AF_VSOCK needs Linux (this is {sys.platform}); on a Windows Hyper-V host use hvsock://VM/PORT",
        )
    try:
        return trio.socket.socket(AF_VSOCK, socket.SOCK_STREAM)
    except OSError as exc:
        raise socket_error(address, op, exc) from exc


def socket_error(address: VsockAddress, op: str, exc: OSError) -> EndpointError:
    """The error for a failed socket(AF_VSOCK): the family is missing or blocked, and what to do."""
    name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    if exc.errno in (errno.EPERM, errno.EACCES):
        return AddressFamilyUnavailable(
            str(address), op, f"creating an AF_VSOCK socket was denied ({name}); {_SECCOMP_HINT}"
        )
    if exc.errno in (errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT, errno.ENODEV):
        return AddressFamilyUnavailable(
            str(address),
            op,
            f"this kernel has no AF_VSOCK support loaded ({name}); load the module for this setup"
            f" with modprobe: {TRANSPORT_MODULES}",
        )
    return EndpointError(str(address), op, f"cannot create an AF_VSOCK socket: {_reason(exc)}")


def connect_error(address: VsockAddress, exc: OSError, timeout: float) -> EndpointError:
    """The error for a failed vsock connect(); BackendUnavailable when a retry may help (rule 3).

    Args:
        address: The vsock address that was being connected.
        exc: The OSError connect() raised.
        timeout: The connect timeout in seconds, for the ETIMEDOUT message.
    """
    cid, port = address.cid, address.port
    hints = {
        errno.ECONNRESET: f"connection reset: nothing listens on port {port} at CID {cid}; start the service",
        errno.ECONNREFUSED: f"connection refused: nothing listens on port {port} at CID {cid}; start the service",
        errno.ETIMEDOUT: f"timed out after {timeout:g}s: CID {cid} did not answer; is the VM running?",
        errno.ENODEV: (
            f"no vsock transport reaches CID {cid}: no running VM has that CID, or the transport"
            f" module is not loaded ({TRANSPORT_MODULES})"
        ),
        errno.ENETUNREACH: (
            f"CID {cid} is unreachable from here: the loaded transport does not route to it"
            " (under Hyper-V hv_sock a guest can connect only to CID 2, the host)"
        ),
        errno.EHOSTUNREACH: f"CID {cid} is unreachable from here; check the CID",
    }
    hint = hints.get(exc.errno or 0)
    if hint is not None:
        return BackendUnavailable(str(address), "connect", f"backend unavailable ({hint})")
    if exc.errno in UNAVAILABLE_ERRNOS:
        return BackendUnavailable(str(address), "connect", f"backend unavailable ({_reason(exc)})")
    if exc.errno in (errno.EPERM, errno.EACCES):
        return EndpointError(
            str(address),
            "connect",
            f"permission denied ({_reason(exc)}); the hypervisor or a security policy refuses this connection",
        )
    return EndpointError(str(address), "connect", _reason(exc))


def listen_error(address: VsockAddress, exc: OSError) -> EndpointError:
    """The error for a failed vsock bind()/listen(), saying what to do."""
    if exc.errno == errno.EADDRINUSE:
        message = f"vsock port {address.port} is already bound; stop the other process or choose another port"
    elif exc.errno == errno.EADDRNOTAVAIL:
        cid = local_cid()
        mine = "unknown" if cid is None else str(cid)
        message = (
            f"CID {address.cid} is not one of this machine's CIDs (local CID: {mine}); listen on"
            " vsock://any:PORT, or load vsock_loopback to bind CID 1 (local) or vhost_vsock for CID 2 (host)"
        )
    elif exc.errno == errno.EACCES:
        message = "permission denied; vsock ports below 1024 need root or CAP_NET_BIND_SERVICE"
    else:
        message = _reason(exc)
    return EndpointError(str(address), "listen", message)


# --------------------------------------------------------------------------------- AF_VSOCK


async def open_vsock_listener(address: VsockAddress, options: RouteOptions) -> trio.SocketListener:
    """Bind and listen on `vsock://CID:PORT`; port `any` lets the kernel choose.

    The bound address (with the chosen port) is `listener.socket.getsockname()`.

    Args:
        address: Usually CID `any`; under Hyper-V hv_sock only `any` works.
        options: vsock_buffer_size is applied to the listener, so accepted connections
            inherit it.

    Returns:
        A listener whose accepted streams are trio.SocketStreams over AF_VSOCK.

    Raises:
        AddressFamilyUnavailable: Not Linux, no vsock support, or a container forbids it.
        EndpointError: The port is taken, the CID is not ours, or a privileged port.
    """
    sock = _new_socket(address, "listen")
    try:
        set_buffer_size(sock, options.vsock_buffer_size)
        await sock.bind((address.cid, address.port))
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise listen_error(address, exc) from exc
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(sock)


async def connect_vsock(address: VsockAddress, options: RouteOptions) -> trio.SocketStream:
    """Connect to `vsock://CID:PORT`, with connect_timeout enforced in the kernel too.

    The caller also bounds the wait (the supervisor's connect_timeout); the kernel timeout
    makes the kernel give up at the same time instead of after its default 2 s.

    Raises:
        BackendUnavailable: Reset, timed out, no such CID or transport, unreachable (rule 3).
        AddressFamilyUnavailable: Not Linux, no vsock support, or a container forbids it.
        EndpointError: Any other failure.
    """
    sock = _new_socket(address, "connect")
    try:
        set_connect_timeout(sock, options.connect_timeout)
        set_buffer_size(sock, options.vsock_buffer_size)
        await sock.connect((address.cid, address.port))
    except OSError as exc:
        sock.close()
        raise connect_error(address, exc, options.connect_timeout) from exc
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)

"""Unix sockets: `unix:///path` and abstract `unix:@name` listeners and connects.

Unix listener files (docs/reference.md, "Who may connect"): created with the route's mode
(default 0600) and owner/group; an existing *socket* file is replaced only when nothing accepts
on it (stale); any other kind of file, or a symlink, is an error and is never deleted or
followed. The file is removed when the listener closes, if it is still ours. The hybrid-vsock
listener (vsock_mux.py) is one of these listeners, so the rules hold for it too.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from typing import TYPE_CHECKING, final

import attrs
import trio

from hvbridge.errors import EndpointError
from hvbridge.transports.base import BACKLOG, Stream, family_unavailable, listen_hint, translate_connect_error

if TYPE_CHECKING:
    import grp
    import pwd
    from collections.abc import Callable

    from hvbridge.addresses import Address, UnixAddress
    from hvbridge.routes import RouteOptions


def unavailable_reason() -> str | None:
    """Why this Python cannot use Unix sockets, or None if it can."""
    if not hasattr(socket, "AF_UNIX"):
        return "Unix sockets need AF_UNIX, which Python has not here (CPython on Windows); use tcp://127.0.0.1:PORT"
    return None


@final
@attrs.define(eq=False)
class UnixListener(trio.abc.Listener[Stream]):
    """A SocketListener on a Unix path that removes its socket file when closed."""

    listener: trio.SocketListener
    path: str | None
    inode: tuple[int, int] | None

    @property
    def socket(self) -> trio.socket.SocketType:
        """The listening socket."""
        return self.listener.socket

    async def accept(self) -> Stream:
        """Accept one connection."""
        return await self.listener.accept()

    async def aclose(self) -> None:
        """Stop listening and remove the socket file if it is still the one we bound."""
        try:
            await self.listener.aclose()
        finally:
            # Also when cancelled: trio.aclose_forcefully() always is, and its checkpoint
            # would otherwise skip the removal and leave the socket file behind.
            self._remove_file()

    def _remove_file(self) -> None:
        if self.path is not None:
            try:
                st = os.lstat(self.path)
                if (st.st_dev, st.st_ino) == self.inode:
                    os.unlink(self.path)
            except OSError:
                pass


def open_unix_listener(address: UnixAddress, options: RouteOptions) -> UnixListener:
    if (why := unavailable_reason()) is not None:
        raise family_unavailable(address, why)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bound = False
    try:
        if not address.abstract:
            _clear_stale_socket(address)
        old_umask = os.umask(0o777 & ~options.mode)
        try:
            sock.bind(address.sockaddr)
            bound = not address.abstract
        finally:
            os.umask(old_umask)
        inode = None
        if not address.abstract:
            st = os.lstat(address.path)
            inode = (st.st_dev, st.st_ino)
            apply_file_options(address, options)
        sock.listen(BACKLOG)
    except OSError as exc:
        _discard(sock, address, bound)
        parent = os.path.dirname(address.path)
        if exc.errno == errno.ENOENT and not address.abstract and parent and not os.path.isdir(parent):
            message = f"no such directory {parent!r}; create it (systemd: RuntimeDirectory=) or choose another path"
            raise EndpointError(str(address), "listen", message) from exc
        raise EndpointError(str(address), "listen", listen_hint(exc)) from exc
    except EndpointError:
        _discard(sock, address, bound)
        raise
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    return UnixListener(listener, None if address.abstract else address.path, inode)


def _discard(sock: socket.socket, address: UnixAddress, bound: bool) -> None:
    """Close a listening socket that failed to set up, and remove the file its bind() made."""
    sock.close()
    if bound:
        with contextlib.suppress(OSError):
            os.unlink(address.path)


def _clear_stale_socket(address: UnixAddress) -> None:
    path = address.path
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise EndpointError(
            str(address),
            "listen",
            "path is a symlink; refusing to follow or delete it, choose another path",
        )
    if not stat.S_ISSOCK(st.st_mode):
        raise EndpointError(
            str(address),
            "listen",
            "a file that is not a socket is in the way; refusing to delete it, remove it or choose another path",
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # Non-blocking: a live listener with a full backlog answers EAGAIN at once, instead of
    # blocking the event loop until a timeout that would then read as "stale".
    probe.setblocking(False)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # stale: nobody accepts on it
        return
    except BlockingIOError:
        pass  # live, with a full backlog
    except OSError as exc:
        # EACCES and the like: no way to tell whether it is live, so never delete it.
        raise EndpointError(
            str(address),
            "listen",
            f"cannot probe the socket file already there ({exc.strerror}); remove it if it is stale,"
            " or choose another path",
        ) from exc
    finally:
        probe.close()
    raise EndpointError(str(address), "listen", "another process is listening on this socket; stop it first")


def apply_file_options(address: UnixAddress, options: RouteOptions) -> None:
    """Give the socket file at `address` the route's owner/group and mode, never following a symlink.

    The listener pool calls it again when a reload changes them on a kept socket.

    Raises:
        EndpointError: The owner or group names nobody.
        OSError: chown() or chmod() failed.
    """
    _apply_owner(address, options)
    os.chmod(address.path, options.mode, follow_symlinks=False)


def _apply_owner(address: UnixAddress, options: RouteOptions) -> None:
    if options.owner is None and options.group is None:
        return
    import grp  # Unix only, like owner/group themselves: imported here so the module imports on Windows
    import pwd

    uid = _lookup(options.owner, pwd.getpwnam, "owner", address) if options.owner else -1
    gid = _lookup(options.group, grp.getgrnam, "group", address) if options.group else -1
    os.chown(address.path, uid, gid, follow_symlinks=False)


def _lookup(
    name: str,
    getter: Callable[[str], pwd.struct_passwd] | Callable[[str], grp.struct_group],
    what: str,
    address: Address,
) -> int:
    if name.isdigit():
        return int(name)
    try:
        entry = getter(name)
    except KeyError:
        raise EndpointError(
            str(address), "listen", f"unknown {what} {name!r}; expected a user/group name or id"
        ) from None
    return entry[2]


async def connect_unix(address: UnixAddress) -> Stream:
    if (why := unavailable_reason()) is not None:
        raise family_unavailable(address, why)
    try:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    except OSError as exc:  # EMFILE/ENFILE: fail this connection, never the process
        raise translate_connect_error(address, exc) from exc
    try:
        await sock.connect(address.sockaddr)
    except OSError as exc:
        sock.close()
        raise translate_connect_error(address, exc) from exc
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)

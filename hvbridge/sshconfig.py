"""ssh with one word: `ssh vsock/3`, `ssh unix/run/x.sock`, `ssh vsock-mux/PATH`, `ssh hvsock/VM`.

`hvbridge ssh-config` prints an ssh_config block whose ProxyCommand is `hvbridge connect %h %p`;
this module turns ssh's `%h %p` into an endpoint, writes that block, and hands a connected
socket to ssh (ProxyUseFdpass): one byte of data carrying the descriptor as SCM_RIGHTS, which
is what OpenSSH's ssh_proxy_fdpass_connect() receives. After that no hvbridge process stays
between ssh and the VM.
"""

from __future__ import annotations

import os
import shlex
import socket
import sys
from pathlib import Path
from typing import Final

from hvbridge.errors import AddressError

#: ssh's %h prefixes and the endpoint each one means (PATH and VM as written after the slash).
SSH_HOST_PATTERNS: Final = ("vsock/*", "vsock-mux/*", "hvsock/*", "unix/*")
DEFAULT_SSH_PORT: Final = 22


def endpoint_for(host: str, port: str | None) -> str:
    """The endpoint text for `hvbridge connect HOST [PORT]`.

    `vsock/CID` -> vsock://CID:PORT, `vsock-mux/PATH` -> vsock-mux:///PATH:PORT,
    `hvsock/VM` -> hvsock://VM/PORT (the vsock port's service GUID), `unix/PATH` ->
    unix:///PATH (no port). PORT defaults to 22. Anything else is an endpoint already and
    takes no PORT.

    Raises:
        AddressError: A PORT with a plain endpoint, or a PORT that is not a number.
    """
    scheme, slash, rest = host.partition("/")
    if not slash or "://" in host or scheme not in ("vsock", "vsock-mux", "hvsock", "unix"):
        if port is not None:
            raise AddressError(
                f"a PORT goes only with ssh's host forms vsock/CID, vsock-mux/PATH, hvsock/VM or unix/PATH,"
                f" not with {host!r}; write the port into the endpoint"
            )
        return host
    if port is not None and not (port.isascii() and port.isdigit()):
        raise AddressError(f"invalid port {port!r}; expected a number such as 22")
    number = int(port) if port is not None else DEFAULT_SSH_PORT
    match scheme:
        case "vsock":
            return f"vsock://{rest}:{number}"
        case "vsock-mux":
            return f"vsock-mux:///{rest.lstrip('/')}:{number}"
        case "hvsock":
            return f"hvsock://{rest}/{number}"
        case _:
            return f"unix:///{rest.lstrip('/')}"


def hvbridge_command() -> str:
    """How ssh should start this hvbridge: the console script's absolute path, else `python -m`."""
    script = Path(sys.argv[0]) if sys.argv else None
    if script is not None and script.name.startswith("hvbridge") and script.is_file():
        return _quote(str(script.resolve()))
    return f"{_quote(sys.executable)} -m hvbridge"


def _quote(word: str) -> str:
    if os.name == "nt":  # pragma: no cover - Windows only
        return f'"{word}"' if " " in word else word
    return shlex.quote(word)


def render(command: str, *, fdpass: bool) -> str:
    """The ssh_config block for `Host vsock/* vsock-mux/* hvsock/* unix/*`."""
    lines = [
        "# hvbridge: ssh vsock/CID, ssh vsock-mux/PATH, ssh hvsock/VM, ssh unix/PATH (port 22 unless -p).",
        "# Include it from ~/.ssh/config, or save it as /etc/ssh/ssh_config.d/20-hvbridge.conf.",
        f"Host {' '.join(SSH_HOST_PATTERNS)}",
        f"    ProxyCommand {command} connect{' --fdpass' if fdpass else ''} %h %p",
    ]
    if fdpass:
        lines.append("    ProxyUseFdpass yes")
    # No IP address to check; known_hosts keys the host key by the name itself (e.g. vsock/3).
    lines.append("    CheckHostIP no")
    return "\n".join(lines) + "\n"


def fdpass_supported() -> bool:
    """Whether this OS can hand a socket to ssh (SCM_RIGHTS over a Unix socket)."""
    return sys.platform.startswith("linux") and hasattr(socket, "send_fds")


def stdout_socket(fd: int = 1) -> socket.socket | None:
    """Standard output as a Unix socket (what ssh gives a ProxyUseFdpass command), else None."""
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        return None
    if sock.family != socket.AF_UNIX:
        sock.close()
        return None
    return sock


def pass_fd(channel: socket.socket, fd: int) -> None:
    """Send `fd` over `channel` as ssh's ProxyUseFdpass expects: one byte with SCM_RIGHTS.

    The descriptor is made blocking first (trio made it non-blocking; the flag is shared with
    ssh's copy).
    """
    os.set_blocking(fd, True)
    socket.send_fds(channel, [b"\0"], [fd])

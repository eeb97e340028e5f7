"""Shims for Wine 8, loaded by every Windows Python process of the test lane (scripts/windows-tests).

They stand in for what a real Windows has and Wine lacks. They live here, in the test lane
only, never in the hvbridge package: on Windows none of this is needed.
"""

from __future__ import annotations

import sys

# Wine 8 lacks propsys.VariantToString, which CPython 3.12+'s _wmi module reaches from
# platform.uname() (prometheus_client calls it at import): Python aborts. Without _wmi,
# platform falls back to the version API.
sys.modules["_wmi"] = None  # type: ignore[assignment]


if sys.platform == "win32":  # (mypy on Linux skips this block)
    from trio._core import _io_windows

    # trio's Windows I/O asks each socket for SIO_BSP_HANDLE_SELECT, which Wine 8 answers with
    # WSAEOPNOTSUPP (10045). With no layered service provider installed (none is in Wine), that
    # handle is the SIO_BASE_HANDLE one, so retry with that.
    _original = _io_windows._get_underlying_socket
    _SELECT = _io_windows.WSAIoctls.SIO_BSP_HANDLE_SELECT
    _BASE = _io_windows.WSAIoctls.SIO_BASE_HANDLE

    def _get_underlying_socket(sock: int, *, which: int = _BASE) -> object:
        try:
            return _original(sock, which=which)
        except OSError as exc:
            if which != _SELECT or exc.winerror != 10045:
                raise
            return _original(sock, which=_BASE)

    _io_windows._get_underlying_socket = _get_underlying_socket

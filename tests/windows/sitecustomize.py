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


def _shim_trio_afd() -> None:
    # trio's Windows I/O asks each socket for SIO_BSP_HANDLE_SELECT, which Wine 8 answers with
    # WSAEOPNOTSUPP (10045). With no layered service provider installed (none is in Wine), that
    # handle is the SIO_BASE_HANDLE one, so retry with that.
    from trio._core import _io_windows

    original = _io_windows._get_underlying_socket

    def get_underlying_socket(sock, *, which=_io_windows.WSAIoctls.SIO_BASE_HANDLE):  # type: ignore[no-untyped-def]
        try:
            return original(sock, which=which)
        except OSError as exc:
            if which != _io_windows.WSAIoctls.SIO_BSP_HANDLE_SELECT or exc.winerror != 10045:
                raise
            return original(sock, which=_io_windows.WSAIoctls.SIO_BASE_HANDLE)

    _io_windows._get_underlying_socket = get_underlying_socket


if sys.platform == "win32":
    _shim_trio_afd()

"""systemd.py: sd_notify datagrams and $LISTEN_FDS parsing, with sockets this test owns."""

from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING

import pytest

from hvbridge import systemd
from hvbridge.systemd import ActivatedSocket, Notifier, encode, listen_fds, notify_address

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"READY": 1}, b"READY=1\n"),
        ({"READY": 1, "STATUS": "serving 2 routes"}, b"READY=1\nSTATUS=serving 2 routes\n"),
        ({"RELOADING": 1, "MONOTONIC_USEC": 12345}, b"RELOADING=1\nMONOTONIC_USEC=12345\n"),
        ({"STOPPING": 1}, b"STOPPING=1\n"),
    ],
)
def test_encode(fields: dict[str, str | int], expected: bytes) -> None:
    assert encode(**fields) == expected


def test_encode_refuses_a_newline_in_a_value() -> None:
    with pytest.raises(ValueError, match=r"^sd_notify value for STATUS contains a newline$"):
        encode(STATUS="a\nREADY=1")


def test_monotonic_usec_is_clock_monotonic() -> None:
    import time

    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    value = systemd.monotonic_usec()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert before <= value <= after


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", None),
        ("/run/systemd/notify", "/run/systemd/notify"),
        ("@hvbridge-test", "\0hvbridge-test"),
        ("vsock:2:1234", None),
        ("relative/path", None),
    ],
)
def test_notify_address(value: str | None, expected: str | None) -> None:
    assert notify_address(value) == expected


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(5)
    with sock:
        yield sock


def test_notifier_sends_each_message(receiver: socket.socket, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", receiver.getsockname())
    monkeypatch.setattr(systemd, "monotonic_usec", lambda: 42)
    notifier = Notifier.from_environment()
    assert notifier.enabled
    assert notifier.ready("serving 1 route")
    assert notifier.reloading()
    assert notifier.stopping("draining")
    assert [receiver.recv(4096) for _ in range(3)] == [
        b"READY=1\nSTATUS=serving 1 route\n",
        b"RELOADING=1\nMONOTONIC_USEC=42\nSTATUS=reloading\n",
        b"STOPPING=1\nSTATUS=draining\n",
    ]


def test_notifier_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"hvbridge-test-notify-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert Notifier.from_environment().notify(READY=1)
        assert sock.recv(4096) == b"READY=1\n"


def test_notifier_without_socket_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier.from_environment()
    assert not notifier.enabled
    assert not notifier.ready("x")


def test_notifier_ignores_a_dead_socket(tmp_path: Path) -> None:
    assert not Notifier(str(tmp_path / "nobody")).notify(READY=1)


def test_listen_fds(monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = socket.socketpair()
    try:
        # Put two sockets at fds 3 and 4, as systemd would (saving what was there).
        saved = [os.dup(fd) if _is_open(fd) else None for fd in (3, 4)]
        try:
            os.dup2(a.fileno(), 3)
            os.dup2(b.fileno(), 4)
            monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
            monkeypatch.setenv("LISTEN_FDS", "2")
            monkeypatch.setenv("LISTEN_FDNAMES", "web:")
            assert listen_fds() == [ActivatedSocket(3, "web"), ActivatedSocket(4, "unknown")]
            assert not os.get_inheritable(3)
            assert "LISTEN_FDS" not in os.environ
            assert "LISTEN_PID" not in os.environ
            assert "LISTEN_FDNAMES" not in os.environ
        finally:
            for fd, old in zip((3, 4), saved, strict=True):
                if old is None:
                    os.close(fd)
                else:
                    os.dup2(old, fd)
                    os.close(old)
    finally:
        a.close()
        b.close()


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"LISTEN_PID": "1", "LISTEN_FDS": "1"},  # for another process
        {"LISTEN_PID": "self", "LISTEN_FDS": "0"},
        {"LISTEN_PID": "self", "LISTEN_FDS": "many"},
    ],
)
def test_listen_fds_not_for_us(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, str(os.getpid()) if value == "self" else value)
    assert listen_fds() == []
    assert "LISTEN_FDS" not in os.environ


def test_listen_fds_can_keep_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISTEN_PID", "1")
    monkeypatch.setenv("LISTEN_FDS", "1")
    assert listen_fds(unset=False) == []
    assert os.environ["LISTEN_FDS"] == "1"


def test_listen_fds_skips_a_closed_fd(monkeypatch: pytest.MonkeyPatch) -> None:
    saved = os.dup(3) if _is_open(3) else None
    try:
        if saved is not None:
            os.close(3)
        monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
        monkeypatch.setenv("LISTEN_FDS", "1")
        assert listen_fds() == []
    finally:
        if saved is not None:
            os.dup2(saved, 3)
            os.close(saved)

"""logs.py's log file, and the daemon writing its log there ([bridge] log_file).

A Windows scheduled task or service has no console, so an unattended hvbridge logs to a file.
Files live in tmp_path; the hvbridge logger's state is restored after each test.
"""

from __future__ import annotations

import functools
import json
import logging
import logging.handlers
from typing import TYPE_CHECKING

import attrs
import pytest
import trio

from hvbridge import service
from hvbridge.addresses import TcpAddress
from hvbridge.cli import run_daemon
from hvbridge.errors import ConfigError
from hvbridge.logs import LOG_FILE_BACKUPS, LOG_FILE_MAX_BYTES, LOGGER, event, setup_logging
from hvbridge.routes import BridgeSettings, Route, RouteTable
from hvbridge.systemd import Notifier

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

TIMEOUT = 15


@pytest.fixture(autouse=True)
def keep_logging() -> Iterator[None]:
    """Undo what setup_logging() does to the hvbridge logger (and close the files it opened)."""
    state = (list(LOGGER.handlers), LOGGER.level, LOGGER.propagate)
    yield
    for handler in LOGGER.handlers:
        if handler not in state[0]:
            handler.close()
    LOGGER.handlers[:] = state[0]
    LOGGER.setLevel(state[1])
    LOGGER.propagate = state[2]


def test_log_file_text_and_json(tmp_path: Path) -> None:
    path = tmp_path / "hvbridge.log"
    setup_logging("info", "text", str(path))
    event(logging.INFO, "connection closed", route="ssh", peer="Überwachung")
    event(logging.DEBUG, "not at info level")
    setup_logging("debug", "json", str(path))  # appends; the first file is closed
    event(logging.DEBUG, "debug now")
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2
    assert lines[0].endswith(" INFO connection closed route=ssh peer=Überwachung")
    assert json.loads(lines[1])["message"] == "debug now"
    (handler,) = LOGGER.handlers
    assert isinstance(handler, logging.handlers.RotatingFileHandler)
    assert (handler.maxBytes, handler.backupCount) == (LOG_FILE_MAX_BYTES, LOG_FILE_BACKUPS)


def test_log_file_that_cannot_open_keeps_the_old_setup(tmp_path: Path) -> None:
    setup_logging("info", "text")
    before = list(LOGGER.handlers)
    with pytest.raises(FileNotFoundError):
        setup_logging("info", "text", str(tmp_path / "missing" / "hvbridge.log"))
    assert LOGGER.handlers == before


def _table(log_file: str | None, source: str = "routes.toml") -> RouteTable:
    route = Route("web", TcpAddress("127.0.0.1", 0), TcpAddress("127.0.0.1", 9))
    return RouteTable((route,), BridgeSettings(log_file=log_file), source=source)


def test_run_refuses_a_log_file_it_cannot_open(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing" / "hvbridge.log")
    with pytest.raises(ConfigError) as info:
        run_daemon(_table(missing))
    assert str(info.value) == (
        f"routes.toml: bridge.log_file: cannot open {missing!r}: No such file or directory;"
        " create its directory or give a path the account running hvbridge may write"
    )


def test_run_refuses_a_log_file_with_workers(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        run_daemon(_table(str(tmp_path / "hvbridge.log")), workers=2)
    assert str(info.value) == (
        "routes.toml: bridge.log_file: cannot be used with --workers (the worker processes log to stderr);"
        " remove one of them"
    )
    assert not (tmp_path / "hvbridge.log").exists()


@attrs.define
class Tables:
    """A `load` callable returning the given tables in turn."""

    tables: list[RouteTable]

    def __call__(self) -> RouteTable:
        return self.tables.pop(0)


async def test_reload_moves_the_log_to_a_file(tmp_path: Path) -> None:
    setup_logging("info", "text")
    path = tmp_path / "hvbridge.log"
    missing = str(tmp_path / "missing" / "x.log")
    tables = Tables([_table(str(path)), _table(str(path)), _table(missing)])
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            run = functools.partial(service.serve, _table(None), load=tables, notifier=Notifier(None))
            svc: service.Service = await nursery.start(run)
            assert await svc.reload()  # to the file
            handler = LOGGER.handlers[0]
            assert isinstance(handler, logging.FileHandler)
            assert await svc.reload()  # the same file: the handler stays
            assert LOGGER.handlers == [handler]
            assert await svc.reload()  # a file that cannot open: the routes reload, the log stays
            assert LOGGER.handlers == [handler]
            svc.request_stop("test")
    text = path.read_text(encoding="utf-8")
    assert text.count(" INFO reloaded ") == 3
    assert (
        f"ERROR routes.toml: bridge.log_file: cannot open {missing!r}: No such file or directory;"
        " create its directory or give a path the account running hvbridge may write; logging as before"
    ) in text

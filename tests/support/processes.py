"""The real hvbridge as a child process: its command line, bounded runs, its output line by line.

Shared by the integration suite, the fault suite and scripts/soak.py. It imports neither pytest
nor hvbridge: it only sees the process from outside. Every wait here is bounded in count; the
caller bounds the time (trio.fail_after).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Final

import attrs
import trio

if TYPE_CHECKING:
    import subprocess
    from collections.abc import Callable, Sequence

KiB: Final = 1024
MiB: Final = 1024 * KiB
GiB: Final = 1024 * MiB
#: hvbridge imports trio, attrs, click, prometheus_client and ruamel.yaml: a busy 2-core machine needs time.
START_TIMEOUT: Final = 30.0
STOP_TIMEOUT: Final = 15.0
_OUTPUT_CHUNK: Final = 64 * KiB
#: Upper bound of reads of one child's output (each read returns at least one byte or EOF).
_MAX_OUTPUT_READS: Final = 1_000_000


def hvbridge_argv() -> list[str]:
    """The command that runs hvbridge with this Python: the console script next to it, else `-m`.

    Either way the child's pid is hvbridge's own (no shell or wrapper in between).
    """
    script = Path(sys.executable).with_name("hvbridge")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "hvbridge"]


async def run_hvbridge(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    """Run `hvbridge ARGS...` to its end with any exit status; the caller bounds the time."""
    return await run_command([*hvbridge_argv(), *args], stdin=stdin)


async def run_command(argv: Sequence[str], *, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    """Run a command to its end with `stdin`, capturing stdout and stderr, any exit status."""
    return await trio.run_process(list(argv), stdin=stdin, capture_stdout=True, capture_stderr=True, check=False)


@attrs.define(eq=False)
class LineReader:
    """Collects the lines of a child's output as they arrive; wait_for() waits for a match."""

    name: str
    lines: list[str] = attrs.Factory(list)
    closed: bool = False
    _changed: trio.Event = attrs.Factory(trio.Event)
    _scope: trio.CancelScope = attrs.Factory(trio.CancelScope)

    @property
    def text(self) -> str:
        """Everything read so far."""
        return "\n".join(self.lines)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def pump(self, stream: trio.abc.ReceiveStream) -> None:
        """Read `stream` to its end (or until cancel()), splitting it into lines."""
        try:
            with self._scope:
                await self._read(stream)
        finally:
            self.closed = True
            self._notify()

    def cancel(self) -> None:
        """Stop reading (when something other than the child still holds the pipe open)."""
        self._scope.cancel()

    async def _read(self, stream: trio.abc.ReceiveStream) -> None:
        pending = b""
        for _ in range(_MAX_OUTPUT_READS):
            data = await stream.receive_some(_OUTPUT_CHUNK)
            if not data:
                break
            pending += data
            *complete, pending = pending.split(b"\n")
            self.lines.extend(line.decode("utf-8", "replace") for line in complete)
            self._notify()
        else:
            raise AssertionError(f"{self.name}: too much output")
        if pending:
            self.lines.append(pending.decode("utf-8", "replace"))

    async def wait_until(self, done: Callable[[], bool], what: str) -> None:
        """Wait (bounded in count; the caller bounds the time) until `done()` is true."""
        for _ in range(_MAX_OUTPUT_READS):
            if done():
                return
            if self.closed:
                raise AssertionError(f"{self.name} ended its output before {what}; its output:\n{self.text}")
            await self._changed.wait()
        raise AssertionError(f"{self.name}: gave up waiting for {what}")  # pragma: no cover

    async def wait_for(self, pattern: str, *, count: int = 1) -> list[str]:
        """Wait for `count` lines matching the regex `pattern`; return the matching lines."""
        regex = re.compile(pattern)

        def matching() -> list[str]:
            return [line for line in self.lines if regex.search(line)]

        await self.wait_until(lambda: len(matching()) >= count, f"{count} line(s) matching {pattern!r}")
        return matching()

    async def wait_closed(self) -> None:
        """Wait for the end of the output (the child exited and nothing else holds the pipe)."""
        await self.wait_until(lambda: self.closed, "the end of its output")

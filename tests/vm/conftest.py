"""Fixtures of the in-guest AF_VSOCK suite: the guard, one hvbridge for the session, backends.

Rules of this suite:
- It runs only inside the micro-VM guest that scripts/vm-tests boots with
  scripts/microvm, whose kernel command line carries `microvm_guest` and
  whose only vsock transport is vsock_loopback (CID 1 = this guest). Anywhere else every test is
  skipped at collection, the autouse guard skips again, and vsock_client() refuses: the
  development and CI machines' CID 2 is infrastructure that is not ours, so nothing here may
  ever open an AF_VSOCK connection on them.
- The guest runs under TCG, where Python is ~20x slower and starting hvbridge takes seconds, so
  one `hvbridge -c routes.toml` serves the whole session with one route per scenario. Its
  backends are TCP servers on ports picked free at session start (the guest runs nothing else).
- Every test is bounded with trio.fail_after and every loop has a maximum count. The hvbridge
  process must still be running after each test and must exit 0 on SIGTERM at the end.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from integration.support import free_port
from support.processes import hvbridge_argv

from .guest import (
    FIGURES,
    GUEST_TOKEN,
    IN_GUEST,
    NOT_IN_GUEST,
    POLL,
    ROUTES,
    START_TIMEOUT,
    STOP_TIMEOUT,
    GuestBridge,
    in_guest,
    routes_toml,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Outside the guest, mark every test of this directory skipped, with the reason."""
    if IN_GUEST:
        return
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.skip(reason=NOT_IN_GUEST))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the throughput and timing figures the tests measured."""
    if FIGURES:
        terminalreporter.section("hvbridge vsock figures (micro-VM guest)")
        for line in FIGURES:
            terminalreporter.write_line(line)


@pytest.fixture(autouse=True)
def refuse_outside_the_guest() -> None:
    """Skip every test of this suite outside the guest (second guard after collection)."""
    if not in_guest():
        pytest.skip(NOT_IN_GUEST)


@pytest.fixture(scope="session", autouse=True)
def mark_report_as_guest(record_testsuite_property: Callable[[str, object], None]) -> None:
    """Put `microvm_guest=yes` into the JUnit report; scripts/vm-tests checks for it."""
    if in_guest():
        record_testsuite_property(GUEST_TOKEN, "yes")


@pytest.fixture(scope="session")
def bridge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GuestBridge]:
    """One `hvbridge -c routes.toml` for the session; SIGTERM at the end must exit 0."""
    if not in_guest():
        pytest.skip(NOT_IN_GUEST)
    backends = {name: free_port() for name in ("vsock-to-tcp", "any-port", "allow-cid-1", "allow-cid-99")}
    table = tmp_path_factory.mktemp("bridge") / "routes.toml"
    table.write_text(routes_toml(backends))
    started = time.monotonic()
    process = subprocess.Popen(
        [*hvbridge_argv(), "-c", str(table)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    bridge = GuestBridge(process, backends)
    reader = threading.Thread(target=bridge.read_stderr, name="hvbridge-stderr", daemon=True)
    reader.start()
    try:
        for _ in range(int(START_TIMEOUT / POLL)):
            if {line.fields.get("route") for line in bridge.events("listening")} >= set(ROUTES):
                break
            if process.poll() is not None:
                pytest.fail(f"hvbridge exited with status {process.returncode} at start:\n{bridge.text}")
            time.sleep(POLL)
        else:
            pytest.fail(f"hvbridge did not listen on every route within {START_TIMEOUT:g}s:\n{bridge.text}")
        FIGURES.append(f"hvbridge start-up (import + 6 listeners): {time.monotonic() - started:.1f} s")
        yield bridge
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        status: int | None
        try:
            status = process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            status = None
        reader.join(STOP_TIMEOUT)
        if process.stderr is not None:
            process.stderr.close()
        sys.stderr.write(f"--- hvbridge log ---\n{bridge.text}\n")
    assert status == 0, f"hvbridge exited with status {status} after SIGTERM:\n{bridge.text}"

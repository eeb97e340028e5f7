#!/usr/bin/env python3
"""Soak test (not run in CI): one hvbridge under a mix of every fault, for minutes.

One real hvbridge process serves a route table with a route per fault: an echo backend (TCP and
Unix), a refused port, a missing Unix socket, a blackholed port, a backend that resets
mid-stream, a slow reader, an allow list. Worker tasks pick scenarios at random (seeded) until
--duration has passed or --max-rounds rounds are done: hash-verified transfers with random
sizes, chunking and half-close, bursts of simultaneous connections, client resets, idle
connections cut by the idle timeout, connects that must fail. The script samples hvbridge's
file descriptors and RSS as it goes and reports them at the end against the start, with the
count of each outcome and of each `reason=` in hvbridge's log. Exit status 0 when every
outcome was the expected one, fds came back to the start, RSS grew by less than --rss-slack
MiB and hvbridge exited 0 on SIGTERM; 1 otherwise.

Rules: loopback only (127.0.0.1, 127.0.0.2 and Unix sockets in a temporary directory), port 0,
bounded in time (--duration) and count (--max-rounds, --burst), every wait under a deadline.

    .venv/bin/python scripts/soak.py --duration 180
"""

from __future__ import annotations

import argparse
import collections
import contextvars
import hashlib
import os
import random
import re
import resource
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Final

import attrs
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from faults.harness import (
    MAX_READS,
    Backend,
    Fds,
    Hvbridge,
    Launcher,
    open_blackhole,
    open_client,
    probe_closed,
    raise_nofile,
    read_to_end,
    reset,
    set_nofile,
    start_backend,
)
from support.processes import KiB, MiB

#: Each scenario must end within this long, or it counts as a hang.
SCENARIO_TIMEOUT: Final = 30.0
IDLE_TIMEOUT: Final = 1.0
SAMPLE_EVERY: Final = 10.0
#: (squeeze epoch, squeezing) when the current task's scenario started; see Soak.bad.
_STARTED: Final = contextvars.ContextVar[tuple[int, bool]]("started", default=(0, False))


@attrs.define
class Tally:
    """Outcomes by scenario: `ok`, or what went wrong."""

    counts: collections.Counter[str] = attrs.Factory(collections.Counter)
    problems: list[str] = attrs.Factory(list)

    def ok(self, scenario: str) -> None:
        """Count one expected outcome."""
        self.counts[f"{scenario} ok"] += 1

    def bad(self, scenario: str, what: str) -> None:
        """Count one unexpected outcome and keep a few descriptions of each kind."""
        self.counts[f"{scenario} UNEXPECTED"] += 1
        if sum(p.startswith(f"{scenario}:") for p in self.problems) < 5:
            self.problems.append(f"{scenario}: {what}")


@attrs.define
class Soak:
    """The running soak: hvbridge, its routes' endpoints, the tally and the samples."""

    hv: Hvbridge
    rng: random.Random
    tally: Tally
    deadline: float
    rounds_left: int
    burst: int
    endpoints: dict[str, str] = attrs.Factory(dict)
    samples: list[tuple[float, Fds, int]] = attrs.Factory(list)
    #: Bumped when an fd squeeze starts and when it ends; a scenario that saw it change (or
    #: ran during one) may fail: running out of fds fails some connections by design.
    squeeze_epoch: int = 0
    squeezing: bool = False
    log: Path | None = None

    def save_log(self) -> None:
        """Write hvbridge's whole log to --log, if given."""
        if self.log is not None:
            self.log.write_text("\n".join(self.hv.lines) + "\n", encoding="utf-8")

    def ok(self, scenario: str) -> None:
        """Count one expected outcome."""
        self.tally.ok(scenario)

    def bad(self, scenario: str, what: str) -> None:
        """Count one unexpected outcome, unless an fd squeeze overlapped the scenario."""
        epoch, squeezed = _STARTED.get()
        if squeezed or self.squeezing or epoch != self.squeeze_epoch:
            self.tally.counts[f"{scenario} failed during an fd squeeze"] += 1
        else:
            self.tally.bad(scenario, what)

    def sample(self) -> None:
        """Record hvbridge's fds and RSS now; fail loudly, with its log, if it has died."""
        if self.hv.process.poll() is not None:
            self.save_log()
            tail = "\n".join(self.hv.lines[-60:])
            raise SystemExit(f"FAIL: hvbridge died with status {self.hv.process.returncode}; its log ends:\n{tail}")
        self.samples.append((time.monotonic(), self.hv.fds(), self.hv.rss()))


# ---------------------------------------------------------------------------------- scenarios


def chunk_size(rng: random.Random) -> int:
    """A random chunk size, small ones often."""
    return rng.choice((1, rng.randint(1, 512), rng.randint(1, 16 * KiB), rng.randint(1, 128 * KiB)))


async def integrity(soak: Soak, rng: random.Random, route: str = "echo", largest: int = 4 * MiB) -> None:
    """Random bytes through the echo backend in random chunks; both hashes must match."""
    size = rng.choice((0, rng.randint(1, 4 * KiB), rng.randint(1, 256 * KiB), rng.randint(1, largest)))
    sent = hashlib.sha256()
    async with await open_client(soak.endpoints[route]) as stream:

        async def send() -> None:
            left = size
            for _ in range(size + 1):
                if not left:
                    break
                data = rng.randbytes(min(left, chunk_size(rng)))
                sent.update(data)
                await stream.send_all(data)
                left -= len(data)
            await stream.send_eof()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            # At most about 1,000 reads a transfer: each read is a syscall and a task switch.
            chunk = max(chunk_size(rng), size // 1000)
            got = await read_to_end(stream, limit=size, chunk=chunk)
    if (got.size, got.sha256, got.ending) == (size, sent.digest(), "eof"):
        soak.ok(f"integrity {route}")
    else:
        soak.bad(f"integrity {route}", f"sent {size}, got {got}")


async def burst(soak: Soak, rng: random.Random) -> None:
    """Many simultaneous small connections."""
    count = rng.randint(soak.burst // 4, soak.burst)
    async with trio.open_nursery() as nursery:
        for i in range(count):
            nursery.start_soon(integrity, soak, random.Random(rng.randrange(2**32) + i), "echo", 64 * KiB)
    soak.ok("burst")


async def squeeze(soak: Soak, rng: random.Random) -> None:
    """Lower hvbridge's RLIMIT_NOFILE to about what it uses for a moment, then restore it.

    hvbridge must log "accept failed", fail only connections that needed an fd, and recover.
    """
    if soak.squeezing:
        return
    soft, hard = resource.prlimit(soak.hv.pid, resource.RLIMIT_NOFILE)
    soak.squeezing = True
    soak.squeeze_epoch += 1
    try:
        set_nofile(soak.hv.pid, soak.hv.fd_count() + rng.randint(0, 16))
        await trio.sleep(rng.uniform(0.2, 1.0))
    finally:
        resource.prlimit(soak.hv.pid, resource.RLIMIT_NOFILE, (soft, hard))
        soak.squeezing = False
        soak.squeeze_epoch += 1
    soak.ok("fd squeeze")


async def must_fail(soak: Soak, rng: random.Random) -> None:
    """A connect that fails (refused, absent, blackholed, not allowed) closes the client."""
    route = rng.choice(("refused", "absent", "blackhole", "allow"))
    got = await probe_closed(soak.endpoints[route], send=b"hello?")
    if got.size == 0 and got.ending in ("eof", "reset"):
        soak.ok(f"fails {route}")
    else:
        soak.bad(f"fails {route}", str(got))


async def allowed(soak: Soak, rng: random.Random) -> None:
    """A peer inside the allow list gets through."""
    data = rng.randbytes(rng.randint(1, 64 * KiB))
    async with await open_client(soak.endpoints["allow"], source="127.0.0.2") as stream:
        await stream.send_all(data)
        await stream.send_eof()
        got = await read_to_end(stream, limit=len(data))
    if (got.size, got.sha256) == (len(data), hashlib.sha256(data).digest()):
        soak.ok("allowed")
    else:
        soak.bad("allowed", str(got))


async def client_resets(soak: Soak, rng: random.Random) -> None:
    """The client resets mid-stream; nothing to check here but that hvbridge copes."""
    stream = await open_client(soak.endpoints[rng.choice(("echo", "unix", "slow"))])
    await stream.send_all(rng.randbytes(rng.randint(1, 256 * KiB)))
    await trio.sleep(rng.random() * 0.05)
    await reset(stream)
    soak.ok("client resets")


async def backend_resets(soak: Soak, rng: random.Random) -> None:
    """The backend resets mid-stream: the client must see a reset, not EOF."""
    async with await open_client(soak.endpoints["reset"]) as stream:
        await stream.send_all(b"go")
        got = await read_to_end(stream, limit=MiB)
    if got.ending == "reset":
        soak.ok("backend resets")
    else:
        soak.bad("backend resets", str(got))


async def slow_reader(soak: Soak, rng: random.Random) -> None:
    """Push a few MiB into a backend that reads in pauses; the echo comes back intact."""
    size = rng.randint(1 * MiB, 16 * MiB)
    data = rng.randbytes(size)
    async with await open_client(soak.endpoints["slow"]) as stream:

        async def send() -> None:
            await stream.send_all(data)
            await stream.send_eof()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            got = await read_to_end(stream, limit=size)
    if (got.size, got.sha256, got.ending) == (size, hashlib.sha256(data).digest(), "eof"):
        soak.ok("slow reader")
    else:
        soak.bad("slow reader", f"sent {size}, got {got}")


async def idle(soak: Soak, rng: random.Random) -> None:
    """A connection left idle is closed by the idle timeout (route `idle`).

    Under load the echo may itself take longer than the timeout; then the connection is cut
    before it, which is what an idle timeout means too.
    """
    async with await open_client(soak.endpoints["idle"]) as stream:
        await stream.send_all(b"ping")
        got = await read_to_end(stream, limit=4)
    if got.size in (0, 4) and got.ending == "eof":
        soak.ok("idle timeout")
    else:
        soak.bad("idle timeout", str(got))


SCENARIOS: Final = (
    (integrity, 30),
    (burst, 3),
    (must_fail, 15),
    (allowed, 5),
    (client_resets, 10),
    (backend_resets, 10),
    (slow_reader, 5),
    (idle, 3),
    (squeeze, 1),
)


async def worker(soak: Soak, seed: int) -> None:
    """Run random scenarios until the deadline or the round budget is used up."""
    rng = random.Random(seed)
    functions = [f for f, _ in SCENARIOS]
    weights = [w for _, w in SCENARIOS]
    for _ in range(10**9):
        if time.monotonic() >= soak.deadline or soak.rounds_left <= 0:
            return
        soak.rounds_left -= 1
        scenario = rng.choices(functions, weights)[0]
        _STARTED.set((soak.squeeze_epoch, soak.squeezing))
        try:
            with trio.fail_after(SCENARIO_TIMEOUT):
                await scenario(soak, random.Random(rng.randrange(2**32)))
        except trio.TooSlowError:
            soak.bad(scenario.__name__, f"did not end within {SCENARIO_TIMEOUT:g}s")
        except Exception as exc:  # any failure is an outcome to report, never the end of the soak
            soak.bad(scenario.__name__, repr(exc)[:300])


# ----------------------------------------------------------------------------------- backends


async def resetting(stream: trio.SocketStream) -> None:
    """Read the request, send a little, then reset."""
    await stream.receive_some(2)
    await stream.send_all(os.urandom(64 * KiB))
    await reset(stream)


async def slow_echo(stream: trio.SocketStream) -> None:
    """Echo, pausing now and then so that the writer backs up."""
    rng = random.Random()
    for _ in range(MAX_READS):
        data = await stream.receive_some(64 * KiB)
        if not data:
            break
        await stream.send_all(data)
        if rng.random() < 0.05:
            await trio.sleep(rng.random() * 0.2)
    await stream.send_eof()


def table(
    echo: Backend, unix_echo: Backend, slow: Backend, resets: Backend, refused: int, blackhole: int, tmp: Path
) -> str:
    """The soak's route table: one route per kind of peer."""
    routes = {
        "echo": (echo.endpoint, ""),
        "unix": (unix_echo.endpoint, ""),
        "slow": (slow.endpoint, ""),
        "reset": (resets.endpoint, ""),
        "refused": (f"tcp://127.0.0.1:{refused}", ""),
        "absent": (f"unix://{tmp / 'absent.sock'}", ""),
        "blackhole": (f"tcp://127.0.0.1:{blackhole}", 'connect_timeout = "0.3s"\n'),
        "allow": (echo.endpoint, 'allow = ["127.0.0.2/32"]\n'),
        "idle": (echo.endpoint, f'idle_timeout = "{IDLE_TIMEOUT}s"\n'),
    }
    text = '[defaults]\nmax_connections = 4096\nidle_timeout = "60s"\n'
    for name, (connect, extra) in routes.items():
        listen = f"unix://{tmp / 'unix-listen.sock'}" if name == "unix" else "tcp://127.0.0.1:0"
        text += f'\n[routes.{name}]\nlisten = "{listen}"\nconnect = "{connect}"\n{extra}'
    return text


# ------------------------------------------------------------------------------------- report


def report(soak: Soak, start: tuple[Fds, int], end: tuple[Fds, int], seconds: float, status: int) -> list[str]:
    """Print the soak report; return the reasons it failed (none: it passed)."""
    failures = []
    peak_rss = max(rss for _, _, rss in soak.samples)
    peak_fds = max(fds.total for _, fds, _ in soak.samples)
    reasons = collections.Counter(
        m.group(1) for line in soak.hv.lines if (m := re.search(r' reason=("[^"]*"|\S+)$', line)) is not None
    )
    accept_failed = sum(" ERROR accept failed: " in line for line in soak.hv.lines)
    errors = [
        line
        for line in soak.hv.lines
        if (" ERROR " in line and " ERROR accept failed: " not in line) or "Traceback" in line
    ]
    print(f"soak: {seconds:.0f} s, {sum(soak.tally.counts.values())} scenarios")
    print(f"  fds   start {start[0].total:5d} ({start[0]})")
    print(f"        end   {end[0].total:5d} ({end[0]})")
    print(f"        peak  {peak_fds:5d}")
    print(f"  RSS   start {start[1] / MiB:7.1f} MiB, end {end[1] / MiB:7.1f} MiB, peak {peak_rss / MiB:7.1f} MiB")
    print("  outcomes:")
    for key, n in sorted(soak.tally.counts.items()):
        print(f"    {n:7d}  {key}")
    print("  hvbridge `connection closed` reasons:")
    for key, n in reasons.most_common():
        print(f"    {n:7d}  {key}")
    print(f"  hvbridge `accept failed` lines (fd squeezes): {accept_failed}")
    print(f"  hvbridge other ERROR lines: {len(errors)}; exit status after SIGTERM: {status}")
    for line in errors[:5]:
        print(f"    {line}")
    for problem in soak.tally.problems[:20]:
        print(f"  UNEXPECTED {problem}")
    unexpected = sum(n for key, n in soak.tally.counts.items() if key.endswith("UNEXPECTED"))
    if unexpected:
        failures.append(f"{unexpected} unexpected outcomes")
    if not end[0].settled_at(start[0]):
        failures.append(f"fds did not come back: {start[0]} -> {end[0]}")
    if errors:
        failures.append(f"{len(errors)} ERROR lines or tracebacks")
    if status != 0:
        failures.append(f"hvbridge exited {status}")
    return failures


async def soak_main(args: argparse.Namespace) -> int:
    """Run the soak; the exit status."""
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    print(f"seed={seed}", flush=True)
    raise_nofile(8 * args.burst * args.workers + 1024)
    with tempfile.TemporaryDirectory(prefix="hvbridge-soak-") as scratch:
        tmp = Path(scratch)
        async with trio.open_nursery() as nursery:
            echo = await start_backend(nursery, "tcp")
            unix_echo = await start_backend(nursery, tmp / "echo.sock")
            slow = await start_backend(nursery, "tcp", default=slow_echo)
            resets = await start_backend(nursery, "tcp", default=resetting)
            refused = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # bound, never listening
            refused.bind(("127.0.0.1", 0))
            blackhole = await open_blackhole()
            launcher = Launcher(nursery, tmp)
            routes = table(echo, unix_echo, slow, resets, refused.getsockname()[1], blackhole.port, tmp)
            hv = await launcher.run_table(routes, listeners=9)
            soak = Soak(hv, random.Random(seed), Tally(), 0.0, args.max_rounds, args.burst, log=args.log)
            for name in ("echo", "unix", "slow", "reset", "refused", "absent", "blackhole", "allow", "idle"):
                soak.endpoints[name] = hv.listening(name)
            for _ in range(3):  # warm-up: buffers, pipes and code paths exist before the baseline
                await integrity(soak, random.Random(seed), "echo")
            soak.tally = Tally()
            await trio.sleep(0.5)
            start = (hv.fds(), hv.rss())
            soak.sample()
            began = time.monotonic()
            soak.deadline = began + args.duration

            async def sampler() -> None:
                for _ in range(int(args.duration / SAMPLE_EVERY) + 2):
                    await trio.sleep(SAMPLE_EVERY)
                    soak.sample()
                    _, fds, rss = soak.samples[-1]
                    print(
                        f"  t={time.monotonic() - began:5.0f}s fds={fds.total} RSS={rss / MiB:.1f} MiB"
                        f" scenarios={sum(soak.tally.counts.values())}",
                        flush=True,
                    )

            async with trio.open_nursery() as load:
                load.start_soon(sampler)
                async with trio.open_nursery() as workers:
                    for i in range(args.workers):
                        workers.start_soon(worker, soak, seed + i)
                load.cancel_scope.cancel()
            seconds = time.monotonic() - began
            # Let hvbridge finish closing, then measure the end state.
            for _ in range(500):
                if hv.fds().settled_at(start[0]):
                    break
                await trio.sleep(0.02)
            end = (hv.fds(), hv.rss())
            soak.sample()
            status = await hv.stop()
            soak.save_log()
            blackhole.close()
            refused.close()
            nursery.cancel_scope.cancel()
    failures = report(soak, start, end, seconds, status)
    if end[1] - start[1] > args.rss_slack * MiB:
        failures.append(f"RSS grew by {(end[1] - start[1]) / MiB:.1f} MiB")
    print("PASS" if not failures else f"FAIL: {'; '.join(failures)}")
    return 1 if failures else 0


def main() -> int:
    """Parse the options and run the soak."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=180.0, help="seconds of load (default 180)")
    parser.add_argument("--max-rounds", type=int, default=1_000_000, help="scenarios at most, in all")
    parser.add_argument("--workers", type=int, default=16, help="concurrent scenario loops (default 16)")
    parser.add_argument("--burst", type=int, default=200, help="connections in the largest burst (default 200)")
    parser.add_argument("--rss-slack", type=float, default=32.0, help="MiB RSS may grow by (default 32)")
    parser.add_argument("--seed", type=int, default=None, help="replay a run")
    parser.add_argument("--log", type=Path, default=None, help="write hvbridge's log to this file")
    return trio.run(soak_main, parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())

"""Integrity under concurrency (docs/reference.md, "Relay semantics": bytes arrive complete, once and in order).

1,000 connections, all open at once through one real hvbridge, each with its own random sizes
(0..256 KiB each way), random chunking on both ends and a random half-close order; every byte is
hash-verified in both directions. The plan comes from a seeded random.Random whose seed is
printed (set HVBRIDGE_FAULTS_SEED to replay one).

Rules: loopback only (127.0.0.1), port 0, bounded by trio.fail_after and loop counts; times are
never asserted.
"""

from __future__ import annotations

import hashlib
import os
import random
from typing import TYPE_CHECKING, Final, Literal

import attrs
import pytest
import trio
from support.processes import KiB

from .harness import MAX_READS, open_client, raise_nofile, start_backend

if TYPE_CHECKING:
    from .harness import Launcher

pytestmark = pytest.mark.slow

CONNECTIONS: Final = int(os.environ.get("HVBRIDGE_FAULTS_CONNECTIONS", "1000"))
MAX_SIZE: Final = 256 * KiB
TIMEOUT: Final = 120.0
#: Who sends EOF first: the client after all it sends, the backend after all it sends, or both
#: sending at once and each closing its write side when done.
Order = Literal["client_first", "backend_first", "together"]
ORDERS: Final[tuple[Order, ...]] = ("client_first", "backend_first", "together")


@attrs.frozen
class Plan:
    """One connection's script."""

    index: int
    up: int
    down: int
    order: Order
    seed: int


@attrs.define
class Tally:
    """What each side sent and received, by connection index and direction."""

    sent: dict[tuple[int, str], tuple[int, bytes]] = attrs.Factory(dict)
    received: dict[tuple[int, str], tuple[int, bytes]] = attrs.Factory(dict)


def chunk_size(rng: random.Random) -> int:
    """A random chunk size, from 1 byte to 128 KiB, small ones often."""
    return rng.choice((1, rng.randint(1, 100), rng.randint(1, 4 * KiB), rng.randint(1, 128 * KiB)))


async def send_random(stream: trio.SocketStream, size: int, rng: random.Random) -> tuple[int, bytes]:
    """Send `size` random bytes in random chunks; (size, sha256)."""
    digest = hashlib.sha256()
    left = size
    for _ in range(size + 1):
        if left == 0:
            break
        data = rng.randbytes(min(left, chunk_size(rng)))
        digest.update(data)
        await stream.send_all(data)
        left -= len(data)
    return size, digest.digest()


async def receive_random(stream: trio.SocketStream, limit: int, rng: random.Random) -> tuple[int, bytes]:
    """Read to EOF with random read sizes; (size, sha256). Fails past `limit` bytes."""
    digest = hashlib.sha256()
    size = 0
    for _ in range(MAX_READS):
        data = await stream.receive_some(chunk_size(rng))
        if not data:
            return size, digest.digest()
        digest.update(data)
        size += len(data)
        assert size <= limit, f"received more than {limit} bytes"
    raise AssertionError("too many reads")  # pragma: no cover


async def receive_exactly(stream: trio.SocketStream, size: int) -> bytes:
    """Read exactly `size` bytes (fails on an early EOF)."""
    data = bytearray()
    for _ in range(size + 1):
        if len(data) == size:
            break
        chunk = await stream.receive_some(size - len(data))
        assert chunk, "EOF inside the header"
        data += chunk
    return bytes(data)


async def run_side(stream: trio.SocketStream, plan: Plan, tally: Tally, side: Literal["client", "backend"]) -> None:
    """Play one side of `plan`: send its bytes and read the other side's, in the planned order."""
    rng = random.Random(plan.seed * 2 + (side == "backend"))
    send_size, receive_limit = (plan.up, plan.down) if side == "client" else (plan.down, plan.up)
    mine, theirs = ("up", "down") if side == "client" else ("down", "up")

    async def send() -> None:
        tally.sent[plan.index, mine] = await send_random(stream, send_size, rng)
        await stream.send_eof()

    async def receive() -> None:
        tally.received[plan.index, theirs] = await receive_random(stream, receive_limit, rng)

    first: Literal["client", "backend"] | None = {
        "client_first": "client",
        "backend_first": "backend",
        "together": None,
    }[plan.order]
    if first is None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            nursery.start_soon(receive)
    elif first == side:
        await send()
        await receive()
    else:
        await receive()
        await send()


async def test_thousand_connections_hash_verified(hvbridge: Launcher, nursery: trio.Nursery) -> None:
    """Every byte of 1,000 simultaneous connections arrives intact, both ways, in any close order."""
    seed = int(os.environ.get("HVBRIDGE_FAULTS_SEED", str(random.randrange(2**32))))
    print(f"seed={seed} (HVBRIDGE_FAULTS_SEED={seed} replays this run)")
    rng = random.Random(seed)
    plans = [
        Plan(i, rng.randint(0, MAX_SIZE), rng.randint(0, MAX_SIZE), rng.choice(ORDERS), rng.randrange(2**32))
        for i in range(CONNECTIONS)
    ]
    # Both ends live in this process (2 fds a connection) and hvbridge holds 2 more; it inherits
    # the limit when it starts.
    assert raise_nofile(2 * CONNECTIONS + 256) >= 2 * CONNECTIONS + 256

    tally = Tally()
    go = trio.Event()
    with trio.fail_after(TIMEOUT):

        async def serve(stream: trio.SocketStream) -> None:
            index = int.from_bytes(await receive_exactly(stream, 4), "big")
            await go.wait()
            await run_side(stream, plans[index], tally, "backend")

        backend = await start_backend(nursery, "tcp", default=serve)
        hv = await hvbridge.forward("tcp://127.0.0.1:0", backend.endpoint, "--max-connections", str(CONNECTIONS))
        baseline = hv.fds()
        listen = hv.listening()
        connected = 0

        async def client(plan: Plan) -> None:
            nonlocal connected
            async with await open_client(listen) as stream:
                await stream.send_all(plan.index.to_bytes(4, "big"))
                connected += 1
                await go.wait()
                await run_side(stream, plan, tally, "client")

        async with trio.open_nursery() as clients:
            for plan in plans:
                clients.start_soon(client, plan)
            # All at once: no byte flows until every connection is open end to end.
            await backend.wait_accepted(CONNECTIONS)
            assert hv.fds()["socket"] >= baseline["socket"] + 2 * CONNECTIONS
            go.set()
        # hvbridge may be done before the backend has read the last bytes it passed on.
        await backend.wait_finished(CONNECTIONS)
        await hv.wait_for(r"connection closed .* reason=closed$", count=CONNECTIONS)
        await hv.wait_fds(baseline)

    assert connected == CONNECTIONS
    expected = {(p.index, "up"): p.up for p in plans} | {(p.index, "down"): p.down for p in plans}
    assert {key: size for key, (size, _) in tally.sent.items()} == expected
    bad = sorted(key for key, value in tally.sent.items() if tally.received.get(key) != value)
    details = [
        f"{key}: sent {tally.sent[key][0]} bytes, received {tally.received.get(key, (None,))[0]},"
        f" order {plans[key[0]].order}"
        for key in bad[:5]
    ]
    assert not bad, f"seed={seed}: {len(bad)} directions arrived damaged, e.g. {details}"
    assert backend.errors == []
    assert hv.matching(r"reason=(?!closed$)") == []

"""Benchmark hvbridge against socat, HAProxy and a direct connection, side by side on loopback.

    .venv/bin/python benchmarks/run.py              # the full suite, 3 repeats (a few minutes)
    .venv/bin/python benchmarks/run.py --quick      # smaller transfers, 1 repeat, no memory test

Prints a table and writes benchmarks/results/<time>.json (raw numbers of every repeat) and
benchmarks/latest.md (the table, the machine and the target ratios); --update-docs also
copies the table into docs/performance.md. Not run in CI: it needs socat and haproxy.

Everything shares the machine's cores: this client, the benchmark server and the relay run at
once, so a relay that burns CPU also slows the ends. Each relay is measured in turn, in the same
run, with the same client and server (benchmarks/peer.py), over TCP and over Unix sockets.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Final

import peer
from relays import EXTRA_RELAYS, HVBRIDGE_COMMANDS, RELAYS, Family, Relay

HERE: Final = Path(__file__).resolve().parent
GiB: Final = 1 << 30
Metrics = dict[str, list[float]]  # metric -> one value per repeat
Results = dict[str, dict[str, Metrics]]  # family -> relay -> metrics

#: (key, label, unit, higher is better)
METRICS: Final = (
    ("down", "1 connection, server -> client", "GiB/s", True),
    ("up", "1 connection, client -> server", "GiB/s", True),
    ("parallel", "8 connections (4 each way)", "GiB/s", True),
    ("down_cpu", "relay CPU per GiB, 1 connection, server -> client", "s", False),
    ("up_cpu", "relay CPU per GiB, 1 connection, client -> server", "s", False),
    ("parallel_cpu", "relay CPU per GiB, 8 connections", "s", False),
    ("rtt1_p50", "1-byte round trip p50", "us", False),
    ("rtt1_p99", "1-byte round trip p99", "us", False),
    ("rtt1k_p50", "1-KiB round trip p50", "us", False),
    ("rtt1k_p99", "1-KiB round trip p99", "us", False),
    ("rate", "new connections per second", "conn/s", True),
    ("mem1000", "memory per idle connection, 1,000 held", "KiB", False),
    ("mem5000", "memory per idle connection, 5,000 held", "KiB", False),
    ("mem9000", "memory per idle connection, 9,000 held", "KiB", False),
)


def throughput(jobs: list[tuple[str, peer.Address, int]], null_fd: int) -> float:
    """Run each (way, address, bytes) transfer in its own thread; GiB/s over all of them."""
    errors: list[BaseException] = []

    def run(way: str, address: peer.Address, count: int) -> None:
        try:
            if way == "down":
                peer.download(address, count, null_fd)
            else:
                peer.upload(address, count)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=job) for job in jobs]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise errors[0]
    return sum(job[2] for job in jobs) / elapsed / GiB


def percentile(values: list[int], fraction: float) -> float:
    """The `fraction` percentile of nanosecond values, in microseconds."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))] / 1000


def measure_memory(relay: Relay, steps: list[int], log: list[str]) -> dict[str, float]:
    """Hold `steps` connections in turn through `relay`; KiB of relay memory per connection."""
    held = peer.Held(relay.listen)
    out: dict[str, float] = {}
    try:
        # Warm up: imports, first buffers, allocator arenas.
        held.open_to(200)
        held.verify()
        held.close()
        time.sleep(0.5)
        base = relay.memory_kib()
        for n in steps:
            first = len(held.socks)
            held.open_to(n)
            ok = held.verify(first)
            if ok != n - first:
                raise RuntimeError(
                    f"{relay.name}/{relay.family}: {n - first - ok} of {n - first} new connections failed"
                )
            time.sleep(0.3)
            out[f"mem{n}"] = (relay.memory_kib() - base) / n
        ok = held.verify()
        if ok != len(held.socks):
            raise RuntimeError(f"{relay.name}/{relay.family}: {len(held.socks) - ok} held connections stopped working")
        log.append(f"  all {len(held.socks)} held connections still work")
    finally:
        held.close()
    return out


def run_relay(relay: Relay, args: argparse.Namespace, null_fd: int, memory: bool) -> dict[str, float]:
    """Every measurement for one relay and family."""
    out: dict[str, float] = {}
    log: list[str] = []
    address = relay.listen
    if memory and relay.name != "direct" and "memory" in args.tests:
        steps = [s for s in args.hold if relay.name != "socat" or s <= args.socat_hold_max]
        out.update(measure_memory(relay, steps, log))
        relay.settle()  # closing thousands of connections takes the relay a while
    size: int = args.size
    if "throughput" in args.tests:
        part = size // 8
        for key, jobs in (
            ("down", [("down", address, size)]),
            ("up", [("up", address, size)]),
            ("parallel", [("down", address, part)] * 4 + [("up", address, part)] * 4),
        ):
            cpu = relay.cpu_seconds()
            out[key] = throughput(jobs, null_fd)
            if relay.pid is not None:
                time.sleep(0.3)  # socat's per-connection child: counted once its parent reaps it
                out[f"{key}_cpu"] = (relay.cpu_seconds() - cpu) / (size / GiB)
    if "latency" in args.tests:
        rtt1 = peer.ping_pong(address, 1, args.rounds)
        out["rtt1_p50"], out["rtt1_p99"] = percentile(rtt1, 0.5), percentile(rtt1, 0.99)
        rtt1k = peer.ping_pong(address, 1024, args.rounds)
        out["rtt1k_p50"], out["rtt1k_p99"] = percentile(rtt1k, 0.5), percentile(rtt1k, 0.99)
    if "rate" in args.tests:
        done, failed = peer.connection_rate(address, args.rate_seconds)
        if failed:
            log.append(f"  {failed} connections failed in the rate test")
        out["rate"] = done / args.rate_seconds
    for line in log:
        print(line, file=sys.stderr)
    return out


def wait_for_quiet(seconds: float) -> None:
    """Wait until the 1-minute load average drops below 0.7 (other work done), at most `seconds`."""
    deadline = time.monotonic() + seconds
    while os.getloadavg()[0] >= 0.7 and time.monotonic() < deadline:
        time.sleep(5)


def machine() -> dict[str, str]:
    """What the numbers were measured on."""
    model = "unknown"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()

    def version(argv: list[str]) -> str:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            result = subprocess.run(argv, capture_output=True, text=True, check=False)
            return (result.stdout or result.stderr).splitlines()[0].strip()
        return "missing"

    return {
        "cpu": model,
        "cores": str(os.cpu_count()),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "socat_version": next(
            (line for line in version_lines(["socat", "-V"]) if line.startswith("socat version")), "missing"
        ),
        "haproxy": version(["haproxy", "-v"]).split(" - ")[0],
    }


def version_lines(argv: list[str]) -> list[str]:
    """The output lines of a version command (empty when the tool is missing)."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        return subprocess.run(argv, capture_output=True, text=True, check=False).stdout.splitlines()
    return []


def fmt(values: list[float], unit: str) -> str:
    """Median of the repeats, with the spread when there are several."""
    if not values:
        return "-"
    median = statistics.median(values)
    digits = 2 if unit in ("GiB/s", "s") else 1 if unit in ("us", "KiB") else 0
    text = f"{median:,.{digits}f}"
    if len(values) > 1:
        spread = (max(values) - min(values)) / median * 100 if median else 0.0
        text += f" ±{spread / 2:.0f}%"
    return text


def table(results: Results, relays: list[str]) -> str:
    """Markdown tables, one per family: metrics down, relays across."""
    lines: list[str] = []
    for family, by_relay in results.items():
        lines.append(f"**{family.upper()}** (median of repeats, ± half the min-max spread)")
        lines.append("")
        lines.append("| metric | unit | " + " | ".join(relays) + " |")
        lines.append("|---|---|" + "---:|" * len(relays))
        for key, label, unit, _ in METRICS:
            cells = [fmt(by_relay.get(r, {}).get(key, []), unit) for r in relays]
            if all(c == "-" for c in cells):
                continue
            lines.append(f"| {label} | {unit} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def ratios(results: Results) -> str:
    """The issue's targets as ratios of this run's medians."""
    lines = ["| target | family | hvbridge | compared with | ratio | goal | met |", "|---|---|---:|---:|---:|---:|---|"]

    def row(label: str, family: str, have: float, other: float, who: str, goal: str, unit: str) -> None:
        ratio = have / other
        met = ratio >= float(goal[3:-1]) if goal.startswith(">=") else ratio <= float(goal[3:-1])
        cells = [label, family, f"{have:,.{unit}f}", f"{other:,.{unit}f} ({who})", f"{ratio:.2f}x", goal]
        lines.append("| " + " | ".join(cells) + f" | {'yes' if met else 'no'} |")

    for family, by_relay in results.items():

        def best(
            relays: tuple[str, ...], key: str, by_relay: dict[str, Metrics] = by_relay
        ) -> tuple[float, str] | None:
            """The highest median of `key` among `relays`, and which relay has it."""
            found = [(statistics.median(v), r) for r in relays if (v := by_relay.get(r, {}).get(key))]
            return max(found) if found else None

        others = ("socat", "haproxy", "haproxy-splice")
        for key, label in (
            ("down", "1-connection GiB/s, server -> client"),
            ("up", "1-connection GiB/s, client -> server"),
        ):
            mine, other = best(("hvbridge",), key), best(others, key)
            if mine and other:
                row(label, family, mine[0], other[0], other[1], ">= 1.2x", "2")
        mine, other = best(("hvbridge",), "rtt1_p50"), best(("socat",), "rtt1_p50")
        if mine and other:
            row("1-byte round trip p50, us", family, mine[0], other[0], "socat", "<= 1.2x", "1")
        mine = best(("hvbridge",), "mem9000")
        if mine:
            met = "yes" if mine[0] <= 4 else "no"
            lines.append(
                f"| KiB per idle connection, 9,000 held | {family} | {mine[0]:.2f} | 4 KiB | - | <= 4 KiB | {met} |"
            )
        other = best(("haproxy", "haproxy-splice"), "rate")  # HAProxy's best, with or without splice
        for relay, label, goal in (("hvbridge-2w", "--workers 2", ">= 1.0x"), ("hvbridge", "one process", ">= 0.6x")):
            mine = best((relay,), "rate")
            if mine and other:
                row(f"new connections/s ({label})", family, mine[0], other[0], other[1], goal, "0")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3, help="runs of every measurement (default 3)")
    parser.add_argument(
        "--size", type=lambda s: int(float(s) * GiB), default=2 * GiB, help="GiB per throughput run (default 2)"
    )
    parser.add_argument("--rounds", type=int, default=5000, help="round trips per ping-pong run (default 5000)")
    parser.add_argument("--rate-seconds", type=float, default=2.0, help="length of the connection-rate run")
    parser.add_argument(
        "--hold",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1000, 5000, 9000],
        help="idle connections to hold, in steps",
    )
    parser.add_argument(
        "--socat-hold-max", type=int, default=1000, help="socat forks a process per connection: hold at most this many"
    )
    parser.add_argument("--tests", default="memory,throughput,latency,rate", help="comma-separated subset of the tests")
    parser.add_argument(
        "--relays",
        default=",".join(RELAYS),
        help="comma-separated subset of " + ",".join(RELAYS) + ", or also " + ",".join(EXTRA_RELAYS),
    )
    parser.add_argument("--families", default="tcp,unix", help="tcp, unix or both")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=COMMAND",
        help="also run an hvbridge started by COMMAND ({python}, {config}) as relay hvbridge-NAME",
    )
    parser.add_argument("--quick", action="store_true", help="0.5 GiB transfers, 1 repeat, 1000 rounds, no memory test")
    parser.add_argument(
        "--wait-idle", type=float, default=0, metavar="SECONDS", help="first wait up to this long for a quiet machine"
    )
    parser.add_argument("--update-docs", action="store_true", help="write the table into docs/performance.md")
    args = parser.parse_args()
    if args.quick:
        args.size, args.repeat, args.rounds = GiB // 2, 1, 1000
        args.tests = args.tests.replace("memory", "")
    relays = args.relays.split(",")
    commands = dict(HVBRIDGE_COMMANDS)
    for variant in args.variant:
        name, _, command = variant.partition("=")
        commands[f"hvbridge-{name}"] = command
        relays.append(f"hvbridge-{name}")
    families: list[Family] = [f for f in ("tcp", "unix") if f in args.families.split(",")]
    missing = [
        tool for tool in ("socat", "haproxy") if any(r.startswith(tool) for r in relays) and not shutil.which(tool)
    ]
    if missing:
        parser.error(f"{', '.join(missing)} not installed (apt-get install {' '.join(missing)}), or pick --relays")

    limit = peer.raise_fd_limit()
    info = machine()
    if args.wait_idle:
        wait_for_quiet(args.wait_idle)
    load_before = os.getloadavg()[0]
    print(
        f"{info['cpu']}, {info['cores']} cores, Linux {info['kernel']}, Python {info['python']}; "
        f"client, server and relay share these cores. RLIMIT_NOFILE {limit}.",
        file=sys.stderr,
    )
    results: Results = {f: {r: {} for r in relays} for f in families}
    null_fd = os.open(os.devnull, os.O_WRONLY)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="hvbridge-bench-") as tmp:
        workdir = Path(tmp)
        server_unix = str(workdir / "server.sock")
        server = subprocess.Popen(
            [sys.executable, str(HERE / "peer.py"), "serve", "--unix", server_unix], stdout=subprocess.PIPE, text=True
        )
        try:
            assert server.stdout is not None
            server_tcp = ("127.0.0.1", int(server.stdout.readline().split()[1]))
            for repeat in range(args.repeat):
                for family in families:
                    for name in relays:
                        target = server_unix if family == "unix" else server_tcp
                        t0 = time.monotonic()
                        with Relay(name, family, target, workdir, commands.get(name, "")) as relay:
                            memory = repeat == 0
                            values = run_relay(relay, args, null_fd, memory)
                        for key, value in values.items():
                            results[family][name].setdefault(key, []).append(value)
                        print(
                            f"run {repeat + 1}/{args.repeat} {family:4} {name:15} {time.monotonic() - t0:5.1f}s  "
                            + " ".join(f"{k}={v:.3g}" for k, v in values.items()),
                            file=sys.stderr,
                        )
        finally:
            server.kill()
            server.wait()
    elapsed = time.monotonic() - started
    load = f"load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after"
    if max(load_before, os.getloadavg()[0]) > 1.0:
        load += " (other processes were busy: expect noise)"
    print(load, file=sys.stderr)
    text = table(results, relays)
    target_text = ratios(results)
    print()
    print(text)
    print(target_text)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    (HERE / "results").mkdir(exist_ok=True)
    record = {
        "time": stamp,
        "machine": info,
        "arguments": vars(args),
        "seconds": elapsed,
        "load": load,
        "results": results,
    }
    (HERE / "results" / f"{stamp}.json").write_text(json.dumps(record, indent=1))
    notes = (
        f"Measured {stamp} by `benchmarks/run.py` ({args.repeat} repeats, {args.size / GiB:g} GiB per throughput run, "
        f"{args.rounds} round trips per latency run, {elapsed:.0f} s in all; {load}).\n\n"
        f"Machine: {info['cpu']}, {info['cores']} cores, Linux {info['kernel']}, Python {info['python']}, "
        f"{info['socat_version']}, {info['haproxy']}. The client, the server and the relay share these "
        "cores, over loopback.\n"
    )
    markdown = f"{notes}\n{text}\nTargets, as ratios of this run's medians:\n\n{target_text}\n"
    if args.relays == ",".join(RELAYS) and args.families == "tcp,unix" and not args.quick:
        (HERE / "latest.md").write_text(markdown)
    if args.update_docs:
        doc = HERE.parent / "docs" / "performance.md"
        start, end = "<!-- benchmark:start -->", "<!-- benchmark:end -->"
        body = doc.read_text()
        head, _, rest = body.partition(start)
        _, _, tail = rest.partition(end)
        doc.write_text(f"{head}{start}\n{markdown}{end}{tail}")


if __name__ == "__main__":
    main()

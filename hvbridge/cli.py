"""The `hvbridge` command line (docs/reference.md, "Command line"): run, check, forward, connect, hyperv.

This module owns argument parsing and exit codes, and composes the daemon (run_daemon: the
engine, the listener pool, logging); service.py runs it (signals, reload, shutdown). Exit status:
0 clean exit; 1 a user error (HvbridgeError), printed as `Error: ...` lines on stderr with no
traceback; 2 bad usage (click). Anything else escaping is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import re
import signal
import socket
from typing import TYPE_CHECKING, Final, Literal, ParamSpec, TypeVar, final

import click
import trio

from hvbridge import __version__, metrics, sshconfig, transports
from hvbridge.addresses import VMADDR_PORT_ANY, Address, StdioAddress, TcpAddress, VsockAddress, parse_address
from hvbridge.backend import Backend
from hvbridge.cli_errors import UserError, user_errors
from hvbridge.cli_hyperv import hyperv_group
from hvbridge.config import (
    COMMAND_LINE,
    Format,
    format_table,
    listen_conflicts,
    load_config,
    parse_duration,
    table_from_mapping,
)
from hvbridge.engine import Engine, open_local_engine
from hvbridge.errors import AddressError, ConfigError, EndpointError
from hvbridge.hyperv.guids import hyperv_port_problem
from hvbridge.listeners import ListenerPool, inherit
from hvbridge.logs import event, setup_logging
from hvbridge.relay import relay
from hvbridge.relay.ends import EndReason
from hvbridge.routes import RouteOptions, RouteTable
from hvbridge.service import check_families, file_signature, log_file_problem, serve
from hvbridge.supervisor import connect_with_retries
from hvbridge.systemd import listen_fds
from hvbridge.transports import base, tcp, vsock
from hvbridge.workers import open_worker_engine

if TYPE_CHECKING:
    import contextlib
    from collections.abc import Callable

P = ParamSpec("P")
R = TypeVar("R")
LogFormat = Literal["text", "json"]


def _log_level(verbose: int, quiet: int, configured: str) -> str:
    if verbose:
        return "debug"
    if quiet:
        return "warning" if quiet == 1 else "error"
    return configured


# Options people put before the command name too (`hvbridge -q forward ...`); the group moves
# them after it, where each command declares them.
_LEADING_FLAG = re.compile(r"-[vq]+|--verbose|--quiet|--config=.*|--log-format=.*|-c.+")
_LEADING_WITH_VALUE: Final = ("-c", "--config", "--log-format")


class _Main(click.Group):
    """`hvbridge -c FILE` with no command runs the table, as `hvbridge run -c FILE` does."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        """Move leading -v/-q/--log-format/-c after the command name; with no command, insert `run`.

        So `hvbridge -q forward A B` means `hvbridge forward -q A B`, and `hvbridge -v -c FILE` and
        `hvbridge --config=FILE --watch` mean `hvbridge run ...`.
        """
        leading: list[str] = []
        rest = list(args)
        while rest and (rest[0] in _LEADING_WITH_VALUE or _LEADING_FLAG.fullmatch(rest[0])):
            leading.append(rest.pop(0))
            if leading[-1] in _LEADING_WITH_VALUE and rest:
                leading.append(rest.pop(0))
        if leading and rest and rest[0] in self.commands:
            args = [rest[0], *leading, *rest[1:]]
        elif args and args[0].startswith("-") and args[0] not in ("-h", "--help", "--version"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


if TYPE_CHECKING:  # click 8.5 made ParamType generic; older clicks (>=8.1 is allowed) are not
    _FloatParamType = click.ParamType[float, object]
else:
    _FloatParamType = click.ParamType


class _Duration(_FloatParamType):
    """A duration option: seconds, or a number with a unit ms, s, m or h (the route table's form)."""

    name = "duration"

    def __init__(self, *, positive: bool = False) -> None:
        self.positive = positive

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> float:
        """Seconds, from a string such as "5s", "500ms" or "2"."""
        if isinstance(value, float):
            return value
        try:
            seconds = parse_duration(value)
        except ValueError:
            seconds = None
        if seconds is None:
            self.fail(f"{value!r} is not a duration; expected e.g. 5s, 500ms, 2 (seconds)", param, ctx)
        if self.positive and seconds == 0:
            self.fail(f"{value!r} is no time; expected a duration greater than 0, e.g. 5s, 500ms, 2", param, ctx)
        return seconds


_DURATION_EXAMPLE: Final = "(e.g. 5s, 500ms, 2)"
_connect_timeout = click.option(
    "--connect-timeout",
    type=_Duration(positive=True),
    default="5s",
    show_default=True,
    help=f"Give up connecting after this long {_DURATION_EXAMPLE}.",
)


_verbose = click.option("-v", "--verbose", count=True, help="More log output (debug).")
_quiet = click.option("-q", "--quiet", count=True, help="Less log output (-q warning, -qq error).")
_log_format = click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default=None,
    help="Log as text or one JSON object per line.",
)
_config = click.option(
    "-c",
    "--config",
    "config_path",
    required=True,
    metavar="FILE",
    help="Route table (.toml, .yaml, .yml; `-` reads TOML from stdin).",
)
_format = click.option(
    "--format",
    "config_format",
    type=click.Choice(["toml", "yaml"]),
    default=None,
    help="Read the route table as TOML or YAML, whatever its name (default: from its extension).",
)


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="hvbridge")
def main() -> None:
    """Relay TCP and Unix sockets to and from VM sockets (AF_VSOCK, Hyper-V sockets).

    \b
    hvbridge -c routes.toml            run every route (same as `hvbridge run -c ...`)
    hvbridge check -c routes.toml      validate and print the resolved table
    hvbridge forward LISTEN CONNECT    one ad-hoc route, no file
    hvbridge connect ENDPOINT          stdin/stdout <-> ENDPOINT (ssh ProxyCommand)
    hvbridge probe -c routes.toml      ask a running daemon whether every route listens
    hvbridge hyperv guid 22            Hyper-V helpers (service GUIDs, registry, VM ids)
    hvbridge ssh-config                ssh_config block for `ssh vsock/3`, `ssh unix/PATH`

    -v, -q, --log-format and -c may come before or after the command name.
    """


_workers = click.option(
    "--workers",
    type=click.IntRange(1, 1024),
    default=1,
    show_default=True,
    help="Processes that relay, sharing the listening sockets (POSIX).",
)


@main.command(short_help="Run every route of the route table (SIGHUP reloads it).")
@_config
@_format
@click.option("--watch", is_flag=True, help="Also reload when the file changes (polled every second).")
@_workers
@_verbose
@_quiet
@_log_format
@user_errors
def run(
    config_path: str,
    config_format: Format | None,
    watch: bool,
    workers: int,
    verbose: int,
    quiet: int,
    log_format: LogFormat | None,
) -> None:
    """Run every route of the route table until SIGINT/SIGTERM (Ctrl-C/Ctrl-Break on Windows).

    SIGHUP reloads the file; Windows has no SIGHUP: use --watch there.
    """
    table = load_config(config_path, config_format)
    load = functools.partial(load_config, config_path, config_format)
    _serve(table, verbose, quiet, log_format, config_path=config_path, load=load, watch=watch, workers=workers)


@main.command(short_help="Validate the route table and print it resolved.")
@_config
@_format
@_verbose
@_quiet
@_log_format
@user_errors
def check(
    config_path: str, config_format: Format | None, verbose: int, quiet: int, log_format: LogFormat | None
) -> None:
    """Validate the route table and print it resolved; opens nothing. Exit 0 valid, 1 not."""
    del verbose, quiet, log_format  # taken so that they may come before any command; check logs nothing
    table = load_config(config_path, config_format)
    # Parsing compared listen endpoints as text; here host names are resolved, as run does.
    conflicts = listen_conflicts(table, tcp.listen_hosts)
    if conflicts:
        raise UserError("\n".join(str(problem) for problem in conflicts))
    click.echo(format_table(table), nl=False)
    if any(isinstance(a, VsockAddress) for r in table.routes for a in (r.listen, r.connect)) and hasattr(
        socket, "AF_VSOCK"
    ):
        click.echo(f"# {vsock.describe_local_cid()}")
    for route in table.routes:
        for key, address in (("listen", route.listen), ("connect", route.connect)):
            if isinstance(address, VsockAddress) and address.port != VMADDR_PORT_ANY:
                problem = hyperv_port_problem(address.port)
                if problem is not None:
                    click.echo(f"warning: routes.{route.name}.{key}: under Hyper-V, {problem}", err=True)
            why = transports.unavailable_reason(address)
            if why is not None:
                click.echo(
                    f"warning: routes.{route.name}.{key}: {why}; this route cannot run here",
                    err=True,
                )


@main.command(short_help="Relay LISTEN to CONNECT: one route, no file.")
@click.argument("listen")
@click.argument("connect_to", metavar="CONNECT")
@_connect_timeout
@click.option("--connect-retries", default=0, show_default=True, help="Extra connect attempts, with backoff.")
@click.option(
    "--idle-timeout",
    type=_Duration(),
    default="0s",
    show_default=True,
    help=f"Close connections idle this long, 0: never {_DURATION_EXAMPLE}.",
)
@click.option("--max-connections", default=1024, show_default=True, help="Most connections at once.")
@click.option(
    "--half-close/--no-half-close",
    default=True,
    show_default=True,
    help="Pass EOF on one way at a time.",
)
@click.option("--allow", multiple=True, help="Peer allowed to connect (CIDR, cid:N, vm:GUID); repeatable.")
@click.option("--mode", default=None, help="File mode of a unix:///PATH listener, e.g. 0660.  [default: 0600]")
@click.option(
    "--proxy-protocol",
    type=click.Choice(["none", "v1", "v2"]),
    default="none",
    show_default=True,
    help="Send the backend a PROXY protocol header describing the client.",
)
@click.option("--accept-proxy", is_flag=True, help="Read a PROXY protocol header from each client first.")
@_workers
@_verbose
@_quiet
@_log_format
@user_errors
def forward(
    listen: str,
    connect_to: str,
    connect_timeout: float,
    connect_retries: int,
    idle_timeout: float,
    max_connections: int,
    half_close: bool,
    allow: tuple[str, ...],
    mode: str | None,
    proxy_protocol: str,
    accept_proxy: bool,
    workers: int,
    verbose: int,
    quiet: int,
    log_format: LogFormat | None,
) -> None:
    """Relay connections accepted on LISTEN to CONNECT (one route, no file)."""
    route: dict[str, object] = {
        "listen": listen,
        "connect": connect_to,
        "connect_timeout": connect_timeout,
        "connect_retries": connect_retries,
        "idle_timeout": idle_timeout,
        "max_connections": max_connections,
        "half_close": half_close,
        "proxy_protocol": proxy_protocol,
        "accept_proxy": accept_proxy,
    }
    if allow:
        route["allow"] = list(allow)
    if mode is not None:
        route["mode"] = mode  # on a listener without a file it is an error, not ignored
    _serve(_command_line_route(route), verbose, quiet, log_format, workers=workers)


def _command_line_route(route: dict[str, object]) -> RouteTable:
    """A table of one route built from a command's arguments; its problems name the arguments."""
    try:
        return table_from_mapping({"routes": {"forward": route}}, source=COMMAND_LINE)
    except ConfigError as exc:
        names = {"listen": "LISTEN", "connect": "CONNECT"}
        lines = []
        for problem in exc.problems:
            key = problem.location.rpartition(".")[2]
            lines.append(f"{names.get(key, '--' + key.replace('_', '-'))}: {problem.message}")
        raise UserError("\n".join(lines)) from None


@main.command(name="connect", short_help="Relay stdin/stdout to ENDPOINT (ssh ProxyCommand).")
@click.argument("endpoint")
@click.argument("port", required=False)
@click.option(
    "--fdpass",
    is_flag=True,
    help="Hand the connected socket to ssh over stdout and exit (ProxyUseFdpass; Linux, else relays).",
)
@_connect_timeout
@click.option(
    "--connect-retries", type=click.IntRange(0, 100), default=0, show_default=True, help="Extra connect attempts."
)
@_verbose
@_quiet
@_log_format
@user_errors
def connect_command(
    endpoint: str,
    port: str | None,
    fdpass: bool,
    connect_timeout: float,
    connect_retries: int,
    verbose: int,
    quiet: int,
    log_format: LogFormat | None,
) -> None:
    """Relay stdin/stdout to ENDPOINT until both ways are done (e.g. as ssh ProxyCommand).

    ENDPOINT PORT is also ssh's `%h %p`: vsock/CID, vsock-mux/PATH, hvsock/VM or unix/PATH.
    EOF on stdin (or stdin closed) is passed on to ENDPOINT, and the other way keeps flowing.
    Exit status: 0 when both ways ended with EOF; 1 when either side failed or reset, with one
    line saying which; 130 on Ctrl-C (SIGINT).
    """
    target = _connect_target(sshconfig.endpoint_for(endpoint, port))
    options = RouteOptions(connect_timeout=connect_timeout, connect_retries=connect_retries)
    # Quiet by default: ssh shows a ProxyCommand's stderr to its user.
    setup_logging(_log_level(verbose, quiet, "warning"), log_format or "text")
    _stdin_at_eof_if_closed()
    try:
        failure = trio.run(functools.partial(_connect_stdio, target, options, fdpass=fdpass))
    except BaseException as exc:
        if not _interrupted(exc):
            raise
        click.echo("Error: connect: interrupted (SIGINT)", err=True)
        raise click.exceptions.Exit(130) from None
    if failure is not None:
        raise UserError(f"connect: {failure}")


def _connect_target(endpoint: str) -> Address:
    """ENDPOINT of `hvbridge connect`; its problems name the argument."""
    try:
        target = parse_address(endpoint, role="connect")
    except AddressError as exc:
        raise UserError(f"ENDPOINT: {exc}") from None
    if isinstance(target, StdioAddress):
        raise UserError(
            "ENDPOINT: stdio is this command's own end (stdin/stdout); expected the endpoint to relay it to,"
            " such as 'vsock://3:22' or 'tcp://127.0.0.1:22'"
        )
    return target


def _stdin_at_eof_if_closed() -> None:
    """Put /dev/null on a closed stdin (`<&-`), before anything else could take descriptor 0.

    A closed stdin then reads as EOF, which is passed on as a half-close; left closed, the
    first file trio opens would become descriptor 0 and be read as stdin.
    """
    try:
        os.fstat(0)
    except OSError:
        null = os.open(os.devnull, os.O_RDONLY)
        if null != 0:  # pragma: no cover - the lowest free descriptor is 0, being closed
            os.dup2(null, 0)
            os.close(null)
    try:
        os.fstat(1)
    except OSError:
        raise UserError("connect: stdout is closed; expected somewhere to write what ENDPOINT sends") from None


def _interrupted(exc: BaseException) -> bool:
    if isinstance(exc, KeyboardInterrupt):
        return True
    return isinstance(exc, BaseExceptionGroup) and exc.split(KeyboardInterrupt)[0] is not None


async def _connect_stdio(target: Address, options: RouteOptions, *, fdpass: bool = False) -> str | None:
    """_relay_stdio() until it ends or SIGINT comes: then it is cancelled (closing both streams) and
    KeyboardInterrupt raised. Taking SIGINT as a signal, not as trio's KeyboardInterrupt raised
    wherever the code happens to be, keeps it out of half-built objects (such as a stdio stream).
    """
    result: list[str | None] = []
    with trio.open_signal_receiver(signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def relay_then_stop() -> None:
                result.append(await _relay_stdio(target, options, fdpass=fdpass))
                nursery.cancel_scope.cancel()

            nursery.start_soon(relay_then_stop)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                raise KeyboardInterrupt
    return result[0]


async def _relay_stdio(target: Address, options: RouteOptions, *, fdpass: bool) -> str | None:
    """Connect, relay stdin/stdout (or pass the socket to ssh), and say what failed (None: all went well)."""
    backend = await _open_target(target, options)
    channel = sshconfig.stdout_socket() if fdpass and sshconfig.fdpass_supported() else None
    sock = getattr(backend, "socket", None)
    if channel is not None and sock is not None:
        with channel:
            sshconfig.pass_fd(channel, sock.fileno())
        await trio.aclose_forcefully(backend)  # ssh holds its own copy now
        return None
    stdio = _StdioSides(transports.stdio.open_stdio_stream())
    result = await relay(stdio, backend, half_close=True)
    event(
        logging.DEBUG,
        "connection closed",
        target=str(target),
        bytes_in=result.client_to_backend,
        bytes_out=result.backend_to_client,
        reason=result.reason,
    )
    if result.end is EndReason.CLOSED:
        return None
    if result.end is EndReason.RESET_BY_BACKEND:
        return f"the backend {target} reset the connection"
    if result.end is EndReason.BACKEND_ERROR:
        return f"the backend {target} failed ({result.detail})"
    return stdio.failed or result.reason  # the client side: stdin or stdout


async def _open_target(target: Address, options: RouteOptions) -> base.Stream:
    """connect_with_retries(), whose timeout speaks of this command's --connect-timeout."""
    try:
        return await connect_with_retries(target, options, Backend().connect, name="connect")
    except EndpointError as exc:
        if exc.message.startswith("timed out after "):
            raise EndpointError(exc.address, exc.op, f"{exc.message} (--connect-timeout)") from None
        raise


@final
class _StdioSides(trio.abc.HalfCloseableStream):
    """stdin/stdout as one stream, remembering which of the two failed first (for the message)."""

    def __init__(self, stream: trio.abc.HalfCloseableStream) -> None:
        self.stream = stream
        self.failed: str | None = None

    def _note(self, side: str, exc: BaseException) -> None:
        if self.failed is None:
            cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc
            closed = isinstance(exc, trio.BrokenResourceError) or (
                isinstance(cause, OSError) and cause.errno in (errno.EPIPE, errno.ECONNRESET)
            )
            why = cause.strerror if isinstance(cause, OSError) and cause.strerror else type(exc).__name__
            self.failed = f"{side} closed" if closed else f"{side} failed ({why})"

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Write to stdout."""
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, OSError) as exc:
            self._note("stdout", exc)
            raise

    async def wait_send_all_might_not_block(self) -> None:
        """Wait until stdout may take more."""
        await self.stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        """Close stdout: its reader sees EOF."""
        try:
            await self.stream.send_eof()
        except (trio.BrokenResourceError, OSError) as exc:
            self._note("stdout", exc)
            raise

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        """Read from stdin."""
        try:
            return await self.stream.receive_some(max_bytes)
        except (trio.BrokenResourceError, OSError) as exc:
            self._note("stdin", exc)
            raise

    async def aclose(self) -> None:
        """Close both."""
        await self.stream.aclose()


@main.command(name="ssh-config", short_help="Print an ssh_config block so that `ssh vsock/3` just works.")
@click.option(
    "--fdpass/--no-fdpass",
    default=None,
    help="ProxyUseFdpass: no hvbridge process stays per session (default: on Linux).",
)
def ssh_config(fdpass: bool | None) -> None:
    """Print an ssh_config block so that `ssh vsock/3`, `ssh unix/PATH`, ... just work."""
    use_fdpass = sshconfig.fdpass_supported() if fdpass is None else fdpass
    click.echo(sshconfig.render(sshconfig.hvbridge_command(), fdpass=use_fdpass), nl=False)


def _serve(
    table: RouteTable,
    verbose: int,
    quiet: int,
    log_format: LogFormat | None,
    *,
    config_path: str | None = None,
    load: Callable[[], RouteTable] | None = None,
    watch: bool = False,
    workers: int = 1,
) -> None:
    """Run the daemon (run_daemon): signals, reload, drain, metrics, systemd, workers."""
    if workers > 1 and os.name != "posix":
        raise click.UsageError("--workers needs a POSIX system (the workers inherit the listening sockets)")
    from_file = config_path is not None and config_path != "-"
    if watch and not from_file:
        raise click.UsageError("--watch needs a route table file (not stdin)")
    run_daemon(
        table,
        load=load if from_file else None,
        watch=config_path if watch else None,
        workers=workers,
        log_level=_log_level(verbose, quiet, "") or None,
        log_format=log_format,
    )


def run_daemon(
    table: RouteTable,
    *,
    load: Callable[[], RouteTable] | None = None,
    watch: str | None = None,
    workers: int = 1,
    log_level: str | None = None,
    log_format: Literal["text", "json"] | None = None,
) -> None:
    """Run the daemon in this process until it is stopped: the `run` and `forward` commands.

    The composition root: picks the engine (this process, or --workers processes).

    Sets up logging, takes socket-activated sockets ($LISTEN_FDS), and runs serve() with
    `workers` processes (1: this process relays).

    Args:
        table: The route table to start with.
        load: Re-reads the table (SIGHUP, --watch); None when it did not come from a file.
        watch: The file to poll for changes (--watch), or None.
        workers: Processes that relay (--workers).
        log_level: A -v/-q override of [bridge] log_level.
        log_format: A --log-format override of [bridge] log_format.

    Raises:
        HvbridgeError: The table cannot run here (family missing, listener cannot be opened).
    """
    # Taken before anything else, so that an edit made while starting up is seen.
    since = file_signature(watch) if watch is not None else None
    level = log_level or table.bridge.log_level
    fmt = log_format or table.bridge.log_format
    if workers > 1 and table.bridge.log_file is not None:
        raise ConfigError.single(
            table.source,
            "bridge.log_file",
            "cannot be used with --workers (the worker processes log to stderr); remove one of them",
        )
    try:
        setup_logging(level, fmt, table.bridge.log_file)
    except OSError as exc:
        raise ConfigError([log_file_problem(table, exc)]) from exc
    check_families(table)
    backend = Backend()
    engine: Callable[[], contextlib.AbstractAsyncContextManager[Engine]] = functools.partial(open_local_engine, backend)
    if workers > 1:
        engine = functools.partial(open_worker_engine, workers, level, fmt)
    pool = ListenerPool(inherit(listen_fds()), backend.open_listeners, respell=workers <= 1)
    trio.run(
        functools.partial(
            serve,
            table,
            backend=backend,
            engine=engine,
            pool=pool,
            load=load,
            watch=watch,
            watch_since=since,
            log_level=log_level,
            log_format=log_format,
        )
    )


@main.command(short_help="Ask a running daemon whether every route listens.")
@_config
@_format
@_verbose
@_quiet
@_log_format
@user_errors
def probe(
    config_path: str, config_format: Format | None, verbose: int, quiet: int, log_format: LogFormat | None
) -> None:
    """Ask a running daemon's metrics endpoint whether every route listens; exit 0 if so, else 1.

    For container HEALTHCHECKs and monitoring: it needs `[bridge] metrics` in the table.
    """
    table = load_config(config_path, config_format)
    setup_logging(_log_level(verbose, quiet, "warning"), log_format or "text")
    if table.bridge.metrics is None:
        raise UserError(f"{table.source}: bridge.metrics is not set; `probe` asks the metrics endpoint")
    if isinstance(table.bridge.metrics, TcpAddress | VsockAddress) and table.bridge.metrics.port == 0:
        raise UserError(f"{table.source}: bridge.metrics has port 0; `probe` needs a fixed port to ask")
    problems = trio.run(metrics.probe, table.bridge.metrics, [route.name for route in table.routes], Backend().connect)
    if problems:
        raise UserError("\n".join(problems))
    click.echo(f"healthy: {len(table.routes)} route(s) listening")


main.add_command(hyperv_group)

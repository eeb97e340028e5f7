"""The `hvbridge` command line (docs/reference.md, "Command line"): run, check, forward, connect, hyperv.

This module owns argument parsing and exit codes; service.py runs the daemon (signals, reload,
shutdown, workers). Exit status:
0 clean exit; 1 a user error (HvbridgeError), printed as `Error: ...` lines on stderr with no
traceback; 2 bad usage (click). Anything else escaping is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
from typing import TYPE_CHECKING, Literal, ParamSpec, TypeVar

import click
import trio

from hvbridge import __version__, endpoints, hyperv, metrics, service, sshconfig
from hvbridge.addresses import VMADDR_PORT_ANY, VsockAddress
from hvbridge.cli_hyperv import hyperv_group
from hvbridge.config import RouteTable, format_table, load_config, table_from_mapping
from hvbridge.errors import HvbridgeError
from hvbridge.logs import event, setup_logging
from hvbridge.relay import relay
from hvbridge.supervisor import Supervisor

if TYPE_CHECKING:
    from collections.abc import Callable

P = ParamSpec("P")
R = TypeVar("R")
LogFormat = Literal["text", "json"]


class UserError(click.ClickException):
    """An HvbridgeError for the user: one `Error: ...` line per problem, exit status 1."""

    def show(self, file: object = None) -> None:
        """Print each line of the message as its own `Error: ...` line on stderr."""
        for line in self.message.splitlines() or [""]:
            click.echo(f"Error: {line}", err=True)


def _first_user_error(exc: BaseException) -> HvbridgeError | None:
    if isinstance(exc, HvbridgeError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            found = _first_user_error(sub)
            if found is not None:
                return found
    return None


def _user_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn HvbridgeError (also inside exception groups) into exit status 1 with `Error:` lines."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except (HvbridgeError, BaseExceptionGroup) as exc:
            found = _first_user_error(exc)
            if found is None:
                raise
            raise UserError(str(found)) from None

    return wrapper


def _log_level(verbose: int, quiet: int, configured: str) -> str:
    if verbose:
        return "debug"
    if quiet:
        return "warning" if quiet == 1 else "error"
    return configured


class _Main(click.Group):
    """`hvbridge -c FILE` with no command runs the table, as `hvbridge run -c FILE` does."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        """Insert `run` when the arguments start with an option the group itself does not take.

        The group's only options are --help and --version, so `hvbridge -v -c FILE` and
        `hvbridge --config=FILE --watch` mean `hvbridge run ...`.
        """
        if args and args[0].startswith("-") and args[0] not in ("-h", "--help", "--version"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


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


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="hvbridge")
def main() -> None:
    """Relay TCP and Unix sockets to and from VM sockets (AF_VSOCK, Hyper-V sockets).

    \b
    hvbridge -c routes.toml            run every route (same as `hvbridge run -c ...`)
    hvbridge check -c routes.toml      validate and print the resolved table
    hvbridge forward LISTEN CONNECT    one ad-hoc route, no file
    hvbridge connect ENDPOINT          stdin/stdout <-> ENDPOINT (ssh ProxyCommand)
    hvbridge ssh-config                ssh_config block for `ssh vsock/3`, `ssh unix/PATH`
    """


_workers = click.option(
    "--workers",
    type=click.IntRange(1, 1024),
    default=1,
    show_default=True,
    help="Processes that relay, sharing the listening sockets (POSIX).",
)


@main.command()
@_config
@click.option("--watch", is_flag=True, help="Also reload when the file changes (polled every second).")
@_workers
@_verbose
@_quiet
@_log_format
@_user_errors
def run(config_path: str, watch: bool, workers: int, verbose: int, quiet: int, log_format: LogFormat | None) -> None:
    """Run every route of the route table until SIGINT/SIGTERM (Ctrl-C/Ctrl-Break on Windows).

    SIGHUP reloads the file; Windows has no SIGHUP: use --watch there.
    """
    table = load_config(config_path)
    _serve(table, verbose, quiet, log_format, config_path=config_path, watch=watch, workers=workers)


@main.command()
@_config
@_user_errors
def check(config_path: str) -> None:
    """Validate the route table and print it resolved; opens nothing. Exit 0 valid, 1 not."""
    table = load_config(config_path)
    click.echo(format_table(table), nl=False)
    if any(isinstance(a, VsockAddress) for r in table.routes for a in (r.listen, r.connect)) and hasattr(
        socket, "AF_VSOCK"
    ):
        from hvbridge import vsock

        click.echo(f"# {vsock.describe_local_cid()}")
    for route in table.routes:
        for key, address in (("listen", route.listen), ("connect", route.connect)):
            if isinstance(address, VsockAddress) and address.port != VMADDR_PORT_ANY:
                problem = hyperv.hyperv_port_problem(address.port)
                if problem is not None:
                    click.echo(f"warning: routes.{route.name}.{key}: under Hyper-V, {problem}", err=True)
            why = endpoints.unavailable_reason(address)
            if why is not None:
                click.echo(
                    f"warning: routes.{route.name}.{key}: {why}; this route cannot run here",
                    err=True,
                )


@main.command()
@click.argument("listen")
@click.argument("connect_to", metavar="CONNECT")
@click.option("--connect-timeout", default="5s", show_default=True, help="Give up connecting after this long.")
@click.option("--connect-retries", default=0, show_default=True, help="Extra connect attempts, with backoff.")
@click.option(
    "--idle-timeout",
    default="0s",
    show_default=True,
    help="Close connections idle this long (0: never).",
)
@click.option("--max-connections", default=1024, show_default=True, help="Most connections at once.")
@click.option(
    "--half-close/--no-half-close",
    default=True,
    show_default=True,
    help="Pass EOF on one way at a time.",
)
@click.option("--allow", multiple=True, help="Peer allowed to connect (CIDR, cid:N, vm:GUID); repeatable.")
@click.option("--mode", default="0600", show_default=True, help="File mode of a Unix listener.")
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
@_user_errors
def forward(
    listen: str,
    connect_to: str,
    connect_timeout: str,
    connect_retries: int,
    idle_timeout: str,
    max_connections: int,
    half_close: bool,
    allow: tuple[str, ...],
    mode: str,
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
    if listen.startswith(("unix:", "vsock-mux:")):
        route["mode"] = mode
    table = table_from_mapping({"routes": {"forward": route}}, source="<command line>")
    _serve(table, verbose, quiet, log_format, workers=workers)


@main.command(name="connect")
@click.argument("endpoint")
@click.argument("port", required=False)
@click.option(
    "--fdpass",
    is_flag=True,
    help="Hand the connected socket to ssh over stdout and exit (ProxyUseFdpass; Linux, else relays).",
)
@click.option("--connect-timeout", default="5s", show_default=True, help="Give up connecting after this long.")
@click.option("--connect-retries", default=0, show_default=True, help="Extra connect attempts, with backoff.")
@_verbose
@_quiet
@_log_format
@_user_errors
def connect_command(
    endpoint: str,
    port: str | None,
    fdpass: bool,
    connect_timeout: str,
    connect_retries: int,
    verbose: int,
    quiet: int,
    log_format: LogFormat | None,
) -> None:
    """Relay stdin/stdout to ENDPOINT until both ways are done (e.g. as ssh ProxyCommand).

    ENDPOINT PORT is also ssh's `%h %p`: vsock/CID, vsock-mux/PATH, hvsock/VM or unix/PATH.
    """
    endpoint = sshconfig.endpoint_for(endpoint, port)
    table = table_from_mapping(
        {
            "routes": {
                "connect": {
                    "listen": "unix:@hvbridge-connect-unused",
                    "connect": endpoint,
                    "connect_timeout": connect_timeout,
                    "connect_retries": connect_retries,
                }
            }
        },
        source="<command line>",
    )
    # Quiet by default: ssh shows a ProxyCommand's stderr to its user.
    setup_logging(_log_level(verbose, quiet, "warning"), log_format or "text")
    route = table.routes[0]

    async def _connect() -> None:
        async with trio.open_nursery() as nursery:
            supervisor = Supervisor(nursery)
            backend = await supervisor.open_backend(route)
            channel = sshconfig.stdout_socket() if fdpass and sshconfig.fdpass_supported() else None
            sock = getattr(backend, "socket", None)
            if channel is not None and sock is not None:
                with channel:
                    sshconfig.pass_fd(channel, sock.fileno())
                await trio.aclose_forcefully(backend)  # ssh holds its own copy now
                return
            result = await relay(endpoints.open_stdio_stream(), backend, half_close=True)
            event(
                logging.DEBUG,
                "connection closed",
                target=str(route.connect),
                bytes_in=result.client_to_backend,
                bytes_out=result.backend_to_client,
                reason=result.reason,
            )

    trio.run(_connect)


@main.command(name="ssh-config")
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
    watch: bool = False,
    workers: int = 1,
) -> None:
    """Run the daemon (service.run): signals, reload, drain, metrics, systemd, workers."""
    if workers > 1 and os.name != "posix":
        raise click.UsageError("--workers needs a POSIX system (the workers inherit the listening sockets)")
    from_file = config_path is not None and config_path != "-"
    if watch and not from_file:
        raise click.UsageError("--watch needs a route table file (not stdin)")
    service.run(
        table,
        load=functools.partial(load_config, config_path) if from_file and config_path else None,
        watch=config_path if watch else None,
        workers=workers,
        log_level=_log_level(verbose, quiet, "") or None,
        log_format=log_format,
    )


@main.command()
@_config
@_user_errors
def probe(config_path: str) -> None:
    """Ask a running daemon's metrics endpoint whether every route listens; exit 0 if so, else 1.

    For container HEALTHCHECKs and monitoring: it needs `[bridge] metrics` in the table.
    """
    table = load_config(config_path)
    if table.bridge.metrics is None:
        raise UserError(f"{table.source}: bridge.metrics is not set; `probe` asks the metrics endpoint")
    if str(table.bridge.metrics).endswith(":0"):
        raise UserError(f"{table.source}: bridge.metrics has port 0; `probe` needs a fixed port to ask")
    problems = trio.run(metrics.probe, table.bridge.metrics, [route.name for route in table.routes])
    if problems:
        raise UserError("\n".join(problems))
    click.echo(f"healthy: {len(table.routes)} route(s) listening")


main.add_command(hyperv_group)

"""How the command line reports a user's mistake: `Error: ...` lines on stderr and exit status 1.

Shared by every command (cli.py and cli_hyperv.py), so that every HvbridgeError, also one inside an
exception group from a trio nursery, reads the same way and never shows a traceback
(docs/reference.md, "Exit status").
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, ParamSpec, TypeVar

import click

from hvbridge.errors import HvbridgeError

if TYPE_CHECKING:
    from collections.abc import Callable

P = ParamSpec("P")
R = TypeVar("R")


class UserError(click.ClickException):
    """An HvbridgeError for the user: one `Error: ...` line per problem, exit status 1."""

    def show(self, file: object = None) -> None:
        """Print each line of the message as its own `Error: ...` line on stderr."""
        for line in self.message.splitlines() or [""]:
            click.echo(f"Error: {line}", err=True)


def first_user_error(exc: BaseException) -> HvbridgeError | None:
    if isinstance(exc, HvbridgeError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            found = first_user_error(sub)
            if found is not None:
                return found
    return None


def user_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn HvbridgeError (also inside exception groups) into exit status 1 with `Error:` lines."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except (HvbridgeError, BaseExceptionGroup) as exc:
            found = first_user_error(exc)
            if found is None:
                raise
            raise UserError(str(found)) from None

    return wrapper

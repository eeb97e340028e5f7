"""The HvbridgeError tree: every error a user can cause, and nothing else.

This module owns the exception types and how they print. A message names the thing and the
place, says what was expected, and what to do next. The CLI turns any HvbridgeError into one
`Error: ...` line and exit status 1; anything else escaping is a bug and keeps its traceback.
"""

from __future__ import annotations

import attrs


class HvbridgeError(Exception):
    """Base of every error that hvbridge reports to its user without a traceback."""


@attrs.frozen
class Problem:
    """One mistake in a route table: where it is and what is wrong.

    Attributes:
        source: The file name (or `<stdin>`, `<command line>`).
        line: 1-based line number where the format gives one, else None.
        location: Dotted key path, e.g. `routes.ssh.connect_timeout`.
        message: What is wrong; what is expected.
    """

    source: str
    line: int | None
    location: str
    message: str

    def __str__(self) -> str:
        where = self.source if self.line is None else f"{self.source}:{self.line}"
        if self.location:
            return f"{where}: {self.location}: {self.message}"
        return f"{where}: {self.message}"


class AddressError(HvbridgeError, ValueError):
    """An endpoint's text form is invalid (the message says why and what is expected)."""


class ConfigError(HvbridgeError):
    """A route table has one or more problems; all of them are listed, one per line."""

    def __init__(self, problems: list[Problem] | tuple[Problem, ...]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))

    @classmethod
    def single(cls, source: str, location: str, message: str, line: int | None = None) -> ConfigError:
        """A ConfigError with one problem."""
        return cls([Problem(source, line, location, message)])


class EndpointError(HvbridgeError):
    """Opening, binding or connecting an endpoint failed.

    Args:
        address: The endpoint's text form, as logs print it.
        op: What was being done: "listen" or "connect".
        message: What went wrong and what to do about it.
    """

    def __init__(self, address: str, op: str, message: str) -> None:
        self.address = address
        self.op = op
        self.message = message
        super().__init__(f"{op} {address}: {message}")


class AddressFamilyUnavailable(EndpointError):
    """This OS or Python cannot use the endpoint's family (AF_VSOCK off Linux, AF_HYPERV off Windows)."""


class BackendUnavailable(EndpointError):
    """The connect target refused, reset, timed out or does not exist (worth retrying)."""

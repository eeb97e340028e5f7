"""`python -m hvbridge` runs the command line."""

from __future__ import annotations

from hvbridge.cli import main

main()

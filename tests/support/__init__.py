"""Helpers the test suites share (tests/ is on sys.path: `from support.processes import ...`).

- settle: settled(), for unit tests that relay through the splice reactor thread.
- processes: running the real hvbridge as a child (its command line, bounded runs, its output
  read line by line), for the integration and fault suites and scripts/soak.py; it imports
  neither pytest nor hvbridge.

Helpers that one suite alone uses stay next to it (tests/integration/support.py,
tests/faults/harness.py).
"""

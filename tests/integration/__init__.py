"""Integration tests: the real `hvbridge` process on loopback, with real clients."""

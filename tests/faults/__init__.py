"""Fault injection: the real `hvbridge` process against misbehaving peers.

What they hold hvbridge to: docs/reference.md, "Who may connect" and "Relay semantics".
"""

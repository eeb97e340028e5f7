"""Fault injection: the real `hvbridge` process against misbehaving peers (docs/reference.md, "Who may connect" and "Relay semantics")."""

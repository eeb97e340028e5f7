"""Fault injection: the real `hvbridge` process against misbehaving peers (issue 6, SPEC 3.2, 4)."""

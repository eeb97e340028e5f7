"""docs/reference.md against the code: every section the code cites exists, every key is documented.

The code and tests cite the reference page by section name (`docs/reference.md, "Relay
semantics"`), so a renamed heading must fail here rather than leave a dangling citation. The
repository stands alone: nothing in it points outside it.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import attrs
import pytest

from hvbridge.config import ROUTE_KEYS
from hvbridge.routes import BridgeSettings

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "docs" / "reference.md"
CITATION = re.compile(r'docs/reference\.md,?\s*(?:#\s*)?"([^"]+)"(?:\s*(?:#\s*)?and\s*"([^"]+)")?')


def _tracked_text_files() -> list[Path]:
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    paths = [ROOT / name for name in listed.stdout.split("\0") if name]
    return [p for p in paths if p.is_file() and p.suffix not in {".png", ".gz"}]


def _headings() -> set[str]:
    return {line.lstrip("#").strip() for line in REFERENCE.read_text().splitlines() if line.startswith("#")}


def test_every_cited_section_of_the_reference_exists() -> None:
    headings = _headings()
    cited: dict[str, str] = {}
    for path in _tracked_text_files():
        text = path.read_text(errors="replace")
        for match in CITATION.finditer(text):
            for name in match.groups():
                if name:  # a citation may wrap onto the next (comment) line
                    cited.setdefault(re.sub(r"\s*\n\s*#?\s*", " ", name), str(path.relative_to(ROOT)))
    assert len(cited) >= 5, cited  # the code does cite it
    missing = {name: where for name, where in cited.items() if name not in headings}
    assert missing == {}


def test_the_reference_documents_every_key() -> None:
    text = REFERENCE.read_text()
    keys = set(ROUTE_KEYS) | {field.name for field in attrs.fields(BridgeSettings)}
    assert {key for key in keys if f"`{key}`" not in text} == set()


def test_nothing_points_outside_the_repository() -> None:
    # Spelled in pieces, so that a grep of the repository for these words finds nothing, this file included.
    shared, spec = "shared", "SP" + "EC"
    outside = re.compile(rf"\.\./{shared}|{shared}/tools|{spec}\.md|{spec} [0-9]|\b[Ii]ssue #?[0-9]+")
    found = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in _tracked_text_files()
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
        if outside.search(line)
    ]
    assert found == []

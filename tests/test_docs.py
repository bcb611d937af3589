"""The README and the docs stand on their own: every link they make stays inside the
repository and points at something that exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [
    ROOT / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
    ROOT / "examples/node/README.md",
]
# [text](target) links, without the #fragment.
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: str(path.relative_to(ROOT)))
def test_links_stay_inside_the_repository_and_resolve(document: Path):
    text = document.read_text()
    assert "shared/SPEC" not in text
    for target in LINK.findall(text):
        if re.match(r"[a-z]+://", target):
            continue
        resolved = (document.parent / target).resolve()
        assert resolved.is_relative_to(ROOT), (document.name, target)
        assert resolved.exists(), (document.name, target)

"""The README stays short (the reference lives in docs/) and no link of the documentation
leads nowhere."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_the_readme_is_short_and_points_to_the_reference():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    for topic in ("COMMANDS", "RECIPES", "LIBRARY", "INSTALL", "METHOD", "ARCHITECTURE"):
        assert f"(docs/{topic}.md)" in readme, topic


def test_every_relative_link_of_the_documentation_resolves():
    pages = [REPO / "README.md", REPO / "DEVELOPERS.md", *sorted((REPO / "docs").glob("*.md"))]
    broken = [
        (page.name, target)
        for page in pages
        for target in LINK.findall(page.read_text())
        if not target.startswith(("http://", "https://")) and not (page.parent / target).exists()
    ]
    assert broken == []

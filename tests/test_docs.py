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


IMPORT = re.compile(r"^from (s2ft_cli[\w.]*) import ([\w, ]+)$", re.M)
MODULE = re.compile(r"`(s2ft_cli(?:\.\w+)+)(?:\([^`]*\))?`")


def test_every_import_and_module_path_the_documentation_names_exists():
    """The snippets' ``from s2ft_cli... import ...`` lines and the dotted names in
    backticks (``s2ft_cli.training.trainer.Trainer``) name what the package holds."""
    import importlib

    def exists(dotted: str) -> bool:
        parts = dotted.split(".")
        for cut in range(len(parts), 0, -1):
            try:
                value = importlib.import_module(".".join(parts[:cut]))
            except ModuleNotFoundError:
                continue
            for name in parts[cut:]:
                value = getattr(value, name, None)
            return value is not None
        return False

    pages = [REPO / "README.md", REPO / "DEVELOPERS.md", *sorted((REPO / "docs").glob("*.md"))]
    named = {
        f"{module}.{name.strip()}"
        for page in pages
        for module, names in IMPORT.findall(page.read_text())
        for name in names.split(",")
    }
    named |= {path for page in pages for path in MODULE.findall(page.read_text())}
    assert sorted(n for n in named if not exists(n)) == []

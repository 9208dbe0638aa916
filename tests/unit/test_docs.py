"""README is a newcomer's page whose links all lead somewhere; the depth is a MkDocs site that builds strictly."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
LINK = re.compile(r"\]\(([^)\s]+)\)")


def slugs(markdown: str) -> set[str]:
    """The anchors of a page's headings, as GitHub and MkDocs both make them for plain words."""
    headings = re.findall(r"^#{1,6} (.+)$", re.sub(r"```.*?```", "", markdown, flags=re.S), re.M)
    return {re.sub(r"[-\s]+", "-", re.sub(r"[^\w\s-]", "", h).strip().lower()) for h in headings}


def test_readme_is_what_a_newcomer_needs() -> None:
    """A short README with the newcomer's sections, and the depth in docs/ behind links."""
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 400
    sections = re.findall(r"^## (.+)$", re.sub(r"```.*?```", "", text, flags=re.S), re.M)
    for needed in (
        "Try it: two commands",
        "Use it with your Ollama",
        "Several hosts",
        "Command line",
        "The live page",
        "Configuration",
    ):
        assert needed in sections, f"README has no '{needed}' section"
    for page in ("scheduling.md", "reliability.md", "performance.md", "how-it-works.md"):
        assert f"](docs/{page}" in text


def test_every_relative_link_in_readme_leads_somewhere() -> None:
    """Each relative link of README names a file that exists, and an anchor its page has."""
    text = README.read_text(encoding="utf-8")
    broken = []
    for target in LINK.findall(text):
        if "://" in target:
            continue
        path, _, anchor = target.partition("#")
        page = ROOT / path if path else README
        if not page.exists() or (
            anchor and page.suffix == ".md" and anchor not in slugs(page.read_text(encoding="utf-8"))
        ):
            broken.append(target)
    assert broken == []


@pytest.mark.skipif(
    shutil.which("mkdocs", path=str(Path(sys.executable).parent)) is None, reason="pip install '.[docs]'"
)
def test_the_docs_site_builds_with_no_broken_link_or_anchor(tmp_path: Path) -> None:
    """`mkdocs build --strict`, as CI runs it: a link or an anchor that leads nowhere fails it."""
    mkdocs = Path(sys.executable).parent / "mkdocs"
    built = subprocess.run(
        [str(mkdocs), "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "NO_MKDOCS_2_WARNING": "1"},
        check=False,
    )
    assert built.returncode == 0, built.stderr
    assert (tmp_path / "site" / "scheduling" / "index.html").exists()

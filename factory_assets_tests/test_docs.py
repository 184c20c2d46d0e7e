"""The docs site builds with `mkdocs build --strict` (a broken link, anchor or picture fails it), offline,
and the built pages load nothing from another host; the README's own links and pictures exist."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("mkdocs", reason="mkdocs is absent (pip install '.[test]')")
pytest.importorskip("material", reason="mkdocs-material is absent (pip install '.[test]')")


def build(config: Path, site: Path) -> subprocess.CompletedProcess:
    # Material announces its successor on every build; the notice is not part of the result
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config),
                           "--site-dir", str(site)], cwd=config.parent, env=env, capture_output=True,
                          text=True, timeout=180)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    result = build(ROOT / "mkdocs.yml", out)
    assert result.returncode == 0, result.stdout + result.stderr
    return out


class _Assets(HTMLParser):
    """Every address a page loads by itself: scripts, stylesheets, fonts, pictures, frames."""

    def __init__(self):
        super().__init__()
        self.loaded: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag in ("script", "img", "iframe", "source", "audio", "video", "embed") and a.get("src"):
            self.loaded.append(a["src"])
        if tag == "link" and a.get("href") and set((a.get("rel") or "").split()) & {
                "stylesheet", "preconnect", "preload", "prefetch", "dns-prefetch", "icon", "modulepreload"}:
            self.loaded.append(a["href"])


def _remote(address: str) -> bool:
    return urlparse(address).scheme in ("http", "https") or address.startswith("//")


def test_the_docs_site_builds_in_strict_mode_with_every_page_of_its_nav(site):
    for page in ("operations", "architecture", "api-usage", "aws", "benchmarks", "evaluations"):
        assert (site / page / "index.html").is_file(), page
    index = (site / "index.html").read_text()
    for picture in ("images/twin-page.png", "images/dagster-graph.png"):
        assert picture in index
        assert (site / picture).stat().st_size > 10_000, f"{picture} is not a real screenshot"


def test_the_built_site_loads_no_script_style_font_or_picture_from_another_host(site):
    remote = []
    for page in sorted(site.rglob("*.html")):
        parser = _Assets()
        parser.feed(page.read_text())
        remote += [f"{page.relative_to(site)}: {a}" for a in parser.loaded if _remote(a)]
    for sheet in sorted(site.rglob("*.css")):
        for url in re.findall(r"url\(\s*['\"]?([^'\")]+)", sheet.read_text()):
            if _remote(url):
                remote.append(f"{sheet.relative_to(site)}: {url}")
    assert not remote, "\n".join(remote)
    html = "\n".join(p.read_text() for p in site.rglob("*.html"))
    assert "fonts.googleapis.com" not in html and "fonts.gstatic.com" not in html


def _copy_docs(to: Path) -> Path:
    shutil.copy(ROOT / "mkdocs.yml", to / "mkdocs.yml")
    shutil.copytree(ROOT / "docs", to / "docs")
    return to / "mkdocs.yml"


@pytest.mark.parametrize("broken, named", [
    ("[the old page](no-such-page.md)", "no-such-page.md"),
    ("[a heading that is gone](architecture.md#no-such-heading)", "no-such-heading"),
    ("![a picture that is gone](images/no-such-picture.png)", "no-such-picture.png"),
], ids=["page", "anchor", "picture"])
def test_a_broken_link_in_the_docs_fails_the_build_and_is_named(tmp_path, broken, named):
    config = _copy_docs(tmp_path)
    page = tmp_path / "docs" / "operations.md"
    page.write_text(page.read_text() + f"\n\nSee {broken}.\n")
    result = build(config, tmp_path / "site")
    assert result.returncode != 0
    assert named in result.stdout + result.stderr


def test_a_docs_page_left_out_of_the_nav_fails_the_build(tmp_path):
    config = _copy_docs(tmp_path)
    (tmp_path / "docs" / "orphan.md").write_text("# An orphan\n\nNo page links here and the nav omits it.\n")
    result = build(config, tmp_path / "site")
    assert result.returncode != 0
    assert "orphan.md" in result.stdout + result.stderr


def test_every_relative_link_and_picture_of_the_readme_exists():
    readme = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", readme)
    targets += re.findall(r"<img[^>]+src=\"([^\"]+)\"", readme)
    assert targets, "the README links to nothing"
    missing = []
    for target in targets:
        if _remote(target) or target.startswith(("#", "mailto:")):
            continue
        path = unquote(target.split("#", 1)[0])
        if path and not (ROOT / path).exists():
            missing.append(target)
    assert not missing, f"README.md links to files that do not exist: {missing}"


def test_the_readme_shows_no_picture_from_another_host():
    readme = (ROOT / "README.md").read_text()
    pictures = re.findall(r"!\[[^\]]*\]\(([^)\s]+)", readme) + re.findall(r"<img[^>]+src=\"([^\"]+)\"", readme)
    assert pictures and not [p for p in pictures if _remote(p)]

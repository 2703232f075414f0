"""The documentation site builds in strict mode and documents every exported distiller from its docstring."""

from __future__ import annotations

import html
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

import lightningkd.distillers as distillers

pytest.importorskip("mkdocs", reason="the docs build needs mkdocs: pip install -e '.[docs]'")
pytest.importorskip("mkdocstrings_handlers.python", reason="the docs build needs mkdocstrings-python")

ROOT = Path(__file__).resolve().parents[1]
BASE_NAMES = {"Distiller", "OUTPUT", "Features", "sum_terms"}


def distiller_pages() -> dict[type, str]:
    """Each distiller class exported by ``lightningkd.distillers`` -> its page, named after its module.

    Aliases (``CWD``, ``SKD``) are the same class objects as the names they stand for, so they map to that
    class's page; CIRKDMiniBatch and CIRKDMemory share ``cirkd``.
    """
    pages = {}
    for name in distillers.__all__:
        if name in BASE_NAMES:
            continue
        cls = getattr(distillers, name)
        assert inspect.isclass(cls) and issubclass(cls, distillers.Distiller), name
        pages[cls] = cls.__module__.rsplit(".", 1)[-1]
    return pages


def page_text(page: Path) -> str:
    """The visible text of a built page: tags removed, entities decoded, whitespace collapsed."""
    text = html.unescape(re.sub(r"<[^>]+>", "", page.read_text(encoding="utf-8")))
    return " ".join(text.split())


def docstring_first_line(cls: type) -> str:
    """The docstring's first line as rendered: RST inline code (double backquotes) loses its markers."""
    first = inspect.cleandoc(cls.__doc__ or "").splitlines()[0]
    return " ".join(first.replace("``", "").split())


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("docs") / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", "docs/mkdocs.yml", "-d", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode != 0:
        print(result.stderr)
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stderr}"
    return out


def test_site_builds_strict(site: Path) -> None:
    assert (site / "index.html").is_file()


@pytest.mark.parametrize("cls", sorted(distiller_pages(), key=lambda c: c.__name__), ids=lambda c: c.__name__)
def test_every_distiller_has_a_page_rendered_from_its_docstring(site: Path, cls: type) -> None:
    page = site / "distillers" / distiller_pages()[cls] / "index.html"
    assert page.is_file(), f"no page for {cls.__name__}: add docs/site/distillers/{page.parent.name}.md"
    text = page_text(page)
    assert docstring_first_line(cls) in text, f"{page} does not show the docstring of {cls.__name__}"
    assert "Measured here" in text


def test_readme_commands_are_on_the_home_page() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Two commands for a fresh machine", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)```", section, re.S)[:2]
    home = (ROOT / "docs" / "site" / "index.md").read_text(encoding="utf-8")
    assert len(commands) == 2
    for command in commands:
        assert command in home, f"docs/site/index.md lacks the README command {command.strip()!r}"

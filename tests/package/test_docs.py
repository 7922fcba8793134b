"""The README's first screen stays true, and its links and the documentation's navigation point at real pages.

The documentation itself is built by ``.ci/run`` with ``mkdocs build --strict`` (broken links, anchors and pages left
out of the navigation fail there); these checks need no mkdocs.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def test_readme_links_point_at_files() -> None:
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README)
    assert links
    for link in links:
        assert (ROOT / link).is_file(), f"README links to {link}, which does not exist"


def test_the_first_screen_commands_are_valid() -> None:
    """The two commands (embedded run, tests) install extras that exist and name methods that are registered."""
    from clbench.methods import list_methods

    blocks = re.findall(r"```bash\n(.+?)\n```", README, re.S)
    assert len(blocks) == 2
    run, tests = blocks
    assert run.startswith("python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/clbench run --methods ")
    methods = re.search(r"--methods (\S+)", run).group(1).split(",")
    assert set(methods) <= set(list_methods())
    extras = re.search(r"-e '\.\[(\w+)\]'", tests).group(1)
    assert f"\n{extras} = [" in (ROOT / "pyproject.toml").read_text()
    assert "pytest -q --benchmark-disable" in tests


def test_the_navigation_lists_existing_pages() -> None:
    nav = re.findall(r":\s+(\S+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), re.M)
    assert "index.md" in nav and "architecture.md" in nav
    for page in nav:
        assert (ROOT / "docs" / page).is_file(), page

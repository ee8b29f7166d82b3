"""The README stays a front door: short, the two set-up commands first, every link and file real.

The details live on the documentation site (docs/, tests/test_docs.py builds it); the config
reference is generated there from the code, so it cannot go stale.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def test_readme_starts_with_the_two_setup_commands():
    first_block = re.search(r"```bash\n(.*?)```", README, re.S).group(1)
    assert first_block.splitlines()[0].startswith("make demo")
    assert first_block.splitlines()[1].startswith("make test")


def test_readme_is_a_front_door_not_a_manual():
    words = len(re.sub(r"```.*?```", "", README, flags=re.S).split())
    assert words <= 1500, f"README.md has {words} words of prose: move detail to a docs/ page"


def test_readme_links_point_at_files_of_the_repository():
    for target in re.findall(r"\]\(([^)#]+?)(?:#[^)]*)?\)", README):
        if "://" not in target:
            assert (ROOT / target).exists(), target


def test_files_named_in_the_readme_and_docs_exist():
    for page in PAGES:
        text = page.read_text()
        for path in set(re.findall(r"\b((?:configs|examples|benchmarks|scripts)/[\w./-]+\.(?:yaml|jsonl|py|md|sh))", text)):
            assert (ROOT / path).exists(), f"{page.relative_to(ROOT)} names {path}"

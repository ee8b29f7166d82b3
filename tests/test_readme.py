"""The README stays true: its config reference is the current one, its commands name real files."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_config_reference_is_current():
    res = subprocess.run([sys.executable, "scripts/update_readme.py", "--check"], cwd=ROOT)
    assert res.returncode == 0, "README.md's config reference is stale: run `make readme`"


def test_readme_starts_with_the_two_setup_commands():
    text = (ROOT / "README.md").read_text()
    first_block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    assert first_block.splitlines()[0].startswith("make demo")
    assert first_block.splitlines()[1].startswith("make test")


def test_files_named_in_the_readme_exist():
    text = (ROOT / "README.md").read_text()
    for path in set(re.findall(r"\b((?:configs|examples|benchmarks|scripts)/[\w./-]+\.(?:yaml|jsonl|py|md))", text)):
        assert (ROOT / path).exists(), path

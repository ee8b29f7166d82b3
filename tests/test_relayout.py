"""scripts/relayout.py, which moved the flat modules into the subpackages: its rewrite sends every
old path to the module that defines the name now, leaves new paths alone (a second pass changes
nothing), and the tree names no old path."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def relayout():
    spec = importlib.util.spec_from_file_location("relayout", ROOT / "scripts" / "relayout.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


OLD = '''from hpd.data import build_batch, load_examples, EpochSampler
from hpd.trainer import train, load_models
import hpd.teacher_cache as tc
from hpd.models import (
    lm_head_of,
    load_model,
)
def f(monkeypatch):
    from hpd.teachers import TeacherSource
    monkeypatch.setattr("hpd.trainer.objective_from_config", None)
    monkeypatch.setattr(hpd.models.loading, "final_hidden_states", None)
code = "import torch\\nfrom hpd.models import save_student_from_teacher\\n"
See `hpd/teachers.py`, `hpd.regimes.response_source` and `hpd.data` (the package).
    >>> from hpd.data import encode_example
'''

NEW = '''from hpd.data.collate import build_batch
from hpd.data.rows import load_examples
from hpd.data.order import EpochSampler
from hpd.training.trainer import train
from hpd.training.setup import load_models
import hpd.teachers.cache as tc
from hpd.models.head import lm_head_of
from hpd.models.loading import load_model
def f(monkeypatch):
    from hpd.teachers.sources import TeacherSource
    monkeypatch.setattr("hpd.training.setup.objective_from_config", None)
    monkeypatch.setattr(hpd.models.head, "final_hidden_states", None)
code = "import torch\\nfrom hpd.models.from_teacher import save_student_from_teacher\\n"
See `hpd/teachers/sources.py`, `hpd.responses.regimes.response_source` and `hpd.data` (the package).
    >>> from hpd.data.encode import encode_example
'''


def test_old_paths_go_to_the_module_that_defines_each_name(relayout):
    mapping = relayout.Mapping()
    new, warnings = relayout.rewrite_text(OLD, mapping)
    assert new == NEW and warnings == []


def test_a_second_pass_changes_nothing(relayout):
    mapping = relayout.Mapping()
    assert relayout.rewrite_text(NEW, mapping) == (NEW, [])


def test_from_hpd_import_of_a_moved_module_is_reported(relayout):
    text = "from hpd import trainer\n"
    assert relayout.rewrite_text(text, relayout.Mapping())[1] != []


def test_the_tree_names_no_old_path(relayout):
    assert relayout.rewrite_all(check=True) == []

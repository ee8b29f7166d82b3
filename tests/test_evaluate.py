"""Evaluation: Wilson intervals, end-to-end runs on a tiny model, perfect scores for references,
records and the CLI entry point."""

import json
import re

import pytest

import hpd.apps.evaluate as ev
from hpd.errors import HPDError
from hpd.apps.evaluate import EvalResult, eval_cli, evaluate_model, wilson_interval, write_records
from hpd.apps.evaluate import eval_out
from hpd.models.loading import build_tiny_model, save_model
from hpd.apps.tasks import get_task
from hpd.models.tokenizer import byte_tokenizer


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return build_tiny_model(tok, num_layers=1, hidden_size=32, num_heads=4, seed=0)


@pytest.mark.parametrize(
    "correct, n, low, high",
    [
        (0, 10, 0.0, 0.2775),  # Wilson (1927); also Agresti & Coull (1998), table 1
        (5, 10, 0.2366, 0.7634),
        (10, 10, 0.7225, 1.0),
        (41, 200, 0.1549, 0.2663),
    ],
)
def test_wilson_interval_known_values(correct, n, low, high):
    lo, hi = wilson_interval(correct, n)
    assert lo == pytest.approx(low, abs=1e-4)
    assert hi == pytest.approx(high, abs=1e-4)


@pytest.mark.parametrize("correct, n", [(1, 3), (7, 19), (81, 263), (999, 1000)])
def test_wilson_endpoints_solve_the_score_equation(correct, n):
    # By definition the Wilson bounds are the p where |p_hat - p| = z * sqrt(p (1 - p) / n).
    z, p_hat = 1.959963984540054, correct / n
    for p in wilson_interval(correct, n):
        assert abs(p_hat - p) == pytest.approx(z * (p * (1 - p) / n) ** 0.5, abs=1e-12)


def test_wilson_interval_rejects_bad_counts():
    with pytest.raises(HPDError, match="n >= 1"):
        wilson_interval(0, 0)
    with pytest.raises(HPDError, match="0..n"):
        wilson_interval(5, 4)


def test_summary_line_format():
    lo, hi = wilson_interval(41, 200)
    result = EvalResult("math", 200, 41, 0.205, lo, hi)
    assert result.summary() == "math: 41/200 = 20.5% (95% CI 15.5-26.6%)"


@pytest.mark.parametrize("name", ["dialogue", "code", "math"])
def test_evaluate_tiny_model_end_to_end(model, tok, name):
    result = evaluate_model(model, tok, name, n=6, max_new_tokens=10, batch_size=4)
    assert result.task == name and result.n == 6 and len(result.records) == 6
    assert 0.0 <= result.accuracy <= 1.0
    assert result.ci_low <= result.accuracy <= result.ci_high
    assert result.correct == sum(r["correct"] for r in result.records)
    assert set(result.records[0]) == {"prompt", "reference", "completion", "correct"}
    assert all(isinstance(r["completion"], str) for r in result.records)
    # Greedy decoding with the same seed is reproducible.
    again = evaluate_model(model, tok, name, n=6, max_new_tokens=10, batch_size=4)
    assert [r["completion"] for r in again.records] == [r["completion"] for r in result.records]


def _echo_references(monkeypatch, calls):
    """Replace generation with a function that answers every prompt with its reference."""
    refs = {}
    for name in ("math", "code", "dialogue", "math:steps=5"):
        for split in ("test", "train"):
            for item in get_task(name).generate(split, 40, seed=0):
                refs[item.prompt] = item.reference

    def fake_generate_text(model, tokenizer, prompts, **kwargs):
        calls.append(kwargs)
        return [refs[p] for p in prompts]

    monkeypatch.setattr(ev, "generate_text", fake_generate_text)


@pytest.mark.parametrize("name", ["math", "code", "dialogue", "math:steps=5"])
def test_references_score_perfectly(monkeypatch, name):
    calls = []
    _echo_references(monkeypatch, calls)
    result = evaluate_model(None, None, name, n=40, batch_size=7)
    assert result.accuracy == 1.0 and result.correct == 40
    assert result.ci_high == 1.0 and result.ci_low == pytest.approx(wilson_interval(40, 40)[0])
    # The task's own budget and greedy decoding are the defaults.
    assert calls[0]["max_new_tokens"] == get_task(name).max_new_tokens
    assert calls[0]["temperature"] == 0.0 and calls[0]["batch_size"] == 7


def test_wrong_answers_score_zero(monkeypatch):
    def always_wrong(model, tokenizer, prompts, **kwargs):
        return ["Answer: -1"] * len(prompts)

    monkeypatch.setattr(ev, "generate_text", always_wrong)
    result = evaluate_model(None, None, get_task("math"), n=20)
    assert result.correct == 0 and result.ci_low == 0.0 and result.task == "math"


def test_evaluate_rejects_bad_arguments(model, tok):
    with pytest.raises(HPDError, match="n must be"):
        evaluate_model(model, tok, "math", n=0)
    with pytest.raises(HPDError, match="unknown task"):
        evaluate_model(model, tok, "poetry", n=2)


def test_write_records_jsonl(tmp_path):
    records = [{"prompt": "p", "reference": "r", "completion": "c", "correct": False}]
    path = tmp_path / "a" / "eval.jsonl"
    write_records(EvalResult("math", 1, 0, 0.0, 0.0, 0.79, records), path)
    assert [json.loads(line) for line in path.read_text().splitlines()] == records


def test_eval_cli_prints_summary_and_writes_records(tmp_path, tok, model, capsys, monkeypatch):
    model_dir = save_model(model, tok, tmp_path / "student")
    before = sorted(p.name for p in model_dir.iterdir())
    monkeypatch.chdir(tmp_path)
    result = eval_cli(str(model_dir), "dialogue", n=5, max_new_tokens=6, batch_size=8)
    line = capsys.readouterr().out.strip()
    assert re.fullmatch(r"dialogue: \d+/5 = \d+\.\d% \(95% CI \d+\.\d-\d+\.\d%\)", line), line
    # a model outside a run: ./eval/MODEL-TASK.jsonl, and nothing written into the model directory
    rows = (tmp_path / "eval" / "student-dialogue.jsonl").read_text().splitlines()
    assert len(rows) == 5 and result.n == 5
    assert sorted(p.name for p in model_dir.iterdir()) == before
    out = tmp_path / "elsewhere.jsonl"
    eval_cli(str(model_dir), "math:steps=2", n=3, out=str(out), max_new_tokens=4)
    assert len(out.read_text().splitlines()) == 3
    assert capsys.readouterr().out.startswith("math:steps=2: ")


def test_eval_cli_bad_task_fails_before_loading(tmp_path):
    with pytest.raises(HPDError, match="unknown task"):
        eval_cli(str(tmp_path / "missing"), "poetry", n=2)


def test_eval_of_a_run_model_writes_under_the_run_never_into_the_model(tmp_path, tok, model, monkeypatch):
    run = tmp_path / "run"
    final = save_model(model, tok, run / "final")
    (run / "metrics.jsonl").write_text("")
    (run / "config.yaml").write_text("max_steps: 1\n")
    ckpt = save_model(model, tok, run / "checkpoints" / "step-00000004" / "model")
    monkeypatch.chdir(final)  # even from inside the model directory, nothing lands there
    assert eval_out(str(final), "math:steps=2") == run / "eval" / "final-math_steps=2.jsonl"
    assert eval_out(str(ckpt), "code") == run / "eval" / "step-00000004-code.jsonl"
    before = sorted(p.name for p in final.iterdir())
    eval_cli(str(final), "dialogue", n=2, max_new_tokens=2)
    assert len((run / "eval" / "final-dialogue.jsonl").read_text().splitlines()) == 2
    assert sorted(p.name for p in final.iterdir()) == before
    with pytest.raises(HPDError, match="outside the model directory"):
        eval_cli(str(final), "dialogue", n=2, out=str(final / "mine.jsonl"))
    monkeypatch.chdir(tmp_path)
    outside = save_model(model, tok, tmp_path / "models" / "m1")
    monkeypatch.chdir(outside)
    with pytest.raises(HPDError, match="--out"):  # ./eval would be inside the model: refused before loading
        eval_out(str(outside), "dialogue")

"""Verifiers for a user's own data (hpd.apps.verifiers) and `hpd eval --data FILE --verifier SPEC`.

The end-to-end tests run the bundled teacher (1.9M parameters, it solves most `math` problems) on
a few problems whose every other answer is made wrong, so the verdicts mix True and False, and
check that every verifier kind gives the verdicts of the math task's own verifier.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hpd.apps.cli import app
from hpd.apps.demo import BUNDLED_TEACHER
from hpd.errors import HPDError
from hpd.apps.tasks import TaskItem, get_task, mixed_dataset, task_row
from hpd.apps.verifiers import get_verifier

runner = CliRunner()
N = 6


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


pytestmark = pytest.mark.usefixtures("single_torch_thread")


# --- the verifiers ------------------------------------------------------------------------------

def test_exact_reads_the_last_answer_marker_else_the_last_line():
    v = get_verifier("exact")
    rows = [{"answer": "Paris"}] * 6
    completions = ["Answer: paris", "Answer: Rome. answer: Paris ", "I say\nParis\n", "Answer: Paris.", "Paris is it", ""]
    assert v.verify_batch(rows, completions) == [True, True, True, False, False, False]
    assert get_verifier("exact").verify_batch([{"answer": 21}], ["Answer: 21"]) == [True]  # numbers as strings


def test_exact_with_an_answer_pattern():
    v = get_verifier("exact", answer_pattern=r"\\boxed\{(.+?)\}")
    assert v.verify_batch([{"answer": "7"}] * 3, ["so \\boxed{7}", "\\boxed{3} then \\boxed{7}", "7 \\boxed{8}"]) == [True, True, False]
    whole = get_verifier("exact", answer_pattern=r"[A-D]\b")  # no group: the whole match
    assert whole.verify_batch([{"answer": "c"}], ["I pick A... no, C"]) == [True]
    with pytest.raises(HPDError, match="is not a regular expression"):
        get_verifier("exact", answer_pattern="(")
    with pytest.raises(HPDError, match="at most one group"):
        get_verifier("exact", answer_pattern="(a)(b)")
    with pytest.raises(HPDError, match="exact verifier only"):
        get_verifier("math", answer_pattern="x")


def test_math_compares_values_through_math_verify():
    v = get_verifier("math")
    rows = [{"answer": "0.5"}, {"answer": "0.5"}, {"answer": "12"}]
    assert v.verify_batch(rows, ["x = \\frac{1}{2}", "Answer: 1/3", "3*4=12. Answer: 12"]) == [True, False, True]


def test_task_uses_each_rows_own_task_and_keeps_the_order():
    items = mixed_dataset({"math": 4, "dialogue": 4, "code": 4}, split="test", seed=0)
    rows = [json.loads(json.dumps(task_row(i))) for i in items]  # through JSON, as from a file
    v = get_verifier("task")
    wrong = ["Answer: -1" if i.meta["task"] == "math" else "no" for i in items]
    assert v.verify_batch(rows, [i.reference for i in items]) == [True] * 12
    assert v.verify_batch(rows, wrong) == [False] * 12
    mixed = [i.reference if k % 2 else w for k, (i, w) in enumerate(zip(items, wrong))]
    assert v.verify_batch(rows, mixed) == [bool(k % 2) for k in range(12)]
    # ... the same verdicts as each task's own verifier
    assert v.verify_batch(rows, mixed) == [get_task(i.meta["task"]).verify(i, c) for i, c in zip(items, mixed)]


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_module_function_from_a_file_and_from_sys_path(tmp_path, monkeypatch):
    src = "def check(row, completion):\n    return completion.strip().lower() == row['gold']\n"
    path = _write(tmp_path, "my_checks.py", src)
    rows, completions = [{"gold": "yes"}, {"gold": "no"}], ["YES ", "yes"]
    assert get_verifier(f"{path}:check").verify_batch(rows, completions) == [True, False]
    monkeypatch.syspath_prepend(str(tmp_path))
    v = get_verifier("my_checks:check")
    assert v.name == "my_checks:check" and v.verify_batch(rows, completions) == [True, False]


@pytest.mark.parametrize("spec,match", [
    ("exakt", r"unknown verifier 'exakt' \(did you mean 'exact'\?\); use exact, math, task, or MODULE:FUNCTION"),
    ("no_such_module_xyz:fn", r"cannot import module 'no_such_module_xyz' \(ModuleNotFoundError"),
    ("missing/file.py:fn", r"file missing/file\.py not found"),
    (":fn", "write MODULE:FUNCTION"),
])
def test_bad_specs_say_what_is_wrong(spec, match):
    with pytest.raises(HPDError, match=match):
        get_verifier(spec)


def test_bad_functions_say_what_is_wrong(tmp_path):
    path = _write(tmp_path, "v.py", "def check(row, completion):\n    return row['x'] > 0\n"
                                    "def one_arg(row):\n    return True\n"
                                    "def maybe(row, completion):\n    return 'yes'\n"
                                    "NOT_A_FUNCTION = 3\n")
    with pytest.raises(HPDError, match=r"has no function 'chek' \(did you mean 'check'\?\)"):
        get_verifier(f"{path}:chek")
    with pytest.raises(HPDError, match=r"must take \(row: dict, completion: str\)"):
        get_verifier(f"{path}:one_arg")
    with pytest.raises(HPDError, match="is not a function"):
        get_verifier(f"{path}:NOT_A_FUNCTION")
    with pytest.raises(HPDError, match=r"returned 'yes' for row 0, not True/False"):
        get_verifier(f"{path}:maybe").verify_batch([{}], ["c"])
    broken = _write(tmp_path, "broken.py", "import no_such_module_abc\n")
    with pytest.raises(HPDError, match=r"importing .*broken\.py failed: ModuleNotFoundError"):
        get_verifier(f"{broken}:f")
    # A verifier that raises: one line naming the verifier, the row and the exception.
    with pytest.raises(HPDError) as info:
        get_verifier(f"{path}:check").verify_batch([{"prompt": "p0", "x": 1}, {"prompt": "p1"}], ["a", "b"])
    msg = str(info.value)
    assert msg == f"verifier '{path}:check' raised on row 1 (0-based; prompt 'p1'): KeyError: 'x'"


@pytest.mark.parametrize("spec,row,field", [
    ("exact", {"prompt": "p", "answer": None}, "'answer' or 'completion'"),  # a reference of either kind
    ("math", {"prompt": "p", "answer": None}, "'answer' or 'completion'"),
    ("task", {"prompt": "p", "answer": "1", "meta": {}}, "'task'"),
    ("task", {"prompt": "p", "answer": "1", "task": "math"}, "'meta'"),
])
def test_a_row_without_the_needed_field_names_it(spec, row, field):
    with pytest.raises(HPDError, match=rf"reads the field {field} of every row, but row 1 \(0-based; prompt 'p'\) has none"):
        get_verifier(spec).verify_batch([{"prompt": "q", "answer": "1", "task": "math", "meta": {}}, row], ["a", "b"])
    with pytest.raises(HPDError, match=rf"reads the field {field} of every row, but data.jsonl:7 has none"):
        get_verifier(spec).check_rows([{"prompt": "q", "answer": "1", "task": "math", "meta": {}}, row],
                                      ["data.jsonl:3", "data.jsonl:7"])


@pytest.mark.parametrize("spec,second,right,wrong", [
    ("exact", "The capital of France is\nParis", "paris", "Lyon"),  # extracted as from a completion: the last line
    ("math", "so the result is $\\boxed{\\frac{1}{2}}$", "Answer: 0.5", "Answer: 2"),  # its last boxed value
])
def test_without_an_answer_the_reference_is_the_completions_final_answer(spec, second, right, wrong):
    v = get_verifier(spec)
    rows = [{"prompt": "p", "completion": "7+5=12. 12*2=24. Answer: 24"}, {"prompt": "p", "completion": second},
            {"prompt": "p", "completion": "wrong: Answer: 3", "answer": "24"}]  # an answer field wins
    got = v.verify_batch(rows * 2, ["Answer: 24", right, "Answer: 24", "Answer: 12", wrong, "Answer: 3"])
    assert got == [True, True, True, False, False, False]


def test_task_rows_naming_an_unknown_task():
    with pytest.raises(HPDError, match=r"row 0 \(0-based\): unknown task 'poetry'"):
        get_verifier("task").verify_batch([{"task": "poetry", "meta": {}}], ["x"])


# --- hpd eval --data, end to end ------------------------------------------------------------------

@pytest.fixture(scope="module")
def math_files(tmp_path_factory):
    """`hpd data math` test rows (with meta) with every other answer made wrong, so the verdicts
    mix True and False; the same problems as plain prompt/answer rows; a checker file."""
    d = tmp_path_factory.mktemp("eval-data")
    task_file = d / "math.jsonl"
    res = invoke("data", "math", "--split", "test", "--n", N, "--out", task_file)
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in task_file.read_text().splitlines()]
    for k, r in enumerate(rows):
        if k % 2:
            r["answer"] = str(int(r["answer"]) + 1)
    task_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    plain = d / "plain.jsonl"
    plain.write_text("".join(json.dumps({"prompt": r["prompt"], "answer": r["answer"]}) + "\n" for r in rows))
    checker = d / "checker.py"
    checker.write_text("def last_answer(row, completion):\n"
                       "    return completion.rsplit('Answer:', 1)[-1].strip() == row['answer']\n")
    return task_file, plain, checker


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("kind", ["task", "exact", "math", "function"])
def test_eval_data_with_each_verifier_kind(kind, math_files, tmp_path):
    """Every kind gives, on the model's recorded completions, the math task's own verdicts."""
    task_file, plain, checker = math_files
    data = task_file if kind == "task" else plain
    spec = f"{checker}:last_answer" if kind == "function" else kind
    out = tmp_path / "records.jsonl"
    res = invoke("eval", "--model", BUNDLED_TEACHER, "--data", data, "--verifier", spec,
                 *(["--max-new-tokens", get_task("math").max_new_tokens] if kind != "task" else []), "--out", out)
    assert res.exit_code == 0, res.output
    rows, records = _records(data), _records(out)
    assert [r["prompt"] for r in records] == [r["prompt"] for r in rows]
    assert set(records[0]) == {"prompt", "reference", "completion", "correct"}
    math = get_task("math")
    expected = [math.verify(TaskItem(r["prompt"], "", r["answer"]), rec["completion"]) for r, rec in zip(rows, records)]
    assert [rec["correct"] for rec in records] == expected
    assert not any(expected[1::2]) and any(expected[0::2]), "the wrong answers fail, the teacher solves some"
    k = sum(expected)
    assert re.fullmatch(rf"{data.name} \[{re.escape(get_verifier(spec).name)}\]: {k}/{N} = \d+\.\d% "
                        rf"\(95% CI \d+\.\d-\d+\.\d%\)", res.stdout.strip()), res.stdout


def test_evaluate_rows_python_api(math_files):
    from hpd.apps.evaluate import evaluate_rows, load_rows

    rows = load_rows(math_files[1])
    math = get_task("math")
    result = evaluate_rows(BUNDLED_TEACHER, rows, "exact", max_new_tokens=math.max_new_tokens, n=3)
    assert result.n == 3 and len(result.verdicts) == 3
    assert result.verdicts == [math.verify(TaskItem(r["prompt"], "", r["answer"]), rec["completion"])
                               for r, rec in zip(rows, result.records)]
    assert result.accuracy == sum(result.verdicts) / 3


def test_eval_data_errors_exit_2_with_one_line(math_files, tmp_path):
    task_file, plain, checker = math_files
    res = invoke("eval", "--model", BUNDLED_TEACHER, "--data", plain, "--verifier", "exakt")
    assert res.exit_code == 2 and "did you mean 'exact'" in res.stderr and "Traceback" not in res.output
    res = invoke("eval", "--model", BUNDLED_TEACHER, "--data", plain, "--verifier", "task")
    assert res.exit_code == 2 and f"reads the field 'task' of every row, but {plain}:1 has none" in res.stderr
    raising = _write(tmp_path, "raising.py", "def check(row, completion):\n    raise ValueError('cannot parse ' + row['answer'])\n")
    res = invoke("eval", "--model", BUNDLED_TEACHER, "--data", plain, "--verifier", f"{raising}:check", "--n", 1,
                 "--max-new-tokens", 2)
    first = json.loads(plain.read_text().splitlines()[0])
    assert res.exit_code == 2, res.output
    line = res.stderr.strip().splitlines()[-1]  # (after transformers' weight-loading progress bar)
    assert line.startswith(f"error: verifier '{raising}:check' raised on row 0 (0-based; prompt 'Start at ")
    assert line.endswith(f"): ValueError: cannot parse {first['answer']}")
    assert "Traceback" not in res.output
    res = invoke("eval", "--model", BUNDLED_TEACHER, "--data", plain)
    assert res.exit_code == 2 and "--data needs --verifier" in res.stderr
    res = invoke("eval", "--model", BUNDLED_TEACHER, "--data", plain, "--task", "math", "--verifier", "exact")
    assert res.exit_code == 2 and "either --task NAME" in res.stderr
    res = invoke("eval", "--model", BUNDLED_TEACHER, "--task", "math", "--verifier", "exact")
    assert res.exit_code == 2 and "go with --data" in res.stderr


def test_verifier_reward_scores_plain_and_chat_completions_for_grpo():
    from hpd.apps.verifiers import TaskVerifier, VerifierReward

    task = get_task("math")
    items = task.generate("train", 2, seed=0)
    rows = [task_row(it) for it in items]
    reward = VerifierReward(TaskVerifier(task))
    wrong = items[1].reference.replace(f"Answer: {items[1].answer}", f"Answer: {int(items[1].answer) + 1}")
    chat_right = [{"role": "assistant", "content": items[0].reference}]
    # TRL's call: every dataset column as a list, one value per completion (here 2 per prompt).
    cols = {k: [r[k] for r in rows for _ in range(2)] for k in ("answer", "meta", "task")}
    got = reward(prompts=[r["prompt"] for r in rows for _ in range(2)],
                 completions=[items[0].reference, chat_right, wrong, [{"role": "assistant", "content": "no idea"}]],
                 completion_ids=[[1] * 5, [1] * 3, [1] * 7, [1] * 2], **cols)
    assert got == [1.0, 1.0, 0.0, 0.0]
    assert reward.generated_tokens == 17
    assert reward.__name__ == "verifier_task"
    # a second call adds up; a completion of another kind is refused with one line
    reward(prompts=[rows[0]["prompt"]], completions=["x"], completion_ids=[[1, 2]], **{k: [rows[0][k]] for k in cols})
    assert reward.generated_tokens == 19
    with pytest.raises(HPDError, match="string or a list of chat messages"):
        reward(prompts=[rows[0]["prompt"]], completions=[42], **{k: [rows[0][k]] for k in cols})


def test_eval_data_refuses_a_row_that_switches_the_sandbox_off(tmp_path):
    """`hpd eval --data F --verifier task` with a row `code:unsafe_no_sandbox=1`: exit 2 before the
    model loads, one line naming the file and the row (issue 35)."""
    item = get_task("code").generate("test", 1, seed=0)[0]
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps(task_row(item)) + "\n" + json.dumps({**task_row(item), "task": "code:unsafe_no_sandbox=1"}) + "\n")
    res = invoke("eval", "--model", tmp_path / "no-such-model", "--data", data, "--verifier", "task")
    assert res.exit_code == 2, res.output
    line = res.stderr.strip()
    assert "\n" not in line and "Traceback" not in res.output
    assert line.startswith(f"error: verifier 'task': {data}:2: the task spec 'code:unsafe_no_sandbox=1' "
                           "of a data row may set only"), line


def test_bench_scoring_refuses_a_row_that_switches_the_sandbox_off(tmp_path):
    """The bench scores its rows files through the same check: refused before any model loads."""
    from hpd.apps.bench import score_model

    item = get_task("code").generate("test", 1, seed=0)[0]
    data = tmp_path / "test.jsonl"
    data.write_text(json.dumps(task_row(item)) + "\n" + json.dumps({**task_row(item), "task": "code:unsafe_no_sandbox=1"}) + "\n")
    with pytest.raises(HPDError, match=rf"^verifier 'task': {re.escape(str(data))}:2: the task spec "
                                       r"'code:unsafe_no_sandbox=1' of a data row may set only"):
        score_model(tmp_path / "no-such-model", str(data), "task", None)

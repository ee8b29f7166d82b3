"""Bundled tasks: references verify, corruptions fail, the code sandbox survives bad programs,
generators are deterministic and their splits disjoint."""

import json
import os
import subprocess
import re
import sys
import time
from pathlib import Path

import pytest

from hpd.errors import HPDError
from hpd.apps.tasks import (
    TASKS,
    CodeTask,
    DialogueTask,
    MathTask,
    TaskItem,
    get_task,
    mixed_dataset,
    split_of,
    task_item,
    verify_free_form,
    write_jsonl,
)
from hpd.apps.tasks.dialogue import NAMES

# capitals (for real pretrained models) has a small fixed prompt space: see its own tests below.
ALL_TASKS = sorted(set(TASKS) - {"capitals"})


@pytest.fixture(scope="module")
def items_200():
    return {name: get_task(name).generate("test", 200, seed=0) for name in ALL_TASKS}


# ---- references pass, corruptions fail ---------------------------------------------------


@pytest.mark.parametrize("name", ALL_TASKS)
def test_every_reference_verifies(name, items_200):
    items = items_200[name]
    assert len(items) == 200
    assert get_task(name).verify_batch(items, [i.reference for i in items]) == [True] * 200


def _next_letter(text: str) -> str:
    """Change the last letter of `text` to the next one in the alphabet (z -> a)."""
    for pos in range(len(text) - 1, -1, -1):
        c = text[pos]
        if c.isalpha():
            base = "a" if c.islower() else "A"
            return text[:pos] + chr(ord(base) + (ord(c) - ord(base) + 1) % 26) + text[pos + 1:]
    return text + "a"


def _wrong(name: str, item: TaskItem) -> str:
    """A well-formed completion with the wrong content."""
    if name == "math":
        return item.reference.rsplit("Answer:", 1)[0] + f"Answer: {int(item.answer) + 1}"
    if name == "code":
        return f"({item.reference})+1" if item.meta["var"] == "x" else f"({item.reference})*2"
    kind = item.meta["kind"]
    if kind == "count":
        return str(item.meta["count"] + 1)
    if kind == "greet":
        other = next(n for n in NAMES if n != item.meta["name"])
        return item.reference.replace(item.meta["name"], other)
    if kind == "repeat":
        return ", ".join([item.meta["word"]] * (item.meta["times"] - 1))
    if kind == "sort":
        return ", ".join(reversed(item.meta["words"]))
    if kind == "upper":
        return item.reference.lower()
    return _next_letter(item.reference)


@pytest.mark.parametrize("name", ALL_TASKS)
def test_corrupted_completions_fail(name, items_200):
    items = items_200[name]
    if name == "code":
        items = items[:100]  # 400 sandboxed runs are enough to show it
    task = get_task(name)
    corruptions = {
        "wrong": [_wrong(name, i) for i in items],
        "truncated": [i.reference[: len(i.reference) // 2] for i in items],
        "empty": [""] * len(items),
        "garbage": ["qzx !! 7?7 ~~"] * len(items),
    }
    for label, completions in corruptions.items():
        verdicts = task.verify_batch(items, completions)
        passed = [c for c, v in zip(completions, verdicts) if v]
        assert not passed, f"{name}: {label} completions passed: {passed[:3]}"


# ---- math -----------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_math_steps_set_the_chain_length_and_values_stay_small(steps):
    task = MathTask(steps=steps)
    items = task.generate("train", 100, seed=1)
    for item in items:
        assert item.prompt.count(",") == steps
        chain = re.findall(r"(\d+)([-+*/])(\d+)=(\d+)\.", item.reference)
        assert len(chain) == steps
        value = int(item.prompt.split(",")[0].removeprefix("Start at "))
        for a, op, b, result in chain:
            assert int(a) == value
            value = {"+": value + int(b), "-": value - int(b), "*": value * int(b),
                     "/": value // int(b)}[op]
            assert op != "/" or int(a) % int(b) == 0  # exact division only
            assert int(result) == value and 0 <= value <= task.max_value
            assert op not in "+-" or int(b) <= 20  # the default max_operand
        assert item.answer == str(value) and item.reference.endswith(f"Answer: {value}")


def test_math_verifier_reads_only_the_marked_answer():
    task = MathTask()
    item = TaskItem("Start at 7, add 5, times 2, minus 3.", "7+5=12. 12*2=24. 24-3=21. Answer: 21",
                    "21")
    assert task.verify(item, "Answer: 21")
    assert task.verify(item, "7+5=13. wrong chain. answer: 21.0")
    assert task.verify(item, "Answer: 20. Oops. Answer: 21")  # the last marker counts
    assert not task.verify(item, "7+5=12. 12*2=24. 24-3=21.")  # no marker
    assert not task.verify(item, "Answer: 2")
    assert not task.verify(item, "Answer: -21")
    assert not task.verify(item, "")



def test_math_partial_credit_counts_each_step_done_right_on_the_answers_own_value():
    task = MathTask()
    item = TaskItem("Start at 7, add 5, times 2, minus 3, add 4.", "7+5=12. 12*2=24. 24-3=21. 21+4=25. Answer: 25",
                    "25")
    assert task.partial_credit(item, item.reference) == 1.0
    assert task.partial_credit(item, "7+5=12. 12*2=24. 24-3=21. 21+4=25. 25+1=26. Answer: 26") == 1.0  # extra steps
    assert task.partial_credit(item, "7+5=12. 12*2=24. 24-3=20. 20+4=24. Answer: 24") == 0.75  # a slip costs its step
    assert task.partial_credit(item, "7+5=13. 13*2=26. 26-3=23. 23+4=27.") == 0.75  # the rest right on its own value
    assert task.partial_credit(item, "7+5=12. 12*2=24. 24-3=20. 21+4=25.") == 0.5  # step 4 not on its own value (20)
    assert task.partial_credit(item, "7+6=13. 13*3=39. 39-3=36. 36+4=40.") == 0.5  # wrong operands copied: no credit
    assert task.partial_credit(item, "7 + 5 = 12. 12*2=24.") == 0.5  # spacing is free
    assert task.partial_credit(item, "8+5=13. 13*2=26.") == 0.25  # the first step must start at the start value
    assert task.partial_credit(item, "Answer: 25") == 0.0  # right answer, no steps written
    assert task.partial_credit(item, "") == 0.0
    div = TaskItem("Start at 7, add 5, divide by 4.", "7+5=12. 12/4=3. Answer: 3", "3")
    assert task.partial_credit(div, "7+5=12. 12/4=3.") == 1.0 and task.partial_credit(div, "7+5=13. 13/4=3.") == 0.0
    assert get_task("dialogue").partial_credit(get_task("dialogue").generate("test", 1)[0], "x") is None
    from hpd.apps.verifiers import get_verifier
    from hpd.apps.tasks import task_row

    row = task_row(item)
    assert get_verifier("task").partial_credit({**row, "task": "math"}, "7+5=12. 12*2=25.") == 0.25
    assert get_verifier("exact").partial_credit(row, item.reference) is None

def test_verify_free_form_with_math_verify_and_without(monkeypatch):
    pytest.importorskip("math_verify")
    assert verify_free_form("so x = \\frac{1}{2}", "0.5")
    assert verify_free_form("The result is $\\boxed{21}$.", "21")
    assert verify_free_form("12*2=24. 24-3=21. Answer: 21", "21")
    assert not verify_free_form("Answer: 22", "21")
    monkeypatch.setitem(sys.modules, "math_verify", None)  # import now fails: numeric fallback
    assert verify_free_form("it is 1/2", "0.5")
    assert verify_free_form("7+5=12. Answer: 21", "21")
    assert not verify_free_form("Answer: 22", "21")
    assert not verify_free_form("no number", "21")


def test_math_rejects_bad_parameters():
    with pytest.raises(HPDError, match="steps"):
        MathTask(steps=0)


# ---- code -----------------------------------------------------------------------------------


def _interpret_int(prompt: str, x: int) -> int:
    """Apply the prompt's operations one by one: an oracle for the generated expressions."""
    steps = prompt.removeprefix("Write f(x): ").rstrip(".").replace("then ", "").split(", ")
    for step in steps:
        k = int(step.split()[-1]) if step[-1].isdigit() else 0
        if step.startswith("add"):
            x += k
        elif step.startswith("subtract"):
            x -= k
        elif step == "double":
            x *= 2
        elif step.startswith("multiply"):
            x *= k
        elif step == "square":
            x = x * x
        elif step == "negate":
            x = -x
        elif step.startswith("mod"):
            x %= k
        elif step.startswith("floor-divide"):
            x //= k
        elif step == "take abs":
            x = abs(x)
        else:
            raise AssertionError(f"unknown step {step!r}")
    return x


def test_code_references_mean_what_the_prompt_says():
    items = CodeTask(kinds="int").generate("train", 300, seed=0)
    for item in items:
        fn = eval(f"lambda x: {item.reference}")
        for x in (-13, -1, 0, 4, 29):
            assert fn(x) == _interpret_int(item.prompt, x), (item.prompt, item.reference)


def _item(expr: str, var: str = "x") -> TaskItem:
    """A code item for `expr` with hidden tests computed from it."""
    inputs = {"x": [-7, 0, 3, 12], "s": ["", "ab", "hello"], "xs": [[], [3, 1], [5, -2, 8]]}
    fn = eval(f"lambda {var}: {expr}")
    meta = {"task": "code", "var": var, "tests": [[v, fn(v)] for v in inputs[var]]}
    return TaskItem(f"Write f({var}): ...", expr, expr, meta)


def test_code_accepts_equivalent_programs_and_rejects_others():
    task = CodeTask()
    item = _item("x*2")
    programs = ["2*x", "x+x", "lambda x: x << 1", "def f(x):\n    return 2*x", " x*2\n"]
    assert task.verify_batch([item] * 5, programs) == [True] * 5
    assert task.verify_batch([item] * 3, ["x*3", "x", "abs(x)*2"]) == [False] * 3
    s_item, xs_item = _item("s[::-1]", "s"), _item("sorted(xs)", "xs")
    assert task.verify_batch([s_item, s_item, xs_item, xs_item],
                             ["''.join(reversed(s))", "s", "list(sorted(xs))", "xs"]) \
        == [True, False, True, False]


BAD_PROGRAMS = {
    "infinite loop": "next(v for v in iter(int, 1) if v)",
    "busy exec loop": "exec('while True: pass')",
    "sleep": "__import__('time').sleep(60)",
    "exception": "1/0",
    "syntax error": "x +* 2",
    "memory bomb list": "[0]*10**10",
    "memory bomb str": "'x'*10**10",
    "slow memory bomb": "list(range(10**9))",
    "socket": "__import__('socket').socket()",
    "raw socket": "__import__('_socket').socket()",
    "connect": "__import__('socket').create_connection(('127.0.0.1', 9))",
    "os._exit": "__import__('os')._exit(0)",
    "sys.exit": "__import__('sys').exit(0)",
    "kill parent": "__import__('os').kill(__import__('os').getppid(), 9)",
    "fork": "__import__('os').fork()",
    "subprocess": "__import__('subprocess').run(['true'])",
    "close pipes and hang": "__import__('os').closerange(3, 64) or __import__('time').sleep(60)",
    "fake result line": "print('[[\"ok\", 0]]') or __import__('os')._exit(0)",
    "recursion": "(lambda f: f(f))(lambda f: f(f))",
    "patch builtins": "__import__('builtins').__dict__.update(abs=lambda v: 0, sorted=len) or 0",
}


def test_code_sandbox_survives_bad_programs_and_scores_the_next_one(tmp_path):
    task = CodeTask(timeout_s=1.0, workers=1)  # one fork server: all run in sequence
    item = _item("abs(x)+sorted([x, 1])[0]")
    target = tmp_path / "pwned"
    bad = dict(BAD_PROGRAMS, write=f"open({str(target)!r}, 'w').write('x')")
    completions = []
    for program in bad.values():
        completions += [program, item.reference]  # each bad one followed by a correct one
    start = time.monotonic()
    verdicts = task.verify_batch([item] * len(completions), completions)
    elapsed = time.monotonic() - start
    failed = {label: v for label, v in zip(bad, verdicts[0::2]) if v}
    assert not failed, f"bad programs scored True: {failed}"
    assert verdicts[1::2] == [True] * len(bad), "a bad program spoiled the next completion"
    assert not target.exists()
    # Four programs hang until the 1 s limit; everything else is quick.
    assert elapsed < 4 * 1.0 + 6, elapsed


def test_each_bad_program_fails_quickly_on_its_own():
    task = CodeTask(timeout_s=1.0)
    item = _item("abs(x)+1")
    for label in ("infinite loop", "memory bomb str", "os._exit", "socket"):
        start = time.monotonic()
        assert task.verify(item, BAD_PROGRAMS[label]) is False, label
        assert time.monotonic() - start < 1.0 + 2.0, label
    assert task.verify(item, item.reference) is True


def test_verifying_100_code_completions_is_fast():
    task = CodeTask()
    items = task.generate("test", 100, seed=3)
    start = time.monotonic()
    assert all(task.verify_batch(items, [i.reference for i in items]))
    assert time.monotonic() - start < 5.0


def test_code_item_without_tests_is_a_user_error():
    with pytest.raises(HPDError, match="hidden tests"):
        CodeTask().verify(TaskItem("Write f(x): double.", "x*2", "x*2", {}), "x*2")


# ---- dialogue -------------------------------------------------------------------------------


def test_dialogue_checkers_accept_other_valid_answers():
    task = DialogueTask()
    items = task.generate("train", 600, seed=0)
    by_kind = {}
    for item in items:
        by_kind.setdefault(item.meta["kind"], item)
    assert set(by_kind) == set(DialogueTask().kinds)
    alternatives = {
        "repeat": lambda i: ",".join([i.meta["word"]] * i.meta["times"]),
        "sort": lambda i: " ".join(i.meta["words"]),
        "count": lambda i: f"There are {i.meta['count']}.",
        "initials": lambda i: " ".join(i.meta["letters"].upper()),
        "greet": lambda i: f"Hi {i.meta['name']}, nice to meet you.",
        "reverse": lambda i: f"'{i.reference}'.",
        "join": lambda i: f" {i.reference} ",
        "upper": lambda i: f'"{i.reference}"',
    }
    for kind, item in by_kind.items():
        assert task.verify(item, alternatives[kind](item)), (kind, item)


def test_dialogue_uppercase_is_case_sensitive_and_count_needs_one_number():
    task = DialogueTask(kinds=["upper", "count"])
    items = task.generate("train", 50, seed=0)
    upper = next(i for i in items if i.meta["kind"] == "upper")
    count = next(i for i in items if i.meta["kind"] == "count")
    assert not task.verify(upper, upper.reference.capitalize())
    assert not task.verify(count, f"{count.meta['count']} or {count.meta['count'] + 1}")


# ---- generation: determinism, splits, registry, files --------------------------------------


@pytest.mark.parametrize("name", ALL_TASKS)
def test_generation_is_deterministic_distinct_and_seeded(name):
    task = get_task(name)
    a = task.generate("train", 50, seed=0)
    assert a == task.generate("train", 50, seed=0)
    assert a[:20] == task.generate("train", 20, seed=0)  # a shorter list is a prefix
    assert len({i.prompt for i in a}) == 50
    b = task.generate("train", 50, seed=1)
    assert [i.prompt for i in a] != [i.prompt for i in b]


@pytest.mark.parametrize("name", ALL_TASKS)
def test_train_and_test_splits_share_no_prompt(name):
    task = get_task(name)
    train = {i.prompt for i in task.generate("train", 2000, seed=0)}
    test = {i.prompt for i in task.generate("test", 500, seed=0)}
    assert len(train) == 2000 and len(test) == 500
    assert not train & test
    assert all(split_of(p) == "test" for p in test)


def test_exhausted_space_and_bad_split_are_user_errors():
    with pytest.raises(HPDError, match="distinct"):
        MathTask(steps=1).generate("train", 5000)
    with pytest.raises(HPDError, match="split"):
        MathTask().generate("validation", 5)


def test_get_task_names_params_and_errors():
    assert get_task("math", steps=5).steps == 5
    assert get_task("math:steps=4").steps == 4
    assert get_task("code:kinds=int+list").kinds == ("int", "list")
    with pytest.raises(HPDError, match="code.*dialogue.*math"):
        get_task("algebra")
    with pytest.raises(HPDError, match="bad parameters"):
        get_task("math", depth=3)
    with pytest.raises(HPDError, match="key=value"):
        get_task("math:steps")


def test_mixed_dataset_and_jsonl_rows(tmp_path):
    from hpd.data.rows import load_examples

    mix = mixed_dataset({"math": 30, "code": 20, "dialogue": 10}, split="train", seed=0)
    assert len(mix) == 60
    assert [i.meta["task"] for i in mix].count("code") == 20
    assert mix == mixed_dataset({"math": 30, "code": 20, "dialogue": 10}, split="train", seed=0)
    assert [i.meta["task"] for i in mix[:10]] != ["math"] * 10  # shuffled
    path = tmp_path / "sub" / "mix.jsonl"
    assert write_jsonl(mix, path) == 60
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert set(rows[0]) == {"prompt", "completion", "task", "answer", "meta"}
    assert [r["completion"] for r in rows] == [i.reference for i in mix]
    assert [task_item(r) for r in rows] == mix  # the rows hold everything the verifiers need
    examples, _ = load_examples(str(path))
    assert [e.prompt for e in examples] == [i.prompt for i in mix]


def test_items_fit_a_tiny_byte_model():
    for name in ALL_TASKS:
        task = get_task(name)
        for item in task.generate("train", 300, seed=0):
            assert len(item.prompt.encode()) <= 90, item.prompt
            assert len(item.reference.encode()) <= task.max_new_tokens - 4, item.reference


# ---- capitals (world knowledge, for real pretrained models) --------------------------------


def test_capitals_references_pass_and_wrong_or_echoed_answers_fail():
    from hpd.apps.tasks.capitals import CAPITALS, country_split

    task = get_task("capitals")
    items = task.generate("test", 60, seed=0)
    assert len({i.prompt for i in items}) == 60 and all(country_split(i.meta["country"]) == "test" for i in items)
    assert task.verify_batch(items, [i.reference for i in items]) == [True] * 60
    for item in items:
        other = next(c for c in CAPITALS.values() if c != item.answer)
        assert not task.verify(item, f"The capital of {item.meta['country']} is {other}.")
        assert not task.verify(item, item.prompt)  # echoing the question names no capital
        assert not task.verify(item, f"{other} or maybe {item.answer}")  # the first capital named counts
        assert task.verify(item, f"It is {item.answer.upper()}!")  # case does not matter
        assert not task.verify(item, "")


def test_capitals_aliases_and_no_country_contains_its_capital():
    from hpd.apps.tasks.capitals import CAPITALS, TEMPLATES, first_capital

    task = get_task("capitals")
    kyiv = next(i for i in task.generate("train", 300, seed=0) + task.generate("test", 60, seed=0)
                if i.answer == "Kyiv")
    assert task.verify(kyiv, "Kiev is the capital.")
    assert first_capital("Parisian food") is None  # whole words only
    # no question names a capital by itself (Tunisia does not count as Tunis), so echoes fail
    assert all(first_capital(t.format(c=country)) is None for country in CAPITALS for t in TEMPLATES)


# The held-out countries, pinned: the split is a hash of the country's name, the same on every
# machine and run; a change here moves countries between training and evaluation.
HELD_OUT_COUNTRIES = [
    "Albania", "Algeria", "Angola", "Armenia", "Bangladesh", "Cambodia", "Cameroon", "China", "Cuba",
    "Czech Republic", "Ecuador", "Estonia", "Iran", "Ireland", "Libya", "Malaysia", "New Zealand", "Nigeria",
    "Switzerland", "Turkey", "Venezuela", "Vietnam", "the United States",
]


def test_capitals_split_is_by_country_and_stable():
    from hpd.apps.tasks.capitals import CAPITALS, TEMPLATES, countries, country_split, questions

    assert countries("test") == HELD_OUT_COUNTRIES
    assert sorted(countries("train") + countries("test")) == sorted(CAPITALS)
    assert country_split("Netherlands") == country_split("the Netherlands") == "train"  # with or without "the"
    task = get_task("capitals")
    # the whole prompt space of each split: every phrasing of every country of the split, nothing else
    test = task.generate("test", len(HELD_OUT_COUNTRIES) * len(TEMPLATES), seed=0)
    train = task.generate("train", len(countries("train")) * len(TEMPLATES), seed=1)
    assert {i.prompt for i in test} == {q.prompt for c in HELD_OUT_COUNTRIES for q in questions(c)}
    assert {i.prompt for i in train} == {q.prompt for c in countries("train") for q in questions(c)}
    with pytest.raises(HPDError, match="found only"):
        task.generate("test", len(test) + 1, seed=0)  # a held-out country never turns up in another phrasing
    assert len(TEMPLATES) >= 12 and len(set(TEMPLATES)) == len(TEMPLATES)
    with pytest.raises(HPDError, match="unknown country"):
        country_split("Atlantis")


def test_capitals_training_questions_never_name_a_held_out_country():
    from hpd.apps.tasks.capitals import CAPITALS, ALIASES, countries, country_name, mentions

    held_out = {country_name(c) for c in HELD_OUT_COUNTRIES} | {CAPITALS[c] for c in HELD_OUT_COUNTRIES}
    held_out |= {a for c in HELD_OUT_COUNTRIES for a in ALIASES.get(CAPITALS[c], ())}
    train = get_task("capitals").generate("train", len(countries("train")) * 12, seed=0)
    for item in train:
        assert not any(re.search(rf"\b{re.escape(n)}\b", item.prompt, re.I) for n in held_out), item.prompt
        assert mentions(item.prompt + " " + item.reference) is None
    # the check itself sees held-out names anywhere in a text, in any case, and only whole words
    assert mentions("Tell me about the capital of the United States.") == "United States"
    assert mentions("i flew to HAVANA last year") == "HAVANA"
    assert mentions("Irelandish Chinatown") is None
    assert mentions("Paris, the capital of France") is None


def test_verify_free_form_is_bounded_off_the_main_thread():
    """`Answer: 9^9^9^9` (a power tower math-verify tries to evaluate, in C, holding the GIL) is
    scored wrong within the timeout from any thread; the checker recovers for the next answer
    (issue 35). Run in a child process, so that a hang fails the test instead of holding it."""
    pytest.importorskip("math_verify")
    program = (
        "import threading, time, warnings\n"
        "from hpd.apps.tasks.math import verify_free_form\n"
        "assert verify_free_form('Answer: 3', '3')  # the checker started (once per process)\n"
        "out = {}\n"
        "def check():\n"
        "    with warnings.catch_warnings(record=True) as w:\n"
        "        warnings.simplefilter('always')\n"
        "        t = time.monotonic()\n"
        "        out['bomb'] = verify_free_form('Answer: 9^9^9^9', '3', timeout_s=1.0)\n"
        "        out['s'] = time.monotonic() - t\n"
        "        out['warned'] = [str(x.message) for x in w]\n"
        "    out['next'] = verify_free_form('so x = \\\\frac{1}{2}', '0.5', timeout_s=1.0)\n"
        "t = threading.Thread(target=check)\n"
        "t.start()\n"
        "t.join()\n"
        "print(out)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    try:
        res = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, env=env, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("verifying 'Answer: 9^9^9^9' off the main thread did not end in 60 s")
    assert res.returncode == 0, res.stderr
    out = eval(res.stdout.strip().splitlines()[-1])  # noqa: S307 (our own print of a dict)
    assert out["bomb"] is False and out["next"] is True, out
    assert out["s"] < 1.0 + 2.0, out
    assert len(out["warned"]) == 1 and "scored wrong" in out["warned"][0] and "\n" not in out["warned"][0], out


def test_a_forked_process_checks_with_its_own_math_helper():
    """A fork (a bench worker) must not share the parent's helper: their answers would mix."""
    pytest.importorskip("math_verify")
    program = (
        "import os\n"
        "from hpd.apps.tasks.math import verify_free_form, _checker\n"
        "assert verify_free_form('Answer: 3', '3')\n"
        "helper = _checker._proc.pid\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    ok = verify_free_form('Answer: 4', '4') and not verify_free_form('Answer: 5', '4')\n"
        "    os._exit(0 if ok and _checker._proc.pid != helper else 1)\n"
        "print(os.waitpid(pid, 0)[1], verify_free_form('Answer: 3', '3'), _checker._proc.pid == helper)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    res = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, env=env, timeout=60)
    assert res.stdout.split() == ["0", "True", "True"], res.stdout + res.stderr

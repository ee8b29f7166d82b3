"""benchmarks/task_teacher.py's stages that need no model: the data slices are disjoint, the
off-policy file keeps the writer's answers and counts its mistakes with the task's verifier, the
rate pick follows the bench's rule (on accuracy or on steps right), and the curve's last point is the final test score's head."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def _tt(repo_root, *args: str) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, str(repo_root / "benchmarks" / "task_teacher.py"), *args], capture_output=True,
                         text=True, cwd=repo_root, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return res


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_data_slices_are_disjoint_and_offpolicy_counts_the_writers_mistakes(repo_root, tmp_path):
    d = tmp_path / "data"
    _tt(repo_root, "data", "--out", str(d), "--task", "math:steps=3,max_value=99", "--n-teacher", "6", "--n-writer", "3",
        "--n-student", "4", "--n-val", "2", "--n-test", "3")
    files = {n: _rows(d / f"{n}.jsonl") for n in ("teacher_sft", "writer_sft", "student_prompts", "val", "test")}
    assert [len(files[n]) for n in files] == [6, 3, 4, 2, 3]
    prompts = [r["prompt"] for rs in files.values() for r in rs]
    assert len(set(prompts)) == len(prompts)  # no problem in two slices
    students = files["student_prompts"]
    assert all("completion" not in r and r["reference"].endswith("Answer: " + r["answer"]) for r in students)
    before = (d / "test.jsonl").stat().st_mtime_ns
    _tt(repo_root, "data", "--out", str(d), "--task", "math:steps=3,max_value=99", "--n-teacher", "6", "--n-writer", "3",
        "--n-student", "4", "--n-val", "2", "--n-test", "3")
    assert (d / "test.jsonl").stat().st_mtime_ns == before  # unchanged text: not rewritten

    # The writer: right on rows 0 and 2 (one with a wrong step but the right answer), wrong on 1 and 3.
    answers = [dict(r) for r in students]
    answers[0]["completion"] = r0 = students[0]["reference"]
    answers[1]["completion"] = "1+1=2. Answer: " + str(int(students[1]["answer"]) + 1)
    answers[2]["completion"] = "0+0=0. Answer: " + students[2]["answer"]
    answers[3]["completion"] = "no answer"
    (d / "writer_answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in answers))
    out = _tt(repo_root, "offpolicy", "--answers", str(d / "writer_answers.jsonl"), "--out", str(d / "train.jsonl"),
              "--stats", str(d / "train.stats.json"), "--writer", "w").stdout
    stats = json.loads((d / "train.stats.json").read_text())
    assert (stats["rows"], stats["wrong"], stats["wrong_share"]) == (4, 2, 0.5), out
    assert abs(stats["steps_right"] - 0.25) < 1e-9  # only row 0 does its steps right
    train = _rows(d / "train.jsonl")
    assert [r["completion"] for r in train][0] == r0 and all("reference" not in r for r in train)


def _val_rows(repo_root) -> list[dict]:
    return _rows(repo_root / "benchmarks" / "results" / "task-teacher" / "data" / "val.jsonl")[:4]


def test_pick_takes_the_best_validation_rate_and_ties_go_to_the_base(repo_root, tmp_path):
    rows = tmp_path / "val.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in _val_rows(repo_root)))

    def val(rate: str, acc: float) -> None:
        run = tmp_path / f"lr{rate}-s0"
        run.mkdir(exist_ok=True)
        (run / "eval-val.json").write_text(json.dumps({"accuracy": acc}))

    val("1.67e-04", 0.40)
    val("5.00e-04", 0.30)
    pick = lambda: _tt(repo_root, "pick", "--runs", str(tmp_path), "--rows", str(rows), "--base", "5e-4",  # noqa: E731
                       "1.67e-04", "5.00e-04").stdout.strip()
    assert pick() == "1.67e-04"
    val("5.00e-04", 0.40)
    assert pick() == "5.00e-04"


def test_pick_on_steps_right_grades_the_kept_validation_answers(repo_root, tmp_path):
    """`--on graded` picks by the mean share of steps right of each rate's kept answers (the bench's
    second criterion), which can differ from accuracy's pick: here one rate solves a problem outright
    and writes nothing else, the other gets most steps of every chain right and no final answer."""
    rows = _val_rows(repo_root)
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    right = rows[0]["completion"]
    halves = [" ".join(r["completion"].split(" ")[:8]) for r in rows]  # the first steps, no "Answer:"

    def val(rate: str, answers: list[str], acc: float) -> None:
        run = tmp_path / f"lr{rate}-s0"
        run.mkdir(exist_ok=True)
        (run / "eval-val.json").write_text(json.dumps({"accuracy": acc, "completions": answers}))

    val("1.67e-04", [right, "", "", ""], 0.25)
    val("5.00e-04", halves, 0.0)

    def pick(on: str) -> str:
        return _tt(repo_root, "pick", "--runs", str(tmp_path), "--rows", str(tmp_path / "val.jsonl"), "--on", on,
                   "--base", "5e-4", "1.67e-04", "5.00e-04").stdout.strip()

    assert pick("accuracy") == "1.67e-04"
    assert pick("graded") == "5.00e-04"
    # Answers kept for another file are an error, not a silently truncated score.
    val("5.00e-04", halves[:3], 0.0)
    res = subprocess.run([sys.executable, str(repo_root / "benchmarks" / "task_teacher.py"), "pick", "--runs",
                          str(tmp_path), "--rows", str(tmp_path / "val.jsonl"), "--on", "graded", "--base", "5e-4",
                          "1.67e-04", "5.00e-04"], capture_output=True, text=True, cwd=repo_root, timeout=120)
    assert res.returncode != 0 and "3 kept answers for the 4 problems" in res.stderr


def test_curve_last_point_is_the_head_of_the_final_test_score(repo_root, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "eval-test.json").write_text(json.dumps({"verdicts": [True, False, True, True], "tasks": ["math"] * 4,
                                                    "completions": ["a", "b", "c", "d"], "accuracy": 0.75}))
    _tt(repo_root, "curve", "--run", str(run), "--rows", "unused.jsonl", "--n", "2", "--steps", "8")
    last = json.loads((run / "eval-curve-step8.json").read_text())
    assert (last["verdicts"], last["accuracy"], last["completions"]) == ([True, False], 0.5, ["a", "b"])
    assert not (run / "checkpoints").exists()  # scored: the checkpoints are gone


def test_keep_copies_what_the_report_reads_and_no_weights(repo_root, tmp_path):
    runs, keep = tmp_path / "runs", tmp_path / "keep"
    run = runs / "every3" / "hpd" / "lr5.00e-04-s0"
    for rel, text in (("data/test.jsonl", "{}\n"), ("data/teacher_sft.jsonl", "{}\n"), ("teacher/eval-test.json", "{}"),
                      ("teacher/final/config.json", "{}"), ("every3/hpd/speed.json", "{}"),
                      ("every3/eval-start-test.json", "{}"),
                      ("every3/hpd/lr5.00e-04-s0/eval-curve-step3.json", "{}"), ("every3/hpd/lr5.00e-04-s0/metrics.jsonl", "{}\n"),
                      ("every3/hpd/lr5.00e-04-s0/final/model.safetensors", "w"),
                      ("every3/hpd/lr5.00e-04-s0/checkpoints/step-1/model/config.json", "{}")):
        (runs / rel).parent.mkdir(parents=True, exist_ok=True)
        (runs / rel).write_text(text)
    assert "kept 6 changed files" in _tt(repo_root, "keep", "--runs", str(runs), "--to", str(keep)).stdout
    kept = sorted(str(p.relative_to(keep)) for p in keep.rglob("*") if p.is_file())
    assert kept == ["data/test.jsonl", "every3/eval-start-test.json", "every3/hpd/lr5.00e-04-s0/eval-curve-step3.json",
                    "every3/hpd/lr5.00e-04-s0/metrics.jsonl", "every3/hpd/speed.json", "teacher/eval-test.json"]
    (run / "metrics.jsonl").write_text("{}\n{}\n")
    assert "kept 1 changed files" in _tt(repo_root, "keep", "--runs", str(runs), "--to", str(keep)).stdout


def test_report_rebuilds_from_the_kept_results_without_training(repo_root):
    """A fresh clone prints the task teacher's tables from `benchmarks/results/task-teacher` alone."""
    res = subprocess.run([sys.executable, str(repo_root / "benchmarks" / "task_teacher_report.py"),
                          "--runs", str(repo_root / "benchmarks" / "results" / "task-teacher")],
                         capture_output=True, text=True, cwd=repo_root, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout
    assert "281/300 = 93.7% [90.3, 95.9]; steps right 98.3%" in out  # the teacher, scored once, kept
    assert "Before training (the teacher's layers, pruned): 0/300 = 0.0%" in out
    assert "252 wrong (84.0%)" in out
    hpd_row = next(line for line in out.splitlines() if line.startswith("| hpd |"))
    assert "| 1.67e-04 | 3.0" in hpd_row  # validation's pick, then its seed-0 test accuracy first
    # The second table: each rate picked on validation steps right, as the bench tunes long chains.
    graded = out[out.index("Tuned on validation steps right"):]
    hpd_graded = next(line for line in graded.splitlines() if line.startswith("| hpd |"))
    assert "| 1.67e-04: 8.3, 5.00e-04: 17.0 | 5.00e-04 | 5.7" in hpd_graded


def test_script_refuses_an_unknown_criterion_before_any_work(repo_root, tmp_path):
    """A misspelt CRITERIA stops the script at once (exit 2, the choices named), before it writes a
    file, not at the pick after hours of training."""
    runs = tmp_path / "runs"
    env = {**os.environ, "R": str(runs), "CRITERIA": "accuracy steps", "PY": sys.executable}
    res = subprocess.run(["bash", str(repo_root / "benchmarks" / "task_teacher.sh")], capture_output=True, text=True,
                         cwd=tmp_path, env=env, timeout=120)
    assert res.returncode == 2
    assert "CRITERIA names 'steps'; choose from: accuracy graded" in res.stderr
    assert not runs.exists()

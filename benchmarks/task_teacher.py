"""Stage helpers of benchmarks/task_teacher.sh (a task teacher and its pruned students, issue 37 item 2).

Each subcommand does one stage's Python part and leaves a finished output alone, so the script
can be rerun to resume:

- `data`: the task's problems, written as disjoint slices of one train-split draw (the teacher's
  SFT rows, the writer's SFT rows, the students' prompts) plus validation and test rows; a file
  is rewritten only when its text changes.
- `offpolicy`: the writer's sampled answers to the students' prompts, kept right or wrong, as the
  students' training file, with the share that is wrong (the task's verifier) and of steps right.
- `score`: greedy answers of a model to rows, verified by the task (`hpd.apps.bench.score_model`,
  the bench's own scoring and file layout: `eval-test.json`, `eval-val.json`,
  `eval-curve-stepN.json`), written once.
- `curve`: score every kept checkpoint of a run on the first N test rows, then delete the
  checkpoints (they are the size of the model and its optimizer state).
- `pick`: the grid rate whose seed-0 run scores best on validation, by accuracy or by steps right
  (`--on`; `hpd.apps.bench.best_rate`, the bench's own rule: ties go to the rate nearest the base
  rate), printed.
- `keep`: copy what the report reads (data, scores, metrics, configs, speeds; no weights) into a
  directory of the repository, so a fresh clone prints the tables without training
  (`task_teacher_report.py --runs KEEP`).
- `speed`: greedy generation tokens/s of a student and of the teacher, timed one after the other
  in one process on the same prompts (`smollm2_report.generation`), written once.

    python benchmarks/task_teacher.py data --out runs/task-teacher/data --task math:steps=12,max_value=99
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

from hpd.apps.bench import TUNING, best_rate, eval_file, score_model, validation_score
from hpd.apps.tasks import get_task, task_row
from hpd.files import atomic_write_text


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def _write_if_changed(path: Path, text: str) -> None:
    if not path.is_file() or path.read_text() != text:
        atomic_write_text(path, text)


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def cmd_data(a: argparse.Namespace) -> None:
    task = get_task(a.task)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = (a.n_teacher, a.n_writer, a.n_student)
    train = [task_row(i) for i in task.generate("train", sum(sizes), seed=a.seed)]
    cut1, cut2 = a.n_teacher, a.n_teacher + a.n_writer
    _write_if_changed(out / "teacher_sft.jsonl", _jsonl(train[:cut1]))
    _write_if_changed(out / "writer_sft.jsonl", _jsonl(train[cut1:cut2]))
    # The students' prompts keep the gold reference under another key: `hpd generate` writes the
    # writer's answer as `completion`, and the gold answer must not be what they train on.
    prompts = [{**{k: v for k, v in r.items() if k != "completion"}, "reference": r["completion"]} for r in train[cut2:]]
    _write_if_changed(out / "student_prompts.jsonl", _jsonl(prompts))
    _write_if_changed(out / "val.jsonl", _jsonl([task_row(i) for i in task.generate("val", a.n_val, seed=a.seed)]))
    _write_if_changed(out / "test.jsonl", _jsonl([task_row(i) for i in task.generate("test", a.n_test, seed=a.seed)]))
    refs = [len(r["completion"]) for r in train]
    print(f"data: {a.task}: {len(train)} train rows ({cut1} teacher SFT, {a.n_writer} writer SFT, {a.n_student} "
          f"student prompts), {a.n_val} val, {a.n_test} test; reference {statistics.fmean(refs):.0f} chars on average")


def cmd_offpolicy(a: argparse.Namespace) -> None:
    rows = _read(Path(a.answers))
    if not rows:
        sys.exit(f"error: {a.answers} is empty: run the writer's `hpd generate` stage again")
    from hpd.apps.verifiers import TaskVerifier

    verifier = TaskVerifier()  # each row's task, as `hpd eval --verifier task` checks it
    gold = [{**r, "completion": r["reference"]} for r in rows]
    right = sum(verifier.verify_batch(gold, [r["completion"] for r in rows]))
    steps = [verifier.partial_credit(g, r["completion"]) or 0.0 for g, r in zip(gold, rows)]
    out_rows = [{k: v for k, v in r.items() if k != "reference"} for r in rows]
    _write_if_changed(Path(a.out), _jsonl(out_rows))
    stats = {"rows": len(rows), "wrong": len(rows) - right, "wrong_share": 1 - right / len(rows),
             "steps_right": statistics.fmean(steps), "writer": a.writer, "answers": a.answers}
    _write_if_changed(Path(a.stats), json.dumps(stats, indent=1) + "\n")
    print(f"off-policy data: {len(rows)} answers of the writer, {stats['wrong']} wrong "
          f"({100 * stats['wrong_share']:.1f}%, kept); {100 * stats['steps_right']:.1f}% of steps right")


def _score(model: Path, rows: str, n: int | None) -> dict:
    from hpd.provenance import code_record

    return {**score_model(model, rows, "task", None, n), "code": code_record()}


def cmd_score(a: argparse.Namespace) -> None:
    out = Path(a.out)
    if not out.is_file():
        atomic_write_text(out, json.dumps(_score(Path(a.model), a.rows, a.n)))
    ev = json.loads(out.read_text())
    print(f"{a.model} on {a.rows}: {sum(ev['verdicts'])}/{len(ev['verdicts'])} = {100 * ev['accuracy']:.1f}%")


def cmd_curve(a: argparse.Namespace) -> None:
    run = Path(a.run)
    for ckpt in sorted((run / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1])):
        step = int(ckpt.name.split("-")[1])
        path = eval_file(run, "curve", step)
        if step < a.steps and not path.is_file() and (ckpt / "model" / "config.json").is_file():
            atomic_write_text(path, json.dumps(_score(ckpt / "model", a.rows, a.n)))
    # The last point is the final model's test score on the same first N problems (greedy: the
    # same answers), read from its eval-test.json rather than generated again.
    final, test = eval_file(run, "curve", a.steps), eval_file(run, "test")
    if not final.is_file() and test.is_file():
        ev = json.loads(test.read_text())
        head = {k: ev[k][: a.n] for k in ("verdicts", "tasks", "completions")}
        atomic_write_text(final, json.dumps({**head, "accuracy": sum(head["verdicts"]) / len(head["verdicts"]),
                                             "code": ev.get("code"), "from": test.name}))
    if final.is_file() and (run / "checkpoints").is_dir():
        shutil.rmtree(run / "checkpoints")  # a checkpoint is the model and its optimizer state: ~1 GB


def cmd_pick(a: argparse.Namespace) -> None:
    scores = {}
    for lr in a.rates:
        path = Path(a.runs) / f"lr{lr}-s{a.seed}" / "eval-val.json"
        if not path.is_file():
            sys.exit(f"error: {path} is missing: the seed-0 grid of {a.runs} has not finished")
        scores[float(lr)] = validation_score(json.loads(path.read_text()), a.on, Path(a.rows), "task")
    picked = best_rate(scores, a.base)
    if picked is None:
        sys.exit(f"error: no seed-0 run of {a.runs} has a {a.on} score on validation (are its answers kept?)")
    print(next(lr for lr in a.rates if float(lr) == picked))  # as the run directories spell it


def cmd_speed(a: argparse.Namespace) -> None:
    out = Path(a.out)
    if out.is_file():
        print(out.read_text().strip())
        return
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from smollm2_report import generation

    from hpd.models.loading import load_model

    torch.set_num_threads(1)
    prompts = [r["prompt"] for r in _read(Path(a.prompts))[: a.n]]
    rates = {}
    for name, path in (("student", a.model), ("teacher", a.teacher)):
        model, tok = load_model(path)
        model.eval()
        rates[name] = generation(model, tok, prompts, a.max_new_tokens)[1]
        del model
    result = {"model": a.model, "teacher": a.teacher, "prompts": len(prompts), "student_tokens_per_s": rates["student"],
              "teacher_tokens_per_s": rates["teacher"], "ratio": rates["student"] / rates["teacher"]}
    atomic_write_text(out, json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


# What the report reads, relative to the runs directory: no weights, no checkpoints, no cache.
# The gold SFT slices are left out: `data` rebuilds them deterministically (the test asserts it).
KEPT = ("data/student_prompts.jsonl", "data/val.jsonl", "data/test.jsonl", "data/writer_answers.jsonl*",
        "data/train.jsonl", "data/*.json", "teacher/eval-*.json", "*/metrics.jsonl", "*/config.yaml",
        "every*/eval-start-*.json", "every*/*/speed.json", "every*/*/lr*-s*/eval-*.json", "every*/*/lr*-s*/metrics.jsonl",
        "every*/*/lr*-s*/config.yaml")


def cmd_keep(a: argparse.Namespace) -> None:
    runs, keep = Path(a.runs), Path(a.to)
    copied = 0
    for pattern in KEPT:
        for src in sorted(runs.glob(pattern)):
            if src.name.endswith(".partial") or not src.is_file():
                continue
            dst = keep / src.relative_to(runs)
            if not dst.is_file() or dst.read_bytes() != src.read_bytes():
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dst)
                copied += 1
    print(f"kept {copied} changed files of {runs} in {keep}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("data")
    p.add_argument("--out", required=True)
    p.add_argument("--task", required=True)
    p.add_argument("--seed", type=int, default=0)
    for name, default in (("teacher", 4000), ("writer", 800), ("student", 300), ("val", 100), ("test", 300)):
        p.add_argument(f"--n-{name}", type=int, default=default)
    p = sub.add_parser("offpolicy")
    p.add_argument("--answers", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--stats", required=True)
    p.add_argument("--writer", required=True)
    p = sub.add_parser("score")
    p.add_argument("--model", required=True)
    p.add_argument("--rows", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=None)
    p = sub.add_parser("curve")
    p.add_argument("--run", required=True)
    p.add_argument("--rows", required=True)
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--steps", type=int, required=True)
    p = sub.add_parser("pick")
    p.add_argument("--runs", required=True)
    p.add_argument("--base", type=float, required=True)
    p.add_argument("--seed", default="0")
    p.add_argument("--rows", required=True, help="the validation rows (graded: each answer's steps right)")
    p.add_argument("--on", choices=tuple(TUNING), default="accuracy",
                   help="validation accuracy, or the mean share of steps right (hpd.apps.bench.TUNING)")
    p.add_argument("rates", nargs="+")
    p = sub.add_parser("keep")
    p.add_argument("--runs", required=True)
    p.add_argument("--to", required=True)
    p = sub.add_parser("speed")
    p.add_argument("--model", required=True)
    p.add_argument("--teacher", required=True)
    p.add_argument("--prompts", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=128)
    a = ap.parse_args()
    {"data": cmd_data, "offpolicy": cmd_offpolicy, "score": cmd_score, "curve": cmd_curve, "pick": cmd_pick,
     "keep": cmd_keep, "speed": cmd_speed}[a.cmd](a)


if __name__ == "__main__":
    main()

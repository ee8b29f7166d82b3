"""`hpd bench`: which objective should I use on my data? A tuned, seeded, paired protocol.

Over 600 lines: the protocol reads as one piece (its settings, the starts and data conditions,
the runs and their scoring), and every part is used only here; what other modules use is apart
already (`bench_run`, `bench_report`, `bench_manifest`, `bench_archive`).

The protocol, for every condition (a student start x a data condition) and every method:

1. **Learning-rate grid** (seed 0): each method trains once per rate of `lr_grid` (multiples of the
   start's base rate) and is scored on a validation split carved from the *training* problems
   (never the test split). The rate with the best validation accuracy is the method's tuned rate.
2. **Equal-lr table**: every method at the start's base rate, `seeds` seeds, scored on the test
   split (`n_eval` problems per task).
3. **Tuned table**: every method at its own tuned rate, the same seeds. Where the verifier grades
   every validation problem (`longmath`: the share of steps done right), a second tuned table
   picks each rate on that graded score too (`tuning_criteria`), since whole-chain accuracy at the
   floor would pick it on a problem or two.
4. **Paired differences**: every method against HPD on the same test problems, mean difference in
   accuracy points with a 95% paired-bootstrap interval over problems and seeds.
5. **The paper's three claims as columns**: final accuracy (per task, mean); stability (std over
   seeds, loss spikes, gradient-norm spread, the validation accuracy lost across the grid);
   efficiency (CPU seconds, teacher and student tokens to reach 90% of the condition's best final
   accuracy, read from checkpoints at every quarter of the seed-0 tuned run).

Student starts (`--starts`): `scratch` (the default student from random weights), `pretrained`
(`pretrained:NAME`, a student of the teacher's family already trained to do the tasks partly,
shipped in `hpd/assets/students/`, built by `scripts/build_students.sh`), `pruned` (`pruned:every:2`,
a layer subset of the teacher), or a model directory. Data conditions (`--data`): `gold` (the
reference solutions), `traces` (sampled generations of a weaker model, its mistakes kept; the
fraction wrong is measured and reported), `limited` (a few hundred gold rows), `longmath` (math
with many steps, answers of a few hundred tokens, with its own teacher), and the paper's training
length, `gold-epochs` and `traces-epochs`: `epochs` passes (10, as the authors' recipe) over a
modest set (`epochs_per_task` rows per task, the first of the gold rows; the traces are the
writer's answers to those prompts), the run's steps set by the epochs instead of the start's.
A longer grid downward (`--lr-grid 0.1,0.333,1`) answers whether a rate was too high for a method.

The seed-0 grid of every condition runs first (so each method's validation pick is known early),
then each condition's other seeds; the tables are rewritten after each condition.

On a user's own task the same protocol runs on files:

    hpd bench --teacher T --student S --train train.jsonl --test test.jsonl --verifier exact --out runs/mine

The files are read as `hpd train` reads data (`hpd.apps.evaluate.load_rows`): JSONL, JSON, Parquet,
saved datasets, with the runs' data settings (`--set data.on_bad_row=skip`, `data.prompt_field=...`)
and row errors naming your file and line; the bench trains and scores on plain copies under OUT/data/user.

Every run keeps its directory, so an interrupted benchmark resumes (finished runs and evaluations
are reused; unfinished runs resume from their checkpoint); the tables are rewritten after each
condition. `--archive DIR` also keeps each finished run's small files (config, metrics, scores) in
DIR, e.g. inside a git repository, and restores them into a fresh OUT (`hpd.apps.bench_archive`).
A rerun with other data settings, or a finished run made with another config, is refused
(`hpd.apps.bench_manifest`): reuse never mixes two settings.

    hpd bench --starts pretrained --data gold --out runs/bench     # one condition, all methods
    hpd bench --smoke --out /tmp/bench-smoke                       # a small setting (CI)
    hpd bench --out runs/bench --report                            # tables of what has finished
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from hpd.apps.recipe import BUNDLED_TEACHER, STUDENT_OVERRIDES, TASKS
from hpd.errors import DivergedError, HPDError
from hpd.files import atomic_write_text
from hpd.training.progress import format_duration

STUDENTS_DIR = Path(__file__).resolve().parents[1] / "assets" / "students"
LONG_TEACHER = Path(__file__).resolve().parents[1] / "assets" / "long-teacher"
# The long-generation condition's sequence lengths (prompts ~200 tokens, answers ~220).
LONG_OVERRIDES = ("data.max_length=448", "regime.max_new_tokens=240", "student.tiny_max_positions=512")

# label -> (objective, overrides). Baselines as their authors run them: AKL and ToDi as
# CE + 0.1 KD (the HPD authors' example recipes), ABKL pure (alpha = beta = 1), GKD as the mixed
# JSD (beta 0.5, half the steps on student rollouts), on-policy reverse KL on student rollouts.
METHODS: dict[str, tuple[str, list[str]]] = {
    "sft": ("sft", []),
    "fkl": ("fkl", []),
    "rkl": ("rkl", []),
    "gkd": ("jsd", ["objective.beta=0.5", "regime.name=mixed", "regime.mixed_lambda=0.5"]),
    "orkl": ("orkl", ["regime.name=student"]),
    "akl": ("akl", ["objective.ce_weight=1", "objective.kd_weight=0.1"]),
    "todi": ("todi", ["objective.ce_weight=1", "objective.kd_weight=0.1"]),
    "abkl": ("abkl", []),
    "hpd": ("hpd", []),
    "hpdk": ("hpdk", []),  # beyond the paper: HPD plus the teacher's top-8 tokens (docs/objectives.md)
    # not in the default set:
    "jsd": ("jsd", ["objective.beta=0.5"]),
    "skl": ("skl", []),
    "akl-pure": ("akl", []),
    "todi-pure": ("todi", []),
    "hpd-teacher-data": ("hpd", ["regime.name=teacher"]),
}
DEFAULT_METHODS = ["sft", "fkl", "rkl", "gkd", "orkl", "akl", "todi", "abkl", "hpd", "hpdk"]
REFERENCE = "hpd"  # every paired difference is taken against this method
DATA_CONDITIONS = ("gold", "traces", "limited", "longmath", "gold-epochs", "traces-epochs")
# The conditions of the paper's training length: many epochs over a modest set (`epoch_data`).
EPOCH_CONDITIONS = ("gold-epochs", "traces-epochs")
# A condition's training settings beyond the student (shared by every start).
TRAIN_SETTINGS = [o for o in STUDENT_OVERRIDES if not o.startswith("student.")]


@dataclass(frozen=True)
class Start:
    """Where the student begins: its config overrides, base learning rate and step budget."""

    name: str
    overrides: tuple[str, ...]
    lr: float
    steps: int
    model: Path | None = None  # the initial student's directory, when it has one


@dataclass
class BenchSettings:
    out_dir: Path = Path("runs/bench")
    teacher: Path = BUNDLED_TEACHER
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    starts: list[str] = field(default_factory=lambda: ["pretrained", "scratch"])
    data: list[str] = field(default_factory=lambda: list(DATA_CONDITIONS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    # Multiples of the base rate. Two points: 3x was the worst rate on test for SFT and FKL in a first
    # run, and each point costs a run per method and condition (benchmarks/RESULTS.md, issue 12).
    lr_grid: list[float] = field(default_factory=lambda: [0.333, 1.0])
    steps_scratch: int = 500
    steps_pretrained: int = 240
    lr_scratch: float = 3e-3
    lr_pretrained: float = 1e-3
    n_eval: int = 500          # test problems per task
    n_val: int = 100           # validation problems per task (the tasks' `val` split)
    n_curve: int = 100         # test problems per task for the accuracy-over-training curve
    train_per_task: int = 4000
    limited_per_task: int = 100
    writer: Path = STUDENTS_DIR / "writer"
    writer_temperature: float = 1.0
    long_teacher: Path = LONG_TEACHER
    long_steps: int = 20       # math steps of the long-generation condition
    # The paper's training length (gold-epochs, traces-epochs): passes over the data, and its rows
    # per task. 667 per task (2,001 rows) x 10 epochs is 626 steps of batch 32: about 4 CPU minutes
    # per run from the pretrained start (benchmarks/RESULTS.md, issue 37).
    epochs: int = 10
    epochs_per_task: int = 667
    jobs: int = 2
    overrides: list[str] = field(default_factory=list)  # applied to every run, after the method's own
    report_only: bool = False
    archive: Path | None = None  # where finished runs' small files are kept and restored from (bench_archive)
    # a user's own task (all four set together): files and a verifier
    user_train: Path | None = None
    user_test: Path | None = None
    user_student: str | None = None
    verifier: str | None = None
    answer_pattern: str | None = None


@dataclass(frozen=True)
class Condition:
    """One cell of the protocol: a start, a data condition, its teacher, files and verifier."""

    name: str
    start: Start
    data: str
    teacher: Path
    train: Path
    val: Path
    test: Path
    verifier: str
    note: str = ""
    overrides: tuple[str, ...] = ()  # the condition's own settings (sequence lengths), after the start's
    last: tuple[str, ...] = ()  # after every other override: how the runs read the bench's copies of a user's rows


@dataclass(frozen=True)
class RunSpec:
    condition: str
    method: str
    lr: float
    seed: int
    run_dir: Path
    overrides: tuple[str, ...]
    evals: tuple[tuple[str, str], ...]  # (split name, rows file)
    curve: bool = False                 # score the checkpoints of every quarter (seed-0 runs keep them)


# ---------------------------------------------------------------------------------------------
# Starts and data conditions


def resolve_start(spec: str, s: BenchSettings) -> Start:
    """`scratch`, `pretrained[:NAME]`, `pruned[:every:K]` or a model directory."""
    kind, _, arg = spec.partition(":")
    if kind == "scratch":
        student = [o for o in STUDENT_OVERRIDES if o.startswith("student.")]
        return Start("scratch", tuple(student), s.lr_scratch, s.steps_scratch)
    if kind == "pretrained":
        name = arg or "llama-2x96"
        path = STUDENTS_DIR / name
        if not (path / "config.json").is_file():
            have = sorted(p.name for p in STUDENTS_DIR.glob("*") if (p / "config.json").is_file())
            raise HPDError(f"no pretrained student '{name}' in {STUDENTS_DIR} (have: {', '.join(have) or 'none'}): "
                           "build them with `bash scripts/build_students.sh`")
        label = "pretrained" if not arg else f"pretrained-{name}"
        return Start(label, (f"student.path={path}",), s.lr_pretrained, s.steps_pretrained, path)
    if kind == "pruned":
        layers = arg or "every:2"
        return Start(f"pruned-{layers.replace(':', '')}", ("student.path=teacher", f"student.init_from_teacher={layers}"),
                     s.lr_pretrained, s.steps_pretrained)
    path = Path(spec)
    if (path / "config.json").is_file():
        return Start(path.name, (f"student.path={path}",), s.lr_pretrained, s.steps_pretrained, path)
    raise HPDError(f"unknown student start {spec!r}: use scratch, pretrained[:NAME], pruned[:every:K] or a model directory")


def _write_rows(rows: list[dict], path: Path) -> Path:
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _first_per_task(rows: list[dict], n: int) -> list[dict]:
    """The first `n` rows of each task, in file order."""
    seen: dict[str, int] = {}
    kept = []
    for r in rows:
        t = r.get("task", "")
        if seen.get(t, 0) < n:
            seen[t] = seen.get(t, 0) + 1
            kept.append(r)
    return kept


def _read_rows(path: Path) -> list[dict]:
    """The rows of a file the bench wrote (`_write_rows`), read by the reader of every command
    (`hpd.apps.evaluate.Rows`: their errors name the file and line)."""
    from hpd.apps.evaluate import load_rows

    return load_rows(path)


# The bench's copies of a user's rows use the plain field names (`hpd.apps.evaluate.load_rows`).
PLAIN_FIELDS = {"prompt_field": "prompt", "completion_field": "completion"}


def _user_rows(s: BenchSettings) -> tuple[Any, Any, tuple[str, ...]]:
    """A user's training and test rows, read as `hpd train` reads data with the runs' data settings
    (`--set data.on_bad_row=skip`, `data.prompt_field=...`): every format, row errors naming the
    user's file and line; and the overrides under which the runs read the bench's plain copies."""
    from hpd.apps.evaluate import load_rows
    from hpd.config import load_config

    d = load_config(None, list(s.overrides)).data
    read = functools.partial(load_rows, prompt_field=d.prompt_field, completion_field=d.completion_field,
                             messages_field=d.messages_field, on_bad_row=d.on_bad_row,
                             skip_hint="pass --set data.on_bad_row=skip")
    plain = tuple(f"data.{k}={v}" for k, v in PLAIN_FIELDS.items() if getattr(d, k) != v)
    # Training rows need a completion (as the runs will read them); test rows need only a prompt.
    return read(s.user_train, require_completion=True), read(s.user_test), plain


def _task_rows(tasks: list[str], split: str, per_task: int, seed: int) -> dict[str, list[dict]]:
    """Rows `{"prompt", "completion", "task", "answer", ...}` per task, as `hpd data` writes them."""
    from hpd.apps.tasks import get_task, task_row

    return {t: [task_row(it) for it in get_task(t).generate(split, per_task, seed=seed)] for t in tasks}


def _mix(per_task: dict[str, list[dict]], seed: int) -> list[dict]:
    rows = [r for rs in per_task.values() for r in rs]
    random.Random(f"hpd.bench.mix/{seed}").shuffle(rows)
    return rows


def gold_data(data_dir: Path, tasks: list[str], s: BenchSettings) -> tuple[Path, Path]:
    """Gold training rows and validation rows. The validation problems come from the tasks' `val`
    split: a slice of the training problem space (by prompt hash) that nothing the project builds
    trains on, so a pretrained student has never seen them (carving them from the training rows
    would reward a rate that keeps what the student memorized in pretraining)."""
    train, val = data_dir / "gold" / "train.jsonl", data_dir / "gold" / "val.jsonl"
    if not (train.is_file() and val.is_file()):
        _write_rows(_mix(_task_rows(tasks, "train", s.train_per_task, seed=0), 0), train)
        _write_rows(_mix(_task_rows(tasks, "val", s.n_val, seed=0), 1), val)
    return train, val


def _traces(data_dir: Path, gold_train: Path, s: BenchSettings, name: str = "traces") -> tuple[Path, str]:
    """The gold prompts answered by a weaker model (sampled, its mistakes kept); the share wrong.
    Written to `data_dir/name/`: `traces` for the gold rows, `traces-epochs` for the epochs' rows."""
    out = data_dir / name / "train.jsonl"
    stats_path = data_dir / name / "stats.json"
    kept = _archived_data(stats_path, s)
    if not out.is_file() and s.report_only and kept is not None:
        # The tables need only what the traces were (the archive's record, made by the same
        # settings: its bench.json was checked), not 12,000 generations of the writer again.
        return out, _describe_traces(json.loads(kept.read_text()))
    if not out.is_file():
        if not (Path(s.writer) / "config.json").is_file():
            raise HPDError(f"no trace writer at {s.writer}: build it with `bash scripts/build_students.sh`")
        from hpd.models.loading import load_model
        from hpd.responses.rollout import generate_text
        from hpd.apps.verifiers import get_verifier

        rows = _read_rows(gold_train)
        model, tok = load_model(str(s.writer))
        model.eval()
        print(f"[bench] writing {len(rows)} traces with {s.writer} (temperature {s.writer_temperature})", flush=True)
        texts = generate_text(model, tok, [r["prompt"] for r in rows], max_new_tokens=96,
                              temperature=s.writer_temperature, batch_size=64, seed=1234)
        verdicts = get_verifier("task").verify_batch(rows, texts)
        traced = [{**r, "completion": c} for r, c in zip(rows, texts) if c.strip()]
        by_task: dict[str, list[bool]] = {}
        for r, ok in zip(rows, verdicts):
            by_task.setdefault(r.get("task", ""), []).append(bool(ok))
        stats = {"writer": str(s.writer), "temperature": s.writer_temperature, "rows": len(traced),
                 "wrong": 1 - sum(verdicts) / len(verdicts),
                 "wrong_per_task": {t: 1 - sum(v) / len(v) for t, v in by_task.items()}}
        _write_rows(traced, out)
        atomic_write_text(stats_path, json.dumps(stats, indent=2))
    if s.archive is not None:
        from hpd.apps.bench_archive import archive_data_file

        archive_data_file(stats_path, s.out_dir, s.archive)
    return out, _describe_traces(json.loads(stats_path.read_text()))


def _describe_traces(stats: dict[str, Any]) -> str:
    per = ", ".join(f"{t} {100 * w:.0f}%" for t, w in stats["wrong_per_task"].items())
    return f"traces of {Path(stats['writer']).name} (T={stats['temperature']:g}): {100 * stats['wrong']:.0f}% wrong ({per})"


def _archived_data(path: Path, s: BenchSettings) -> Path | None:
    if s.archive is None:
        return None
    from hpd.apps.bench_archive import archived_data_file

    return archived_data_file(path, s.out_dir, s.archive)


def _limited(data_dir: Path, gold_train: Path, s: BenchSettings) -> Path:
    out = data_dir / "limited" / "train.jsonl"
    if not out.is_file():
        _write_rows(_first_per_task(_read_rows(gold_train), s.limited_per_task), out)
    return out


def epoch_data(data_dir: Path, gold_train: Path, s: BenchSettings) -> Path:
    """The gold rows of the paper's training length: the first `epochs_per_task` of each task."""
    out = data_dir / "gold-epochs" / "train.jsonl"
    if not out.is_file():
        rows = _first_per_task(_read_rows(gold_train), s.epochs_per_task)
        if len(rows) < s.epochs_per_task * len(TASKS):
            raise HPDError(f"--epochs-per-task {s.epochs_per_task} needs that many gold rows per task; the bench has "
                           f"{s.train_per_task}: lower it or raise the training rows per task")
        _write_rows(rows, out)
    return out


def epoch_steps(rows: int, s: BenchSettings, start: Start) -> int:
    """Optimizer steps of `s.epochs` passes over `rows` rows, at the runs' batch size (as the
    config's `epochs` key derives them, but known before a run starts: checkpoints, resume checks)."""
    from hpd.config import load_config

    o = load_config(None, [*TRAIN_SETTINGS, *start.overrides, *s.overrides]).optim
    return max(1, math.ceil(s.epochs * rows / (o.batch_size * o.grad_accum)))


def heldout_data(data_dir: Path, tasks: list[str], n: int, name: str) -> Path:
    path = data_dir / f"test-{name}.jsonl"
    if not path.is_file():
        _write_rows(_mix(_task_rows(tasks, "test", n, seed=0), 2), path)
    return path


def manifest_settings(s: BenchSettings) -> dict[str, Any]:
    """What shapes OUT's data files and teaches its runs (hpd.apps.bench_manifest): settings, a
    user's files by content, and the weights of the teacher, the data-making models and the starts."""
    from hpd.data.rows import data_digest
    from hpd.fingerprints import weights_fingerprint

    # The weights alone: a config.json may gain keys that change nothing (hpd.models.portable's).
    weights = functools.partial(weights_fingerprint, with_config=False)
    m: dict[str, Any] = {"data.n_val": s.n_val, "teacher": weights(s.teacher)}
    if s.user_train is not None:
        # (a file's digest is its bytes' sha256, as before saved datasets were read: earlier OUTs stay valid)
        m.update({"user.train": data_digest(s.user_train), "user.test": data_digest(s.user_test)})
        starts = [s.user_student or "scratch"]
    else:
        m.update({"data.train_per_task": s.train_per_task, "data.n_eval": s.n_eval, "data.n_curve": s.n_curve})
        if "limited" in s.data:
            m["limited.per_task"] = s.limited_per_task
        if any(d in s.data for d in EPOCH_CONDITIONS):
            m.update({"epochs.per_task": s.epochs_per_task, "epochs.epochs": s.epochs})
        if {"traces", "traces-epochs"} & set(s.data) and (Path(s.writer) / "config.json").is_file():
            m.update({"traces.writer": weights(s.writer), "traces.temperature": s.writer_temperature})
        if "longmath" in s.data:
            m["longmath.steps"] = s.long_steps
            if (Path(s.long_teacher) / "config.json").is_file():
                m["longmath.teacher"] = weights(s.long_teacher)
            if "pretrained" in s.starts and (STUDENTS_DIR / "llama-2x96-long" / "config.json").is_file():
                m["longmath.start"] = weights(STUDENTS_DIR / "llama-2x96-long")
        starts = list(s.starts)
    for spec in starts:
        start = resolve_start(spec, s)
        if start.model is not None:
            m[f"start.{start.name}"] = weights(start.model)
    return m


def build_conditions(s: BenchSettings) -> tuple[list[Condition], list[str]]:
    """The conditions to run, and a note for each one that cannot run here (with the reason)."""
    out = Path(s.out_dir)
    data_dir = out / "data"
    if s.user_train is not None:
        from hpd.apps.verifiers import get_verifier

        start = resolve_start(s.user_student or "scratch", s)
        rows, test_rows, plain = _user_rows(s)
        if len(rows) < 2:
            raise HPDError(f"{s.user_train} has {len(rows)} usable row(s)"
                           + (f" ({rows.skipped} bad ones skipped)" if rows.skipped else "")
                           + ": the bench needs rows to train on and a validation share of them")
        n_val = min(s.n_val, max(1, len(rows) // 10))
        v = get_verifier(s.verifier or "exact", answer_pattern=s.answer_pattern)
        v.check_rows(rows[:n_val], rows.sources[:n_val])  # scored rows lack nothing the verifier reads: said before training
        v.check_rows(test_rows, test_rows.sources)
        train = _write_rows(rows[n_val:], data_dir / "user" / "train.jsonl")
        val = _write_rows(rows[:n_val], data_dir / "user" / "val.jsonl")
        test = _write_rows(test_rows, data_dir / "user" / "test.jsonl")
        cond = Condition(f"{start.name}-user", start, "user", Path(s.teacher), train, val, test,
                         s.verifier or "exact", last=plain,
                         note=f"{s.user_train}: {len(rows) - n_val} training rows, {n_val} validation"
                              + "".join(f", {r.skipped} bad rows of {f} skipped" for r, f in ((rows, s.user_train),
                                        (test_rows, s.user_test)) if r.skipped))
        return [cond], []
    conditions, missing = [], []
    gold_train = gold_val = None
    for data in s.data:
        if data not in DATA_CONDITIONS:
            raise HPDError(f"unknown data condition {data!r}: choose from {', '.join(DATA_CONDITIONS)}")
    for start_spec in s.starts:
        start = resolve_start(start_spec, s)
        for data in s.data:
            name = f"{start.name}-{data}"
            if data == "longmath":
                # Long answers need a teacher and a pretrained student trained for them.
                long_start = start
                if start_spec == "pretrained":
                    try:
                        long_start = replace(resolve_start("pretrained:llama-2x96-long", s), name="pretrained")
                    except HPDError:
                        missing.append(f"{name}: no long-generation pretrained student in {STUDENTS_DIR / 'llama-2x96-long'} "
                                       "(build it with `bash scripts/build_long_teacher.sh`)")
                        continue
                if not (Path(s.long_teacher) / "config.json").is_file():
                    missing.append(f"{name}: no long-generation teacher at {s.long_teacher} (build it with "
                                   "`bash scripts/build_long_teacher.sh`, or pass --long-teacher DIR)")
                    continue
                tasks = [f"math:steps={s.long_steps}"]
                long_dir = data_dir / "longmath"
                tr, va = gold_data(long_dir, tasks, s)
                conditions.append(Condition(name, long_start, data, Path(s.long_teacher), tr, va,
                                            heldout_data(long_dir, tasks, s.n_eval, "longmath"), "task",
                                            note=f"math with {s.long_steps} steps (answers of about 220 tokens), gold references",
                                            overrides=LONG_OVERRIDES))
                continue
            if gold_train is None:
                gold_train, gold_val = gold_data(data_dir, list(TASKS), s)
            test = heldout_data(data_dir, list(TASKS), s.n_eval, "tasks")
            if data == "gold":
                train, note = gold_train, f"gold references, {s.train_per_task} per task"
            elif data == "limited":
                train, note = _limited(data_dir, gold_train, s), f"gold references, {s.limited_per_task} per task"
            elif data in EPOCH_CONDITIONS:
                gold_few = epoch_data(data_dir, gold_train, s)
                if data == "gold-epochs":
                    train, note = gold_few, f"gold references, {s.epochs_per_task} per task"
                else:
                    train, note = _traces(data_dir, gold_few, s, name="traces-epochs")
                rows = s.epochs_per_task * len(TASKS)
                start_here = replace(start, steps=epoch_steps(rows, s, start))
                note += f"; {s.epochs} epochs over {rows} rows"
                conditions.append(Condition(name, start_here, data, Path(s.teacher), train, gold_val, test, "task", note=note))
                continue
            else:
                train, note = _traces(data_dir, gold_train, s)
            conditions.append(Condition(name, start, data, Path(s.teacher), train, gold_val, test, "task", note=note))
    return conditions, missing


# ---------------------------------------------------------------------------------------------
# Runs


def _lr_tag(lr: float) -> str:
    return f"lr{lr:.2e}".replace("e-0", "e-")


def run_spec(cond: Condition, method: str, lr: float, seed: int, s: BenchSettings) -> RunSpec:
    """One run. Seed-0 runs are the grid: they keep a checkpoint at every quarter, scored as soon as
    the run ends (the efficiency curve of whichever rate turns out best: a finished run needs nothing
    more, and its checkpoints need not outlive it), and are also scored on the validation split."""
    from hpd.apps.experiments import run_slug

    run_dir = Path(s.out_dir) / "runs" / cond.name / run_slug(method) / f"{_lr_tag(lr)}-s{seed}"
    objective, extra = METHODS[method]
    steps = cond.start.steps
    grid = seed == s.seeds[0]
    # ceil: the final step's save is the fourth checkpoint, never a fifth that drops the first
    # quarter (626 steps: 157, 314, 471, 626; a multiple of 4 gives the same saves as steps // 4)
    save = [f"save.every={-(-steps // 4)}", "save.keep_last=4"] if grid else [f"save.every={max(steps // 2, 1)}", "save.keep_last=1"]
    overrides = (f"output_dir={run_dir}", f"teacher.path={cond.teacher}", f"data.train={cond.train}", f"data.eval={cond.val}",
                 f"objective.name={objective}", f"max_steps={steps}", f"seed={seed}", f"log.eval_every={max(steps // 4, 1)}",
                 "resume=auto", "log.progress=false", *TRAIN_SETTINGS, *cond.start.overrides, *cond.overrides, f"optim.lr={lr:g}", *save,
                 f"regime.teacher_cache={Path(s.out_dir) / 'teacher_generations' / cond.data}", *extra, *s.overrides,
                 *cond.last)
    evals = (("test", str(cond.test)),) + ((("val", str(cond.val)),) if grid else ())
    return RunSpec(cond.name, method, lr, seed, run_dir, overrides, evals, curve=grid)


def eval_file(run_dir: Path, split: str, step: int | None = None) -> Path:
    return run_dir / (f"eval-{split}.json" if step is None else f"eval-{split}-step{step}.json")


def score_model(model_dir: Path, rows_file: str, verifier: str, answer_pattern: str | None, n_per_task: int | None = None) -> dict:
    """Greedy answers to every row, verified: `{"verdicts": [...], "tasks": [...], "accuracy": ...,
    "completions": [...]}`. The answers are kept so that a graded score (`Verifier.partial_credit`)
    is read from them by the report, by the definition in the code, never from a stored number."""
    from hpd.apps.evaluate import check_rows, evaluate_rows
    from hpd.apps.verifiers import get_verifier

    rows = _read_rows(Path(rows_file))
    if n_per_task is not None:
        rows = _first_per_task(rows, n_per_task)
    v = get_verifier(verifier, answer_pattern=answer_pattern)
    check_rows(v, rows, rows_file)  # a refused row fails naming its file, before the model loads
    res = evaluate_rows(str(model_dir), rows, v)
    verdicts = [bool(x) for x in res.verdicts]
    return {"verdicts": verdicts, "tasks": [r.get("task", "") for r in rows], "accuracy": sum(verdicts) / max(len(verdicts), 1),
            "completions": [r["completion"] for r in res.records]}


def execute(spec: RunSpec, verifier: str, answer_pattern: str | None, n_curve: int) -> dict:
    """Train (or resume) one run and score it; runs in a worker process. A run that diverges is
    recorded as failed (a diverged learning rate is a result of the grid, not a crash); any other
    error stops the bench with its message, never recorded as a result."""
    import torch

    torch.set_num_threads(1)
    run_dir = spec.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    failed = run_dir / "failed.json"
    if failed.is_file():
        return json.loads(failed.read_text())

    def scored(model: Path, rows_file: Path, limit: int | None = None) -> dict:
        # The score with the code that made it (hpd.provenance): the report names each table's code.
        from hpd.provenance import code_record

        return {**score_model(model, rows_file, verifier, answer_pattern, limit), "code": code_record()}

    log = open(run_dir.parent / f"{run_dir.name}.log", "a")
    saved = os.dup(1), os.dup(2)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    try:
        if not (run_dir / "final" / "config.json").is_file():
            import hpd
            from hpd.config import load_config

            for stale in run_dir.glob("eval-*.json"):  # scores of a model that is not here: it is trained again
                stale.unlink()
            try:
                hpd.train(load_config(None, list(spec.overrides)))
            except DivergedError as e:
                result = {"failed": str(e).splitlines()[0][:300]}
                atomic_write_text(failed, json.dumps(result))
                return result
        for split, rows_file in spec.evals:
            path = eval_file(run_dir, split)
            if not path.is_file():
                atomic_write_text(path, json.dumps(scored(run_dir / "final", rows_file)))
        if spec.curve:
            for ckpt in sorted((run_dir / "checkpoints").glob("step-*")):
                step = int(ckpt.name.split("-")[1])
                path = eval_file(run_dir, "curve", step)
                if not path.is_file() and (ckpt / "model" / "config.json").is_file():
                    atomic_write_text(path, json.dumps(scored(ckpt / "model", spec.evals[0][1], n_curve)))
        return {"ok": True}
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        log.close()


def run_all(specs: list[RunSpec], s: BenchSettings, verifier: str) -> None:
    """Execute the specs `s.jobs` at a time, each in a fresh single-threaded worker process."""
    import concurrent.futures as cf
    import multiprocessing as mp

    todo = reuse(specs, s)
    if not todo:
        return
    t0 = time.perf_counter()

    def report(i: int, sp: RunSpec, res: dict) -> None:
        keep(sp, s)
        status = "failed: " + res["failed"] if "failed" in res else "done"
        elapsed = time.perf_counter() - t0
        # The runs of a phase are alike: the time left is the mean so far times the runs left.
        eta = f", ETA {format_duration(elapsed / i * (len(todo) - i))}" if i < len(todo) else ""
        print(f"[bench] {i}/{len(todo)} {sp.condition} {sp.method} lr={sp.lr:.2g} seed={sp.seed}: {status} "
              f"({elapsed:.0f} s{eta})", flush=True)

    if s.jobs == 1:  # one at a time: in this process (no interpreter start-up per run)
        for i, sp in enumerate(todo, 1):
            report(i, sp, execute(sp, verifier, s.answer_pattern, s.n_curve))
        return
    os.environ.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    # Fresh single-threaded interpreters: a worker never carries one run's state into the next.
    ctx = mp.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=s.jobs, mp_context=ctx, max_tasks_per_child=1) as pool:
        futures = {pool.submit(execute, sp, verifier, s.answer_pattern, s.n_curve): sp for sp in todo}
        for i, fut in enumerate(cf.as_completed(futures), 1):
            report(i, futures[fut], fut.result())


def reuse(specs: list[RunSpec], s: BenchSettings) -> list[RunSpec]:
    """What is finished of `specs` (in OUT, or restored from the archive), checked to be made with
    the config each spec asks for and kept in the archive; returns the specs still to run."""
    from hpd.apps.bench_manifest import check_reused_runs

    restore_archived(specs, s)
    check_reused_runs(specs)  # a finished run made with another config is never reused as this one
    todo = [sp for sp in specs if not _done(sp)]
    for sp in specs:  # finished before this bench started (or before --archive was given)
        if sp not in todo:
            keep(sp, s)
    return todo


def restore_archived(specs: list[RunSpec], s: BenchSettings) -> None:
    """Finished runs that OUT lacks and `s.archive` holds are restored into OUT (bench_archive)."""
    if s.archive is None:
        return
    from hpd.apps.bench_archive import restore_run

    n = sum(bool(restore_run(sp.run_dir, s.out_dir, s.archive)) for sp in specs)
    if n:
        print(f"[bench] restored {n} finished run(s) from {s.archive}", flush=True)


def keep(spec: RunSpec, s: BenchSettings) -> None:
    """A finished run's small files into `s.archive`, when one is given (bench_archive)."""
    if s.archive is not None:
        from hpd.apps.bench_archive import archive_run

        archive_run(spec.run_dir, s.out_dir, s.archive)


def _done(spec: RunSpec) -> bool:
    if (spec.run_dir / "failed.json").is_file():
        return True
    if not all(eval_file(spec.run_dir, split).is_file() for split, _ in spec.evals):
        return False
    if spec.curve:
        steps = [int(c.name.split("-")[1]) for c in (spec.run_dir / "checkpoints").glob("step-*")]
        if not steps:  # the checkpoints are gone (a run restored from an archive): its curve is what was scored
            return any(spec.run_dir.glob("eval-curve-step*.json"))
        return all(eval_file(spec.run_dir, "curve", st).is_file() for st in steps)
    return True


@functools.lru_cache(maxsize=16)
def _grading(rows_file: str, verifier: str, answer_pattern: str | None) -> tuple[list[dict], Any]:
    from hpd.apps.verifiers import get_verifier

    return _read_rows(Path(rows_file)), get_verifier(verifier, answer_pattern=answer_pattern)


def graded_scores(answers: list[str], rows_file: Path, verifier: str, answer_pattern: str | None = None,
                  first: bool = False) -> list[float | None] | None:
    """Per-problem graded scores in [0, 1] (`Verifier.partial_credit`) of `answers` to the rows of
    `rows_file` (`first`: to its first len(answers) rows, as a checkpoint's curve is scored), in row
    order (None for a problem the verifier does not grade), or None where it grades none of them."""
    rows, v = _grading(str(rows_file), verifier, answer_pattern)
    if first:
        rows = rows[:len(answers)]
    if len(rows) != len(answers):
        raise HPDError(f"{len(answers)} kept answers for the {len(rows)} problems of {rows_file}: they were scored on "
                       "another file; delete the run's eval-*.json to score it again")
    scores = [v.partial_credit(r, c) for r, c in zip(rows, answers)]
    return scores if any(x is not None for x in scores) else None


def mean_graded(scores: list[float | None] | None) -> float | None:
    """The mean of `graded_scores` over the problems the verifier grades, or None where it grades none."""
    xs = [x for x in scores or [] if x is not None]
    return statistics.fmean(xs) if xs else None


# What picks a method's rate on validation. `graded` is added where the verifier grades every
# validation problem (long math chains): there whole-chain accuracy sits at the floor for small
# students, and a grid rate would be chosen on a problem or two.
TUNING = {"accuracy": "validation accuracy", "graded": "validation steps right (the verifier's graded score)"}


def tuning_criteria(cond: Condition, s: BenchSettings) -> list[str]:
    """`["accuracy"]`, plus `"graded"` where the condition's verifier grades every validation problem."""
    if not cond.val.is_file():
        return ["accuracy"]
    rows, v = _grading(str(cond.val), cond.verifier, s.answer_pattern)
    if rows and all(v.partial_credit(r, r.get("completion") or "") is not None for r in rows):
        return ["accuracy", "graded"]
    return ["accuracy"]


def validation_score(ev: dict[str, Any], on: str, rows_file: Path, verifier: str,
                     answer_pattern: str | None = None) -> float | None:
    """A scored validation file's score by criterion `on` (a key of `TUNING`): its accuracy, or the
    mean graded score of its kept answers to `rows_file` (None where they are not kept or none is graded)."""
    if on not in TUNING:
        raise HPDError(f"unknown tuning criterion {on!r}; choose from: {', '.join(TUNING)}")
    if on == "accuracy":
        return ev["accuracy"]
    if ev.get("completions") is None:
        return None
    return mean_graded(graded_scores(ev["completions"], rows_file, verifier, answer_pattern))


def best_rate(scores: dict[float, float | None], base: float) -> float | None:
    """The rate of the best score (ties: the rate nearest `base` on a log scale), or None where none
    is scored. The one pick rule of every tuned table (`hpd bench`, benchmarks/task_teacher*.py)."""
    scored = [(a, -abs(math.log(lr / base)), lr) for lr, a in scores.items() if a is not None]
    return max(scored)[2] if scored else None


def _val_score(cond: Condition, spec: RunSpec, s: BenchSettings, on: str) -> float | None:
    """Seed 0's validation score at one grid rate (`validation_score`), None until it is scored."""
    path = eval_file(spec.run_dir, "val")
    if not path.is_file():
        return None
    return validation_score(json.loads(path.read_text()), on, cond.val, cond.verifier, s.answer_pattern)


def tuned_lr(cond: Condition, method: str, s: BenchSettings, on: str = "accuracy") -> tuple[float, dict[float, float | None]]:
    """The grid rate with the best validation score `on` (a key of `TUNING`; `best_rate`; the base
    rate until one is scored), and every grid rate's score."""
    if on not in TUNING:
        raise HPDError(f"unknown tuning criterion {on!r}; choose from: {', '.join(TUNING)}")
    scores = {}
    for mult in s.lr_grid:
        lr = cond.start.lr * mult
        scores[lr] = _val_score(cond, run_spec(cond, method, lr, s.seeds[0], s), s, on)
    picked = best_rate(scores, cond.start.lr)
    return (cond.start.lr if picked is None else picked), scores


def plan_rates(cond: Condition, s: BenchSettings) -> list[RunSpec]:
    """Seed 0 at every grid rate (validation and test scores): what picks each method's rate.
    The reference first, each method at every rate before the next method."""
    methods = sorted(s.methods, key=lambda m: m != REFERENCE)
    return [run_spec(cond, m, cond.start.lr * mult, s.seeds[0], s) for m in methods for mult in s.lr_grid]


def plan_grid(cond: Condition, s: BenchSettings) -> list[RunSpec]:
    """Phase 1: seed 0 at every grid rate (`plan_rates`), then seeds > 0 at the base rate (the
    equal-lr table). Ordered so that an interrupted bench leaves the most useful partial tables:
    every method's validation pick first (the bench runs every condition's `plan_rates` before
    any other run), the reference first."""
    methods = sorted(s.methods, key=lambda m: m != REFERENCE)
    return plan_rates(cond, s) + [run_spec(cond, m, cond.start.lr, seed, s) for m in methods for seed in s.seeds[1:]]


def plan_tuned(cond: Condition, s: BenchSettings) -> list[RunSpec]:
    """Phase 2: seeds > 0 at each method's tuned rate (where it differs from the base rate), beside
    its seed-0 run (done in phase 1, with its accuracy-over-training curve); for every criterion of
    `tuning_criteria`, each run once."""
    specs: dict[Path, RunSpec] = {}
    for on in tuning_criteria(cond, s):
        for m in s.methods:
            lr, _ = tuned_lr(cond, m, s, on)
            for seed in s.seeds if lr != cond.start.lr else s.seeds[:1]:
                spec = run_spec(cond, m, lr, seed, s)
                specs.setdefault(spec.run_dir, spec)
    return list(specs.values())

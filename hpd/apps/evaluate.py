"""Evaluate a model on verifiable problems: generate answers, verify them, report accuracy with a CI.

One routine, `evaluate_rows`, does it for any rows and verifier: it generates one completion per
row's prompt with `hpd.responses.rollout.generate_text` (chat-templated when the tokenizer has a template,
greedy by default), scores them with the verifier (`hpd.apps.verifiers`) and returns an `EvalResult`
with the accuracy, a 95% Wilson interval, the per-row verdicts (`.verdicts`, in input order) and
one record per row. `evaluate_model` runs it on `n` held-out items of a bundled task (`hpd.apps.tasks`),
as rows checked by the task's own verifier. `eval_cli` / `eval_data_cli` are what `hpd eval
--task` / `hpd eval --data` run.

    >>> from hpd.apps.evaluate import evaluate_model, evaluate_rows
    >>> from hpd.models.loading import load_model
    >>> model, tok = load_model("tiny", tiny={"num_layers": 1, "hidden_size": 32})
    >>> result = evaluate_model(model, tok, "dialogue", n=4, max_new_tokens=8)
    >>> result.n, 0.0 <= result.accuracy <= 1.0, len(result.records)
    (4, True, 4)
    >>> rows = [{"prompt": "What is 2+2?", "answer": "4"}, {"prompt": "Capital of France?", "answer": "Paris"}]
    >>> result = evaluate_rows(model, rows, "exact", tokenizer=tok, max_new_tokens=8)
    >>> len(result.verdicts), result.task
    (2, 'exact')
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from hpd.errors import HPDError
from hpd.files import check_output
from hpd.training.progress import Progress
from hpd.responses.rollout import generate_text
from hpd.stats import Z_95, wilson_interval  # noqa: F401  (re-exported: hpd.apps.evaluate.wilson_interval)
from hpd.apps.tasks import Task, get_task, task_row
from hpd.apps.verifiers import TaskVerifier, Verifier, get_verifier

# The generation budget of rows whose verifier names none (a bundled task names its own).
DEFAULT_MAX_NEW_TOKENS = 256

@dataclass
class EvalResult:
    """Accuracy of one evaluation; `records` hold prompt, reference, completion, correct per row.

    `task` is the label of what was evaluated: a task spec (`math:steps=4`) or, for data rows,
    the data file and verifier.
    """

    task: str
    n: int
    correct: int
    accuracy: float
    ci_low: float
    ci_high: float
    records: list[dict[str, Any]] = field(default_factory=list, repr=False)

    @property
    def verdicts(self) -> list[bool]:
        """One verdict per row, in input order."""
        return [bool(r["correct"]) for r in self.records]

    def summary(self) -> str:
        """One line: `math: 41/200 = 20.5% (95% CI 15.5-26.6%)`."""
        return (
            f"{self.task}: {self.correct}/{self.n} = {100 * self.accuracy:.1f}% "
            f"(95% CI {100 * self.ci_low:.1f}-{100 * self.ci_high:.1f}%)"
        )


def evaluate_rows(
    model: PreTrainedModel | str | os.PathLike[str],
    rows: Sequence[Mapping[str, Any]],
    verifier: Verifier | str,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    max_new_tokens: int | None = None,
    batch_size: int = 32,
    n: int | None = None,
    temperature: float = 0.0,
    seed: int = 0,
    label: str | None = None,
    progress: bool = False,
) -> EvalResult:
    """Generate for each row's `prompt` (text or chat messages) and verify: the one evaluation routine.

    model:          a model path (HF directory, .gguf file, "tiny") or a loaded model with `tokenizer`.
    rows:           dicts as in a data file; `n` keeps the first n (None: all).
    verifier:       a `Verifier` or a spec for `hpd.apps.verifiers.get_verifier` ("exact", "math", ...).
    max_new_tokens: the budget of every row; None: the verifier's per row (a task's), else
                    `DEFAULT_MAX_NEW_TOKENS`. `temperature=0` is greedy decoding.
    Rows are checked (prompt, the verifier's fields) before the model is loaded or run.
    progress:       show the generation's progress with an ETA on stderr (`hpd.training.progress`).
    """
    if isinstance(verifier, str):
        verifier = get_verifier(verifier)
    sources = getattr(rows, "sources", None)  # rows of `load_rows`: errors name the file and line
    if n is not None:
        if n < 1:
            raise HPDError(f"n must be at least 1 to evaluate, got {n}")
        rows, sources = rows[:n], None if sources is None else sources[:n]
    if not rows:
        raise HPDError("no rows to evaluate: the data is empty")
    for i, row in enumerate(rows):
        prompt = row.get("prompt") if isinstance(row, Mapping) else None
        if not isinstance(prompt, (str, list)) or not prompt:
            raise HPDError(f"row {i} (0-based) has no 'prompt' (a string, or chat messages) to generate from")
    verifier.check_rows(rows, sources)
    if isinstance(model, (str, os.PathLike)):
        from hpd.models.loading import load_model

        model, tokenizer = load_model(str(model))
    budgets = [max_new_tokens or verifier.max_new_tokens(row) or DEFAULT_MAX_NEW_TOKENS for row in rows]
    completions: list[str] = [""] * len(rows)
    with Progress(len(rows), f"eval {label or verifier.name}", unit="prompt", enabled=progress) as bar:
        for budget in sorted(set(budgets)):  # one generation call per budget (per task), rows in input order
            idx = [i for i, b in enumerate(budgets) if b == budget]
            texts = generate_text(model, tokenizer, [rows[i]["prompt"] for i in idx], max_new_tokens=budget,
                                  temperature=temperature, batch_size=batch_size, seed=seed, on_batch=bar.update)
            for i, text in zip(idx, texts):
                completions[i] = text
    verdicts = verifier.verify_batch(rows, completions)
    records = [
        {"prompt": row["prompt"], "reference": row.get("completion", ""), "completion": c, "correct": bool(ok)}
        for row, c, ok in zip(rows, completions, verdicts)
    ]
    correct = sum(r["correct"] for r in records)
    low, high = wilson_interval(correct, len(records))
    return EvalResult(label or verifier.name, len(records), correct, correct / len(records), low, high, records)


def evaluate_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: str | Task,
    *,
    n: int = 200,
    split: str = "test",
    seed: int = 0,
    max_new_tokens: int | None = None,
    batch_size: int = 32,
    temperature: float = 0.0,
    progress: bool = False,
) -> EvalResult:
    """Generate for `n` items of `task` (a `Task` or a name/spec like "math:steps=4") and verify.

    The items go through `evaluate_rows` as data rows (`hpd.apps.tasks.task_row`) checked by the task.
    `max_new_tokens=None` uses the task's default budget; `temperature=0` is greedy decoding.
    """
    if n < 1:
        raise HPDError(f"n must be at least 1 to evaluate, got {n}")
    task_obj = get_task(task) if isinstance(task, str) else task
    label = task if isinstance(task, str) else task_obj.name
    rows = [task_row(item) for item in task_obj.generate(split, n, seed=seed)]
    return evaluate_rows(model, rows, TaskVerifier(task_obj), tokenizer=tokenizer, max_new_tokens=max_new_tokens,
                         batch_size=batch_size, temperature=temperature, seed=seed, label=label, progress=progress)


def write_records(result: EvalResult, path: str | os.PathLike[str]) -> None:
    """Write one JSON line per item: prompt, reference, completion, correct."""
    parent = os.path.dirname(os.fspath(path))
    if parent:
        os.makedirs(parent, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for record in result.records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def _run_of(model_dir: Path) -> Path | None:
    """The run directory a model directory belongs to (`RUN/final`, `RUN/checkpoints/step-N/model`),
    found by the `metrics.jsonl` every run writes; None for a model outside a run."""
    for parent in list(model_dir.resolve().parents)[:3]:
        if (parent / "metrics.jsonl").is_file() and (parent / "config.yaml").is_file():
            return parent
    return None


def _file_safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_=." else "_" for c in text)


def eval_out(model_path: str, label: str, out: str | os.PathLike[str] | None = None) -> Path:
    """Where `hpd eval` writes its per-example records: `out`, else `RUN/eval/<final|step-N>-<label>.jsonl`
    for a model of a run, else `eval/<model name>-<label>.jsonl` in the working directory.

    Never inside the model directory: a file there would change what the directory holds (and, before
    content hashes, invalidated `hpd generate`'s cache of the model); an `out` there is refused.
    """
    p = Path(model_path)
    safe = _file_safe(label)
    if out is not None:
        path = Path(out)
    elif p.is_dir() and (run := _run_of(p)) is not None:
        name = "-".join(part for part in p.resolve().relative_to(run).parts if part not in ("checkpoints", "model"))
        path = run / "eval" / f"{name}-{safe}.jsonl"
    else:
        name = p.stem if p.is_file() else p.name if p.is_dir() else str(model_path)
        path = Path("eval") / f"{_file_safe(name)}-{safe}.jsonl"
    if p.is_dir() and path.resolve().is_relative_to(p.resolve()):
        raise HPDError(f"evaluation outputs go outside the model directory '{model_path}' (it would then hold files "
                       f"other than the model's): pass --out FILE elsewhere, or run from another directory")
    return path


def eval_cli(
    model_path: str,
    task: str,
    n: int = 200,
    out: str | None = None,
    split: str = "test",
    seed: int = 0,
    batch_size: int = 32,
    max_new_tokens: int | None = None,
) -> EvalResult:
    """Load a model, evaluate it on `task`, print the one-line summary and write the records."""
    from hpd.models.loading import load_model

    task_obj = get_task(task)  # fail on a bad task name before the (slow) model load
    task_obj.preflight()
    dest = eval_out(model_path, task, out)  # a refused destination fails before the model load
    model, tokenizer = load_model(model_path)
    result = evaluate_model(
        model,
        tokenizer,
        task_obj,
        n=n,
        split=split,
        seed=seed,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        progress=True,
    )
    result.task = task
    write_records(result, dest)
    print(result.summary())
    return result


class Rows(list):
    """Data rows (dicts); `sources`: where each one comes from ("train.jsonl:17", "data.parquet[3]");
    `skipped`: the bad rows left out (`on_bad_row="skip"`)."""

    def __init__(self, rows: Sequence[dict[str, Any]], sources: Sequence[str], skipped: int = 0):
        super().__init__(rows)
        self.sources = list(sources)
        self.skipped = skipped


def load_rows(path: str | os.PathLike[str], *, prompt_field: str = "prompt", completion_field: str = "completion",
              messages_field: str = "messages", on_bad_row: str = "error", require_completion: bool = False,
              skip_hint: str = "pass --on-bad-row skip") -> Rows:
    """The rows of a data source as dicts `{"prompt", "completion", ...}`, read by `hpd.data.rows.load_examples`
    (the reader of `hpd train`: every format, its row errors naming the file and line).

    A chat row's `prompt` is its messages before the last assistant turn, its `completion` that turn
    (absent for a prompt-only row; `require_completion`: such a row is a bad row); every other field is kept. The fields are the data settings'
    (`data.prompt_field`, ...); the dicts use the plain names, so a file written from them reads back
    with the default settings.
    """
    from hpd.data.rows import load_examples

    examples, stats = load_examples(os.fspath(path), prompt_field=prompt_field, completion_field=completion_field,
                                    messages_field=messages_field, on_bad_row=on_bad_row,
                                    require_completion=require_completion,
                                    skip_hint=skip_hint)
    rows = [{"prompt": ex.prompt, **({"completion": ex.completion} if ex.completion else {}),
             **{k: v for k, v in ex.extra.items() if k not in ("prompt", "completion")}} for ex in examples]
    return Rows(rows, [ex.source for ex in examples], stats.skipped)


def check_rows(verifier: Verifier, rows: Sequence[Mapping[str, Any]], source: str | os.PathLike[str]) -> None:
    """`verifier.check_rows(rows)`, its one-line error naming the file `source` the rows come from:
    the row's file and line for rows of `load_rows` (`Rows.sources`), else the file and row index."""
    sources = getattr(rows, "sources", None)
    try:
        verifier.check_rows(rows, sources)
    except HPDError as e:
        if sources is not None:
            raise
        raise HPDError(f"{os.fspath(source)}: {e}") from None


def eval_data_cli(
    model_path: str,
    data: str,
    verifier: str,
    *,
    answer_pattern: str | None = None,
    n: int | None = None,
    out: str | None = None,
    batch_size: int = 32,
    max_new_tokens: int | None = None,
    on_bad_row: str = "error",
) -> EvalResult:
    """`hpd eval --data`: check the verifier and rows, load the model, evaluate, print, write records.

    data: any source `hpd train` reads (JSONL, JSON, Parquet, a `save_to_disk` directory, `dir:split`)."""
    v = get_verifier(verifier, answer_pattern=answer_pattern)  # a bad spec fails before any loading
    rows = load_rows(data, on_bad_row=on_bad_row)
    check_rows(v, rows, data)
    name = Path(data.rstrip("/\\"))
    label = f"{name.name} [{v.name}]"
    dest = eval_out(model_path, f"{name.stem}-{_file_safe(Path(v.name).name)}", out)
    check_output(dest, {"--data": data}, what="--out", directory=False)  # never over the rows it reads
    result = evaluate_rows(model_path, rows, v, max_new_tokens=max_new_tokens, batch_size=batch_size, n=n, label=label,
                           progress=True)
    write_records(result, dest)
    print(result.summary())
    return result

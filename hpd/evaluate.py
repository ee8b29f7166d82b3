"""Evaluate a model on a bundled task: generate answers, verify them, report accuracy with a CI.

`evaluate_model` draws `n` held-out items of a task (`hpd.tasks`), generates one completion per
prompt with `hpd.rollout.generate_text` (chat-templated when the tokenizer has a template, greedy
by default), scores them with the task's verifier and returns an `EvalResult` with the accuracy,
a 95% Wilson interval and one record per item. `eval_cli` is what `hpd eval` runs.

    >>> from hpd.evaluate import evaluate_model, wilson_interval
    >>> from hpd.models import load_model
    >>> model, tok = load_model("tiny", tiny={"num_layers": 1, "hidden_size": 32})
    >>> result = evaluate_model(model, tok, "dialogue", n=4, max_new_tokens=8)
    >>> result.n, 0.0 <= result.accuracy <= 1.0, len(result.records)
    (4, True, 4)
    >>> [round(v, 3) for v in wilson_interval(41, 200)]
    [0.155, 0.266]
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from hpd.errors import HPDError
from hpd.rollout import generate_text
from hpd.tasks import Task, get_task

Z_95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_interval(correct: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion `correct / n`.

    Unlike the normal (Wald) interval it stays inside [0, 1] and is not empty at 0 or n correct,
    which matters for the small evaluation sets and extreme accuracies of tiny models.
    """
    if n <= 0:
        raise HPDError(f"the Wilson interval needs n >= 1 samples, got n={n}")
    if not 0 <= correct <= n:
        raise HPDError(f"correct must be in 0..n, got correct={correct}, n={n}")
    p = correct / n
    z2 = z * z
    denom = 1.0 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    # At 0 or n correct one bound is exactly 0 or 1; rounding would leave e.g. 3e-17 above 0.
    low = 0.0 if correct == 0 else max(0.0, center - half)
    high = 1.0 if correct == n else min(1.0, center + half)
    return low, high


@dataclass
class EvalResult:
    """Accuracy of one task evaluation; `records` hold prompt, reference, completion, correct."""

    task: str
    n: int
    correct: int
    accuracy: float
    ci_low: float
    ci_high: float
    records: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def summary(self) -> str:
        """One line: `math: 41/200 = 20.5% (95% CI 15.5-26.6%)`."""
        return (
            f"{self.task}: {self.correct}/{self.n} = {100 * self.accuracy:.1f}% "
            f"(95% CI {100 * self.ci_low:.1f}-{100 * self.ci_high:.1f}%)"
        )


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
) -> EvalResult:
    """Generate for `n` items of `task` (a `Task` or a name/spec like "math:steps=4") and verify.

    `max_new_tokens=None` uses the task's default budget; `temperature=0` is greedy decoding.
    """
    if n < 1:
        raise HPDError(f"n must be at least 1 to evaluate, got {n}")
    task_obj = get_task(task) if isinstance(task, str) else task
    label = task if isinstance(task, str) else task_obj.name
    task_obj.preflight()  # e.g. no sandbox for generated code: say so before generating
    items = task_obj.generate(split, n, seed=seed)
    completions = generate_text(
        model,
        tokenizer,
        [item.prompt for item in items],
        max_new_tokens=max_new_tokens or task_obj.max_new_tokens,
        temperature=temperature,
        batch_size=batch_size,
        seed=seed,
    )
    verdicts = task_obj.verify_batch(items, completions)
    records = [
        {"prompt": it.prompt, "reference": it.reference, "completion": c, "correct": bool(ok)}
        for it, c, ok in zip(items, completions, verdicts)
    ]
    correct = sum(r["correct"] for r in records)
    low, high = wilson_interval(correct, len(records))
    return EvalResult(label, len(records), correct, correct / len(records), low, high, records)


def write_records(result: EvalResult, path: str | os.PathLike[str]) -> None:
    """Write one JSON line per item: prompt, reference, completion, correct."""
    parent = os.path.dirname(os.fspath(path))
    if parent:
        os.makedirs(parent, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for record in result.records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def _default_out(model_path: str, task: str) -> Path:
    """`<model_dir>/eval-<task>.jsonl`; next to a GGUF file; the working directory for "tiny"."""
    p = Path(model_path)
    folder = p if p.is_dir() else (p.parent if p.is_file() else Path("."))
    safe = "".join(c if c.isalnum() or c in "-_=." else "_" for c in task)
    return folder / f"eval-{safe}.jsonl"


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
    from hpd.models import load_model

    task_obj = get_task(task)  # fail on a bad task name before the (slow) model load
    task_obj.preflight()
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
    )
    result.task = task
    write_records(result, out or _default_out(model_path, task))
    print(result.summary())
    return result

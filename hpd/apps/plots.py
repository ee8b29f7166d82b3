"""Training-dynamics figures from one or more runs' ``metrics.jsonl``.

Each run directory written by `hpd train` holds ``metrics.jsonl``: one JSON object per line,
``{"type": "train" | "eval", "step": int, "loss": ..., "agreement": ..., ...}``. `plot_runs` draws
one PNG per quantity (loss, agreement, kl, entropy, ce, grad_norm, lr) with train curves solid and
eval curves dashed, several runs overlaid, plus ``dynamics.png``: a 2x2 grid of loss, agreement,
kl and entropy (the curves the HPD paper follows over training), and when logged:
``value.png`` (the objective's own value), ``diagnostics.png`` (HPD's frac_A, frac_B, r, r_hat,
... one panel each) and ``accuracy.png`` (held-out accuracy, one panel per task or split).

One axis never holds two quantities. The loss and the value mean something else for each objective
(HPD's surrogate vs SFT's cross-entropy): runs of different objectives (name and parameters, read
from ``RUN/config.yaml``) get one panel each in ``loss.png`` and ``value.png``, and the dynamics
grid shows the cross-entropy on sequence tokens (``ce``, the same quantity for every run) in the
loss's place. Held-out accuracy is read from what `hpd bench` scores into the run directory
(``eval-test.json``, ``eval-val.json``, ``eval-curve-stepN.json``), from `hpd eval`'s records of
the run's models (``RUN/eval/final-TASK.jsonl``, ``RUN/eval/step-N-TASK.jsonl``) and from any
``accuracy`` key of metrics.jsonl.

    >>> import json, tempfile
    >>> from pathlib import Path
    >>> from hpd.apps.plots import plot_runs
    >>> run = Path(tempfile.mkdtemp()) / "run-a"; run.mkdir()
    >>> rows = [{"type": "train", "step": s, "loss": 1 / s, "kl": 0.5 / s} for s in range(1, 6)]
    >>> _ = (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\\n" for r in rows))
    >>> sorted(p.name for p in plot_runs([run]))
    ['dynamics.png', 'kl.png', 'loss.png']

Missing keys, nulls and NaNs are skipped point by point; a truncated last line (a killed run) or a
line damaged by a kill and resume is ignored; when a resumed run logs a step again, the last
logged value wins. Matplotlib is used through its object API with the Agg canvas, so importing
this module does not change the process-wide backend.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from hpd.errors import HPDError
from hpd.files import atomic_write
from hpd.training.metrics_file import RESTART, read_records

__all__ = ["QUANTITIES", "DYNAMICS", "OBJECTIVE_OWN", "DIAGNOSTICS", "RunMetrics", "read_metrics", "read_accuracy",
           "plot_runs", "ema"]

# quantity -> y-axis label
QUANTITIES: dict[str, str] = {
    "loss": "loss",
    "agreement": "token agreement with teacher",
    "kl": "KL(teacher || student)",
    "entropy": "student entropy (nats)",
    "ce": "cross-entropy on sequence tokens",
    "grad_norm": "gradient norm (before clipping)",
    "lr": "learning rate",
}
DYNAMICS: tuple[str, ...] = ("loss", "agreement", "kl", "entropy")
# Quantities whose meaning is the objective's own: overlaid only across runs of one objective.
OBJECTIVE_OWN: dict[str, str] = {"loss": "loss (the objective's surrogate)", "value": "objective value"}
# The objective's diagnostics (HPD's, hpdk's and the cache's), one panel each; `_band` keys are drawn as
# a shaded min..max band around their mean.
DIAGNOSTICS: dict[str, str] = {
    "frac_A": "frac_A: tokens in set A (teacher above student)",
    "frac_B": "frac_B: samples in set B (student above teacher)",
    "frac_A_and_B": "frac_A_and_B",
    "frac_sample_differs": "frac of samples != sequence token",
    "frac_sample_outside_topk": "frac of samples outside the cached top-K",
    "r_mean": "r = q(y) (log p(y) - log q(y)), y: sequence token",
    "r_hat_mean": "r_hat: the same at the student's sample",
    "frac_teacher_top1_is_y": "hpdk: frac of positions where y is the teacher's top-1",
    "topk_push": "hpdk: positive top-k weight per position",
}
_BAND = {"r_mean": ("r_min", "r_max"), "r_hat_mean": ("r_hat_min", "r_hat_max")}
_KINDS = ("train", "eval")


@dataclass
class RunMetrics:
    """The curves of one run: ``series[kind][quantity] = (steps, values)``, sorted by step."""

    run_dir: Path
    series: dict[str, dict[str, tuple[list[int], list[float]]]] = field(default_factory=dict)
    skipped_lines: int = 0
    # what the run optimised: its config's objective section without chunk_size (None when
    # RUN/config.yaml is absent)
    objective: dict[str, Any] | None = None
    # held-out accuracy in [0, 1]: series name (task or split) -> (steps, values)
    accuracy: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)

    def curve(self, kind: str, quantity: str) -> tuple[list[int], list[float]]:
        return self.series.get(kind, {}).get(quantity, ([], []))

    def last_step(self) -> int | None:
        steps = self.curve("train", "loss")[0] or [s for kind in self.series.values() for c in kind.values() for s in c[0]]
        return max(steps) if steps else None


def _number(value: Any) -> float | None:
    """A finite float, or None for anything not plottable (missing, null, NaN, inf, text)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def read_metrics(run_dir: str | os.PathLike[str]) -> RunMetrics:
    """Parse ``RUN_DIR/metrics.jsonl`` into sorted per-quantity curves.

    Raises HPDError if the file is missing. Lines that are not JSON objects are skipped (a killed
    run leaves a truncated last line; a resumed run may append to it); damage before the last line
    is reported with a warning since it hints at something else.
    """
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise HPDError(
            f"no metrics file '{path}': pass a run directory written by `hpd train` "
            f"(its output_dir), which holds metrics.jsonl"
        )
    # (kind, quantity) -> {step: value}, from the records as the run stands (a resumed run's
    # restart markers applied, `hpd.training.metrics_file`); a dict, so a step logged twice draws no zigzag.
    points: dict[tuple[str, str], dict[int, float]] = {}
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    bad_inner: list[int] = []
    for lineno, line in enumerate(lines, start=1):  # damage before the last line is worth a warning
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        step = row.get("step") if isinstance(row, dict) else None
        # A line cut by a kill is the last one, or the one before a restart marker (a resume appends).
        cut = lineno == len(lines) or f'"type": "{RESTART}"' in lines[lineno]
        if (not isinstance(row, dict) or isinstance(step, bool) or not isinstance(step, (int, float))) and not cut:
            bad_inner.append(lineno)
    for row in read_records(path):
        step = row.get("step")
        if isinstance(step, bool) or not isinstance(step, (int, float)):
            continue
        kind = row.get("type", "train")
        if kind not in _KINDS:
            continue  # other record types (e.g. run info) are not curves
        for quantity, value in row.items():
            number = _number(value)
            if quantity in ("type", "step") or number is None:
                continue
            points.setdefault((kind, quantity), {})[int(step)] = number
    if bad_inner:
        shown = ", ".join(map(str, bad_inner[:5])) + (" ..." if len(bad_inner) > 5 else "")
        warnings.warn(f"{path}: skipped {len(bad_inner)} unreadable line(s): {shown}", stacklevel=2)
    metrics = RunMetrics(run_dir=run_dir, skipped_lines=len(bad_inner), objective=_objective_of(run_dir))
    for (kind, quantity), by_step in points.items():
        steps = sorted(by_step)
        metrics.series.setdefault(kind, {})[quantity] = (steps, [by_step[s] for s in steps])
    metrics.accuracy = read_accuracy(run_dir, metrics.last_step())
    for kind, curves in metrics.series.items():  # an `accuracy` key of metrics.jsonl
        if "accuracy" in curves:
            metrics.accuracy.setdefault(f"{kind} (metrics.jsonl)", curves["accuracy"])
    return metrics


def _objective_of(run_dir: Path) -> dict[str, Any] | None:
    """The run's objective section from its config.yaml, without chunk_size (which changes no value):
    the name and the settings that change what the loss means (JSD's beta, a temperature)."""
    import yaml

    try:
        section = (yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}).get("objective")
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    if not isinstance(section, dict) or "name" not in section:
        return None
    return {k: v for k, v in section.items() if k != "chunk_size"}


def _objective_groups(runs: Sequence[RunMetrics]) -> list[tuple[str, list[int]]]:
    """Runs grouped by objective (name and settings), in order of appearance: (label, run indices).

    A label is the objective's name, plus the settings that tell apart groups of the same name;
    runs without a config.yaml form one group, "objective unknown".
    """
    groups: dict[str, list[int]] = {}
    for i, run in enumerate(runs):
        key = json.dumps(run.objective, sort_keys=True, default=str) if run.objective is not None else ""
        groups.setdefault(key, []).append(i)
    labels = []
    for key, members in groups.items():
        obj = runs[members[0]].objective
        if obj is None:
            labels.append(("objective unknown", members))
            continue
        same_name = [runs[m[0]].objective for k, m in groups.items() if k and runs[m[0]].objective["name"] == obj["name"]]
        differing = sorted(k for k in obj if k != "name" and len({json.dumps(o.get(k), default=str) for o in same_name}) > 1)
        labels.append((str(obj["name"]) + "".join(f" {k}={obj[k]}" for k in differing), members))
    return labels


def read_accuracy(run_dir: str | os.PathLike[str], last_step: int | None = None) -> dict[str, tuple[list[int], list[float]]]:
    """Held-out accuracy scored into a run directory: {series: (steps, accuracies in [0, 1])}.

    `hpd bench`'s `eval-curve-stepN.json` (series "curve") and `eval-test.json` / `eval-val.json`
    (series "test" / "val", at `last_step`); `hpd eval`'s records `eval/final-TASK.jsonl` (at
    `last_step`) and `eval/step-N-TASK.jsonl` (series TASK). Unreadable files are skipped.
    """
    import re

    run_dir = Path(run_dir)
    points: dict[str, dict[int, float]] = {}

    def add(series: str, step: int | None, acc: Any) -> None:
        value = _number(acc)
        if step is not None and value is not None:
            points.setdefault(series, {})[step] = value

    for path in run_dir.glob("eval-*.json"):
        m = re.fullmatch(r"eval-(\w+?)(?:-step(\d+))?\.json", path.name)
        if not m:
            continue
        try:
            acc = json.loads(path.read_text(encoding="utf-8")).get("accuracy")
        except (OSError, ValueError, AttributeError):
            continue
        add(m[1], int(m[2]) if m[2] else last_step, acc)
    for path in (run_dir / "eval").glob("*.jsonl"):
        m = re.fullmatch(r"(?:final|step-(\d+))-(.+)\.jsonl", path.name)
        if not m:
            continue
        try:
            verdicts = [bool(json.loads(line)["correct"]) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if verdicts:
            add(m[2], int(m[1]) if m[1] else last_step, sum(verdicts) / len(verdicts))
    return {name: (sorted(by), [by[s] for s in sorted(by)]) for name, by in sorted(points.items())}


def ema(values: Sequence[float], smoothing: float) -> list[float]:
    """Bias-corrected exponential moving average (TensorBoard's smoothing); 0 = unchanged."""
    if not 0.0 <= smoothing < 1.0:
        raise HPDError(f"smoothing must be in [0, 1), got {smoothing}")
    out, avg, weight = [], 0.0, 0.0
    for v in values:
        avg = smoothing * avg + (1 - smoothing) * v
        weight = smoothing * weight + (1 - smoothing)
        out.append(avg / weight)
    return out


def _labels(run_dirs: Sequence[Path]) -> list[str]:
    """Run names for legends: the dir names, with parents added when two names collide."""
    resolved = [p.resolve() for p in run_dirs]
    for depth in range(1, 6):
        labels = ["/".join(p.parts[-depth:]) for p in resolved]
        if len(set(labels)) == len(labels):
            return labels
    return [str(p) for p in run_dirs]


def _draw(ax: Any, runs: Sequence[RunMetrics], labels: Sequence[str], quantity: str,
          smoothing: float, colors: Sequence[str], legend: str = "inside") -> bool:
    """Draw one quantity on `ax`; False when no run has data for it.

    legend: "inside" (on the axes), "outside" (to the right of them) or "none".
    """
    drew = False
    for run, label, color in zip(runs, labels, colors):
        for kind in _KINDS:
            steps, values = run.curve(kind, quantity)
            if not steps:
                continue
            drew = True
            name = f"{label} ({kind})" if len(runs) > 1 or kind == "eval" else label
            style = "-" if kind == "train" else "--"
            # Eval points are few: markers make them visible even when there are one or two.
            marker = "o" if kind == "eval" or len(steps) == 1 else None
            if smoothing > 0 and kind == "train" and len(steps) > 1:
                ax.plot(steps, values, style, color=color, alpha=0.25, linewidth=1)
                ax.plot(steps, ema(values, smoothing), style, color=color, label=name, linewidth=1.8)
            else:
                ax.plot(steps, values, style, color=color, label=name, marker=marker,
                        markersize=3, linewidth=1.5)
    if drew:
        ax.set_xlabel("step")
        ax.set_ylabel(QUANTITIES.get(quantity, quantity))
        ax.grid(True, alpha=0.3)
        if legend == "inside":
            ax.legend(fontsize="small")
        elif legend == "outside":
            ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    else:
        ax.text(0.5, 0.5, f"no {quantity} logged", ha="center", va="center",
                transform=ax.transAxes, color="gray")
        ax.set_xticks([])
        ax.set_yticks([])
    ax.set_title(quantity)
    return drew


def _panels(figure_cls: Any, n: int, many: bool) -> tuple[Any, list[Any]]:
    """A figure of `n` panels (up to 3 per row); the unused cells of the grid are hidden."""
    cols = min(n, 3)
    rows = -(-n // cols)
    fig = figure_cls(figsize=(4.6 * cols + (2.5 if many else 0), 3.8 * rows))
    axes = list(fig.subplots(rows, cols, squeeze=False).ravel())
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _save(fig: Any, path: Path) -> Path:
    # Written next to the target and renamed: a viewer never sees a half-written PNG.
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))


def plot_runs(
    run_dirs: Iterable[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str] | None = None,
    *,
    smoothing: float = 0.0,
) -> list[Path]:
    """Write one PNG per logged quantity plus ``dynamics.png``; return the written paths.

    run_dirs: run directories (each with metrics.jsonl); several are overlaid, labelled by name.
    out_dir: default ``RUN_DIR/plots`` for one run, ``./plots`` for several.
    smoothing: EMA factor in [0, 1) for train curves (raw curve drawn faintly); 0 = none.
    Quantities no run logged get no file. Raises HPDError for a missing metrics.jsonl or when no
    run has any plottable metric yet.
    """
    import matplotlib  # imported here: only plotting needs matplotlib
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    dirs = [Path(d) for d in run_dirs]
    if not dirs:
        raise HPDError("no run directories given: pass at least one output_dir of `hpd train`")
    if not 0.0 <= smoothing < 1.0:
        raise HPDError(f"smoothing must be in [0, 1) (e.g. 0.9), got {smoothing}")
    runs = [read_metrics(d) for d in dirs]
    if not any(run.series for run in runs):
        raise HPDError(
            "no plottable metrics in " + ", ".join(str(d / "metrics.jsonl") for d in dirs)
            + ": the run has not logged a step yet"
        )
    out = Path(out_dir) if out_dir is not None else (dirs[0] / "plots" if len(dirs) == 1 else Path("plots"))
    out.mkdir(parents=True, exist_ok=True)
    labels = _labels(dirs)
    # Beyond 10 runs the default cycle repeats colours: take a 20-colour map instead.
    palette = [f"C{i % 10}" for i in range(len(runs))] if len(runs) <= 10 else \
        [matplotlib.colormaps["tab20"](i % 20) for i in range(len(runs))]
    # Many runs: legends beside the axes (single figures) or one shared legend (the 2x2 figure).
    many = len(runs) > 3

    written: list[Path] = []
    groups = _objective_groups(runs)
    legend = "outside" if many else "inside"
    for quantity in [*QUANTITIES, "value"]:
        if not any(run.curve(kind, quantity)[0] for run in runs for kind in _KINDS):
            continue
        if quantity in OBJECTIVE_OWN:
            # One panel per objective: a surrogate loss and a cross-entropy are not one quantity.
            shown = [(name, members) for name, members in groups
                     if any(runs[i].curve(kind, quantity)[0] for i in members for kind in _KINDS)]
            fig, axes = _panels(Figure, len(shown), many)
            for n, (ax, (name, members)) in enumerate(zip(axes, shown)):
                _draw(ax, [runs[i] for i in members], [labels[i] for i in members], quantity, smoothing,
                      [palette[i] for i in members], legend if n == len(shown) - 1 or not many else "none")
                ax.set_ylabel(OBJECTIVE_OWN[quantity])
                ax.set_title(f"{quantity}: {name}" if len(groups) > 1 or name != "objective unknown" else quantity)
        else:
            fig = Figure(figsize=(9.5, 4.5) if many else (7, 4.5))
            ax = fig.add_subplot()
            _draw(ax, runs, labels, quantity, smoothing, palette, legend)
            if quantity == "lr":
                ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        fig.tight_layout()
        written.append(_save(fig, out / f"{quantity}.png"))

    diagnostics = [q for q in DIAGNOSTICS if any(run.curve(kind, q)[0] for run in runs for kind in _KINDS)]
    if diagnostics:
        fig, axes = _panels(Figure, len(diagnostics), many)
        for n, (ax, quantity) in enumerate(zip(axes, diagnostics)):
            _draw(ax, runs, labels, quantity, smoothing, palette, legend if n == len(diagnostics) - 1 or not many else "none")
            ax.set_ylabel(DIAGNOSTICS[quantity], fontsize="small")
            for run, color in zip(runs, palette):
                lo, hi = (run.curve("train", k) for k in _BAND.get(quantity, ("", "")))
                if lo[0] and lo[0] == hi[0]:  # the min..max over the step's tokens, around the mean
                    ax.fill_between(lo[0], lo[1], hi[1], color=color, alpha=0.12, linewidth=0)
        fig.suptitle("objective diagnostics")
        fig.tight_layout()
        written.append(_save(fig, out / "diagnostics.png"))

    series = sorted({name for run in runs for name in run.accuracy})
    if series:
        fig, axes = _panels(Figure, len(series), many)
        for n, (ax, name) in enumerate(zip(axes, series)):
            for run, label, color in zip(runs, labels, palette):
                steps, values = run.accuracy.get(name, ([], []))
                if steps:
                    ax.plot(steps, [100 * v for v in values], "--", color=color, marker="o", markersize=4,
                            linewidth=1.5, label=label)
            ax.set_xlabel("step")
            ax.set_ylabel("held-out accuracy (%)")
            ax.set_title(f"accuracy: {name}")
            ax.grid(True, alpha=0.3)
            if n == len(series) - 1 or not many:
                ax.legend(fontsize="small", **({"loc": "upper left", "bbox_to_anchor": (1.02, 1.0)} if many else {}))
        fig.tight_layout()
        written.append(_save(fig, out / "accuracy.png"))

    fig = Figure(figsize=(12, 8))
    axes = fig.subplots(2, 2).ravel()
    for ax, quantity in zip(axes, DYNAMICS):
        # Runs of several objectives: their losses are different quantities, ce is one for all.
        shared = "ce" if quantity in OBJECTIVE_OWN and len(groups) > 1 else quantity
        _draw(ax, runs, labels, shared, smoothing, palette, "none" if many else "inside")
        if shared != quantity:
            ax.set_title(f"{shared} (objectives differ: each one's {quantity} in {quantity}.png)")
    if many:
        handles = [Line2D([], [], color=c, linewidth=2, label=name) for c, name in zip(palette, labels)]
        handles += [Line2D([], [], color="gray", linestyle="-", label="train"),
                    Line2D([], [], color="gray", linestyle="--", marker="o", markersize=3, label="eval (held-out)")]
        fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize="small")
        fig.suptitle(f"training dynamics: {len(runs)} runs")
    else:
        fig.suptitle("training dynamics: " + ", ".join(labels))
    fig.tight_layout()
    written.append(_save(fig, out / "dynamics.png"))
    return written

"""Training-dynamics plots: parsing metrics.jsonl robustly and writing the PNGs."""

from __future__ import annotations

import json
import math

import pytest

from hpd.errors import HPDError
from hpd.apps.plots import DIAGNOSTICS, DYNAMICS, QUANTITIES, ema, plot_runs, read_accuracy, read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(path, steps=10, truncated_tail=True, skip=()):
    """A synthetic run: train lines every step, eval lines every 5, a cut-off last line."""
    path.mkdir(parents=True, exist_ok=True)
    lines = []
    for s in range(1, steps + 1):
        row = {
            "type": "train",
            "step": s,
            "loss": 2.0 / s,
            "lr": 1e-3 * s / steps,
            "grad_norm": 1.0 + s,
            "agreement": s / steps,
            "kl": 1.0 / s,
            "entropy": 3.0 - 0.1 * s,
            "ce": 2.5 / s,
            "tokens_per_s": 1000.0,
            "frac_A": 0.3,
        }
        for key in skip:
            row.pop(key, None)
        lines.append(json.dumps(row))
        if s % 5 == 0:
            lines.append(json.dumps({"type": "eval", "step": s, "loss": 2.2 / s, "kl": 1.1 / s,
                                     "agreement": s / steps - 0.05, "entropy": 2.9, "ce": 2.6 / s}))
    text = "\n".join(lines) + "\n"
    if truncated_tail:
        text += '{"type": "train", "step": 11, "loss": 0.1'  # the kill came mid-write
    (path / "metrics.jsonl").write_text(text)
    return path


def test_read_metrics_sorts_dedups_and_skips_bad_values(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    rows = [
        {"type": "train", "step": 2, "loss": 2.0, "kl": float("nan")},
        {"type": "train", "step": 1, "loss": 1.0, "kl": None, "agreement": "n/a"},
        {"type": "train", "step": 2, "loss": 5.0},  # re-logged after a resume: the last wins
        {"type": "eval", "step": 2, "loss": 3.0},
        {"type": "info", "step": 0, "loss": 99.0},  # not a curve
    ]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{\"type\": \"tr")
    m = read_metrics(run)
    assert m.curve("train", "loss") == ([1, 2], [1.0, 5.0])
    assert m.curve("eval", "loss") == ([2], [3.0])
    assert m.curve("train", "kl") == ([], [])  # NaN and null dropped
    assert m.curve("train", "agreement") == ([], [])
    assert m.skipped_lines == 0  # a truncated *last* line is expected, not reported


def test_damaged_inner_line_is_skipped_with_a_warning(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(
        '{"type": "train", "step": 1, "loss": 1.0}\n'
        '{"type": "train", "step": 2, "lo{"type": "train", "step": 2, "loss": 0.5}\n'
        '{"type": "train", "step": 3, "loss": 0.25}\n'
    )
    with pytest.warns(UserWarning, match="line"):
        m = read_metrics(run)
    assert m.curve("train", "loss") == ([1, 3], [1.0, 0.25])
    assert m.skipped_lines == 1


def test_single_run_writes_every_quantity_into_run_dir_plots(tmp_path):
    run = write_run(tmp_path / "hpd-run")
    written = plot_runs([run])
    names = sorted(p.name for p in written)
    # diagnostics.png: the run logs an objective diagnostic (frac_A)
    assert names == sorted([f"{q}.png" for q in QUANTITIES] + ["dynamics.png", "diagnostics.png"])
    for p in written:
        assert p.parent == run / "plots"
        data = p.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000
    assert not [p for p in (run / "plots").iterdir() if p.name.startswith(".")]  # no temp files


def test_two_runs_overlay_into_out_dir_and_missing_quantities_are_skipped(tmp_path):
    a = write_run(tmp_path / "a" / "run")
    b = write_run(tmp_path / "b" / "run", steps=7, skip=("grad_norm", "lr"))
    out = tmp_path / "figs"
    written = plot_runs([a, b], out, smoothing=0.6)
    assert {p.parent for p in written} == {out}
    assert {"grad_norm.png", "lr.png", "dynamics.png", "loss.png"} <= {p.name for p in written}
    assert all(p.stat().st_size > 0 for p in written)


def test_quantity_no_run_logged_gets_no_file(tmp_path):
    run = write_run(tmp_path / "r", skip=("grad_norm",))
    names = {p.name for p in plot_runs([run], tmp_path / "o")}
    assert "grad_norm.png" not in names and "loss.png" in names


def test_several_runs_default_to_cwd_plots(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a, b = write_run(tmp_path / "a"), write_run(tmp_path / "b")
    written = plot_runs([a, b])
    assert all(p.parent.resolve() == (tmp_path / "plots").resolve() for p in written)


def test_missing_metrics_names_the_file(tmp_path):
    with pytest.raises(HPDError, match="metrics.jsonl"):
        plot_runs([tmp_path / "nope"])


def test_no_plottable_rows_is_an_error(tmp_path):
    run = tmp_path / "empty"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"type": "train", "st')
    with pytest.raises(HPDError, match="not logged a step"):
        plot_runs([run])


def test_bad_smoothing_is_rejected(tmp_path):
    with pytest.raises(HPDError, match="smoothing"):
        plot_runs([write_run(tmp_path / "r")], smoothing=1.0)


def test_ema_is_bias_corrected():
    assert ema([1.0, 1.0, 1.0], 0.9) == pytest.approx([1.0, 1.0, 1.0])
    assert ema([0.0, 2.0], 0.0) == [0.0, 2.0]
    smoothed = ema([0.0, 10.0], 0.5)
    assert smoothed[0] == 0.0 and 0.0 < smoothed[1] < 10.0 and math.isclose(smoothed[1], 5 / 0.75)


def test_dynamics_grid_covers_the_main_four():
    assert DYNAMICS == ("loss", "agreement", "kl", "entropy")


def test_many_runs_get_distinct_colours_and_one_shared_legend(tmp_path, monkeypatch):
    # A benchmark overlays a dozen runs: colours must not repeat and the 2x2 figure carries one
    # legend (per-axes legends would cover the curves).
    from matplotlib.figure import Figure

    import matplotlib.axes

    legends, colours = [], []
    real_legend, real_plot = Figure.legend, matplotlib.axes.Axes.plot

    def spy_plot(self, *args, **kwargs):
        if "label" in kwargs:
            colours.append((kwargs["label"].split(" (")[0], str(kwargs["color"])))
        return real_plot(self, *args, **kwargs)

    def spy_legend(self, *args, **kwargs):
        legends.append(len(kwargs.get("handles", [])))
        return real_legend(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", spy_plot)
    monkeypatch.setattr(Figure, "legend", spy_legend)
    dirs = [write_run(tmp_path / f"run{i:02d}") for i in range(12)]
    written = plot_runs(dirs, tmp_path / "plots")
    assert (tmp_path / "plots" / "dynamics.png") in written
    by_run = dict(colours)
    assert len(by_run) == 12 and len(set(by_run.values())) == 12
    assert legends == [12 + 2]  # one figure legend: 12 runs + the train/eval line styles


@pytest.fixture
def figures(monkeypatch):
    """What each figure shows: {file name: [(title, y label, [line labels]) per visible axes]}.

    The figures are not rendered (the PNG writing is tested above): it is what makes plot tests slow.
    """
    import hpd.apps.plots as plots

    shown: dict[str, list[tuple[str, str, list[str]]]] = {}

    def spy_save(fig, path):
        shown[path.name] = [(ax.get_title(), ax.get_ylabel(), [ln.get_label() for ln in ax.get_lines()])
                            for ax in fig.axes if ax.get_visible()]
        return path

    monkeypatch.setattr(plots, "_save", spy_save)
    return shown


def _with_objective(run, name, **params):
    (run / "config.yaml").write_text(json.dumps({"max_steps": 10, "objective": {"name": name, "chunk_size": 64, **params}}))
    return run


def test_losses_of_different_objectives_never_share_an_axis(tmp_path, figures):
    # HPD's surrogate (about 11) and SFT's cross-entropy (about 5.6) are different quantities: one
    # panel each in loss.png and value.png; the dynamics grid compares the runs on ce instead.
    hpd = _with_objective(write_run(tmp_path / "hpd"), "hpd", temperature=1.0)
    sft = _with_objective(write_run(tmp_path / "sft"), "sft", temperature=1.0)
    for run in (hpd, sft):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()[:-1]]
        (run / "metrics.jsonl").write_text("".join(json.dumps({**r, "value": 1.5 * r["loss"]}) + "\n" for r in rows))
    plot_runs([hpd, sft], tmp_path / "out")
    loss = figures["loss.png"]
    assert [title for title, _, _ in loss] == ["loss: hpd", "loss: sft"]
    assert all(len({label.split(" (")[0] for label in lines}) == 1 for _, _, lines in loss)  # one run per panel
    assert [t for t, _, _ in figures["value.png"]] == ["value: hpd", "value: sft"]
    assert figures["value.png"][0][1] == "objective value"
    title, ylabel, lines = figures["dynamics.png"][0]
    assert title.startswith("ce") and ylabel == QUANTITIES["ce"]
    assert {label.split(" (")[0] for label in lines} == {"hpd", "sft"}
    # the comparable quantities stay overlaid
    assert {label.split(" (")[0] for label in figures["kl.png"][0][2]} == {"hpd", "sft"}


def test_runs_of_one_objective_share_the_loss_axis_and_settings_tell_groups_apart(tmp_path, figures):
    a = _with_objective(write_run(tmp_path / "a"), "jsd", beta=0.5)
    b = _with_objective(write_run(tmp_path / "b"), "jsd", beta=0.5)
    plot_runs([a, b], tmp_path / "o1")
    assert len(figures["loss.png"]) == 1 and figures["dynamics.png"][0][0] == "loss"
    c = _with_objective(write_run(tmp_path / "c"), "jsd", beta=0.1)
    plot_runs([a, b, c], tmp_path / "o2")
    assert [t for t, _, _ in figures["loss.png"]] == ["loss: jsd beta=0.5", "loss: jsd beta=0.1"]


def test_diagnostics_get_one_panel_each_with_the_min_max_band(tmp_path, figures, monkeypatch):
    run = tmp_path / "hpd"
    run.mkdir()
    rows = [{"type": "train", "step": s, "loss": 1.0 / s, "frac_A": 0.3, "frac_B": 0.1 + 0.01 * s,
             "r_mean": 0.2, "r_min": -0.1, "r_max": 0.9, "r_hat_mean": -0.05} for s in range(1, 6)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    import matplotlib.axes

    bands = []
    real_fill = matplotlib.axes.Axes.fill_between
    monkeypatch.setattr(matplotlib.axes.Axes, "fill_between",
                        lambda self, x, lo, hi, **kw: bands.append((self.get_title(), list(lo), list(hi))) or real_fill(self, x, lo, hi, **kw))
    names = {p.name for p in plot_runs([run], tmp_path / "o")}
    assert "diagnostics.png" in names
    panels = figures["diagnostics.png"]
    assert [t for t, _, _ in panels] == ["frac_A", "frac_B", "r_mean", "r_hat_mean"]
    assert [y for _, y, _ in panels] == [DIAGNOSTICS[q] for q in ("frac_A", "frac_B", "r_mean", "r_hat_mean")]
    assert bands == [("r_mean", [-0.1] * 5, [0.9] * 5)]  # r_hat has no min/max logged: no band


def test_held_out_accuracy_from_bench_scores_and_hpd_eval_records(tmp_path, figures):
    run = write_run(tmp_path / "run", truncated_tail=False)  # last train step: 10
    (run / "eval-test.json").write_text(json.dumps({"accuracy": 0.25, "verdicts": [1, 0, 0, 0]}))
    (run / "eval-curve-step5.json").write_text(json.dumps({"accuracy": 0.5}))
    (run / "eval-curve-step10.json").write_text(json.dumps({"accuracy": 0.75}))
    (run / "eval").mkdir()
    (run / "eval" / "final-math.jsonl").write_text("".join(json.dumps({"correct": c}) + "\n" for c in (True, True, False)))
    (run / "eval" / "step-00000005-math.jsonl").write_text(json.dumps({"correct": False}) + "\n")
    (run / "eval" / "notes.jsonl").write_text("not an eval record\n")
    acc = read_accuracy(run, last_step=10)
    assert acc == {"curve": ([5, 10], [0.5, 0.75]), "math": ([5, 10], [0.0, pytest.approx(2 / 3)]), "test": ([10], [0.25])}
    assert read_metrics(run).accuracy == acc
    plot_runs([run], tmp_path / "o")
    panels = figures["accuracy.png"]
    assert [t for t, _, _ in panels] == ["accuracy: curve", "accuracy: math", "accuracy: test"]
    assert all(y == "held-out accuracy (%)" for _, y, _ in panels)


def test_no_accuracy_or_diagnostics_no_such_file(tmp_path, figures):
    names = {p.name for p in plot_runs([write_run(tmp_path / "r", skip=("frac_A",))], tmp_path / "o")}
    assert "accuracy.png" not in names and "diagnostics.png" not in names and "value.png" not in names

"""Training-dynamics plots: parsing metrics.jsonl robustly and writing the PNGs."""

from __future__ import annotations

import json
import math

import pytest

from hpd.errors import HPDError
from hpd.plots import DYNAMICS, QUANTITIES, ema, plot_runs, read_metrics

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
    assert names == sorted([f"{q}.png" for q in QUANTITIES] + ["dynamics.png"])
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

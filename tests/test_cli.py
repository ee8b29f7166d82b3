"""The `hpd` command line, driven through typer's CliRunner."""

from __future__ import annotations

import json
import subprocess
import sys
import types

import pytest
import yaml
from typer.testing import CliRunner

from hpd.apps.cli import app
from hpd.config import Config, config_to_dict, iter_fields, load_config

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args))


def test_train_help_lists_every_config_key_readably():
    result = invoke("train", "--help")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "optim.lr  (float, default 0.001; > 0)" in out
    assert "regime.mixed_lambda  (float, default 0.5; [0, 1])" in out
    for key, *_ in iter_fields():
        # one header line per key, at the start of a line (not re-flowed into a paragraph)
        assert f"\n  {key}  (" in out, key


def test_bad_override_exits_2_with_error_and_no_traceback(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("max_steps: 3\n")
    result = invoke("train", str(cfg), "optim.lr=abc")
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: optim.lr: expected a float, got 'abc'"
    assert "Traceback" not in result.output


def test_unknown_key_and_missing_file_are_user_errors(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("optim:\n  lrr: 1\n")
    result = invoke("train", str(cfg))
    assert result.exit_code == 2 and "did you mean 'optim.lr'" in result.stderr
    result = invoke("train", str(tmp_path / "missing.yaml"))
    assert result.exit_code == 2 and result.stderr.startswith("error: config file")


def test_train_calls_the_trainer_with_the_resolved_config(tmp_path, monkeypatch):
    seen = []

    def fake_train(cfg):
        seen.append(cfg)
        return tmp_path / "run"

    monkeypatch.setitem(sys.modules, "hpd.training.trainer", types.SimpleNamespace(train=fake_train))
    cfg = tmp_path / "c.yaml"
    cfg.write_text("max_steps: 3\noptim:\n  lr: 0.5\n")
    result = invoke("train", str(cfg), "optim.lr=3e-4", "regime.name=mixed")
    assert result.exit_code == 0, result.output
    assert len(seen) == 1 and isinstance(seen[0], Config)
    assert (seen[0].max_steps, seen[0].optim.lr, seen[0].regime.name) == (3, 3e-4, "mixed")
    assert str(tmp_path / "run") in result.stdout


def test_train_dry_run_prints_resolved_yaml_without_training(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "hpd.training.trainer", None)  # importing it would fail
    cfg = tmp_path / "c.yaml"
    cfg.write_text("max_steps: 3\n")
    result = invoke("train", str(cfg), "seed=9", "--dry-run")
    assert result.exit_code == 0, result.output
    data = yaml.safe_load(result.stdout)
    assert data["max_steps"] == 3 and data["seed"] == 9


def test_config_prints_yaml_that_load_config_reads_back(tmp_path):
    result = invoke("config")
    assert result.exit_code == 0
    assert yaml.safe_load(result.stdout) == config_to_dict(Config())
    path = tmp_path / "default.yaml"
    path.write_text(result.stdout)
    assert load_config(path) == Config()


def test_config_out_writes_file_and_refuses_to_overwrite(tmp_path):
    path = tmp_path / "c.yaml"
    assert invoke("config", "--out", str(path)).exit_code == 0
    assert load_config(path) == Config()
    again = invoke("config", "--out", str(path))
    assert again.exit_code == 2 and "already exists" in again.stderr
    assert invoke("config", "--out", str(path), "--force").exit_code == 0


def _metrics(run, steps, truncated=True):
    run.mkdir(parents=True)
    lines = [
        json.dumps({"type": "train", "step": s, "loss": 1.0 / s, "agreement": s / steps,
                    "kl": 0.5 / s, "entropy": 2.0, "ce": 1.5 / s, "lr": 1e-3, "grad_norm": 1.0})
        for s in range(1, steps + 1)
    ]
    lines.append(json.dumps({"type": "eval", "step": steps, "loss": 0.9, "kl": 0.4}))
    text = "\n".join(lines) + "\n" + ('{"type": "train", "step": 9' if truncated else "")
    (run / "metrics.jsonl").write_text(text)
    return run


def test_plot_two_runs_writes_pngs(tmp_path):
    a = _metrics(tmp_path / "run-a", 6)
    b = _metrics(tmp_path / "run-b", 4)
    out = tmp_path / "figs"
    result = invoke("plot", str(a), str(b), "--out", str(out), "--smooth", "0.5")
    assert result.exit_code == 0, result.output
    pngs = sorted(out.glob("*.png"))
    assert {p.name for p in pngs} >= {"loss.png", "kl.png", "agreement.png", "dynamics.png"}
    assert all(p.stat().st_size > 0 for p in pngs)
    assert set(result.stdout.split()) == {str(p) for p in pngs}


def test_plot_missing_metrics_is_a_user_error(tmp_path):
    result = invoke("plot", str(tmp_path))
    assert result.exit_code == 2 and "metrics.jsonl" in result.stderr
    assert "Traceback" not in result.output


def test_generate_writes_one_row_per_prompt_with_completion(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n"
        + json.dumps({"prompt": "abc"}) + "\n"
    )
    out = tmp_path / "gen" / "out.jsonl"
    args = ["generate", "--model", "tiny", "--prompts", str(prompts), "--out", str(out),
            "--max-new-tokens", "3", "--batch-size", "2", "--seed", "1"]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3
    assert rows[0]["prompt"] == "1+1=" and rows[0]["answer"] == "2"  # other fields kept
    assert rows[1]["messages"][0] == {"role": "user", "content": "hi"}
    assert rows[1]["messages"][-1] == {"role": "assistant", "content": rows[1]["completion"]}
    assert all(isinstance(r["completion"], str) for r in rows)
    # same seed, same completions
    first = out.read_text()
    assert invoke(*args).exit_code == 0 and out.read_text() == first
    # atomic write, no temp or partial file left; the key file marks the output as up to date (the
    # hidden lock file of its writers stays: removing it would race with a waiting writer)
    assert sorted(p.name for p in out.parent.iterdir()) == [".out.jsonl.lock", "out.jsonl", "out.jsonl.key"]


def test_generate_user_errors(tmp_path):
    result = invoke("generate", "--model", "tiny", "--prompts", str(tmp_path / "no.jsonl"),
                    "--out", str(tmp_path / "o.jsonl"))
    assert result.exit_code == 2 and f"data file {tmp_path / 'no.jsonl'} not found" in result.stderr
    bad = invoke("generate", "--model", "tiny", "--prompts", "x", "--out", "y", "--top-p", "0")
    assert bad.exit_code == 2 and "--top-p" in bad.stderr


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"]])
def test_console_script_entry_point_runs(argv):
    # `python -m hpd.apps.cli` goes through main(), like the installed `hpd` script.
    proc = subprocess.run([sys.executable, "-m", "hpd.apps.cli", *argv], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "Usage:" in proc.stdout


def test_main_reports_user_errors_with_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "hpd.apps.cli", "train", str(tmp_path / "x.yaml")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: config file") and "Traceback" not in proc.stderr


def test_eval_then_generate_on_the_same_model_reuses_the_generation_cache(tmp_path, monkeypatch):
    # hpd eval writes nothing into the model directory, and the cache key is the model's content,
    # so evaluating between two generations leaves the first one valid; new weights invalidate it.
    import os

    from hpd.models.loading import load_model, save_model

    monkeypatch.chdir(tmp_path)
    model_dir = save_model(*load_model("tiny", tiny={"num_layers": 1, "hidden_size": 32}), tmp_path / "m")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "1+1="}) + "\n")
    gen = ["generate", "--model", str(model_dir), "--prompts", str(prompts), "--out", str(tmp_path / "g.jsonl"),
           "--max-new-tokens", "2"]
    first = invoke(*gen)
    assert first.exit_code == 0 and "wrote 1" in first.stdout, first.output
    ev = invoke("eval", "--model", str(model_dir), "--task", "dialogue", "--n", "2", "--max-new-tokens", "2")
    assert ev.exit_code == 0, ev.output
    assert (tmp_path / "eval" / "m-dialogue.jsonl").is_file()
    again = invoke(*gen)
    assert again.exit_code == 0 and "up to date" in again.stdout, again.output
    # a file's modification time is no content: still reused
    for f in model_dir.iterdir():
        os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    assert "up to date" in invoke(*gen).stdout
    # other weights under the same path: generated anew
    save_model(*load_model("tiny", tiny={"num_layers": 1, "hidden_size": 32}, seed=5), model_dir)
    assert "wrote 1" in invoke(*gen).stdout


def test_package_import_and_help_import_no_torch():
    # `import hpd`, the objective registry, the config and both help pages must answer without
    # torch or transformers (seconds at import); the probe runs in a fresh interpreter.
    probe = (
        "import sys, hpd, hpd.config\n"
        "from typer.testing import CliRunner\n"
        "from hpd.apps.cli import app\n"
        "assert hpd.get_objective('hpd').name == 'hpd' and 'objective.beta' in hpd.config.config_help()\n"
        "for argv in (['--help'], ['train', '--help']):\n"
        "    r = CliRunner().invoke(app, argv)\n"
        "    assert r.exit_code == 0 and 'Usage:' in r.stdout, r.output\n"
        "print(sorted(m for m in ('torch', 'transformers', 'accelerate', 'numpy') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", f"imported at help time: {proc.stdout}"
    # The lazily bound torch of the objectives is the real one once used.
    proc = subprocess.run([sys.executable, "-c", "import torch, hpd\nimport hpd.objectives.tensors as b\n"
                           "out = hpd.get_objective('fkl')(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.long))\n"
                           "print(b.torch is torch, float(out.value))"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "0.0"]

"""End-to-end tests of `hpd train` on tiny models and examples/tiny.jsonl (CPU, seconds each).

A tiny teacher is trained once per session with SFT (`tiny_teacher` in conftest.py); students are
distilled from it. Runs go through `hpd.training.trainer.train` in-process, except where the command line
or a killed process is the point.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from hpd.training.checkpoint import latest_checkpoint
from hpd.apps.cli import app
from hpd.config import config_to_dict, load_config
from hpd.errors import HPDError
from hpd.responses.regimes import step_regime
from hpd.training.trainer import train

OBJECTIVES = ("sft", "fkl", "rkl", "jsd", "skl", "srkl", "tvd", "akl", "todi", "abkl", "orkl", "hpd")
REGIMES = ("dataset", "teacher", "student", "mixed")

# Small and fast: short sequences and rollouts, no progress bar, no TensorBoard.
FAST = [
    "data.max_length=48",
    "regime.max_new_tokens=8",
    "log.progress=false",
    "log.tensorboard=off",
    "log.every=1",
    "save.every=0",
]

runner = CliRunner()


@pytest.fixture(autouse=True)
def _at_repo_root(monkeypatch, repo_root):
    """Config paths (configs/, examples/) are relative to the repository root."""
    monkeypatch.chdir(repo_root)


# One torch thread, so that the runs stay fast on a busy machine and in-process runs compute
# exactly as the (single-threaded) subprocess runs they are compared with.
pytestmark = pytest.mark.usefixtures("single_torch_thread")


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def teacher_cache(tmp_path_factory) -> Path:
    """One cache of the tiny teacher's generations for the module's teacher-regime runs."""
    return tmp_path_factory.mktemp("teacher-cache")


def config(out: Path, *overrides: str, teacher: Path | str | None = None):
    """configs/tiny.yaml with FAST, output_dir=out, the given teacher and overrides."""
    extra = [f"teacher.path={teacher}"] if teacher is not None else []
    return load_config("configs/tiny.yaml", [*FAST, f"output_dir={out}", *extra, *overrides])


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of RUN_DIR/metrics.jsonl."""
    from hpd.training.metrics_file import read_records

    return read_records(Path(run_dir) / "metrics.jsonl")  # as the run stands: restart markers applied


def safetensors_of(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    """Every file under `directory` -> (size, mtime_ns); {} when it does not exist."""
    if not directory.exists():
        return {}
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*"))}


# --------------------------------------------------------------------------------------------
# The loss falls, for every objective and every regime
# --------------------------------------------------------------------------------------------

# SFT on the student's own samples maximises the likelihood of what it already generates: its
# expected gradient is zero, so nothing is expected to fall (it is covered in the mixed regime).
_FALL_CASES = [(o, r) for r in REGIMES for o in OBJECTIVES if (o, r) != ("sft", "student")]
FALL_STEPS = 40


@pytest.mark.parametrize(("objective", "regime"), _FALL_CASES, ids=[f"{o}-{r}" for o, r in _FALL_CASES])
def test_distillation_brings_the_student_closer_to_the_teacher(objective, regime, tiny_teacher, teacher_cache, tmp_path):
    """Held-out KL(teacher || student), evaluated at step 0 and at the end, falls by > 20%.

    The KL is measured on the reference completions of the held-out rows, the same quantity for
    every objective, so a broken gradient (a flipped sign, a missing term that stalls learning)
    fails it, whatever the objective's own value means. Random init gives about 4 nats here; a
    working objective brings it to 2-3 in 40 steps.
    """
    cfg = config(tmp_path / "run", f"objective.name={objective}", f"regime.name={regime}",
                 f"max_steps={FALL_STEPS}", f"log.eval_every={FALL_STEPS}",
                 f"regime.teacher_cache={teacher_cache}", teacher=tiny_teacher)
    run_dir = train(cfg)
    records = read_metrics(run_dir)
    evals = [r for r in records if r["type"] == "eval"]
    assert [r["step"] for r in evals] == [0, FALL_STEPS]
    start, end = evals[0], evals[-1]
    assert math.isfinite(end["kl"]) and math.isfinite(end["ce"])
    assert end["kl"] < 0.8 * start["kl"], f"{objective}/{regime}: held-out KL {start['kl']:.3f} -> {end['kl']:.3f}"
    assert end["ce"] < start["ce"] - 0.5, f"{objective}/{regime}: held-out ce {start['ce']:.3f} -> {end['ce']:.3f}"
    train_records = [r for r in records if r["type"] == "train"]
    assert [r["step"] for r in train_records] == list(range(1, FALL_STEPS + 1))
    assert all(math.isfinite(r["loss"]) for r in train_records)
    if regime == "mixed":
        assert {r["regime"] for r in train_records} == {"student", "dataset"}
    else:
        assert {r["regime"] for r in train_records} == {regime}


# --------------------------------------------------------------------------------------------
# Kill -9 and resume ends where an uninterrupted run ends
# --------------------------------------------------------------------------------------------


def _start_and_kill(overrides: list[str], run_dir: Path, repo_root: Path, timeout: float = 240.0) -> int:
    """Run `python -m hpd.apps.cli train` until a checkpoint exists and a later step was logged, then SIGKILL.

    Returns the step of the latest complete checkpoint at kill time.
    """
    cmd = [sys.executable, "-m", "hpd.apps.cli", "train", "configs/tiny.yaml", *overrides]
    output = run_dir.parent / f"{run_dir.name}.out"
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    with output.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=repo_root, stdout=out, stderr=subprocess.STDOUT, env=subprocess_env())
        try:
            while True:
                assert proc.poll() is None, f"the run ended before it could be killed mid-way:\n{output.read_text()}"
                assert time.monotonic() < deadline, "no checkpoint appeared in time"
                ckpt = latest_checkpoint(run_dir)
                if ckpt is not None and metrics.exists():
                    step = int(ckpt.name.split("-")[1])
                    logged = []
                    for line in metrics.read_text().splitlines():
                        try:
                            logged.append(json.loads(line))
                        except json.JSONDecodeError:
                            pass  # a line being written
                    if any(r.get("type") == "train" and r["step"] > step for r in logged):
                        os.kill(proc.pid, signal.SIGKILL)
                        break
                time.sleep(0.005)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    ckpt = latest_checkpoint(run_dir)
    assert ckpt is not None, "no complete checkpoint at kill time"
    assert not (run_dir / "final").exists(), "the run had finished: the kill did not land mid-way"
    return int(ckpt.name.split("-")[1])


@pytest.mark.parametrize("regime", ["dataset", "mixed", "student"])
def test_killed_run_resumes_to_the_weights_of_an_uninterrupted_run(regime, tiny_teacher, tmp_path, repo_root, capsys):
    """SIGKILL mid-way, resume=auto: same final weights (1e-6) and the same per-step losses.

    mixed and student draw regimes and sample rollouts: their randomness must be resumable too.
    """
    max_steps = 60 if regime == "dataset" else 40
    common = [*FAST, f"teacher.path={tiny_teacher}", "objective.name=hpd", f"regime.name={regime}",
              f"max_steps={max_steps}", "save.every=3", "save.keep_last=2", "log.eval_every=10", "resume=auto"]

    reference = train(load_config("configs/tiny.yaml", [*common, f"output_dir={tmp_path / 'reference'}"]))

    run_dir = tmp_path / "killed"
    killed_at = _start_and_kill([*common, f"output_dir={run_dir}"], run_dir, repo_root)
    assert 0 < killed_at < max_steps

    capsys.readouterr()
    train(load_config("configs/tiny.yaml", [*common, f"output_dir={run_dir}"]))
    out = capsys.readouterr().out
    assert f"resumed from {run_dir / 'checkpoints' / f'step-{killed_at:08d}'} at step {killed_at}" in out

    ref_w, res_w = safetensors_of(reference / "final"), safetensors_of(run_dir / "final")
    assert ref_w.keys() == res_w.keys()
    for name in ref_w:
        torch.testing.assert_close(res_w[name], ref_w[name], rtol=0, atol=1e-6, msg=f"{regime}: {name} differs")

    # The log reads as one run: each step once, the killed run's lines past the checkpoint replaced.
    ref_log = [r for r in read_metrics(reference) if r["type"] in ("train", "eval")]
    res_log = [r for r in read_metrics(run_dir) if r["type"] in ("train", "eval")]
    assert [(r["type"], r["step"]) for r in res_log] == [(r["type"], r["step"]) for r in ref_log]
    for a, b in zip(res_log, ref_log):
        assert a.get("regime") == b.get("regime")
        key = "loss" if a["type"] == "train" else "value"
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["type"], a["step"])
    assert sum(r["type"] == "info" for r in read_metrics(run_dir)) == 1
    # Each start records the code it trains with (hpd.provenance): a resume may bring other code.
    from hpd.provenance import code_record

    starts = [r for r in read_metrics(run_dir) if r["type"] == "code"]
    assert [r["step"] for r in starts] == [0, killed_at]
    assert {r["source"] for r in starts} == {code_record()["source"]}


def test_rerun_after_a_kill_before_the_first_checkpoint_starts_a_clean_log(tiny_teacher, tmp_path, capsys):
    run_dir = tmp_path / "run"
    cfg = config(run_dir, "max_steps=4", "log.eval_every=2", teacher=tiny_teacher)
    train(cfg)
    # What a kill before the first checkpoint leaves: metrics.jsonl and config.yaml, no checkpoint.
    shutil.rmtree(run_dir / "checkpoints")
    shutil.rmtree(run_dir / "final")
    capsys.readouterr()
    train(cfg)
    assert "resumed" not in capsys.readouterr().out
    records = read_metrics(run_dir)
    assert [(r["type"], r["step"]) for r in records] == [
        ("info", 0), ("code", 0), ("eval", 0), ("train", 1), ("train", 2), ("eval", 2), ("train", 3), ("train", 4), ("eval", 4)]


# --------------------------------------------------------------------------------------------
# Bad inputs: a clear message, nothing half-written
# --------------------------------------------------------------------------------------------


def _student_dir_with_other_tokenizer(tmp_path: Path) -> Path:
    """A tiny student whose tokenizer has 20 extra tokens (283; model vocab 288)."""
    from hpd.models.loading import build_tiny_model
    from hpd.models.tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    tok.add_tokens([f"<extra{i}>" for i in range(20)])
    model = build_tiny_model(tok, num_layers=1, hidden_size=32, num_heads=4)
    out = tmp_path / "student-283"
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def _teacher_dir_with_byte_tokenizer(tmp_path: Path) -> Path:
    """A tiny teacher saved as a HF directory with the byte tokenizer (263 tokens; model vocab 264)."""
    from hpd.models.loading import build_tiny_model
    from hpd.models.tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    out = tmp_path / "teacher-263"
    build_tiny_model(tok, num_layers=1, hidden_size=32, num_heads=4).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def _bad_rows(tmp_path: Path) -> Path:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": "d"}\n{"prompt": "e", "completion": \n')
    return path


def _empty(tmp_path: Path) -> Path:
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    return path


# name -> (overrides from tmp_path, substrings the message must hold)
BAD_INPUTS = {
    "missing-data": (lambda t: [f"data.train={t / 'nope.jsonl'}"], lambda t: ["data file", str(t / "nope.jsonl"), "not found"]),
    "missing-student": (lambda t: [f"student.path={t / 'no-model'}"], lambda t: [f"model path '{t / 'no-model'}' does not exist"]),
    "missing-teacher": (lambda t: [f"teacher.path={t / 'no-teacher'}"], lambda t: [f"model path '{t / 'no-teacher'}' does not exist"]),
    "tokenizer-mismatch": (lambda t: [f"student.path={_student_dir_with_other_tokenizer(t)}"],
                           lambda t: ["tokenizer", "283 tokens", "263 tokens"]),
    "two-dirs-vocab-mismatch": (lambda t: [f"student.path={_student_dir_with_other_tokenizer(t)}",
                                           f"teacher.path={_teacher_dir_with_byte_tokenizer(t)}"],
                                lambda t: ["283 tokens", str(t / "student-283"), "263 tokens", str(t / "teacher-263")]),
    "empty-dataset": (lambda t: [f"data.train={_empty(t)}"], lambda t: [str(t / "empty.jsonl"), "no usable rows"]),
    "malformed-row": (lambda t: [f"data.train={_bad_rows(t)}"], lambda t: [f"{t / 'bad.jsonl'} line 3", "invalid JSON"]),
    "wrong-type": (lambda t: ["optim.lr=fast"], lambda t: ["optim.lr: expected a float, got 'fast'"]),
    "tensorboard-missing": (lambda t: ["log.tensorboard=on"], lambda t: ["log.tensorboard=on but tensorboard is not installed"]),
}


def _has_tensorboard() -> bool:
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


BAD_CASES = [pytest.param(name, marks=pytest.mark.skipif(name == "tensorboard-missing" and _has_tensorboard(),
                                                         reason="tensorboard is installed"))
             for name in BAD_INPUTS]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_raises_hpderror_and_leaves_the_run_dir_untouched(case, tmp_path):
    make_overrides, expected = BAD_INPUTS[case]
    overrides = make_overrides(tmp_path)
    run_dir = tmp_path / "existing-run"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("a run dir that already holds something\n")
    before = snapshot(run_dir)
    with pytest.raises(HPDError) as err:
        train(config(run_dir, *overrides))
    for text in expected(tmp_path):
        assert text in str(err.value)
    assert snapshot(run_dir) == before
    assert not (tmp_path / "teacher_generations").exists()


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_through_the_cli_is_an_error_line_with_status_2(case, tmp_path):
    make_overrides, expected = BAD_INPUTS[case]
    overrides = make_overrides(tmp_path)
    run_dir = tmp_path / "new-run"
    result = runner.invoke(app, ["train", "configs/tiny.yaml", *FAST, f"output_dir={run_dir}", *overrides])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ")
    for text in expected(tmp_path):
        assert text in result.stderr
    assert "Traceback" not in result.output
    assert not run_dir.exists()


def test_wrong_type_set_from_python_is_caught_before_anything_is_written(tmp_path):
    cfg = config(tmp_path / "run")
    cfg.max_steps = "ten"
    with pytest.raises(HPDError, match="max_steps: expected an int, got 'ten'"):
        train(cfg)
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------
# Outputs: final model, generation, config, plots, the documented command
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def distilled_run(tiny_teacher, tmp_path_factory, repo_root):
    """(run_dir, config) of a short hpd distillation with evaluations and checkpoints."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(repo_root)
        cfg = config(tmp_path_factory.mktemp("distilled") / "run", "max_steps=12", "log.eval_every=6",
                     "save.every=6", teacher=tiny_teacher)
        return train(cfg), cfg


def test_final_model_loads_with_plain_transformers_and_generates(distilled_run, tiny_teacher):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for final in (distilled_run[0] / "final", tiny_teacher):  # a distilled student and an SFT run
        model = AutoModelForCausalLM.from_pretrained(str(final))
        tok = AutoTokenizer.from_pretrained(str(final))
        ids = tok.apply_chat_template([{"role": "user", "content": "Uppercase: dog"}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
        out = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        new = out[0, ids["input_ids"].shape[1]:]
        assert 1 <= new.numel() <= 6
        assert isinstance(tok.decode(new, skip_special_tokens=True), str)

    # The teacher's final/ holds the trained weights: it knows the training data.
    model = AutoModelForCausalLM.from_pretrained(str(tiny_teacher))
    tok = AutoTokenizer.from_pretrained(str(tiny_teacher))
    rows = [json.loads(line) for line in Path("examples/tiny.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "prompt" in r][:16]
    nll, n = 0.0, 0
    for row in rows:
        chat = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]
        prompt = tok.encode(tok.apply_chat_template(chat[:1], add_generation_prompt=True, tokenize=False),
                            add_special_tokens=False)
        full = tok.encode(tok.apply_chat_template(chat, tokenize=False), add_special_tokens=False)
        assert full[: len(prompt)] == prompt
        logits = model(input_ids=torch.tensor([full])).logits[0, :-1]
        logp = torch.log_softmax(logits, -1)[len(prompt) - 1:]
        target = torch.tensor(full[len(prompt):])
        nll -= float(logp.gather(1, target[:, None]).sum().detach())
        n += len(target)
    assert nll / n < 0.5 * math.log(len(tok)), f"loaded teacher: {nll / n:.3f} nats per completion token"


def test_hpd_generate_writes_one_line_per_prompt(distilled_run, tmp_path):
    prompts = tmp_path / "p.jsonl"
    texts = ["Reverse: paper", "Add: 2+2", "Uppercase: cat"]
    prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    out = tmp_path / "o.jsonl"
    result = runner.invoke(app, ["generate", "--model", str(distilled_run[0] / "final"), "--prompts", str(prompts),
                                 "--out", str(out), "--max-new-tokens", "8"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    # In prompt order; an empty answer (nothing to train on) is left out, and the output says so.
    kept = [r["prompt"] for r in rows]
    assert kept == [t for t in texts if t in kept]
    assert (f"{len(texts) - len(kept)} empty ones left out" in result.stdout) == (len(kept) < len(texts))
    assert all(isinstance(r["completion"], str) and r["completion"].strip() for r in rows)


def test_resolved_config_is_saved_and_reloads_equal(distilled_run):
    run_dir, cfg = distilled_run
    saved = load_config(run_dir / "config.yaml")
    assert saved == cfg
    assert config_to_dict(saved) == config_to_dict(cfg)
    for ckpt in (run_dir / "checkpoints").iterdir():
        assert load_config(ckpt / "config.yaml") == cfg


def test_hpd_plot_writes_pngs_for_a_real_run(distilled_run):
    run_dir = distilled_run[0]
    result = runner.invoke(app, ["plot", str(run_dir)])
    assert result.exit_code == 0, result.output
    written = [Path(line) for line in result.stdout.split()]
    names = {p.name for p in written}
    assert {"loss.png", "kl.png", "agreement.png", "entropy.png", "ce.png", "dynamics.png"} <= names
    for p in written:
        assert p.parent == run_dir / "plots"
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_documented_tiny_command_works_as_written(tmp_path, repo_root):
    """`hpd train configs/tiny.yaml output_dir=... max_steps=20 seed=1`, the console script."""
    hpd = Path(sys.executable).parent / "hpd"
    cmd = [str(hpd)] if hpd.exists() else [sys.executable, "-m", "hpd.apps.cli"]
    out = tmp_path / "run"
    proc = subprocess.run([*cmd, "train", "configs/tiny.yaml", f"output_dir={out}", "max_steps=20", "seed=1"],
                          cwd=repo_root, capture_output=True, text=True, timeout=300, env=subprocess_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"run finished: {out}" in proc.stdout
    records = read_metrics(out)
    assert [r["step"] for r in records if r["type"] == "train"] == list(range(1, 21))
    assert (out / "final" / "model.safetensors").is_file()
    assert load_config(out / "config.yaml").seed == 1


# --------------------------------------------------------------------------------------------
# Non-finite losses
# --------------------------------------------------------------------------------------------


def _poison_objective_from(monkeypatch, bad_steps):
    """Make the objective's token weights NaN on the optimizer steps (0-based) in `bad_steps`."""
    import hpd.training.setup as setup_mod
    import hpd.training.trainer as trainer_mod

    state = {"step": -1}
    original_step = trainer_mod.Trainer.train_step

    def train_step(self):
        state["step"] = self.step
        try:
            return original_step(self)
        finally:
            state["step"] = -1  # evaluations stay finite

    original_objective = setup_mod.objective_from_config

    def objective_from_config(cfg):
        obj = original_objective(cfg)

        class Poisoned(type(obj)):
            def weights(self, *args, **kwargs):
                tw = super().weights(*args, **kwargs)
                if bad_steps(state["step"]):
                    tw.weights = tw.weights * float("nan")
                return tw

        poisoned = Poisoned.__new__(Poisoned)
        poisoned.__dict__.update(obj.__dict__)
        return poisoned

    monkeypatch.setattr(trainer_mod.Trainer, "train_step", train_step)
    monkeypatch.setattr(setup_mod, "objective_from_config", objective_from_config)


def test_nan_loss_skips_the_step_and_logs_it(monkeypatch, tiny_teacher, tmp_path):
    _poison_objective_from(monkeypatch, lambda step: step in (5, 6))  # steps 6 and 7
    cfg = config(tmp_path / "run", "max_steps=10", "log.every=4", "optim.max_bad_steps=3", teacher=tiny_teacher)
    run_dir = train(cfg)
    records = read_metrics(run_dir)
    skips = [r for r in records if r["type"] == "skip"]
    assert [r["step"] for r in skips] == [6, 7]  # logged although log.every=4
    assert all(r["reason"] == "non-finite loss" for r in skips)
    assert [r["step"] for r in records if r["type"] == "train"] == [4, 8, 10]
    assert all(torch.isfinite(t).all() for t in safetensors_of(run_dir / "final").values())


def test_too_many_bad_steps_stop_the_run_naming_the_last_good_checkpoint(monkeypatch, tiny_teacher, tmp_path):
    _poison_objective_from(monkeypatch, lambda step: step >= 5)  # from step 6 on
    cfg = config(tmp_path / "run", "max_steps=20", "save.every=4", "optim.max_bad_steps=3", teacher=tiny_teacher)
    from hpd.errors import DivergedError

    with pytest.raises(DivergedError) as err:  # an HPDError the bench records as a diverged grid point
        train(cfg)
    msg = str(err.value)
    assert "3 steps in a row had a non-finite loss" in msg and "optim.max_bad_steps=3" in msg
    assert f"Last good checkpoint: {tmp_path / 'run' / 'checkpoints' / 'step-00000004'}" in msg
    skips = [r["step"] for r in read_metrics(tmp_path / "run") if r["type"] == "skip"]
    assert skips == [6, 7]
    assert not (tmp_path / "run" / "final").exists()


def test_bad_steps_before_any_checkpoint_say_so(monkeypatch, tiny_teacher, tmp_path):
    _poison_objective_from(monkeypatch, lambda step: step >= 0)
    cfg = config(tmp_path / "run", "max_steps=20", "save.every=4", "optim.max_bad_steps=2", teacher=tiny_teacher)
    with pytest.raises(HPDError, match=r"stopped at step 2: .* Last good checkpoint: none yet\."):
        train(cfg)


def test_no_checkpoint_is_written_inside_a_run_of_non_finite_steps(monkeypatch, tiny_teacher, tmp_path, capsys):
    """Steps 4-6 are non-finite: the checkpoints due at 4 and 6 wait for the next finite step (7)."""
    from hpd.training.checkpoint import checkpoint_dirs

    _poison_objective_from(monkeypatch, lambda step: 3 <= step <= 5)
    cfg = config(tmp_path / "run", "max_steps=9", "save.every=2", "save.keep_last=10", "optim.max_bad_steps=5",
                 teacher=tiny_teacher)
    train(cfg)
    assert [p.name for p in checkpoint_dirs(tmp_path / "run")] == [
        "step-00000002", "step-00000007", "step-00000008", "step-00000009"]
    assert ("step 4: no checkpoint inside a run of non-finite steps (1 in a row); it is written after the next "
            "finite step") in capsys.readouterr().out


def test_the_last_good_checkpoint_offered_is_from_before_the_streak(monkeypatch, tiny_teacher, tmp_path):
    _poison_objective_from(monkeypatch, lambda step: step >= 3)  # from step 4 on; a checkpoint is due at 4
    cfg = config(tmp_path / "run", "max_steps=20", "save.every=2", "optim.max_bad_steps=3", teacher=tiny_teacher)
    with pytest.raises(HPDError, match=rf"stopped at step 6: .* Last good checkpoint: "
                                       rf"{tmp_path / 'run' / 'checkpoints' / 'step-00000002'}\."):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints" / "step-00000004").exists()


# --------------------------------------------------------------------------------------------
# Regimes: teacher cache, mixed draws
# --------------------------------------------------------------------------------------------


def test_teacher_generations_are_generated_once_and_reused(monkeypatch, tiny_teacher, tmp_path):
    cache = tmp_path / "cache"
    common = ["regime.name=teacher", f"regime.teacher_cache={cache}", "max_steps=3"]
    train(config(tmp_path / "a", *common, teacher=tiny_teacher))
    files = sorted(p for p in cache.iterdir() if p.suffix == ".json")
    assert len(files) == 1  # beside it: its record (.key) and its writers' hidden lock file
    assert sorted(p.name for p in cache.iterdir() if not p.name.startswith(".")) == [files[0].name, files[0].name + ".key"]
    stamp = files[0].stat().st_mtime_ns
    completions = json.loads(files[0].read_text())["completions"]
    assert len(completions) == 84 and all(1 <= len(c) <= 8 for c in completions)

    import hpd.responses.regimes

    def no_generation(*args, **kwargs):
        raise AssertionError("teacher generations were generated again")

    monkeypatch.setattr(hpd.responses.regimes, "rollout", no_generation)
    train(config(tmp_path / "b", *common, teacher=tiny_teacher))
    assert sorted(p for p in cache.iterdir() if p.suffix == ".json") == files and files[0].stat().st_mtime_ns == stamp
    info = [r for r in read_metrics(tmp_path / "b") if r["type"] == "info"][0]
    assert info["teacher_generations"] == str(files[0])


def test_mixed_regime_draws_are_logged_seeded_and_about_lambda(tiny_teacher, tmp_path):
    common = ["regime.name=mixed", "regime.mixed_lambda=0.3", "max_steps=30", "seed=3", "objective.name=fkl"]
    logs = []
    for name in ("a", "b"):
        run = train(config(tmp_path / name, *common, teacher=tiny_teacher))
        logs.append([r["regime"] for r in read_metrics(run) if r["type"] == "train"])
    assert logs[0] == logs[1]
    assert logs[0] == [step_regime("mixed", 0.3, "dataset", seed=3, step=k) for k in range(30)]
    assert set(logs[0]) == {"student", "dataset"}
    assert abs(logs[0].count("student") / 30 - 0.3) < 0.2
    # The draw itself, over many steps.
    draws = [step_regime("mixed", 0.3, "dataset", seed=3, step=k) for k in range(4000)]
    assert abs(draws.count("student") / 4000 - 0.3) < 0.03
    assert draws != [step_regime("mixed", 0.3, "dataset", seed=4, step=k) for k in range(4000)]


def test_objective_from_config_passes_parameters_and_the_ce_mix():
    from hpd.training.setup import objective_from_config

    cfg = load_config(None, ["objective.name=akl", "objective.mu=0.7", "objective.ce_weight=1", "objective.kd_weight=0.1"])
    obj = objective_from_config(cfg)
    assert (obj.name, obj.mu, obj.ce_weight, obj.kd_weight, obj.mixed) == ("akl", 0.7, 1.0, 0.1, True)
    assert objective_from_config(load_config(None, [])).mixed is False


def test_a_mixed_run_logs_both_terms_and_learns(tiny_teacher, tmp_path):
    """akl at CE + 0.1 KD (its authors' recipe): the logged value is ce_weight * ce + kd_weight * kd_term."""
    steps = 20
    run_dir = train(config(tmp_path / "run", "objective.name=akl", "objective.ce_weight=1", "objective.kd_weight=0.1",
                           f"max_steps={steps}", f"log.eval_every={steps}", teacher=tiny_teacher))
    records = read_metrics(run_dir)
    train_records = [r for r in records if r["type"] == "train"]
    for r in train_records:
        assert r["value"] == pytest.approx(r["ce"] + 0.1 * r["kd_term"], rel=1e-5)
    evals = [r for r in records if r["type"] == "eval"]
    assert evals[-1]["ce"] < evals[0]["ce"] - 0.5
    with pytest.raises(HPDError, match="ce_weight and kd_weight are both 0"):
        train(config(tmp_path / "zero", "objective.kd_weight=0", teacher=tiny_teacher))
    assert not (tmp_path / "zero").exists()


def test_a_run_ending_inside_a_streak_writes_final_but_no_final_checkpoint(monkeypatch, tiny_teacher, tmp_path, capsys):
    from hpd.training.checkpoint import checkpoint_dirs

    _poison_objective_from(monkeypatch, lambda step: step >= 7)  # steps 8 and 9 of 9
    train(config(tmp_path / "run", "max_steps=9", "save.every=4", "optim.max_bad_steps=5", teacher=tiny_teacher))
    assert [p.name for p in checkpoint_dirs(tmp_path / "run")] == ["step-00000004"]
    assert "warning: the run ends inside a run of non-finite steps (2 in a row): no final checkpoint" in capsys.readouterr().out
    assert all(torch.isfinite(t).all() for t in safetensors_of(tmp_path / "run" / "final").values())


@pytest.mark.parametrize("lora", [0, 4])
def test_gradient_checkpointing_recomputes_and_gives_the_same_loss_and_gradients(lora):
    # The chunked loss (chunk_size > 0) on an hpd objective, one micro-batch, with and without
    # student.gradient_checkpointing: the same loss and gradients, and the decoder layers really
    # run twice (forward, then recomputed in backward) only with it.
    from hpd.training.step import DistillationLoss
    from hpd.training.setup import load_models, objective_from_config

    results = {}
    for checkpointing in (False, True):
        cfg = load_config(None, [f"gradient_checkpointing={str(checkpointing).lower()}", "objective.name=hpd",
                                 "objective.chunk_size=7", f"student.lora_rank={lora}"])
        student, teacher, _tok, vocab = load_models(cfg)
        student.train()
        calls = []
        # Inside the checkpointed layer: its MLP starts again when backward recomputes the layer (a
        # pre-hook: the recompute stops once it has what backward needs, before post-hooks run).
        student.get_decoder().layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, 200, (2, 12), generator=g)
        labels = torch.randint(3, 200, (2, 12), generator=g)
        labels[:, :3] = -100
        labels[:, -1] = -100  # aligned labels: the last position predicts nothing
        with torch.no_grad():
            teacher_logits = teacher(input_ids=ids).logits
        step = DistillationLoss(student, objective_from_config(cfg), chunk_size=cfg.objective.chunk_size, vocab_size=vocab)
        out = step(ids, torch.ones_like(ids), labels, teacher_logits, num_tokens=(labels != -100).sum().float(),
                   generator=torch.Generator().manual_seed(1), diagnostics=False)
        out["loss"].backward()
        grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.requires_grad}
        assert grads and all(g is not None for g in grads.values())
        results[checkpointing] = (out["loss"].item(), grads, len(calls))
    (loss0, grads0, calls0), (loss1, grads1, calls1) = results[False], results[True]
    assert (calls0, calls1) == (1, 2)
    assert loss1 == pytest.approx(loss0, rel=1e-6)
    assert grads0.keys() == grads1.keys()
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-5, atol=1e-7, msg=name)


def test_epochs_set_max_steps_from_the_rows_and_resume_keeps_them(tmp_path, capsys):
    from hpd.training.setup import steps_for_epochs

    assert steps_for_epochs(2, 10, 4) == 5 and steps_for_epochs(1, 10, 4, processes=2) == 2
    assert steps_for_epochs(0.01, 10, 4) == 1
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"{i}+1=", "completion": str(i + 1)}) + "\n" for i in range(10)))
    cfg = config(tmp_path / "run", "objective.name=sft", "teacher.path=none", f"data.train={rows}", "data.eval=null",
                 "data.eval_fraction=0", "optim.batch_size=2", "optim.grad_accum=1", "num_train_epochs=1.5",
                 "max_steps=100", "save.every=4")
    train(cfg)
    steps = [r["step"] for r in read_metrics(tmp_path / "run") if r["type"] == "train"]
    assert max(steps) == 8  # ceil(1.5 x 10 rows / 2 per step), not the max_steps=100 given
    out = capsys.readouterr()
    assert "epochs=1.5 over 10 training rows: max_steps=8" in out.out + out.err
    saved = load_config(tmp_path / "run" / "config.yaml")
    assert (saved.epochs, saved.max_steps) == (1.5, 8)
    # The same command again finds the run finished: the derived count equals the saved one.
    train(config(tmp_path / "run", "objective.name=sft", "teacher.path=none", f"data.train={rows}", "data.eval=null",
                 "data.eval_fraction=0", "optim.batch_size=2", "optim.grad_accum=1", "num_train_epochs=1.5",
                 "save.every=4"))
    assert max(r["step"] for r in read_metrics(tmp_path / "run") if r["type"] == "train") == 8

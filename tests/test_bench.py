"""`hpd bench`: the protocol (grid on validation, seeds, paired differences) end to end in fast
settings, on the bundled tasks and on a user's own files with every verifier kind."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from hpd.apps.bench_run import run_bench
from hpd.apps.bench import (
    METHODS, BenchSettings, Condition, build_conditions, plan_grid, plan_tuned, resolve_start, run_spec,
    tuned_lr,
)
from hpd.apps.bench_report import grad_norm_spread, loss_spikes
from hpd.errors import HPDError
from hpd.provenance import code_record

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def _fast(tmp_path, **kw) -> BenchSettings:
    base = dict(out_dir=tmp_path / "bench", methods=["sft", "hpd"], seeds=[0], lr_grid=[1.0], steps_pretrained=3,
                steps_scratch=3, n_eval=4, n_val=3, n_curve=2, train_per_task=20, limited_per_task=5,
                starts=["pretrained"], data=["gold"], jobs=2)
    base.update(kw)
    return BenchSettings(**base)


def test_bench_protocol_end_to_end(tmp_path):
    s = _fast(tmp_path, seeds=[0, 1], lr_grid=[0.5, 1.0], methods=["sft", "hpd", "hpdk"])
    out = run_bench(s)
    table = (out / "results.md").read_text()
    assert "### pretrained-gold" in table and "Equal learning rate" in table and "Tuned" in table
    for m in s.methods:
        assert f"| {m} |" in table
    assert "| hpd | " in table and "| ref |" in table  # the reference row of the paired column
    assert "frac_A" in table  # HPD's diagnostics are reported
    assert "hpdk's diagnostics" in table and "top-k push 0." in table  # and the extension's top-k statistics
    assert f"Code: every run trained and scored by hpd {code_record()['hpd']} (source {code_record()['source']}" in table
    (cond,), _ = build_conditions(s)
    # The grid ran seed 0 at both rates, scored on validation (carved from training problems) and test.
    for mult in s.lr_grid:
        run = run_spec(cond, "hpd", cond.start.lr * mult, 0, s).run_dir
        val = json.loads((run / "eval-val.json").read_text())
        test = json.loads((run / "eval-test.json").read_text())
        assert len(val["verdicts"]) == 3 * s.n_val and len(test["verdicts"]) == 3 * s.n_eval
        assert sorted(set(test["tasks"])) == ["code", "dialogue", "math"]
        assert test["code"]["source"] == val["code"]["source"] == code_record()["source"]  # the scoring code
    # Validation problems are training problems never trained on, and never test problems.
    val_prompts = {json.loads(l)["prompt"] for l in cond.val.read_text().splitlines()}
    train_prompts = {json.loads(l)["prompt"] for l in cond.train.read_text().splitlines()}
    test_prompts = {json.loads(l)["prompt"] for l in cond.test.read_text().splitlines()}
    assert not val_prompts & train_prompts and not val_prompts & test_prompts and not train_prompts & test_prompts
    from hpd.apps.tasks import split_of

    assert {split_of(p) for p in val_prompts} == {"val"} and {split_of(p) for p in test_prompts} == {"test"}
    # Seed 1 ran at the base rate (equal-lr table) and, where the tuned rate differs, at that one.
    assert (run_spec(cond, "sft", cond.start.lr, 1, s).run_dir / "eval-test.json").is_file()
    for m in s.methods:
        lr, accs = tuned_lr(cond, m, s)
        assert set(accs) == {cond.start.lr * g for g in s.lr_grid}
        assert accs[lr] == max(a for a in accs.values())
        assert (run_spec(cond, m, lr, 1, s).run_dir / "eval-test.json").is_file()
        # the efficiency curve of the tuned seed-0 run: every kept checkpoint scored
        assert list(run_spec(cond, m, lr, 0, s).run_dir.glob("eval-curve-step*.json"))
    # A second call trains nothing: every run and score is reused.
    before = {p: p.stat().st_mtime for p in (out / "runs").rglob("metrics.jsonl")}
    run_bench(s)
    assert before == {p: p.stat().st_mtime for p in (out / "runs").rglob("metrics.jsonl")}
    # --report on a method never run shows it with no seeds instead of inventing a number.
    report = run_bench(_fast(tmp_path, seeds=[0, 1], lr_grid=[0.5, 1.0], methods=["fkl", "hpd"], report_only=True))
    assert "| fkl | 0.001 | 0 |" in (report / "results.md").read_text()


def test_an_archived_bench_resumes_on_a_fresh_machine_without_retraining(tmp_path):
    import gzip
    import shutil

    from hpd.apps.bench_archive import restore_run

    keep = tmp_path / "kept"
    s = _fast(tmp_path, seeds=[0, 1], archive=keep)
    out = run_bench(s)
    table = (out / "results.md").read_text()
    kept = sorted(p.relative_to(keep).as_posix() for p in keep.rglob("*.gz"))
    # no weights: the runs' small files, and what shaped their data
    assert kept and [p.name for p in keep.rglob("*") if p.is_file() and not p.name.endswith(".gz")] == ["bench.json"]
    assert "pretrained-gold/hpd/lr1.00e-3-s0/eval-val.json.gz" in kept and "pretrained-gold/hpd/lr1.00e-3-s0/metrics.jsonl.gz" in kept
    stamp = {p: p.read_bytes() for p in keep.rglob("*.gz")}
    # A fresh machine: OUT is gone. The same bench restores every finished run and trains none.
    shutil.rmtree(out)
    assert (run_bench(s) / "results.md").read_text() == table
    assert not list((out / "runs").rglob("final")) and not list((out / "runs").rglob("checkpoints"))
    assert {p: p.read_bytes() for p in keep.rglob("*.gz")} == stamp  # the same runs give the same bytes
    # --report alone restores too, and archives what a bench without --archive finished.
    shutil.rmtree(out)
    report = _fast(tmp_path, seeds=[0, 1], archive=keep, report_only=True)
    assert (run_bench(report) / "results.md").read_text() == table
    # Into another OUT (the archived configs name the files under the first one), the same, untrained.
    elsewhere = run_bench(_fast(tmp_path, out_dir=tmp_path / "elsewhere" / "bench", seeds=[0, 1], archive=keep))
    assert (elsewhere / "results.md").read_text() == table and not list(elsewhere.rglob("final"))
    shutil.rmtree(keep / "pretrained-gold" / "sft")
    run_bench(report)
    assert {p: p.read_bytes() for p in keep.rglob("*.gz")} == stamp
    # A run archived without its curve (a bench of an older version) is trained again, never
    # counted done without one; its old scores go with the model they belonged to.
    shutil.rmtree(out)
    hpd0 = keep / "pretrained-gold" / "hpd" / "lr1.00e-3-s0"
    for p in hpd0.glob("eval-curve-step*.json.gz"):
        p.unlink()
    run_bench(s)
    retrained = out / "runs" / "pretrained-gold" / "hpd" / "lr1.00e-3-s0"
    assert (retrained / "final").is_dir() and list(retrained.glob("eval-curve-step*.json"))
    assert [p.parent.name for p in (out / "runs").rglob("final")] == ["lr1.00e-3-s0"]
    assert {p: p.read_bytes() for p in keep.rglob("*.gz")}.keys() == stamp.keys()
    # An archive of runs made on other data settings is refused, even to a fresh OUT.
    with pytest.raises(HPDError, match=r"kept holds a bench made with other settings \(data.n_eval: 4 -> 5\).*another --archive"):
        run_bench(_fast(tmp_path, out_dir=tmp_path / "other", seeds=[0, 1], archive=keep, n_eval=5))
    # An archived run made with another config is refused like any reused run.
    shutil.rmtree(out)
    cfg = keep / "pretrained-gold" / "sft" / "lr1.00e-3-s1" / "config.yaml.gz"
    cfg.write_bytes(gzip.compress(gzip.decompress(cfg.read_bytes()).replace(b"max_steps: 3", b"max_steps: 30")))
    with pytest.raises(HPDError, match=r"finished run .*sft.* another config .*max_steps: 30 -> 3"):
        run_bench(s)
    # A run started in OUT is OUT's own: the archive's record of another attempt never mixes into it.
    run = out / "runs" / "pretrained-gold" / "hpd" / "lr1.00e-3-s1"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"type": "train", "step": 1}\n')
    assert restore_run(run, out, keep) == [] and sorted(p.name for p in run.iterdir()) == ["metrics.jsonl"]


def test_tuned_rate_is_the_best_on_validation_ties_go_to_the_base_rate(tmp_path):
    s = _fast(tmp_path, lr_grid=[1 / 3, 1.0, 3.0])
    (cond,), _ = build_conditions(s)
    accs = {1 / 3: 0.2, 1.0: 0.2, 3.0: 0.1}
    for mult, acc in accs.items():
        run = run_spec(cond, "hpd", cond.start.lr * mult, 0, s).run_dir
        run.mkdir(parents=True)
        (run / "eval-val.json").write_text(json.dumps({"accuracy": acc, "verdicts": [], "tasks": []}))
    assert tuned_lr(cond, "hpd", s)[0] == cond.start.lr
    (run_spec(cond, "hpd", cond.start.lr * 3.0, 0, s).run_dir / "eval-val.json").write_text(json.dumps({"accuracy": 0.5}))
    assert tuned_lr(cond, "hpd", s)[0] == cond.start.lr * 3.0
    # the tuned phase runs the other seeds at that rate and scores the seed-0 curve there
    specs = plan_tuned(cond, _fast(tmp_path, lr_grid=[1 / 3, 1.0, 3.0], seeds=[0, 1], methods=["hpd"]))
    assert {(sp.lr, sp.seed, sp.curve) for sp in specs} == {(cond.start.lr * 3.0, 0, True), (cond.start.lr * 3.0, 1, False)}
    # the grid phase: every rate at seed 0, the base rate for the other seeds
    grid = plan_grid(cond, _fast(tmp_path, lr_grid=[1 / 3, 1.0, 3.0], seeds=[0, 1], methods=["hpd"]))
    assert sorted((round(sp.lr / cond.start.lr, 3), sp.seed) for sp in grid) == [(0.333, 0), (1.0, 0), (1.0, 1), (3.0, 0)]
    assert all(sp.curve == (sp.seed == 0) for sp in grid)  # every seed-0 run scores its curve when it ends


def test_data_conditions_traces_and_limited(tmp_path):
    s = _fast(tmp_path, data=["gold", "traces", "limited"], train_per_task=12, limited_per_task=4)
    conds, missing = build_conditions(s)
    assert [c.data for c in conds] == ["gold", "traces", "limited"] and not missing
    gold, traces, limited = conds
    rows = lambda p: [json.loads(l) for l in p.read_text().splitlines()]  # noqa: E731
    assert len(rows(gold.train)) == 36
    lim = rows(limited.train)
    assert {t: sum(r["task"] == t for r in lim) for t in ("math", "code", "dialogue")} == {"math": 4, "code": 4, "dialogue": 4}
    # traces: the gold prompts with the writer's own sampled answers; the share wrong is measured
    tr = rows(traces.train)
    assert {r["prompt"] for r in tr} <= {r["prompt"] for r in rows(gold.train)}
    stats = json.loads((traces.train.parent / "stats.json").read_text())
    assert 0.0 <= stats["wrong"] <= 1.0 and "% wrong" in traces.note
    assert any(r["completion"] != g["completion"] for r, g in zip(tr, rows(gold.train)))


def test_the_papers_training_length_many_epochs_over_a_modest_set(tmp_path):
    """gold-epochs and traces-epochs: the first rows of each task, passed over `epochs` times (the
    steps follow from the rows and the batch), gold and the writer's answers to the same prompts."""
    import math
    from dataclasses import replace

    s = _fast(tmp_path, data=["gold-epochs", "traces-epochs"], train_per_task=12, epochs_per_task=5, epochs=7)
    (gold, traces), missing = build_conditions(s)
    assert not missing and [c.name for c in (gold, traces)] == ["pretrained-gold-epochs", "pretrained-traces-epochs"]
    rows = lambda p: [json.loads(l) for l in p.read_text().splitlines()]  # noqa: E731
    few, all_gold = rows(gold.train), rows(tmp_path / "bench" / "data" / "gold" / "train.jsonl")
    assert {t: sum(r["task"] == t for r in few) for t in ("math", "code", "dialogue")} == {"math": 5, "code": 5, "dialogue": 5}
    assert [r for r in all_gold if r in few] == few  # the first of the gold rows, in their order
    # 7 epochs x 15 rows / batch 32 = 3.3 -> 4 steps, for the grid's runs and the seeds' alike
    assert gold.start.steps == traces.start.steps == math.ceil(7 * 15 / 32) == 4
    assert "7 epochs over 15 rows" in gold.note and "% wrong" in traces.note and "7 epochs" in traces.note
    assert "max_steps=4" in run_spec(gold, "hpd", gold.start.lr, 1, s).overrides
    # the seed-0 curve keeps a checkpoint at every quarter, the last one the final step's
    for steps, every in ((626, 157), (240, 60), (4, 1), (3, 1)):
        spec = run_spec(replace(gold, start=replace(gold.start, steps=steps)), "hpd", gold.start.lr, 0, s)
        assert f"save.every={every}" in spec.overrides and "save.keep_last=4" in spec.overrides
        assert len({min(k * every, steps) for k in range(1, 5)} | {steps}) <= 4
    assert resolve_start("pretrained", s).steps == s.steps_pretrained  # the start itself is unchanged
    # the traces are the writer's answers to those prompts, with their own record of the share wrong
    tr = rows(traces.train)
    assert {r["prompt"] for r in tr} <= {r["prompt"] for r in few} and len(tr) > 0
    assert any(r["completion"] != g["completion"] for r, g in zip(tr, few))
    stats = json.loads((traces.train.parent / "stats.json").read_text())
    assert traces.train.parent.name == "traces-epochs" and stats["rows"] == len(tr)
    # a bigger batch: fewer steps for the same epochs
    (g16,), _ = build_conditions(_fast(tmp_path, data=["gold-epochs"], train_per_task=12, epochs_per_task=5, epochs=7,
                                       overrides=["optim.batch_size=8"]))
    assert g16.start.steps == math.ceil(7 * 15 / 8)
    # more rows per task than the gold rows hold: said, not silently fewer
    with pytest.raises(HPDError, match="--epochs-per-task 13 needs"):
        build_conditions(_fast(tmp_path / "more", data=["gold-epochs"], train_per_task=12, epochs_per_task=13))
    # the record: another epoch count or row count in the same OUT is refused, naming the key
    run_bench(_fast(tmp_path, data=["gold-epochs"], train_per_task=12, epochs_per_task=5, epochs=7, report_only=True))
    for change, key in [(dict(epochs=8), "epochs.epochs: 7 -> 8"), (dict(epochs_per_task=4), "epochs.per_task: 5 -> 4")]:
        with pytest.raises(HPDError, match=f"other settings \\({key}\\)"):
            run_bench(_fast(tmp_path, report_only=True, **{**dict(data=["gold-epochs"], train_per_task=12,
                                                                   epochs_per_task=5, epochs=7), **change}))


def test_every_conditions_seed0_grid_runs_before_any_other_seed(tmp_path, monkeypatch):
    """The validation picks are known first: seed 0 at every rate of every condition (the reference
    first, each method at all its rates), then each condition's other seeds."""
    import hpd.apps.bench_run as bench_run  # the bench's entry point, which calls run_all

    ran = []
    monkeypatch.setattr(bench_run, "run_all", lambda specs, s, verifier: ran.extend(
        (sp.condition, sp.method, round(sp.lr / 1e-3, 3), sp.seed) for sp in specs))
    s = _fast(tmp_path, data=["gold-epochs", "gold"], train_per_task=12, epochs_per_task=5, seeds=[0, 1],
              lr_grid=[0.1, 0.333, 1.0], methods=["sft", "hpd"])
    run_bench(s)
    first = [r for r in ran if r[3] == 0][:12]
    assert ran[:12] == first and len({r[:3] for r in first}) == 12  # 2 conditions x 2 methods x 3 rates, seed 0
    assert [r[:2] for r in first[:3]] == [("pretrained-gold-epochs", "hpd")] * 3
    assert [r[0] for r in first] == ["pretrained-gold-epochs"] * 6 + ["pretrained-gold"] * 6
    assert {r[2] for r in first[:3]} == {0.1, 0.333, 1.0}
    assert all(r[3] == 1 or r[:3] in {f[:3] for f in first} for r in ran[12:])


def test_an_archive_made_in_another_checkout_is_restored_in_this_one(tmp_path):
    """The archived configs name the bundled models by absolute path (/work/main/hpd/assets/...);
    a clone elsewhere has them at another path, with the same weights (checked by bench.json)."""
    import gzip
    import re
    import shutil

    keep = tmp_path / "kept"
    s = _fast(tmp_path, archive=keep)
    table = (run_bench(s) / "results.md").read_text()
    shutil.rmtree(s.out_dir)

    def moved(asset: str) -> None:
        for cfg in keep.rglob("config.yaml.gz"):
            text = gzip.decompress(cfg.read_bytes()).decode()
            text = re.sub(r"path: \S*/hpd/assets/[\w.-]+\n", lambda m: f"path: /another/checkout/hpd/assets/{asset}\n"
                          if "assets/teacher" in m.group(0) else m.group(0), text)
            cfg.write_bytes(gzip.compress(text.encode(), mtime=0))

    moved("teacher")
    assert "/another/checkout/hpd/assets/teacher" in gzip.decompress(next(keep.rglob("config.yaml.gz")).read_bytes()).decode()
    assert (run_bench(s) / "results.md").read_text() == table and not list(s.out_dir.rglob("final"))
    # Another bundled model under the same name is still another config.
    shutil.rmtree(s.out_dir)
    moved("long-teacher")
    with pytest.raises(HPDError, match=r"another config .*teacher.path: '/another/checkout/hpd/assets/long-teacher'"):
        run_bench(s)


def test_a_report_from_the_archive_does_not_write_the_traces_again(tmp_path, monkeypatch):
    import shutil

    import hpd.responses.rollout

    keep = tmp_path / "kept"
    s = _fast(tmp_path, data=["traces"], train_per_task=6, archive=keep)
    out = run_bench(s)
    table = (out / "results.md").read_text()
    assert "% wrong" in table
    assert json.loads((keep / "data" / "traces" / "stats.json").read_text()) == json.loads(
        (out / "data" / "traces" / "stats.json").read_text())
    shutil.rmtree(out)

    def no_generation(*a, **k):
        raise AssertionError("the writer generated again")

    monkeypatch.setattr(hpd.responses.rollout, "generate_text", no_generation)
    report = _fast(tmp_path, data=["traces"], train_per_task=6, archive=keep, report_only=True)
    assert (run_bench(report) / "results.md").read_text() == table
    assert not (out / "data" / "traces" / "train.jsonl").exists()
    # A bench that trains still needs the traces themselves: without the archive's record or
    # --report, they are written again.
    with pytest.raises(AssertionError, match="generated again"):
        run_bench(_fast(tmp_path, data=["traces"], train_per_task=6, archive=keep))


def test_starts(tmp_path):
    s = _fast(tmp_path)
    assert resolve_start("scratch", s).overrides[0].startswith("student.path=tiny")
    assert resolve_start("pretrained", s).overrides == (f"student.path={resolve_start('pretrained:llama-2x96', s).overrides[0].split('=', 1)[1]}",)
    assert resolve_start("pruned", s).overrides == ("student.path=teacher", "student.init_from_teacher=every:2")
    with pytest.raises(HPDError, match="build_students.sh"):
        resolve_start("pretrained:nope", s)
    with pytest.raises(HPDError, match="unknown student start"):
        resolve_start("sideways", s)


def _user_files(tmp_path):
    from hpd.apps.tasks import get_task, task_row

    task = get_task("math", steps=1)
    train = [task_row(it) for it in task.generate("train", 40, seed=0)]
    test = [task_row(it) for it in task.generate("test", 6, seed=0)]
    for rows, name in ((train, "train.jsonl"), (test, "test.jsonl")):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "myverify.py").write_text(
        "def check(row, completion):\n    return completion.strip().endswith(str(row['answer']))\n")
    return tmp_path / "train.jsonl", tmp_path / "test.jsonl"


def test_where_every_validation_problem_is_graded_the_rate_is_also_tuned_on_the_graded_score(tmp_path):
    from hpd.apps.bench import tuning_criteria
    from hpd.apps.bench_report import condition_tables
    from hpd.apps.tasks import get_task, task_row

    task = get_task("math", steps=4)
    for split, n, name in (("train", 40, "train.jsonl"), ("test", 6, "test.jsonl")):
        rows = [task_row(it) for it in task.generate(split, n, seed=0)]
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = _fast(tmp_path, methods=["hpd"], user_train=tmp_path / "train.jsonl", user_test=tmp_path / "test.jsonl",
              user_student="pretrained", verifier="task", lr_grid=[1 / 3, 1.0], seeds=[0, 1])
    (cond,), _ = build_conditions(s)
    assert tuning_criteria(cond, s) == ["accuracy", "graded"]
    val = [json.loads(line) for line in cond.val.read_text().splitlines()]
    # At 1/3 of the base rate every chain is worked right but ends on a wrong answer (accuracy 0,
    # graded 1); at the base rate one chain is right and the others are empty (1/3 on both).
    slips = [r["completion"].rsplit("Answer:", 1)[0] + "Answer: -1" for r in val]
    one_right = [val[0]["completion"]] + [""] * (len(val) - 1)
    for mult, answers, acc in ((1 / 3, slips, 0.0), (1.0, one_right, 1 / 3)):
        run = run_spec(cond, "hpd", cond.start.lr * mult, 0, s).run_dir
        run.mkdir(parents=True)
        (run / "eval-val.json").write_text(json.dumps({"accuracy": acc, "verdicts": [], "tasks": [], "completions": answers}))
    lr_acc, accs = tuned_lr(cond, "hpd", s)
    lr_graded, graded = tuned_lr(cond, "hpd", s, "graded")
    assert lr_acc == cond.start.lr and lr_graded == pytest.approx(cond.start.lr / 3)
    assert graded[lr_graded] == pytest.approx(1.0) and graded[cond.start.lr] == pytest.approx(1 / 3)
    # The tuned phase runs seed 1 where either criterion needs it, each run once.
    plan = [(round(sp.lr / cond.start.lr, 3), sp.seed) for sp in plan_tuned(cond, s)]
    assert sorted(plan) == [(0.333, 0), (0.333, 1), (1.0, 0)]
    report = condition_tables(cond, s)
    assert "Tuned: each method" in report and "Tuned on steps right: each method" in report
    assert "val steps right lost across grid" in report and "- tuned on steps right:" in report
    with pytest.raises(HPDError, match="unknown tuning criterion"):
        tuned_lr(cond, "hpd", s, "loss")
    # A condition whose verifier grades only some problems (code and dialogue are pass/fail) tunes on accuracy.
    (gold,), _ = build_conditions(_fast(tmp_path / "gold"))
    assert tuning_criteria(gold, s) == ["accuracy"]


@pytest.mark.parametrize("verifier", ["exact", "math", "task", "MYFILE:check"])
def test_bench_on_a_users_own_task(tmp_path, verifier):
    train, test = _user_files(tmp_path)
    verifier = verifier.replace("MYFILE", str(tmp_path / "myverify.py"))
    s = _fast(tmp_path, methods=["hpd"], user_train=train, user_test=test, user_student="pretrained", verifier=verifier,
              jobs=1)
    out = run_bench(s)
    table = (out / "results.md").read_text()
    assert "pretrained-user" in table and f"verifier `{verifier}`" in table
    (cond,), _ = build_conditions(s)
    assert len(cond.val.read_text().splitlines()) == 3 and len(cond.train.read_text().splitlines()) == 37
    run = run_spec(cond, "hpd", cond.start.lr, 0, s).run_dir
    ev = json.loads((run / "eval-test.json").read_text())
    assert len(ev["verdicts"]) == 6 and ev["accuracy"] == sum(ev["verdicts"]) / 6
    assert len(ev["completions"]) == 6  # kept, so any later metric can be read without generating again
    if verifier == "task":  # math grades steps right: read from the kept answers, reported beside accuracy
        from hpd.apps.bench_report import grader
        from hpd.apps.tasks import get_task, task_item

        rows = [json.loads(line) for line in test.read_text().splitlines()]
        want = [get_task("math", steps=1).partial_credit(task_item(r), c) for r, c in zip(rows, ev["completions"])]
        assert grader(cond, s)(ev) == want
        mean = 100 * sum(want) / len(want)
        assert f"| hpd | {cond.start.lr:.2g} | 1 |" in table and f"| {mean:.1f} ± 0.0 | ref |" in table
    else:
        assert "steps right" not in table


def test_bench_verifier_that_raises_is_a_clear_error(tmp_path):
    train, test = _user_files(tmp_path)
    (tmp_path / "broken.py").write_text("def check(row, completion):\n    raise KeyError('oops')\n")
    s = _fast(tmp_path, methods=["hpd"], user_train=train, user_test=test, user_student="pretrained",
              verifier=f"{tmp_path / 'broken.py'}:check", jobs=1)
    with pytest.raises(HPDError, match="oops"):
        run_bench(s)


def test_bench_cli_errors(tmp_path):
    train, test = _user_files(tmp_path)
    hpd = [sys.executable, "-m", "hpd.apps.cli", "bench", "--out", str(tmp_path / "b")]
    bad = subprocess.run([*hpd, "--train", str(train), "--test", str(test), "--verifier", "exakt"], capture_output=True, text=True)
    assert bad.returncode == 2 and "exact" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "b" / "runs").exists()  # refused before any training
    half = subprocess.run([*hpd, "--train", str(train)], capture_output=True, text=True)
    assert half.returncode == 2 and "--test" in half.stderr



def test_a_rerun_with_other_data_settings_is_refused_and_leaves_out_untouched(tmp_path):
    run_bench(_fast(tmp_path, data=["gold", "limited"], report_only=True))  # builds the data files, trains nothing
    out = tmp_path / "bench"
    before = {p: p.read_bytes() for p in (out / "data").rglob("*.jsonl")}
    for change, key in [(dict(n_eval=5), "data.n_eval: 4 -> 5"), (dict(train_per_task=30), "data.train_per_task: 20 -> 30"),
                        (dict(data=["gold", "limited"], limited_per_task=6), "limited.per_task: 5 -> 6")]:
        with pytest.raises(HPDError, match=f"other settings \\({key}\\).*another --out"):
            run_bench(_fast(tmp_path, report_only=True, **{"data": ["gold", "limited"], **change}))
    assert before == {p: p.read_bytes() for p in (out / "data").rglob("*.jsonl")}
    run_bench(_fast(tmp_path, data=["gold", "limited"], report_only=True))  # the same settings: accepted
    run_bench(_fast(tmp_path, data=["gold", "traces"], report_only=True))  # a new condition: recorded, not refused
    assert "traces.writer" in json.loads((out / "bench.json").read_text())


def test_a_finished_run_made_with_another_config_is_never_reused(tmp_path):
    from hpd.apps.bench_manifest import check_reused_runs
    from hpd.config import load_config, save_config

    s = _fast(tmp_path)
    (cond,), _ = build_conditions(s)
    spec = run_spec(cond, "hpd", cond.start.lr, 0, s)
    (spec.run_dir / "final").mkdir(parents=True)
    (spec.run_dir / "final" / "config.json").write_text("{}")
    save_config(load_config(None, list(spec.overrides)), spec.run_dir / "config.yaml")
    check_reused_runs(plan_grid(cond, s))  # as made: reused
    longer = _fast(tmp_path, steps_pretrained=4)
    (cond4,), _ = build_conditions(longer)
    with pytest.raises(HPDError, match=r"finished run .*hpd.* another config .*max_steps: 3 -> 4.*delete that run"):
        check_reused_runs(plan_grid(cond4, longer))
    with pytest.raises(HPDError, match=r"objective.hpd_eps|objective\.\w+: .* -> "):
        check_reused_runs(plan_grid(cond, _fast(tmp_path, overrides=["objective.temperature=2.0"])))


def test_a_users_changed_training_file_is_refused_in_the_same_out(tmp_path):
    train, test = _user_files(tmp_path)
    s = _fast(tmp_path, methods=["hpd"], user_train=train, user_test=test, user_student="pretrained", verifier="exact",
              report_only=True)
    run_bench(s)
    train.write_text(train.read_text().replace("\n", "\n", 1) + train.read_text().splitlines(True)[0])
    with pytest.raises(HPDError, match=r"user\.train: '[0-9a-f]+' -> '[0-9a-f]+'"):
        run_bench(s)



def test_the_record_keys_models_by_their_weights_not_their_config_file(tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from hpd.apps.bench import STUDENTS_DIR

    student = shutil.copytree(STUDENTS_DIR / "llama-2x96", tmp_path / "student")
    train, test = _user_files(tmp_path)
    s = _fast(tmp_path, methods=["hpd"], user_train=train, user_test=test, user_student=str(student), verifier="exact",
              report_only=True)
    run_bench(s)
    conf = json.loads((student / "config.json").read_text())
    (student / "config.json").write_text(json.dumps({**conf, "transformers_version": "4.57.0"}))  # a key that changes nothing
    run_bench(s)
    weights = load_file(student / "model.safetensors")
    name = next(iter(weights))
    save_file({**weights, name: weights[name] + 1}, student / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(HPDError, match=r"other settings \(start\.student: "):
        run_bench(s)

def test_a_diverged_run_is_a_failed_grid_point_and_any_other_error_stops_the_bench(tmp_path, monkeypatch):
    import hpd
    from hpd.errors import DivergedError

    real = hpd.train

    def train(cfg):
        if cfg.objective.name == "hpd" and cfg.seed == 0:
            raise DivergedError("stopped at step 2: 2 steps in a row had a non-finite loss")
        return real(cfg)

    monkeypatch.setattr(hpd, "train", train)
    s = _fast(tmp_path, seeds=[0, 1], jobs=1)
    run_bench(s)  # goes on past the diverged run
    (cond,), _ = build_conditions(s)
    failed = run_spec(cond, "hpd", cond.start.lr, 0, s).run_dir / "failed.json"
    assert "non-finite loss" in json.loads(failed.read_text())["failed"]
    assert (run_spec(cond, "hpd", cond.start.lr, 1, s).run_dir / "eval-test.json").is_file()
    assert "(+1 failed)" in (tmp_path / "bench" / "results.md").read_text()

    def broken(cfg):
        raise HPDError("data file 'x.jsonl' not found: check data.train")

    monkeypatch.setattr(hpd, "train", broken)
    other = _fast(tmp_path, methods=["fkl", "hpd"], jobs=1)
    with pytest.raises(HPDError, match="x.jsonl' not found"):
        run_bench(other)
    assert not list((tmp_path / "bench" / "runs").rglob("fkl/*/failed.json"))  # a mistake is never a result


def test_two_benches_on_one_out_are_refused(tmp_path):
    from filelock import FileLock

    out = tmp_path / "bench"
    out.mkdir()
    with FileLock(str(out / ".bench.lock")):
        with pytest.raises(HPDError, match="another `hpd bench` is running on .*another --out"):
            run_bench(_fast(tmp_path))
        assert not (out / "runs").exists() and not (out / "data").exists()
        run_bench(_fast(tmp_path, report_only=True))  # the tables can still be read meanwhile

def test_bench_rejects_unknown_methods_and_needs_the_reference(tmp_path):
    with pytest.raises(HPDError, match="unknown bench method"):
        run_bench(BenchSettings(out_dir=tmp_path, methods=["nope"]))
    with pytest.raises(HPDError, match="include it"):
        run_bench(BenchSettings(out_dir=tmp_path, methods=["sft"]))
    # `hpd bench --methods` is a comma-separated list: no label may contain a comma.
    assert not [m for m in METHODS if "," in m]
    # the authors' recipes: AKL and ToDi as CE + 0.1 KD, ABKL pure
    assert "objective.kd_weight=0.1" in METHODS["akl"][1] and "objective.ce_weight=1" in METHODS["todi"][1]
    assert METHODS["abkl"] == ("abkl", [])


def test_the_bench_help_names_the_default_methods_the_bench_runs():
    # The CLI keeps torch out of `--help`, so it cannot import the list; the two must not drift.
    from typer.testing import CliRunner

    from hpd.apps.bench import DEFAULT_METHODS
    from hpd.apps.cli import app

    text = " ".join(CliRunner().invoke(app, ["bench", "--help"], terminal_width=400).output.split())
    assert f"[default: {','.join(DEFAULT_METHODS)}]" in text
    # and the grid: the command's default is the library's
    grid = BenchSettings(out_dir=".").lr_grid
    assert f"[default: {','.join(f'{g:g}' for g in grid)}]" in text



def test_the_graded_difference_compares_only_the_problems_the_verifier_grades():
    from hpd.apps.bench_report import paired_diff

    # Two seeds; the None rows (e.g. code and dialogue in a mixed test set) carry no graded score.
    ref = {0: {"partial": [0.5, None, 0.25, None]}, 1: {"partial": [0.5, None, 0.5, None]}}
    run = {0: {"partial": [1.0, None, 0.75, None]}, 1: {"partial": [1.0, None, 1.0, None]}}
    assert paired_diff(run, ref, "partial").startswith("+50.0 [+50.0, +50.0]")  # every graded problem +0.5
    assert paired_diff({0: {"partial": None}}, ref, "partial") == "-"
    assert paired_diff({0: {"partial": [1.0]}}, ref, "partial") == "(different problems)"

def test_loss_spikes_and_grad_norm_spread():
    assert loss_spikes([1.0] * 20) == 0
    assert loss_spikes([1.0] * 12 + [2.0] + [1.0] * 5) == 1
    assert loss_spikes([1.0] * 12 + [1.4]) == 0
    # GKD alternates gold batches (KL about 0.4) and its own rollouts (about 0.2): every switch
    # back to gold exceeds 1.5x the mixed window's median, but within a regime nothing jumps.
    regimes = (["student"] * 3 + ["dataset"]) * 10
    kl = [0.2 if g == "student" else 0.42 for g in regimes]
    assert loss_spikes(kl) > 0
    assert loss_spikes(kl, regimes=regimes) == 0
    kl[-3] = 0.9  # a real jump inside the student regime still counts
    assert loss_spikes(kl, regimes=regimes) == 1
    assert grad_norm_spread([2.0] * 10) == 1.0
    assert grad_norm_spread([1.0] * 5 + [5.0] * 5) == pytest.approx(5.0 / 3.0)  # p90 5 over median 3

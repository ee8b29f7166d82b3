"""Caches and outputs under attack and failure: never reused wrong, never overwriting an input.

- `hpd generate` and the teacher regime's generations: an output cut, edited or replaced under an
  old key file is generated again, not reused; a partial file with repeated or cut batches resumes
  to the same rows as a clean run; a second writer is refused; leftovers of a kill are removed;
  a full disk is one error line;
- teacher-cache shards are checked against the manifest's digests; damaged offsets, ids or shards
  are one error line;
- a run refuses an output that holds or is one of its inputs, and a filesystem root or home;
- metrics.jsonl is appended to, never rewritten; config values out of range and undecodable data
  rows are one error line (or skipped with data.on_bad_row=skip).
"""

from __future__ import annotations

import json
import re
import os
import resource
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hpd.apps.cli import app
from hpd.errors import HPDError

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("single_torch_thread")
ROOT = Path(__file__).resolve().parents[1]


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


# --------------------------------------------------------------------------------------------
# hpd generate: the output is reused only when it is the one its key describes
# --------------------------------------------------------------------------------------------

N_PROMPTS, BATCH = 10, 4


@pytest.fixture
def prompts(tmp_path) -> Path:
    p = tmp_path / "p.jsonl"
    p.write_text("".join(json.dumps({"prompt": f"{i}+{i}=", "id": i}) + "\n" for i in range(N_PROMPTS)))
    return p


def gen_args(prompts: Path, out: Path, seed: int = 0) -> list[str]:
    return ["generate", "--model", "tiny", "--prompts", str(prompts), "--out", str(out), "--max-new-tokens", "4",
            "--batch-size", str(BATCH), "--seed", str(seed)]


def generate(prompts: Path, out: Path, seed: int = 0):
    result = invoke(*gen_args(prompts, out, seed))
    assert result.exit_code == 0, result.output
    return result


def the_key(prompts: Path, seed: int = 0) -> str:
    from hpd.apps.cli import _generation_key, _prompts_digest

    return _generation_key("tiny", _prompts_digest(prompts), dict(max_new_tokens=4, temperature=1.0, top_p=1.0, top_k=0, batch_size=BATCH,
                                                 seed=seed, chat_template="auto", dtype="float32"))


def test_generate_output_replaced_under_an_old_key_file_is_not_reused(prompts, tmp_path):
    """A kill between renaming OUT (seed 1) and writing OUT.key leaves seed 0's key beside seed 1's rows."""
    ref, out = tmp_path / "ref.jsonl", tmp_path / "gen.jsonl"
    generate(prompts, ref, seed=0)
    generate(prompts, tmp_path / "other.jsonl", seed=1)
    generate(prompts, out, seed=0)
    assert out.read_text() == ref.read_text()
    other = (tmp_path / "other.jsonl").read_text()
    assert other != ref.read_text()
    out.write_text(other)  # the state the kill leaves: seed 1's output, seed 0's key file
    result = generate(prompts, out, seed=0)
    assert "up to date" not in result.stdout
    assert out.read_text() == ref.read_text()  # generated again: seed 0's completions


def test_generate_truncated_output_with_its_key_intact_is_generated_again(prompts, tmp_path):
    ref, out = tmp_path / "ref.jsonl", tmp_path / "gen.jsonl"
    generate(prompts, ref)
    generate(prompts, out)
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:3]))
    result = generate(prompts, out)
    assert "up to date" not in result.stdout
    assert out.read_text() == ref.read_text()
    assert generate(prompts, out).stdout.startswith(f"{out} is up to date")  # and now reused


@pytest.mark.parametrize("layout", ["rows", "batches"])
def test_generate_resumes_from_a_partial_with_repeated_and_cut_batches_to_a_clean_runs_rows(prompts, tmp_path, layout):
    """Two writers appending to one partial file repeat batches; a kill cuts the last line."""
    ref, out = tmp_path / "ref.jsonl", tmp_path / "gen.jsonl"
    generate(prompts, ref)
    rows = [json.loads(line) for line in ref.read_text().splitlines()]
    assert len(rows) == N_PROMPTS
    head = json.dumps({"key": the_key(prompts)}) + "\n"
    if layout == "rows":  # a row per line: batch 1 written twice, batch 2 cut
        body = rows[:4] + rows[4:8] + rows[4:8]
        text = head + "".join(json.dumps(r) + "\n" for r in body) + json.dumps(rows[8])[:20]
    else:  # a batch per line: batch 1 written twice, batch 2 cut
        lines = [{"batch": 0, "rows": rows[:4]}, {"batch": 1, "rows": rows[4:8]}, {"batch": 1, "rows": rows[4:8]}]
        text = head + "".join(json.dumps(r) + "\n" for r in lines) + json.dumps({"batch": 2, "rows": rows[8:]})[:30]
    (tmp_path / "gen.jsonl.partial").write_text(text)
    generate(prompts, out)
    assert out.read_text() == ref.read_text()  # every prompt once, in order, nothing repeated
    assert not (tmp_path / "gen.jsonl.partial").exists()


def test_a_second_generate_into_the_same_output_is_refused_and_writes_nothing(prompts, tmp_path):
    out = tmp_path / "gen.jsonl"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom hpd.responses.generation_cache import GenerationCache\n"
        f"c = GenerationCache({str(out)!r}, 'k')\n"
        "with c.writing():\n    print('held', flush=True)\n    time.sleep(60)\n")],
        env=env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = sorted(p.name for p in tmp_path.iterdir())
        result = invoke(*gen_args(prompts, out))
        assert result.exit_code == 2 and "being written by another hpd process" in result.stderr, result.output
        assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no partial file
    finally:
        holder.kill()
        holder.wait()
    generate(prompts, out)  # the lock of a killed holder is free


def test_generate_removes_the_leftovers_of_a_killed_writer(prompts, tmp_path):
    out = tmp_path / "gen.jsonl"
    left = [tmp_path / ".gen.jsonl.ab12cd34.tmp", tmp_path / ".gen.jsonl.key.xy98zw76.tmp"]
    other = tmp_path / ".gen.jsonl.x.ab12cd34.tmp"  # another output's temporary file: kept
    for p in [*left, other]:
        p.write_text("half")
    generate(prompts, out)
    assert not any(p.exists() for p in left) and other.exists()


def test_generate_on_a_full_disk_is_one_error_line_and_keeps_finished_batches(prompts, tmp_path):
    out = tmp_path / "gen.jsonl"

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (600, 600))

    res = subprocess.run([sys.executable, "-m", "hpd.apps.cli", *gen_args(prompts, out)], cwd=ROOT, env=env(),
                         capture_output=True, text=True, preexec_fn=small_files, timeout=300)
    assert res.returncode == 2, res.stderr
    err = res.stderr.splitlines()
    assert err[-1].startswith(f"error: cannot write '{out}' (file too large for the file-size limit)"), res.stderr
    assert "Traceback" not in res.stderr
    assert not out.exists()
    generate(prompts, out)  # without the limit: finishes, reusing the batches kept
    assert len(out.read_text().splitlines()) == N_PROMPTS


def test_edited_teacher_regime_generations_are_generated_again(tmp_path):
    from hpd.models.loading import load_model
    from hpd.responses.regimes import SamplingSettings, teacher_generations

    model, tok = load_model("tiny", tiny={"num_layers": 1, "hidden_size": 32}, seed=0)
    prompts = [tok.encode("1+1=")[:4], tok.encode("2+2=")[:4]]
    settings = SamplingSettings(max_new_tokens=3, batch_size=2)
    kw = dict(seed=0, max_length=16, cache_dir=tmp_path, log=lambda m: None)
    first, path = teacher_generations(model, tok, prompts, settings, **kw)
    data = json.loads(path.read_text())
    data["completions"][0] = [7, 7, 7]  # edited: still valid JSON of the right length
    path.write_text(json.dumps(data))
    again, _ = teacher_generations(model, tok, prompts, settings, **kw)
    assert again == first and json.loads(path.read_text())["completions"] == first


# --------------------------------------------------------------------------------------------
# Inputs protected: no output over an input, no root or home as a directory to fill
# --------------------------------------------------------------------------------------------

RUN = ["configs/tiny.yaml", "data.max_length=48", "log.progress=false", "log.tensorboard=off", "teacher.path=none",
       "objective.name=sft", "max_steps=2", "save.every=0"]


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def saved_model(tmp_path) -> Path:
    from hpd.models.loading import load_model

    model, tok = load_model("tiny", tiny={"num_layers": 1, "hidden_size": 32}, seed=0)
    out = tmp_path / "out" / "final"
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


@pytest.mark.parametrize("key", ["student.path", "teacher.path", "data.train", "teacher.cache"])
def test_a_run_refuses_an_output_dir_that_holds_one_of_its_inputs(saved_model, tmp_path, key, monkeypatch):
    from hpd.config import load_config
    from hpd.training.trainer import train

    monkeypatch.chdir(ROOT)
    out = saved_model.parent
    extra = {"student.path": [f"student.path={saved_model}"],
             "teacher.path": [f"teacher.path={saved_model}", "objective.name=fkl", "student.path=tiny"],
             "data.train": [f"data.train={out / 'metrics.jsonl'}"],
             "teacher.cache": [f"teacher.cache={out / 'cache'}", "objective.name=fkl", "teacher.path=none"]}[key]
    (out / "metrics.jsonl").write_bytes((ROOT / "examples/tiny.jsonl").read_bytes())
    (out / "cache").mkdir()
    (out / "cache" / "manifest.json").write_text("{}")
    before = tree(out)
    with pytest.raises(HPDError, match=f"output_dir '{out}' holds the input {key} "):
        train(load_config(RUN[0], [*RUN[1:], f"output_dir={out}", *extra]))
    assert tree(out) == before  # the inputs byte-identical, nothing added (no lock file either)
    result = invoke("train", *RUN, f"output_dir={out}", *extra)
    assert result.exit_code == 2 and f"holds the input {key}" in result.stderr and tree(out) == before


@pytest.mark.parametrize("where", ["root", "home"])
def test_a_run_refuses_a_filesystem_root_or_home_before_writing_anything(tmp_path, monkeypatch, where):
    from hpd.config import load_config
    from hpd.training.run_dir import RunDirLock
    from hpd.training.trainer import train

    monkeypatch.chdir(ROOT)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))

    def no_writes(self):
        raise AssertionError(f"the run went on to write into {self.path}")

    monkeypatch.setattr(RunDirLock, "acquire", no_writes)  # were the check missing, nothing reaches `/`
    out = "/" if where == "root" else str(home)
    with pytest.raises(HPDError, match="is a filesystem root" if where == "root" else "is the home directory"):
        train(load_config(RUN[0], [*RUN[1:], f"output_dir={out}"]))
    result = invoke("train", *RUN, f"output_dir={out}")
    assert result.exit_code == 2 and "error: output_dir" in result.stderr
    assert list(home.iterdir()) == []


def test_generate_refuses_to_overwrite_its_prompts(prompts, tmp_path):
    before = prompts.read_bytes()
    link = tmp_path / "link.jsonl"
    link.symlink_to(prompts)
    for out in (prompts, link):
        result = invoke(*gen_args(prompts, out))
        assert result.exit_code == 2 and "is the input --prompts" in result.stderr, result.output
    assert prompts.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["link.jsonl", "p.jsonl"]


def test_eval_refuses_to_overwrite_its_data(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+{i}=", "answer": str(2 * i)}) + "\n" for i in range(2)))
    before = data.read_bytes()
    result = invoke("eval", "--model", "tiny", "--data", data, "--verifier", "exact", "--out", data,
                    "--max-new-tokens", "2")
    assert result.exit_code == 2 and "is the input --data" in result.stderr, result.output
    assert data.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["rows.jsonl"]


def test_cache_teacher_refuses_a_cache_directory_that_holds_its_data(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "cache"
    out.mkdir()
    data = out / "train.jsonl"
    data.write_bytes((ROOT / "examples/tiny.jsonl").read_bytes())
    result = invoke("cache-teacher", "--teacher", "hpd/assets/teacher", "--data", data, "--out", out, "--force",
                    "--top-k", "4")
    assert result.exit_code == 2 and "holds the input data file" in result.stderr, result.output
    assert [p.name for p in out.iterdir()] == ["train.jsonl"] and data.read_bytes() == (ROOT / "examples/tiny.jsonl").read_bytes()


def test_check_output_follows_links_and_skips_names_that_are_no_paths(tmp_path):
    from hpd.files import check_output

    model = tmp_path / "m"
    model.mkdir()
    (tmp_path / "alias").symlink_to(tmp_path)
    with pytest.raises(HPDError, match="holds the input m"):
        check_output(tmp_path / "alias", {"m": model})
    with pytest.raises(HPDError, match="is inside the input m"):
        check_output(model / "gen.jsonl", {"m": model}, directory=False)
    check_output(tmp_path / "run", {"student.path": "tiny", "data.eval": None, "m": model})  # beside: fine
    check_output(model / "run", {"m": model})  # a run directory inside a model's: its files untouched


# --------------------------------------------------------------------------------------------
# Teacher-cache shards: checked against the manifest, damage is one error line
# --------------------------------------------------------------------------------------------

CACHE_RUN = ["data.max_length=48", "log.progress=false", "log.tensorboard=off", "log.every=1", "save.every=0",
             "objective.name=fkl", "max_steps=2", "teacher.path=hpd/assets/teacher"]


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    from hpd.config import DataConfig
    from hpd.teachers.cache import build_teacher_cache

    monkeypatch.chdir(ROOT)
    return build_teacher_cache("hpd/assets/teacher", ["examples/tiny.jsonl"], tmp_path / "cache", top_k=4,
                               data=DataConfig(max_length=48), shard_positions=300, log=None)


def train_with_cache(cache: Path, out: Path, *extra: str) -> Path:
    from hpd.config import load_config
    from hpd.training.trainer import train

    return train(load_config("configs/tiny.yaml", [*CACHE_RUN, f"teacher.cache={cache}", f"output_dir={out}", *extra]))


def rewrite_array(path: Path, change) -> None:
    """Change the values of a .npy file in place (its header and size kept)."""
    import numpy as np

    arr = np.load(path, mmap_mode="r+")
    change(arr)
    arr.flush()
    del arr


@pytest.mark.parametrize("damage", ["flipped", "zeroed"])
def test_training_refuses_a_cache_shard_whose_topk_logp_bytes_changed(cache_dir, tmp_path, damage):
    shards = sorted(cache_dir.glob("shard-*"))
    assert len(shards) >= 2
    target = shards[-1] / "topk_logp.npy"
    raw = bytearray(target.read_bytes())
    if damage == "flipped":
        raw[-7] ^= 0x40
    else:
        raw[-64:] = bytes(64)
    target.write_bytes(bytes(raw))
    with pytest.raises(HPDError, match=r"is damaged: shard-\d+/topk_logp.npy does not match the manifest's sha256"):
        train_with_cache(cache_dir, tmp_path / "run", "max_steps=8")


@pytest.mark.parametrize("damage", ["ids out of range", "truncated shard", "offsets altered", "manifest cut"])
def test_a_damaged_cache_is_one_error_line_not_a_traceback(cache_dir, tmp_path, damage):
    import numpy as np

    shard = sorted(cache_dir.glob("shard-*"))[0]
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    if damage == "ids out of range":  # digests recomputed: only the range check stands
        rewrite_array(shard / "topk_ids.npy", lambda a: a.__setitem__((slice(None), 0), 60000))
        for sh in manifest["shards"]:
            sh.pop("sha256", None)
        manifest.pop("index_sha256", None)
    elif damage == "truncated shard":
        p = shard / "topk_logp.npy"
        p.write_bytes(p.read_bytes()[:-100])
    elif damage == "offsets altered":
        offsets = np.load(cache_dir / "offsets.npy")
        offsets[3] += 5
        np.save(cache_dir / "offsets.npy", offsets)
    if damage == "manifest cut":
        (cache_dir / "manifest.json").write_text(json.dumps(manifest)[:200])
    else:
        (cache_dir / "manifest.json").write_text(json.dumps(manifest))
    res = subprocess.run([sys.executable, "-m", "hpd.apps.cli", "train", "configs/tiny.yaml", *CACHE_RUN,
                          f"teacher.cache={cache_dir}", f"output_dir={tmp_path / 'run'}"],
                         cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert f"teacher cache '{cache_dir}'" in errors[0] and "rebuild it" in errors[0]


def test_an_intact_cache_trains_and_each_shard_is_hashed_once_per_process(cache_dir, tmp_path, monkeypatch):
    import hpd.teachers.cache as tc

    calls = []
    real = tc.file_sha256
    monkeypatch.setattr(tc, "file_sha256", lambda p: calls.append(Path(p).relative_to(cache_dir)) or real(p))
    monkeypatch.setattr(tc, "_VERIFIED", set())
    train_with_cache(cache_dir, tmp_path / "a", "max_steps=6")
    names = sorted(map(str, calls))
    assert len(names) == len(set(names))  # no file hashed twice
    assert {f"{n}.npy" for n in tc.INDEX_ARRAYS} <= set(names)
    read = {n.split("/")[0] for n in names if "/" in n}
    assert read and all(f"{d}/{n}.npy" in names for d in read for n in tc.ARRAYS)  # a shard read is checked whole
    train_with_cache(cache_dir, tmp_path / "b", "max_steps=6", "seed=1")
    names = list(map(str, calls))
    assert len(names) == len(set(names))  # a second run in the same process hashes nothing again


def cache_teacher(out: Path, *extra: str):
    return invoke("cache-teacher", "--teacher", "hpd/assets/teacher", "--data", "examples/tiny.jsonl", "--out", out,
                  "--top-k", "4", "--max-length", "48", *extra)


def test_a_second_cache_teacher_into_the_same_directory_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "cache"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import time\nfrom filelock import FileLock\n"
        f"l = FileLock({str(tmp_path / '.cache.lock')!r}); l.acquire(); print('held', flush=True); time.sleep(60)")],
        env=env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        result = cache_teacher(out)
        assert result.exit_code == 2 and "another hpd cache-teacher is writing" in result.stderr, result.output
        assert sorted(p.name for p in tmp_path.iterdir()) == [".cache.lock"]  # nothing written
    finally:
        holder.kill()
        holder.wait()
    assert cache_teacher(out).exit_code == 0 and (out / "manifest.json").is_file()


def test_cache_teacher_after_a_kill_during_force_puts_the_old_cache_back_and_cleans_up(tmp_path, monkeypatch):
    from hpd.teachers.cache import TeacherCache

    monkeypatch.chdir(ROOT)
    out = tmp_path / "cache"
    assert cache_teacher(out).exit_code == 0
    before = tree(out)
    # A kill inside replace_dir: the old cache set aside, the new one not yet renamed into place.
    os.replace(out, tmp_path / ".cache.old-1234abcd")
    (tmp_path / ".cache.tmp-deadbeef" / "shard-00000").mkdir(parents=True)
    result = cache_teacher(out)  # without --force: the old cache is back, and kept
    assert result.exit_code == 2 and "already exists" in result.stderr, result.output
    assert tree(out) == before and sorted(p.name for p in tmp_path.iterdir()) == [".cache.lock", "cache"]
    (tmp_path / ".cache.tmp-0badf00d").mkdir()
    assert cache_teacher(out, "--force", "--top-k", "2").exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [".cache.lock", "cache"] and TeacherCache(out).top_k == 2


# --------------------------------------------------------------------------------------------
# metrics.jsonl: appended to, never rewritten; read as the run stands
# --------------------------------------------------------------------------------------------

METRICS_RUN = [*RUN[1:], "max_steps=6", "save.every=2", "save.keep_last=5", "log.every=1", "log.eval_every=3"]


def test_a_resume_appends_to_metrics_and_reads_like_an_uninterrupted_run(tmp_path, monkeypatch):
    import shutil

    from hpd.apps.experiments import last_step, read_records
    from hpd.apps.plots import read_metrics
    from hpd.config import load_config
    from hpd.training.trainer import train

    monkeypatch.chdir(ROOT)
    ref = train(load_config(RUN[0], [*METRICS_RUN, f"output_dir={tmp_path / 'ref'}"]))
    # A run killed after logging step 6 but before its checkpoint: its metrics run ahead of step 4.
    run = tmp_path / "run"
    shutil.copytree(ref, run)
    for p in run.glob("checkpoints/step-0000000[56]"):
        shutil.rmtree(p)
    shutil.rmtree(run / "final")
    (run / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text() + '{"type": "train", "ste')  # a cut line
    before = (run / "metrics.jsonl").read_bytes()
    train(load_config(RUN[0], [*METRICS_RUN, f"output_dir={run}"]))
    after = (run / "metrics.jsonl").read_bytes()
    assert after.startswith(before)  # nothing rewritten: a kill or a size limit here loses no line
    def strip(records):  # what a resumed run repeats exactly (not timings or memory)
        return [{k: r.get(k) for k in ("type", "step", "loss", "lr", "grad_norm", "tokens", "ce")} for r in records]

    for kind in ("train", "eval"):
        assert strip(read_records(run, kind)) == strip(read_records(ref, kind)), kind  # steps 1-6 once each
    assert last_step(run) == 6
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the cut line before the restart marker is no damage to report
        assert read_metrics(run).series["train"]["loss"] == read_metrics(ref).series["train"]["loss"]


def test_a_fresh_start_over_old_metrics_keeps_the_lines_and_reads_only_the_new_run(tmp_path, monkeypatch):
    from hpd.apps.experiments import read_records
    from hpd.config import load_config
    from hpd.training.trainer import train

    monkeypatch.chdir(ROOT)
    run = tmp_path / "run"
    run.mkdir()
    old = '{"type": "train", "step": 1, "loss": 99.0}\n{"type": "train", "step": 2, "loss": 98.0}\n'
    (run / "metrics.jsonl").write_text(old)  # a run killed before its first checkpoint
    train(load_config(RUN[0], [*RUN[1:], f"output_dir={run}"]))
    assert (run / "metrics.jsonl").read_text().startswith(old)
    assert [r["step"] for r in read_records(run, "train")] == [1, 2] and 99.0 not in [r["loss"] for r in read_records(run)
                                                                                        if "loss" in r]


# --------------------------------------------------------------------------------------------
# Values out of range, undecodable rows, prompts past the context: one line each
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("override, match", [
    ("optim.batch_size=1e9", r"optim.batch_size: must be \[1, 65536\], got 1000000000"),
    ("seed=1e26", r"seed: must be at most 9223372036854775807 \(an int64\)"),
    ("student.tiny_hidden=1e9", r"student.tiny_hidden: must be \[1, 65536\]"),
    ("teacher.tiny_intermediate=1e12", r"teacher.tiny_intermediate: must be \[1, 262144\]"),
    ("student.tiny_hidden=65536", r"student: the 'tiny' model .* would have about 3.4e\+10 parameters"),
])
def test_values_out_of_range_are_one_error_line_before_anything_is_built(override, match, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)

    def small_memory():
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))  # a huge list or model fails fast, not the host

    res = subprocess.run([sys.executable, "-m", "hpd.apps.cli", "train", *RUN, override, f"output_dir={tmp_path / 'run'}"],
                         cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300, preexec_fn=small_memory)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-1500:]
    assert len(res.stderr.strip().splitlines()) == 1 and re.search(match, res.stderr), res.stderr
    assert not (tmp_path / "run").exists()


def test_a_large_seed_in_range_trains(tmp_path, monkeypatch):
    from hpd.config import load_config
    from hpd.training.trainer import train

    monkeypatch.chdir(ROOT)
    train(load_config(RUN[0], [*RUN[1:], f"seed={2**62}", f"output_dir={tmp_path / 'run'}"]))
    assert (tmp_path / "run" / "final" / "config.json").is_file()


SURROGATE_ROWS = '{"prompt": "1+1=", "completion": "2"}\n{"prompt": "a\\ud800b", "completion": "x"}\n'


def test_a_lone_surrogate_in_a_row_is_one_error_naming_the_line(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    data = tmp_path / "d.jsonl"
    data.write_text(SURROGATE_ROWS + (ROOT / "examples/tiny.jsonl").read_text())
    result = invoke("train", *RUN, f"data.train={data}", f"output_dir={tmp_path / 'run'}")
    assert result.exit_code == 2, result.output
    assert f"{data} line 2: field 'prompt' holds a lone surrogate" in result.stderr and "on_bad_row" in result.stderr


def test_on_bad_row_skip_skips_a_row_with_a_lone_surrogate(tmp_path, monkeypatch):
    from hpd.apps.experiments import read_records
    from hpd.config import load_config
    from hpd.training.trainer import train

    monkeypatch.chdir(ROOT)
    data = tmp_path / "d.jsonl"
    data.write_text(SURROGATE_ROWS + (ROOT / "examples/tiny.jsonl").read_text())
    run = train(load_config(RUN[0], [*RUN[1:], f"data.train={data}", "data.on_bad_row=skip", f"output_dir={tmp_path / 'run'}"]))
    info = read_records(run, "info")[0]
    assert info["train_skipped"] == 1 and info["train_rows"] == 1 + 96


def test_generate_refuses_a_prompt_longer_than_the_context(tmp_path):
    from hpd.models.loading import load_model
    from hpd.responses.rollout import generate_text

    model, tok = load_model("tiny", tiny={"num_layers": 1, "hidden_size": 32, "max_positions": 16}, seed=0)
    with pytest.raises(HPDError, match="prompt 1 is 40 tokens, longer than the model's context of 16 tokens"):
        generate_text(model, tok, ["short", "x" * 40], chat_template="none", max_new_tokens=2)
    assert len(generate_text(model, tok, ["short", "x" * 12], chat_template="none", max_new_tokens=8)) == 2  # fits
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "y" * 2000}) + "\n")
    result = invoke("generate", "--model", "tiny", "--prompts", prompts, "--out", tmp_path / "g.jsonl")
    assert result.exit_code == 2 and "longer than the model's context of 1024 tokens" in result.stderr, result.output
    assert not (tmp_path / "g.jsonl").exists()


@pytest.mark.parametrize("command", [
    ["plot", ".", "--out", "/"],
    ["bench", "--out", "/", "--report"],
    ["demo", "--out", "/"],
    ["convert", "x.gguf", "/"],
    ["cache-teacher", "--teacher", "hpd/assets/teacher", "--data", "examples/tiny.jsonl", "--out", "/"],
])
def test_every_command_that_fills_a_directory_refuses_the_filesystem_root(command, monkeypatch):
    monkeypatch.chdir(ROOT)
    before = sorted(os.listdir("/"))
    result = invoke(*command)
    assert result.exit_code == 2 and "is a filesystem root" in result.stderr, result.output
    assert sorted(os.listdir("/")) == before

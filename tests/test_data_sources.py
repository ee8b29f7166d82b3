"""Every command reads every data source `hpd train` reads, through its one reader (`hpd.data.rows.load_examples`).

`hpd generate`, `hpd eval --data`, `hpd cache-teacher` and `hpd bench --train/--test` on messages
JSONL, prompt/completion JSONL (plain and TRL's list style), JSON, Parquet and saved datasets
(`save_to_disk`, a `DatasetDict` with `dir:split`); a bad row is a one-line error naming the user's
file and line (not a traceback, not a copy the command made) and saying how that command skips it.
Tiny models, a few rows: each command runs in about a second.
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from hpd.apps.cli import app

pytestmark = pytest.mark.usefixtures("single_torch_thread")

ROWS = [{"prompt": "2+2=", "completion": "2+2=4. Answer: 4", "answer": "4"},
        {"prompt": "3+3=", "completion": "3+3=6. Answer: 6"},  # no `answer`: exact/math read the completion's
        {"prompt": "Capital of France?", "completion": "Paris"}] * 4
FORMATS = ["messages.jsonl", "plain.jsonl", "trl.jsonl", "rows.json", "rows.parquet", "saved", "dict:test"]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """One directory holding the same rows in every format (the name of each is a FORMATS entry)."""
    import datasets

    d = tmp_path_factory.mktemp("sources")
    chat = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}],
             **({"answer": r["answer"]} if "answer" in r else {})} for r in ROWS]
    trl = [{**r, "prompt": [{"role": "user", "content": r["prompt"]}],
            "completion": [{"role": "assistant", "content": r["completion"]}]} for r in ROWS]
    for name, rows in (("messages.jsonl", chat), ("plain.jsonl", ROWS), ("trl.jsonl", trl)):
        (d / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "rows.json").write_text(json.dumps(ROWS, indent=1))
    datasets.Dataset.from_list(ROWS).to_parquet(str(d / "rows.parquet"))
    datasets.Dataset.from_list(chat).save_to_disk(str(d / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:3]),
                          "test": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(d / "dict"))
    from hpd.models.loading import load_model, save_model

    teacher, tok = load_model("tiny", tiny={"num_layers": 1, "hidden_size": 32, "intermediate_size": 64}, seed=1)
    save_model(teacher, tok, d / "teacher")
    return d


BAD = {  # (the file's lines, the bad line, what the message says about it)
    "missing field": ([ROWS[0], {"completion": "4"}, ROWS[1]], 2, "field 'prompt' is missing"),
    "truncated row": ([ROWS[0], ROWS[1], json.dumps(ROWS[2])[:-6]], 3, "the row is truncated"),
    "not JSON": ([ROWS[0], "prompt: 2+2=", ROWS[1]], 2, "invalid JSON"),
}
NO_COMPLETION = ([ROWS[0], {"prompt": "5+5="}, ROWS[1]], 2, "field 'completion' is missing")


def _bad_file(tmp_path, kind):
    lines, line, says = BAD[kind] if kind in BAD else NO_COMPLETION
    path = tmp_path / "bad.jsonl"
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return path, line, says


def _one_line_error(result, path, line, says, skip):
    assert result.exit_code == 2, result.output
    err = result.stderr.splitlines()[-1]  # after any progress bar of a model loaded before the data was read
    assert "Traceback" not in result.stderr and result.stderr.endswith(err + "\n") and err.count("error:") == 1, err
    assert err.startswith(f"error: {path} line {line}: ") and says in err, err
    assert f"Fix the row, or {skip} to skip bad rows." in err, err


# ---------------------------------------------------------------------------------------------
# hpd generate and hpd eval --data


@pytest.mark.parametrize("fmt", FORMATS)
def test_generate_reads_every_format(sources, tmp_path, fmt):
    out = tmp_path / "gen.jsonl"
    result = invoke("generate", "--model", "tiny", "--prompts", sources / fmt, "--out", out, "--max-new-tokens", 2,
                    "--temperature", 0)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == len(ROWS)
    prompts = [r["prompt"] if "prompt" in r else r["messages"][0]["content"] for r in rows]
    assert prompts == [r["prompt"] for r in ROWS]  # the prompts of the source, in its order


def test_generate_keys_a_saved_dataset_by_its_content(sources, tmp_path):
    import shutil

    src = shutil.copytree(sources / "saved", tmp_path / "saved")
    out = tmp_path / "gen.jsonl"
    args = ("generate", "--model", "tiny", "--prompts", src, "--out", out, "--max-new-tokens", 2)
    assert invoke(*args).exit_code == 0
    assert "up to date" in invoke(*args).stdout  # the same dataset: reused
    import datasets

    datasets.Dataset.from_list([{"prompt": "new"}]).save_to_disk(str(tmp_path / "other"))
    shutil.rmtree(src)
    shutil.copytree(tmp_path / "other", src)
    again = invoke(*args)
    assert again.exit_code == 0 and "up to date" not in again.stdout
    assert [json.loads(line)["prompt"] for line in out.read_text().splitlines()] == ["new"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_eval_reads_every_format_and_takes_the_reference_from_the_completion(sources, tmp_path, fmt, monkeypatch):
    import hpd.apps.evaluate as evaluate

    # The model "answers" with each row's reference solution: every verdict must then be right,
    # whether the row has an `answer` or only a completion to take it from.
    refs = {r["prompt"]: r["completion"] for r in ROWS}
    monkeypatch.setattr(evaluate, "generate_text", lambda model, tok, prompts, **kw: [
        refs[p if isinstance(p, str) else p[-1]["content"]] for p in prompts])
    for verifier in ("exact", "math"):
        out = tmp_path / f"eval-{verifier}.jsonl"
        result = invoke("eval", "--model", "tiny", "--data", sources / fmt, "--verifier", verifier, "--out", out)
        assert result.exit_code == 0, result.output
        records = [json.loads(line) for line in out.read_text().splitlines()]
        assert len(records) == len(ROWS)
        if verifier == "exact":
            assert all(r["correct"] for r in records), records
        else:  # "Paris" is no number: math-verify cannot call it right; the two sums it must
            assert [r["correct"] for r in records] == [r["prompt"] != "Capital of France?" for r in ROWS]


def test_eval_names_the_row_without_a_reference_by_file_and_line(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"prompt": "2+2=", "answer": "4"}) + "\n" + json.dumps({"prompt": "3+3="}) + "\n")
    result = invoke("eval", "--model", "tiny", "--data", path, "--verifier", "exact")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert f"reads the field 'answer' or 'completion' of every row, but {path}:2 has none" in result.stderr


@pytest.mark.parametrize("kind", sorted(BAD))
@pytest.mark.parametrize("command", ["generate", "eval"])
def test_a_bad_row_in_generate_or_eval_is_a_one_line_error_naming_the_file_and_line(tmp_path, kind, command):
    path, line, says = _bad_file(tmp_path, kind)
    args = (["generate", "--prompts", path, "--out", tmp_path / "o.jsonl"] if command == "generate"
            else ["eval", "--data", path, "--verifier", "exact", "--out", tmp_path / "o.jsonl"])
    _one_line_error(invoke(*args, "--model", "tiny", "--max-new-tokens", 2), path, line, says, "pass --on-bad-row skip")
    skipped = invoke(*args, "--model", "tiny", "--max-new-tokens", 2, "--on-bad-row", "skip")
    assert skipped.exit_code == 0, skipped.output
    assert len((tmp_path / "o.jsonl").read_text().splitlines()) == 2  # the two good rows


# ---------------------------------------------------------------------------------------------
# hpd cache-teacher


@pytest.mark.parametrize("fmt", FORMATS)
def test_cache_teacher_reads_every_format(sources, tmp_path, fmt):
    result = invoke("cache-teacher", "--teacher", sources / "teacher", "--data", sources / fmt, "--out", tmp_path / "c",
                    "--top-k", 2)
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert sum(f["examples"] for f in manifest["data"]["files"]) == len(ROWS)


@pytest.mark.parametrize("kind", sorted(BAD))
def test_a_bad_row_in_cache_teacher_is_a_one_line_error_naming_the_file_and_line(sources, tmp_path, kind):
    path, line, says = _bad_file(tmp_path, kind)
    result = invoke("cache-teacher", "--teacher", sources / "teacher", "--data", path, "--out", tmp_path / "c")
    _one_line_error(result, path, line, says, "set data.on_bad_row=skip")


# ---------------------------------------------------------------------------------------------
# hpd bench --train/--test (--report: the files are read and copied, nothing is trained)


def _bench(tmp_path, train, test, *extra):
    return invoke("bench", "--train", train, "--test", test, "--verifier", "exact", "--student", "pretrained",
                  "--out", tmp_path / "b", "--n-val", 2, "--report", *extra)


def _copy(tmp_path, name):
    return [json.loads(line) for line in (tmp_path / "b" / "data" / "user" / f"{name}.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("fmt", FORMATS)
def test_bench_reads_every_format(sources, tmp_path, fmt):
    from hpd.apps.evaluate import load_rows

    result = _bench(tmp_path, sources / fmt, sources / fmt)
    assert result.exit_code == 0, result.output
    val, train, test = _copy(tmp_path, "val"), _copy(tmp_path, "train"), _copy(tmp_path, "test")
    assert len(val) == 1 and len(train) == len(ROWS) - 1 and len(test) == len(ROWS)
    # The copies hold the source's rows (chat rows as prompt messages + completion) and read back the same.
    want = list(load_rows(sources / fmt))
    assert val + train == want and test == want
    assert [r["completion"] for r in test] == [r["completion"] for r in ROWS]


@pytest.mark.parametrize("kind,which", [(k, w) for k in sorted(BAD) for w in ("train", "test")]
                         + [("no completion", "train")])  # the runs train on it: needed in --train only
def test_a_bad_row_in_bench_is_a_one_line_error_naming_the_users_file_and_line(sources, tmp_path, kind, which):
    path, line, says = _bad_file(tmp_path, kind)
    good = sources / "plain.jsonl"
    files = (path, good) if which == "train" else (good, path)
    _one_line_error(_bench(tmp_path, *files), path, line, says, "pass --set data.on_bad_row=skip")
    assert not (tmp_path / "b" / "data" / "user").exists()  # refused before any copy was written
    skipped = _bench(tmp_path, *files, "--set", "data.on_bad_row=skip")
    assert skipped.exit_code == 0, skipped.output
    copies = _copy(tmp_path, "val") + _copy(tmp_path, "train") if which == "train" else _copy(tmp_path, "test")
    assert len(copies) == 2  # the good rows


def test_bench_reads_the_users_field_names_and_its_runs_read_its_copies(sources, tmp_path):
    from hpd.apps.bench import BenchSettings, build_conditions, run_spec
    from hpd.config import load_config
    from hpd.data.rows import load_examples

    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps({"question": r["prompt"], "solution": r["completion"]}) + "\n" for r in ROWS))
    s = BenchSettings(out_dir=tmp_path / "b", methods=["hpd"], seeds=[0], lr_grid=[1.0], n_val=2, user_train=path,
                      user_test=path, user_student="pretrained", verifier="exact",
                      overrides=["data.prompt_field=question", "data.completion_field=solution"])
    (cond,), _ = build_conditions(s)
    cfg = load_config(None, list(run_spec(cond, "hpd", cond.start.lr, 0, s).overrides))
    d = cfg.data
    examples, _ = load_examples(d.train, prompt_field=d.prompt_field, completion_field=d.completion_field)
    assert [e.completion for e in examples] == [r["completion"] for r in ROWS[1:]]
    assert (d.prompt_field, d.completion_field) == ("prompt", "completion")
    bad = _bench(tmp_path, path, path)  # without the field settings: the user's file and line, not a copy's
    _one_line_error(bad, path, 1, "field 'prompt' is missing", "pass --set data.on_bad_row=skip")


def test_bench_refuses_a_verifier_field_the_rows_lack_before_training_naming_the_row(sources, tmp_path):
    path = tmp_path / "test.jsonl"
    path.write_text(json.dumps({"prompt": "2+2=", "answer": "4"}) + "\n" + json.dumps({"prompt": "3+3="}) + "\n")
    result = _bench(tmp_path, sources / "plain.jsonl", path)
    assert result.exit_code == 2 and f"but {path}:2 has none" in result.stderr

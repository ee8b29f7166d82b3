"""The cached teacher: `hpd cache-teacher`, `TeacherCache`, and training with `teacher.cache`.

A random tiny teacher saved to disk (no training needed: the cache must reproduce whatever the
teacher computes) and examples/tiny.jsonl with short sequences; everything runs in seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from hpd.apps.cli import app
from hpd.config import DataConfig, load_config
from hpd.data.collate import build_batch
from hpd.data.encode import encode_file
from hpd.errors import HPDError
from hpd.models.loading import load_model, save_model
from hpd.objectives import OBJECTIVES, get_objective
from hpd.fingerprints import sequence_hash
from hpd.teachers.cache import TeacherCache, build_teacher_cache

DATA = "examples/tiny.jsonl"
MAX_LEN = 48
FAST = ["data.max_length=48", "log.progress=false", "log.tensorboard=off", "log.every=1", "save.every=0",
        "log.eval_every=0"]
pytestmark = [pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad"),
              pytest.mark.usefixtures("single_torch_thread")]


@pytest.fixture(autouse=True)
def _at_repo_root(monkeypatch, repo_root):
    monkeypatch.chdir(repo_root)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    """A random tiny teacher saved as a Hugging Face directory."""
    model, tok = load_model("tiny", tiny={"num_layers": 2, "hidden_size": 64, "intermediate_size": 128}, seed=7)
    return save_model(model, tok, tmp_path_factory.mktemp("teacher") / "model")


def build(teacher_dir, out, **kw):
    kw.setdefault("data", DataConfig(max_length=MAX_LEN))
    return build_teacher_cache(teacher_dir, kw.pop("files", [DATA]), out, log=None, **kw)


@pytest.fixture(scope="module")
def exact_cache(teacher_dir, tmp_path_factory) -> Path:
    """K = V, float32: the teacher's whole distribution, in several shards."""
    return build(teacher_dir, tmp_path_factory.mktemp("c") / "exact", top_k=10**6, dtype="float32", shard_positions=500)


@pytest.fixture(scope="module")
def k8_cache(teacher_dir, tmp_path_factory) -> Path:
    return build(teacher_dir, tmp_path_factory.mktemp("c") / "k8", top_k=8)


@pytest.fixture(scope="module")
def trained_cache(tiny_teacher, tmp_path_factory) -> Path:
    """K = 8 of the session's trained tiny teacher (a random teacher has nothing to teach)."""
    return build(tiny_teacher, tmp_path_factory.mktemp("c") / "trained", top_k=8)


def _online(teacher_dir, examples):
    """The teacher's log-probabilities `(B, T, V)` and the batch, computed directly."""
    model, tok = load_model(str(teacher_dir))
    b = build_batch([e.prompt_ids for e in examples], [e.completion_ids for e in examples], pad_id=tok.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    return torch.log_softmax(logits.float(), -1), b


# --- building and reading ---------------------------------------------------------------------------------------


def test_cache_round_trip_holds_what_the_teacher_computes(teacher_dir, exact_cache, k8_cache):
    tok = load_model(str(teacher_dir))[1]
    examples, _ = encode_file(DATA, tok, DataConfig(max_length=MAX_LEN))
    cache, small = TeacherCache(exact_cache), TeacherCache(k8_cache)
    m = cache.manifest
    assert m["examples"] == len(examples) and len(m["shards"]) > 1 and cache.top_k == cache.vocab_size == 264
    assert m["positions"] == sum(len(e.completion_ids) for e in examples)
    assert small.manifest["bytes_per_token"] == 8 + 8 * (2 + 2)  # uint16 ids, float16 log-probs
    pick = [0, 37, len(examples) - 1]  # rows in different shards
    logp, b = _online(teacher_dir, [examples[i] for i in pick])
    rows = cache.rows_of([examples[i] for i in pick], "test")
    # Rows are found by the hash of the token ids (the file repeats some rows: any copy will do).
    assert [int(cache.hashes[r]) for r in rows] == [sequence_hash(examples[i].prompt_ids, examples[i].completion_ids)
                                                    for i in pick]
    labels = b["labels"]
    active = labels != -100
    full = cache.teacher(rows, labels)
    top = small.teacher(small.rows_of([examples[i] for i in pick], "test"), labels)
    exact_label = logp.gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)
    torch.testing.assert_close(full.label_logprobs[active], exact_label[active], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(top.label_logprobs[active], exact_label[active], atol=1e-5, rtol=1e-5)
    # K = V: the whole distribution; K = 8: the top 8 tokens (float16: small error) and the tail.
    rebuilt = torch.empty_like(logp).scatter_(-1, full.tokens, full.logprobs)
    torch.testing.assert_close(rebuilt[active], logp[active], atol=1e-5, rtol=1e-5)
    vals, ids = logp.topk(8, -1)
    assert torch.equal(top.tokens[active], ids[active])
    assert (top.logprobs[active] - vals[active]).abs().max() < 5e-3
    tail = logp.scatter(-1, ids, float("-inf")).logsumexp(-1)
    torch.testing.assert_close(top.tail[active], tail[active], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_complete_cache_gives_the_online_teachers_loss_and_gradient(name, teacher_dir, exact_cache):
    """K = V: every objective, unchunked and chunked, equals the online teacher (1e-5)."""
    tok = load_model(str(teacher_dir))[1]
    examples = encode_file(DATA, tok, DataConfig(max_length=MAX_LEN))[0][:6]
    cache = TeacherCache(exact_cache)
    teacher_model = load_model(str(teacher_dir))[0]
    student = load_model("tiny", tokenizer=tok, tiny={"num_layers": 1, "hidden_size": 32}, seed=3)[0]
    b = build_batch([e.prompt_ids for e in examples], [e.completion_ids for e in examples], pad_id=tok.pad_token_id)
    ids, mask, labels = b["input_ids"], b["attention_mask"], b["labels"]
    with torch.no_grad():
        online = teacher_model(input_ids=ids, attention_mask=mask).logits
    cached = cache.teacher(cache.rows_of(examples, "test"), labels)
    obj = get_objective(name)
    params = list(student.parameters())
    for chunk in (False, True):
        results = []
        for teacher in (online, cached):
            g = torch.Generator().manual_seed(11)
            if chunk:
                from hpd.models.head import final_hidden_states, lm_head_of

                hidden = final_hidden_states(student, ids, mask)
                out = obj.chunked(hidden, lm_head_of(student), teacher, labels, chunk_size=16, generator=g)
            else:
                out = obj(student(input_ids=ids, attention_mask=mask).logits, teacher, labels, generator=g)
            results.append((out, torch.autograd.grad(out.loss, params, allow_unused=True)))
        (a, ga), (c, gc) = results
        assert float(c.loss) == pytest.approx(float(a.loss), rel=1e-5, abs=1e-6)
        for x, y in zip(gc, ga):
            if x is not None:
                torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


def test_float16_topk_changes_the_loss_little(teacher_dir, exact_cache, k8_cache, tmp_path):
    """float16 top-K storage against float32 at the same K: the hpd and fkl losses differ by < 1e-3."""
    k8_f32 = build(teacher_dir, tmp_path / "k8f32", top_k=8, dtype="float32")
    tok = load_model(str(teacher_dir))[1]
    examples = encode_file(DATA, tok, DataConfig(max_length=MAX_LEN))[0][:8]
    b = build_batch([e.prompt_ids for e in examples], [e.completion_ids for e in examples], pad_id=tok.pad_token_id)
    s = torch.randn(*b["labels"].shape, 264, generator=torch.Generator().manual_seed(0))
    for name in ("hpd", "fkl"):
        losses = []
        for path in (k8_cache, k8_f32):
            c = TeacherCache(path)
            t = c.teacher(c.rows_of(examples, "test"), b["labels"])
            losses.append(float(get_objective(name)(s, t, b["labels"], generator=torch.Generator().manual_seed(1)).loss))
        assert abs(losses[0] - losses[1]) < 1e-3 * max(1.0, abs(losses[1])), (name, losses)


def test_build_is_atomic_and_refuses_to_overwrite(teacher_dir, tmp_path, monkeypatch):
    out = build(teacher_dir, tmp_path / "c", top_k=4)
    with pytest.raises(HPDError, match="already exists: choose another --out, or pass --force"):
        build(teacher_dir, out, top_k=4)
    before = (out / "manifest.json").read_text()
    import hpd.models.head

    def boom(*a, **k):
        raise RuntimeError("teacher forward failed")

    monkeypatch.setattr(hpd.models.head, "final_hidden_states", boom)
    with pytest.raises(RuntimeError, match="teacher forward failed"):
        build(teacher_dir, out, top_k=4, overwrite=True)
    assert (out / "manifest.json").read_text() == before  # the old cache is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == [".c.lock", "c"]  # no temporary directory left (the
    # builders' lock file stays: removing it would race with a waiting builder)


def test_the_teacher_runs_on_the_device_asked_and_a_bad_device_is_a_clear_error(teacher_dir, tmp_path, monkeypatch):
    import hpd.models.head

    seen, real = [], hpd.models.head.final_hidden_states

    def spy(model, input_ids, attention_mask):
        seen.append((next(model.parameters()).device.type, input_ids.device.type))
        return real(model, input_ids, attention_mask)

    monkeypatch.setattr(hpd.models.head, "final_hidden_states", spy)
    expected = "cuda" if torch.cuda.is_available() else "cpu"  # auto: the GPU when there is one
    build(teacher_dir, tmp_path / "auto", top_k=4)
    assert seen and set(seen) == {(expected, expected)}
    seen.clear()
    build(teacher_dir, tmp_path / "cpu", top_k=4, device="cpu")
    assert set(seen) == {("cpu", "cpu")}
    with pytest.raises(HPDError, match="is not a device: use auto, cpu, cuda or cuda:N"):
        build(teacher_dir, tmp_path / "bad", top_k=4, device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(HPDError, match="asks for a GPU but torch sees none: use --device cpu"):
            build(teacher_dir, tmp_path / "cuda", top_k=4, device="cuda")
    assert not (tmp_path / "bad").exists() and not (tmp_path / "cuda").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_cache_built_on_the_gpu_matches_the_cpu_one(teacher_dir, tmp_path):
    a = TeacherCache(build(teacher_dir, tmp_path / "cpu", top_k=4, dtype="float32", device="cpu"))
    b = TeacherCache(build(teacher_dir, tmp_path / "gpu", top_k=4, dtype="float32", device="cuda"))
    for name in ("label_logp", "tail_logp", "topk_logp"):
        x = np.concatenate([np.load(a.path / s["dir"] / f"{name}.npy") for s in a.manifest["shards"]])
        y = np.concatenate([np.load(b.path / s["dir"] / f"{name}.npy") for s in b.manifest["shards"]])
        np.testing.assert_allclose(x, y, atol=1e-4)


def test_sequence_hash_sees_the_prompt_completion_split():
    assert sequence_hash([1, 2], [3]) != sequence_hash([1], [2, 3])
    assert sequence_hash([1, 2], [3]) == sequence_hash([1, 2], [3])


# --- training with the cache ------------------------------------------------------------------------------------


def _cfg(out, teacher_dir, *extra):
    return load_config("configs/tiny.yaml", [*FAST, f"output_dir={out}", f"teacher.path={teacher_dir}", *extra])


def _no_teacher_loading(monkeypatch):
    """The trainer may build the tiny student, never load the teacher."""
    import hpd.training.setup

    real = hpd.training.setup.load_model

    def guarded(path, **kw):
        if path != "tiny":
            raise AssertionError(f"the teacher was loaded from {path}")
        return real(path, **kw)

    monkeypatch.setattr(hpd.training.setup, "load_model", guarded)


@pytest.mark.parametrize("objective", ["hpd", "fkl"])
def test_training_with_a_cache_never_loads_the_teacher_and_the_loss_falls(objective, tiny_teacher, trained_cache,
                                                                         tmp_path, monkeypatch):
    from hpd.training.trainer import train

    _no_teacher_loading(monkeypatch)
    run = train(_cfg(tmp_path / "run", tiny_teacher, f"teacher.cache={trained_cache}", f"objective.name={objective}",
                     "max_steps=40", "log.eval_every=40"))
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in recs if r["type"] == "train"]
    assert all(r["teacher_tokens_total"] == 0 for r in train_recs)  # no teacher forward was run
    assert recs[0]["teacher_cache"] == str(trained_cache) and recs[0]["teacher_parameters"] == 0
    # Held-out (K + 1)-bucket KL to the teacher and cross-entropy fall, as with the online teacher.
    start, end = [r for r in recs if r["type"] == "eval"]
    assert end["kl_topk"] < 0.8 * start["kl_topk"], (start["kl_topk"], end["kl_topk"])
    assert end["ce"] < start["ce"] - 0.5, (start["ce"], end["ce"])
    assert start["agreement"] < end["agreement"]
    if objective == "hpd":
        assert 0 <= train_recs[-1]["frac_sample_outside_topk"] <= 1


def test_training_with_a_complete_cache_equals_training_with_the_teacher(teacher_dir, exact_cache, tmp_path):
    from hpd.training.trainer import train

    common = ["objective.name=hpd", "max_steps=4", "data.eval_fraction=0.125"]
    online = train(_cfg(tmp_path / "online", teacher_dir, *common))
    cached = train(_cfg(tmp_path / "cached", teacher_dir, f"teacher.cache={exact_cache}", *common))
    from safetensors.torch import load_file

    a, c = load_file(str(online / "final" / "model.safetensors")), load_file(str(cached / "final" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(c[k], a[k], atol=1e-5, rtol=1e-4)


def test_resume_with_a_cache_equals_an_uninterrupted_run(teacher_dir, k8_cache, tmp_path, monkeypatch):
    from conftest import interrupted_at_step
    from hpd.training.trainer import train

    common = [f"teacher.cache={k8_cache}", "objective.name=hpd", "max_steps=6", "save.every=3"]
    whole = train(_cfg(tmp_path / "whole", teacher_dir, *common))
    with interrupted_at_step(monkeypatch, 5):
        train(_cfg(tmp_path / "resumed", teacher_dir, *common))
    resumed = train(_cfg(tmp_path / "resumed", teacher_dir, *common))
    from safetensors.torch import load_file

    a, c = load_file(str(whole / "final" / "model.safetensors")), load_file(str(resumed / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], c[k]) for k in a)


# --- mismatches -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra,match", [
    (["data.max_length=40"], r"does not hold \d+ of the \d+ training sequences.*max_length: cache 48, run 40.*Rebuild"),
    (["data.train={other}"], r"does not hold (\d+) of the \1 training sequences .*data or the tokenizer differ"),
    (["objective.temperature=2"], r"built at temperature 1, objective.temperature is 2: rebuild it with --temperature 2"),
    (["regime.name=student"], r"teacher.cache holds the teacher on the data's sequences only.*regime.name=dataset"),
    (["regime.name=teacher"], r"regime.name is 'teacher'.*hpd generate.*hpd cache-teacher --data GEN.jsonl"),
])
def test_a_cache_that_does_not_fit_the_run_is_an_error_that_says_what_differs(extra, match, teacher_dir, k8_cache,
                                                                              tmp_path, repo_root):
    from hpd.training.trainer import Trainer

    other = tmp_path / "other.jsonl"
    other.write_text('{"prompt": "1+1=", "completion": "2"}\n{"prompt": "2+2=", "completion": "4"}\n')
    extra = [e.format(other=other) for e in extra]
    with pytest.raises(HPDError, match=match):
        Trainer(_cfg(tmp_path / "run", teacher_dir, f"teacher.cache={k8_cache}", *extra))
    assert not (tmp_path / "run").exists()


def test_cache_errors_for_another_teacher_and_a_cache_without_topk(teacher_dir, tmp_path):
    from hpd.training.trainer import Trainer

    k0 = build(teacher_dir, tmp_path / "k0", top_k=0)
    # sft and orkl need only the sequence token; hpd and fkl need the top-K.
    Trainer(_cfg(tmp_path / "ok", teacher_dir, f"teacher.cache={k0}", "objective.name=orkl"))
    for name in ("hpd", "fkl"):
        with pytest.raises(HPDError, match="holds no top-K tokens: rebuild it with --top-k"):
            Trainer(_cfg(tmp_path / "run", teacher_dir, f"teacher.cache={k0}", f"objective.name={name}"))
    other, tok = load_model("tiny", tiny={"num_layers": 1, "hidden_size": 32}, seed=99)
    other_dir = save_model(other, tok, tmp_path / "other")
    with pytest.raises(HPDError, match="is not the teacher the cache .* was built from"):
        Trainer(_cfg(tmp_path / "run", other_dir, f"teacher.cache={k0}", "objective.name=sft"))
    with pytest.raises(HPDError, match="is not a teacher cache"):
        Trainer(_cfg(tmp_path / "run", teacher_dir, f"teacher.cache={tmp_path}", "objective.name=sft"))


# --- the command ------------------------------------------------------------------------------------------------


def test_cache_teacher_command_builds_a_cache_the_trainer_reads(teacher_dir, tmp_path):
    runner = CliRunner()
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(_cfg(tmp_path / "run", teacher_dir, "data.eval_fraction=0.125").to_yaml())
    out = tmp_path / "cache"
    res = runner.invoke(app, ["cache-teacher", "--config", str(cfg_path), "--out", str(out), "--top-k", "4"])
    assert res.exit_code == 0, res.output
    assert str(out) in res.stdout and "bytes per token" in res.output
    cache = TeacherCache(out)
    assert cache.top_k == 4 and cache.manifest["data"]["settings"]["max_length"] == MAX_LEN
    res = runner.invoke(app, ["cache-teacher", "--config", str(cfg_path), "--out", str(out)])
    assert res.exit_code == 2 and "already exists" in res.output
    res = runner.invoke(app, ["cache-teacher", "--data", DATA, "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "--teacher DIR" in res.output


def test_teacher_generations_are_cached_with_generate_then_cache_teacher_then_trained_on(teacher_dir, tmp_path,
                                                                                          monkeypatch):
    """The README's recipe for the teacher regime's data with a cache: generate, cache, train (dataset)."""
    from hpd.training.trainer import train

    runner = CliRunner()
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{a}+{a}="}) + "\n" for a in range(6)))
    gen = tmp_path / "gen.jsonl"
    res = runner.invoke(app, ["generate", "--model", str(teacher_dir), "--prompts", str(prompts), "--out", str(gen),
                              "--max-new-tokens", "6", "--temperature", "1", "--seed", "3"])
    assert res.exit_code == 0, res.output
    n_rows = len(gen.read_text().splitlines())
    assert n_rows >= 1
    res = runner.invoke(app, ["cache-teacher", "--teacher", str(teacher_dir), "--data", str(gen), "--out",
                              str(tmp_path / "cache"), "--top-k", "4", "--max-length", str(MAX_LEN)])
    assert res.exit_code == 0, res.output
    assert TeacherCache(tmp_path / "cache").manifest["examples"] == n_rows
    _no_teacher_loading(monkeypatch)
    run = train(_cfg(tmp_path / "run", teacher_dir, f"data.train={gen}", "data.eval=null", "objective.name=hpd",
                     f"teacher.cache={tmp_path / 'cache'}", "max_steps=2", "optim.batch_size=2"))
    assert (run / "final" / "config.json").is_file()


def test_generate_leaves_empty_answers_out_and_says_so(tmp_path, monkeypatch):
    import hpd.responses.rollout

    monkeypatch.setattr(hpd.responses.rollout, "generate_text", lambda model, tok, prompts, **kw: ["", "4", "  "][: len(prompts)])
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("a", "2+2=", "c")))
    out = tmp_path / "gen.jsonl"
    res = CliRunner().invoke(app, ["generate", "--model", "tiny", "--prompts", str(prompts), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert [json.loads(line) for line in out.read_text().splitlines()] == [{"prompt": "2+2=", "completion": "4"}]
    assert "wrote 1 completions" in res.stdout and "2 empty ones left out" in res.stdout

"""A teacher per row (`teacher.named`, `data.teacher_column`, `hpd.teachers.routing`).

Two random tiny teachers saved to disk (no training needed: routing must reproduce whatever each
teacher computes), a copy of examples/tiny.jsonl whose rows name them; everything runs in seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from hpd.apps.cli import app
from hpd.data.batches import make_batch
from hpd.config import DataConfig, load_config
from hpd.data.encode import encode_file
from hpd.errors import HPDError
from hpd.models.head import final_hidden_states, lm_head_of
from hpd.models.loading import load_model, save_model
from hpd.objectives import get_objective
from hpd.teachers.cache import TeacherCache, build_teacher_cache
from hpd.teachers.routing import RoutedTeacher
from hpd.teachers.sources import CachedTeacher, ModelTeacher

DATA = "examples/tiny.jsonl"
MAX_LEN = 48
FAST = ["data.max_length=48", "log.progress=false", "log.tensorboard=off", "log.every=1", "save.every=0",
        "log.eval_every=0", "optim.batch_size=8"]
TINY = {"num_layers": 1, "hidden_size": 32, "intermediate_size": 64}
pytestmark = [pytest.mark.usefixtures("single_torch_thread")]


@pytest.fixture(autouse=True)
def _at_repo_root(monkeypatch, repo_root):
    monkeypatch.chdir(repo_root)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> dict[str, Path]:
    """Two random tiny teachers of the student's byte tokenizer, `a` and `b`, saved."""
    out = tmp_path_factory.mktemp("teachers")
    dirs = {}
    for name, seed in (("a", 7), ("b", 8)):
        model, tok = load_model("tiny", tiny=TINY, seed=seed)
        dirs[name] = save_model(model, tok, out / name)
    return dirs


@pytest.fixture(scope="module")
def routed_data(tmp_path_factory) -> Path:
    """examples/tiny.jsonl with a teacher per row: a, b, or none (the default) in turn."""
    rows = [json.loads(line) for line in Path(DATA).read_text().splitlines()]
    for i, r in enumerate(rows):
        if i % 3:
            r["teacher"] = "a" if i % 3 == 1 else "b"
    path = tmp_path_factory.mktemp("data") / "routed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def b_cache(teachers, tmp_path_factory) -> Path:
    """A top-8 cache of teacher b over the data (float32, so only the top-K semantics differ)."""
    return build_teacher_cache(teachers["b"], [DATA], tmp_path_factory.mktemp("c") / "b8", top_k=8, dtype="float32",
                               data=DataConfig(max_length=MAX_LEN), log=None)


def _cfg(run_dir: Path, data: Path, teachers: dict[str, Path], *extra: str):
    return load_config("configs/tiny.yaml", [f"output_dir={run_dir}", f"data.train={data}", *FAST,
                                             *(f"teacher.named.{n}.path={p}" for n, p in teachers.items()), *extra])


def _setting(teachers, route):
    """A student, a micro-batch of 6 examples routed as `route` says, its routed teacher source."""
    tok = load_model(str(teachers["a"]))[1]
    examples = encode_file(DATA, tok, DataConfig(max_length=MAX_LEN))[0][:len(route)]
    models = {n: load_model(str(p))[0].eval() for n, p in teachers.items()}
    student = load_model("tiny", tokenizer=tok, tiny=TINY, seed=3)[0]

    def batch(exs, completions=None):
        """A batch of examples `exs`, or of prompts `exs` and `completions` (the routed source's builder)."""
        prompts = exs if completions is not None else [e.prompt_ids for e in exs]
        completions = completions if completions is not None else [e.completion_ids for e in exs]
        return make_batch(prompts, completions, pad_id=tok.pad_token_id, vocab_size=None, device=torch.device("cpu"))

    return tok, examples, models, student, batch


def _loss(obj, student, b, teacher, **kw):
    hidden = final_hidden_states(student, b.input_ids, b.attention_mask)
    out = obj.chunked(hidden, lm_head_of(student), teacher, b.labels, chunk_size=16, **kw)
    return out, torch.autograd.grad(out.loss, list(student.parameters()))


def _close(a, b):
    (oa, ga), (ob, gb) = a, b
    torch.testing.assert_close(oa.loss, ob.loss, atol=1e-6, rtol=1e-5)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["hpd", "fkl", "hpdk", "jsd"])
def test_a_mixed_batch_equals_each_row_taught_by_its_own_teacher(name, teachers):
    """Rows of teachers a and b in one micro-batch: loss and gradient equal those of one batch whose
    teacher logits are, row by row, its own teacher's (the same global normalization and draws)."""
    route = [1, 2, 1, 2, 2, 1]  # indices into (default, a, b)
    tok, examples, models, student, batch = _setting(teachers, route)
    source = RoutedTeacher(["default", "a", "b"], [None, ModelTeacher(models["a"]), ModelTeacher(models["b"])],
                           {"train": route}, batch)
    b = batch(examples)
    source.prepare(b, examples, "train", list(range(len(examples))))
    obj = get_objective(name)
    routed = _loss(obj, student, b, source.view(b), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        logits = {n: m(input_ids=b.input_ids, attention_mask=b.attention_mask).logits for n, m in models.items()}
    own = torch.stack([logits["a" if r == 1 else "b"][i] for i, r in enumerate(route)])
    by_hand = _loss(obj, student, b, own, generator=torch.Generator().manual_seed(5))
    _close(routed, by_hand)
    assert source.step_counts() == {"routed_tokens_a": float(sum(batch([examples[i]]).num_active for i in (0, 2, 5))),
                                    "routed_tokens_b": float(sum(batch([examples[i]]).num_active for i in (1, 3, 4)))}
    assert set(source.step_counts().values()) == {0.0}  # reset by the call


def test_the_routed_loss_is_the_sum_of_each_teachers_rows_under_the_global_token_count(teachers):
    route = [2, 1, 1, 2, 1, 2]
    tok, examples, models, student, batch = _setting(teachers, route)
    source = RoutedTeacher(["default", "a", "b"], [None, ModelTeacher(models["a"]), ModelTeacher(models["b"])],
                           {"train": route}, batch)
    b = batch(examples)
    source.prepare(b, examples, "train", list(range(len(examples))))
    obj = get_objective("fkl")
    routed = _loss(obj, student, b, source.view(b))
    N = b.num_active
    total, grads = 0.0, None
    for r, n in ((1, "a"), (2, "b")):
        sub = batch([e for e, x in zip(examples, route) if x == r])
        with torch.no_grad():
            t = models[n](input_ids=sub.input_ids, attention_mask=sub.attention_mask).logits
        out, g = _loss(obj, student, sub, t, num_tokens=N)
        total = total + out.loss
        grads = g if grads is None else [x + y for x, y in zip(grads, g)]
    _close(routed, (type(routed[0])(total, *(routed[0].value, routed[0].num_active)), grads))
    assert b.teacher_tokens == int(b.attention_mask.sum())  # each teacher ran over its own rows once


@pytest.mark.parametrize("name", ["hpd", "fkl"])
def test_an_online_and_a_cached_teacher_in_one_batch_each_keep_their_own_semantics(name, teachers, b_cache):
    """Teacher a online (its full distribution), teacher b from a top-8 cache (top-K + tail): each row
    is weighed as its teacher alone would weigh it; nothing is converted between the kinds."""
    route = [1, 2, 2, 1, 2, 1]
    tok, examples, models, student, batch = _setting(teachers, route)
    cache = TeacherCache(b_cache)
    cached = CachedTeacher(cache, {"train": cache.rows_of(examples, "test")}, torch.device("cpu"))
    source = RoutedTeacher(["default", "a", "b"], [None, ModelTeacher(models["a"]), cached], {"train": route}, batch)
    b = batch(examples)
    source.prepare(b, examples, "train", list(range(len(examples))))
    assert b.teacher_tokens == int(batch([examples[i] for i in (0, 3, 5)]).attention_mask.sum())  # b costs no forward
    samples = torch.randint(0, 264, b.labels.shape, generator=torch.Generator().manual_seed(2))
    obj = get_objective(name)
    kw = {"sampled_tokens": samples} if name == "hpd" else {}
    routed = _loss(obj, student, b, source.view(b), **kw)
    N, total, grads = b.num_active, 0.0, None
    for r in (1, 2):
        rows = [i for i, x in enumerate(route) if x == r]
        sub = batch([examples[i] for i in rows])
        if r == 1:
            with torch.no_grad():
                t = models["a"](input_ids=sub.input_ids, attention_mask=sub.attention_mask).logits
        else:
            t = cache.teacher(cache.rows_of([examples[i] for i in rows], "test"), sub.labels)
        sub_kw = {"sampled_tokens": samples[rows][:, :sub.labels.shape[1]]} if name == "hpd" else {}
        out, g = _loss(obj, student, sub, t, num_tokens=N, **sub_kw)
        total = total + out.loss
        grads = g if grads is None else [x + y for x, y in zip(grads, g)]
    _close(routed, (type(routed[0])(total, routed[0].value, routed[0].num_active), grads))
    # The logged diagnostics stay each kind's own: the full KL over a's rows, the bucketed one over b's.
    out = routed[0]
    assert {"kl", "kl_topk"} <= set(out.sums)
    assert int(out.counts["kl"]) + int(out.counts["kl_topk"]) == N


def test_hpd_train_with_a_routed_file_logs_each_teachers_tokens_and_resumes_exactly(teachers, routed_data, tmp_path,
                                                                                   monkeypatch):
    from conftest import interrupted_at_step
    from hpd.training.trainer import train

    cfg = _cfg(tmp_path / "whole", routed_data, teachers, "objective.name=hpd", "max_steps=4", "save.every=2")
    path = tmp_path / "run.yaml"
    path.write_text(cfg.to_yaml())
    assert "named:" in path.read_text()  # the teachers are in the run's config, as YAML reads them back
    res = CliRunner().invoke(app, ["train", str(path)])
    assert res.exit_code == 0, res.output
    whole = tmp_path / "whole"
    recs = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    info = recs[0]
    assert info["teachers"] == {"a": {"path": str(teachers["a"])}, "b": {"path": str(teachers["b"])}}
    rows = info["teacher_rows"]  # the 84 training rows (96 less the held-out eighth), about a third each
    assert list(rows) == ["default", "a", "b"] and sum(rows.values()) == 84 and min(rows.values()) > 20
    assert "named" in (whole / "config.yaml").read_text()
    card = (whole / "final" / "README.md").read_text()  # the model card names every teacher
    assert f"default: tiny; a: {teachers['a']}; b: {teachers['b']}" in card
    train_recs = [r for r in recs if r["type"] == "train"]
    last = train_recs[-1]
    taught = [last[f"routed_tokens_{n}"] for n in ("default", "a", "b")]
    assert all(t > 0 for t in taught) and sum(taught) == sum(r["tokens"] for r in train_recs)
    # Interrupted at step 3 (after the checkpoint of step 2), resumed: the same weights and counts.
    with interrupted_at_step(monkeypatch, 3):
        train(_cfg(tmp_path / "resumed", routed_data, teachers, "objective.name=hpd", "max_steps=4", "save.every=2"))
    resumed = train(_cfg(tmp_path / "resumed", routed_data, teachers, "objective.name=hpd", "max_steps=4",
                         "save.every=2"))
    from safetensors.torch import load_file

    a, c = load_file(str(whole / "final" / "model.safetensors")), load_file(str(resumed / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], c[k]) for k in a)
    again = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in again if r["type"] == "train"][-1]["routed_tokens_b"] == last["routed_tokens_b"]


def test_rows_that_name_no_teacher_train_as_a_run_without_named_teachers(teachers, tmp_path):
    """examples/tiny.jsonl has no teacher column: every row goes to the default teacher, and the run
    equals the same run without teacher.named (the routing adds nothing but its bookkeeping)."""
    from safetensors.torch import load_file
    from hpd.training.trainer import train

    plain = train(load_config("configs/tiny.yaml", [f"output_dir={tmp_path / 'plain'}", *FAST, "max_steps=3"]))
    routed = train(_cfg(tmp_path / "routed", Path(DATA), teachers, "max_steps=3"))
    a, c = load_file(str(plain / "final" / "model.safetensors")), load_file(str(routed / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], c[k]) for k in a)
    last = [r for r in map(json.loads, (routed / "metrics.jsonl").read_text().splitlines()) if r["type"] == "train"][-1]
    assert last["routed_tokens_a"] == last["routed_tokens_b"] == 0 and last["routed_tokens_default"] > 0


def test_packed_batches_route_as_padded_ones(teachers, routed_data, tmp_path):
    from hpd.training.trainer import train

    losses = []
    for packing in ("false", "true"):
        run = train(_cfg(tmp_path / packing, routed_data, teachers, "objective.name=fkl", "max_steps=2",
                         f"data.packing={packing}"))
        recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        losses.append([r["loss"] for r in recs if r["type"] == "train"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_a_row_naming_an_unknown_teacher_is_refused_naming_the_row_and_the_teachers(teachers, routed_data, tmp_path):
    from hpd.training.trainer import Trainer

    rows = routed_data.read_text().splitlines()
    rows[4] = json.dumps({**json.loads(rows[4]), "teacher": "c"})
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(rows) + "\n")
    with pytest.raises(HPDError, match=r"bad.jsonl:5: teacher 'c' \(column 'teacher'\) is not one of the run's "
                                       r"teachers \(default, a, b\)"):
        Trainer(_cfg(tmp_path / "run", bad, teachers))
    # Without a default teacher (teacher.path=none) a row that names none is refused too.
    with pytest.raises(HPDError, match=r"routed.jsonl:1: the row names no teacher \(column 'teacher'\) and the run "
                                       r"has no default teacher \(teacher.path=none\): name one of a, b"):
        Trainer(_cfg(tmp_path / "run2", routed_data, teachers, "teacher.path=none"))
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").glob("checkpoint-*"))


def test_a_named_teacher_of_another_vocabulary_is_refused_at_start_by_name(teachers, routed_data, tmp_path):
    from hpd.training.trainer import Trainer

    model, tok = load_model("tiny", tiny=TINY, seed=9)
    tok.add_tokens(["<extra>"])
    model.resize_token_embeddings(len(tok))
    other = save_model(model, tok, tmp_path / "other")
    with pytest.raises(HPDError, match=r"output_dir '.*' holds the input teacher.named.b.path"):
        Trainer(_cfg(other.parent, routed_data, {"a": teachers["a"], "b": other}))  # never written over
    with pytest.raises(HPDError, match=r"teacher 'b' \(path .*other\): the tokenizer of the student .* differs from "
                                       r"that of teacher 'b'"):
        Trainer(_cfg(tmp_path / "run", routed_data, {"a": teachers["a"], "b": other}))


def test_the_named_teachers_config_reads_yaml_and_overrides_and_refuses_what_routing_cannot_do(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("teacher:\n  path: none\n  named:\n    math: {path: models/math}\n    chat: {server: http://b:8000}\n"
                    "data:\n  teacher_column: expert\n")
    cfg = load_config(path, ["teacher.named.code.cache=cache/"])
    assert {n: t.source() for n, t in cfg.teacher.named.items()} == {
        "math": ("path", "models/math"), "chat": ("server", "http://b:8000"), "code": ("cache", "cache/")}
    assert cfg.data.teacher_column == "expert"
    for extra, match in [(["teacher.named.math.cache=c/"], r"teacher.named.math: give exactly one of path, cache or server"),
                         (["teacher.named.x.pth=d"], r"teacher.named.x.pth: unknown key; teacher.named.x takes cache, "
                                                     r"path, server"),
                         (["teacher.named.default.path=d"], r"'default' names the teacher of the teacher section"),
                         (["regime.name=student"], r"teacher.named.code.cache holds the teacher on the data's "
                                                   r"sequences only"),
                         (["data.streaming=true", "data.eval=x.jsonl"], r"does not work with data.streaming=true")]:
        with pytest.raises(HPDError, match=match):
            load_config(path, ["teacher.named.code.cache=cache/", *extra])


def test_a_resume_with_other_named_teachers_is_a_change_of_the_run(tmp_path):
    """teacher.named is compared as one value: a teacher added, removed or moved changes the run."""
    from hpd.config import config_to_dict
    from hpd.training.resume import RUN_NEUTRAL_KEYS, config_changes

    before = load_config(None, ["teacher.named.a.path=x"])
    for extra in (["teacher.named.a.path=x", "teacher.named.c.path=y"], ["teacher.named.a.path=z"], []):
        changes = config_changes(config_to_dict(before), load_config(None, extra))
        assert list(changes) == ["teacher.named"] and "teacher.named" not in RUN_NEUTRAL_KEYS
    assert config_changes(config_to_dict(before), load_config(None, ["teacher.named.a.path=x"])) == {}


@pytest.fixture(scope="module")
def b_exact_cache(teachers, tmp_path_factory) -> Path:
    """Teacher b's whole distribution (K = V, float32): a cache that must teach as b itself does."""
    return build_teacher_cache(teachers["b"], [DATA], tmp_path_factory.mktemp("c") / "bV", top_k=10**6,
                               dtype="float32", data=DataConfig(max_length=MAX_LEN), log=None)


def test_a_named_cache_of_a_teacher_trains_as_that_teacher_online(teachers, routed_data, b_exact_cache, tmp_path):
    """Teacher b as a complete cache (K = V) among online teachers: the run ends with the weights of
    the run where b runs online (fp32 tolerance), and b's rows cost no teacher forward."""
    from safetensors.torch import load_file
    from hpd.training.trainer import train

    runs = {}
    for how, b in (("online", f"teacher.named.b.path={teachers['b']}"), ("cache", f"teacher.named.b.cache={b_exact_cache}")):
        runs[how] = train(_cfg(tmp_path / how, routed_data, {"a": teachers["a"]}, b, "objective.name=hpd",
                               "max_steps=3", f"teacher.path={teachers['a']}"))
    recs = {how: [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] for how, run in runs.items()}
    assert recs["cache"][0]["teachers"]["b"] == {"cache": str(b_exact_cache)}
    online, cached = ([r for r in recs[how] if r["type"] == "train"][-1] for how in ("online", "cache"))
    assert cached["routed_tokens_b"] == online["routed_tokens_b"] > 0
    assert cached["teacher_tokens_total"] < online["teacher_tokens_total"]  # b's rows were read, not run
    a, c = (load_file(str(runs[how] / "final" / "model.safetensors")) for how in ("online", "cache"))
    for k in a:
        torch.testing.assert_close(c[k], a[k], atol=1e-5, rtol=1e-4)


def test_a_default_cache_needs_only_the_rows_of_the_default_teacher(teachers, routed_data, tmp_path):
    """teacher.cache as the default teacher, built over the rows that name no teacher alone: the run
    reads it for those rows only and ends as the run with that teacher online."""
    from safetensors.torch import load_file
    from hpd.training.trainer import train

    own = tmp_path / "default-rows.jsonl"
    own.write_text("".join(line + "\n" for line in routed_data.read_text().splitlines()
                           if "teacher" not in json.loads(line)))
    cache = build_teacher_cache(teachers["a"], [own], tmp_path / "a-cache", top_k=10**6, dtype="float32",
                                data=DataConfig(max_length=MAX_LEN), log=None)
    runs = {how: train(_cfg(tmp_path / how, routed_data, teachers, "objective.name=fkl", "max_steps=2", *extra))
            for how, extra in (("online", [f"teacher.path={teachers['a']}"]),
                               ("cache", ["teacher.path=none", f"teacher.cache={cache}"]))}
    a, c = (load_file(str(runs[how] / "final" / "model.safetensors")) for how in ("online", "cache"))
    for k in a:
        torch.testing.assert_close(c[k], a[k], atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_two_processes_route_as_one_and_sum_each_teachers_tokens(teachers, routed_data, tmp_path):
    """DDP on CPU (2 processes, gloo) against 1 process with the same global batch: the same fkl loss
    curve and the same per-teacher token totals (summed over the processes)."""
    import os
    import subprocess
    import sys

    from test_distributed import _free_port, _train_lines

    curves = {}
    for n, bs in ((1, 8), (2, 4)):
        out = tmp_path / f"p{n}"
        overrides = [f"output_dir={out}", f"optim.batch_size={bs}", "objective.name=fkl", "max_steps=3",
                     f"data.train={routed_data}", "log.progress=false", "save.every=0", "data.eval_fraction=0",
                     "log.eval_every=0", "data.max_length=48", *(f"teacher.named.{k}.path={p}" for k, p in teachers.items())]
        launch = ([sys.executable] if n == 1 else
                  [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
                   "configs/accelerate/cpu-2proc.yaml", "--num_processes", "2", "--main_process_port", str(_free_port())])
        res = subprocess.run([*launch, "-m", "hpd.apps.cli", "train", "configs/tiny.yaml", *overrides], capture_output=True,
                             text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert res.returncode == 0, res.stderr[-3000:]
        curves[n] = _train_lines(out)
    for a, b in zip(curves[1], curves[2]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert [b[f"routed_tokens_{k}"] for k in ("default", "a", "b")] == [a[f"routed_tokens_{k}"] for k in ("default", "a", "b")]


@pytest.mark.engine
@pytest.mark.slow
def test_a_served_teacher_as_one_route_trains_as_that_teacher_online(teacher_server, routed_data, tmp_path):
    """The bundled teacher served by vLLM (K = V) teaches the rows of `b`, the same teacher online
    those of `a` and the default: the run ends with the weights of the all-online run (to the
    engine's fp32 numerics) and the servers and model are recorded."""
    from safetensors.torch import load_file
    from hpd.training.trainer import train

    teacher, student = "hpd/assets/teacher", "hpd/assets/students/llama-2x96"
    common = [f"output_dir={tmp_path}", f"data.train={routed_data}", *FAST, "data.max_length=64", "objective.name=fkl",
              "max_steps=3", f"student.path={student}", f"teacher.path={teacher}", f"teacher.named.a.path={teacher}",
              "teacher.server_top_k=264"]
    runs = {}
    for how, b in (("online", f"teacher.named.b.path={teacher}"), ("served", f"teacher.named.b.server={teacher_server.url}")):
        runs[how] = train(load_config("configs/tiny.yaml", [*common, f"output_dir={tmp_path / how}", b]))
    info = json.loads((runs["served"] / "metrics.jsonl").read_text().splitlines()[0])
    assert info["teachers"]["b"]["server"]["servers"] == [teacher_server.url]
    assert info["teachers"]["b"]["server"]["vocab_size"] == 264
    a, c = (load_file(str(runs[how] / "final" / "model.safetensors")) for how in ("online", "served"))
    for k in a:
        torch.testing.assert_close(c[k], a[k], atol=1e-4, rtol=1e-3)

"""The served teacher (`teacher.server`, `hpd.teachers.served`) and the cache built by engines, against a real vLLM.

The engine tests start vLLM on 127.0.0.1 with the bundled teacher (the `teacher_server` fixture,
tests/conftest.py; skipped with a message naming `make engine` when its environment is absent) and
are marked slow: an engine takes one to three minutes to start on two shared CPU cores. Faults
in the answers (malformed, truncated, slow) come from a small HTTP proxy in front of the real
server that corrupts what it forwards: a fault injector, not a fake engine. The answer checks and
the pool's errors also have fast tests without an engine.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

from hpd.config import DataConfig, load_config
from hpd.data.collate import build_batch
from hpd.data.encode import encode_file
from hpd.engine import free_port
from hpd.errors import HPDError
from hpd.teachers.served import ServerError, TeacherServers, parse_prompt_logprobs, topk_teacher

TEACHER = "hpd/assets/teacher"
STUDENT = "hpd/assets/students/llama-2x96"
DATA = "examples/tiny.jsonl"
FAST = ["data.max_length=64", "log.progress=false", "log.tensorboard=off", "log.every=1", "log.eval_every=0",
        "optim.batch_size=8", f"student.path={STUDENT}", "teacher.path=none"]
pytestmark = [pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad"),
              pytest.mark.usefixtures("single_torch_thread")]


def engine(test):
    """A test against a real engine: slow (minutes to start on a shared CPU), run by `make test-engine`."""
    return pytest.mark.engine(pytest.mark.slow(test))


@pytest.fixture(autouse=True)
def _at_repo_root(monkeypatch, repo_root):
    monkeypatch.chdir(repo_root)


def _cfg(out, server, *extra):
    return load_config("configs/tiny.yaml", [*FAST, f"output_dir={out}", f"teacher.server={server}", *extra])


def _weights(run):
    from safetensors.torch import load_file

    return load_file(str(Path(run) / "final" / "model.safetensors"))


# --- the answer checks and the pool, without an engine -----------------------------------------------------------


def _entry(lps: dict[int, float]):
    ranked = sorted(lps, key=lambda k: -lps[k])
    return {str(k): {"logprob": lps[k], "rank": ranked.index(k) + 1} for k in lps}


def test_an_answer_becomes_the_cache_semantics_label_topk_and_tail():
    seq = [1, 2, 3]
    p1 = {2: np.log(0.5), 7: np.log(0.3)}          # the sequence token is the top-1
    p2 = {5: np.log(0.6), 6: np.log(0.2), 3: np.log(0.05)}  # the sequence token is outside the top-2
    s = parse_prompt_logprobs([None, _entry(p1), _entry(p2)], seq, top_k=2)
    np.testing.assert_allclose(s.label_logp, np.log([0.5, 0.05]))
    assert s.topk_ids.tolist() == [[2, 7], [5, 6]]
    np.testing.assert_allclose(np.exp(s.tail), [0.2, 0.2])  # the mass outside the top-2
    t = topk_teacher([s], T=4, top_k=2, vocab_size=10)
    assert t.label_logprobs.shape == (1, 4) and t.tokens.shape == (1, 4, 2)
    assert float(t.label_logprobs[0, 1]) == pytest.approx(np.log(0.05)) and float(t.label_logprobs[0, 3]) == 0


def test_an_answer_read_from_a_position_on_equals_the_whole_answer_there_and_zero_before():
    """`first`: the cache and the trainer read only the response's positions; the prompt's are
    neither read (not even checked) nor filled (zero, as padding)."""
    seq = [1, 2, 3, 4]
    entries = [None, _entry({2: np.log(0.5), 7: np.log(0.3)}), _entry({5: np.log(0.6), 6: np.log(0.2), 3: np.log(0.05)}),
               _entry({4: np.log(0.9), 1: np.log(0.01)})]
    whole = parse_prompt_logprobs(entries, seq, top_k=2)
    part = parse_prompt_logprobs([None, "not read", *entries[2:]], seq, top_k=2, first=1)
    for name in ("label_logp", "topk_ids", "topk_logp", "tail"):
        got, ref = getattr(part, name), getattr(whole, name)
        assert got.shape == ref.shape and np.array_equal(got[1:], ref[1:]) and not got[0].any(), name
    assert part.topk_ids[2].tolist() == [4, 1] and part.label_logp[1] == pytest.approx(np.log(0.05))


def test_hpd_reads_samples_outside_the_topk_from_score_exactly():
    """A top-2 teacher with `score` (here the exact log-probabilities of a teacher in memory) gives
    hpd the loss and gradient of the full teacher; without it, the tail estimate differs."""
    from hpd.objectives import TopKTeacher, get_objective

    g = torch.Generator().manual_seed(0)
    B, T, V, K = 3, 7, 11, 2
    t_logits = torch.randn(B, T, V, generator=g) * 2
    s_logits = (t_logits + torch.randn(B, T, V, generator=g)).requires_grad_()  # a student near the teacher
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, :2] = -100
    labels[:, -1] = -100  # aligned labels: the last position predicts nothing
    logp = torch.log_softmax(t_logits, -1)
    vals, ids = logp.topk(K, -1)
    label_lp = logp.gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)
    tail = logp.scatter(-1, ids, float("-inf")).logsumexp(-1)
    asked = []

    def score(positions, tokens):
        asked.append(len(positions))
        return logp.reshape(B * T, V)[positions, tokens]

    def loss_grad(teacher):
        out = get_objective("hpd")(s_logits, teacher, labels, generator=torch.Generator().manual_seed(3))
        return out, torch.autograd.grad(out.loss, s_logits)[0]

    full, g_full = loss_grad(t_logits)
    exact, g_exact = loss_grad(TopKTeacher(label_lp, ids, vals, tail, V, score=score))
    approx, g_approx = loss_grad(TopKTeacher(label_lp, ids, vals, tail, V))
    assert asked and 0 < asked[0] < int((labels != -100).sum())  # only the samples outside the top-K were asked for
    assert float(exact.metrics["frac_sample_outside_topk"]) > 0
    torch.testing.assert_close(exact.loss, full.loss)
    torch.testing.assert_close(g_exact, g_full)
    assert (g_approx - g_full).abs().max() > 1e-4  # 1e-7 with score


@pytest.mark.parametrize("entries,match", [
    ([None, _entry({2: -0.1, 7: -2.0})], r"for a 3-token sequence has 2 entries"),               # truncated
    ([None, _entry({9: -0.1, 7: -2.0}), _entry({3: -0.1, 4: -2.0})], r"position 1 lacks the sequence token 2"),
    ([None, _entry({2: -0.1}), _entry({3: -0.1, 4: -2.0})], r"position 1 has 1 log-probabilities, expected 2 or 3"),
    ([None, _entry({2: float("nan"), 7: -2.0}), _entry({3: -0.1, 4: -2.0})], r"not finite numbers <= 0"),
    ([None, _entry({2: 0.5, 7: -2.0}), _entry({3: -0.1, 4: -2.0})], r"not finite numbers <= 0"),
    ([None, {"2": {"logprob": "x"}, "7": {"rank": 1}}, _entry({3: -0.1, 4: -2.0})], r"without a numeric logprob"),
    ("garbage", r"has str entries"),
    ([None, {"2": {"logprob": -0.1, "rank": 1}, "7": {"logprob": -2.0, "rank": 1}}, _entry({3: -0.1, 4: -2.0})],
     r"position 1: ranks \[1, 1\] are not a top-2"),                                          # a rank twice
    ([None, {"2": {"logprob": -0.1, "rank": 0}, "7": {"logprob": -2.0, "rank": 1}}, _entry({3: -0.1, 4: -2.0})],
     r"position 1: ranks \[0, 1\] are not a top-2"),
])
def test_a_malformed_answer_is_refused(entries, match):
    with pytest.raises(ServerError, match=match):
        parse_prompt_logprobs(entries, [1, 2, 3], top_k=2)


def test_a_server_that_is_down_is_an_error_naming_it_after_the_retries():
    url = f"http://127.0.0.1:{free_port()}"  # nobody listens there
    pool = TeacherServers(url, retries=2, backoff=0.01)
    t0 = time.monotonic()
    with pytest.raises(HPDError, match=rf"failed to score a batch after 3 tries \({url}: cannot reach it.*"
                                        r"hpd serve-teacher"):
        pool.score([[1, 2, 3]], top_k=2)
    assert time.monotonic() - t0 < 5


def test_a_pool_sends_more_requests_to_the_server_that_answers_faster(monkeypatch):
    """The least busy server takes the next request: with one server ten times slower, the fast
    one answers most of them (sent in turn, each would take half, and the slow one would set the pace)."""
    pool = TeacherServers(["http://fast:1", "http://slow:1"], workers_per_server=2)
    served = []

    def score_on(url, sequences, top_k, first=None):
        time.sleep(0.01 if "fast" in url else 0.1)
        served.append(url)
        return [None] * len(sequences)

    monkeypatch.setattr(pool, "_score_on", score_on)
    for f in [pool.submit(pool.score, [[1, 2]], 2) for _ in range(40)]:
        f.result()
    assert len(served) == 40 and served.count("http://fast:1") >= 30, served  # in turn: 20 each
    assert pool._in_flight == [0, 0]


@pytest.mark.parametrize("extra,match", [
    (["objective.temperature=2"], r"teacher.server .*temperature 1: set objective.temperature=1"),
    (["teacher.cache=somewhere"], r"teacher.server .*teacher.cache is set too"),
    (["regime.name=teacher"], r"teacher.server .*teacher generations need the teacher model here"),
    (["teacher.server_exact_samples=true", "data.packing=true"], r"teacher.server .*does not work with data.packing"),
])
def test_settings_a_served_teacher_cannot_serve_are_refused(extra, match, tmp_path):
    with pytest.raises(HPDError, match=match):
        _cfg(tmp_path / "run", "http://127.0.0.1:9", *extra)


# --- a proxy that corrupts what a real server answers (the fault injector) ----------------------------------------


class Proxy:
    """Forwards to `target`; `mode` (set at any time): "pass", "truncate" (half the body), "garble"
    (one sequence token's log-probability removed), "slow" (answers after `delay` seconds), "down"
    (closes the connection)."""

    def __init__(self, target: str, delay: float = 4.0):
        import requests

        proxy = self
        self.mode, self.delay, self.requests = "pass", delay, 0

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _forward(self, method):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) if method == "POST" else None
                proxy.requests += 1
                mode = proxy.mode
                if mode == "down":
                    self.close_connection = True
                    return
                r = requests.request(method, target + self.path, data=body, headers={"Content-Type": "application/json"})
                out = r.content
                scoring = method == "POST" and self.path == "/v1/completions" and b"prompt_logprobs" in out
                if scoring and mode == "truncate":
                    out = out[:len(out) // 2]
                elif scoring and mode == "garble":
                    doc = json.loads(out)
                    pl = doc["choices"][0]["prompt_logprobs"]
                    # the last position: a response's, which the client reads (it skips the prompt's)
                    pl[-1] = {k: v for k, v in list(pl[-1].items())[1:]}
                    out = json.dumps(doc).encode()
                elif scoring and mode == "slow":
                    time.sleep(proxy.delay)
                try:
                    self.send_response(r.status_code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(out)))
                    self.end_headers()
                    self.wfile.write(out)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def do_GET(self):
                self._forward("GET")

            def do_POST(self):
                self._forward("POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def proxy(teacher_server):
    p = Proxy(teacher_server.url)
    yield p
    p.close()


# --- against the real engine --------------------------------------------------------------------------------------


def _examples(n=6):
    from hpd.models.loading import load_saved_tokenizer

    tok = load_saved_tokenizer(TEACHER)
    return encode_file(DATA, tok, DataConfig(max_length=64))[0][:n], tok


def _in_process(examples, tok):
    from hpd.models.loading import load_model

    model = load_model(TEACHER, dtype="float32")[0]
    b = build_batch([e.prompt_ids for e in examples], [e.completion_ids for e in examples], pad_id=tok.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
    return logits, b


def _served(url, examples, b, top_k):
    pool = TeacherServers(url)
    got = pool.score([e.prompt_ids + e.completion_ids for e in examples], top_k)
    return topk_teacher(got, b["input_ids"].shape[1], top_k, 264)


@engine
def test_the_served_view_is_the_in_process_teachers(teacher_server):
    """At every response position: log p(y) to fp32 tolerance; with K = V the whole distribution; with
    K = 8 the same top-8 tokens and the tail mass to the engine's numerics."""
    examples, tok = _examples()
    logits, b = _in_process(examples, tok)
    logp = torch.log_softmax(logits, -1)
    labels = b["labels"]
    active = labels != -100
    exact = logp.gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)
    full, top = _served(teacher_server.url, examples, b, 264), _served(teacher_server.url, examples, b, 8)
    torch.testing.assert_close(full.label_logprobs[active], exact[active], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(top.label_logprobs[active], exact[active], atol=1e-4, rtol=1e-5)
    rebuilt = torch.empty_like(logp).scatter_(-1, full.tokens, full.logprobs)
    torch.testing.assert_close(rebuilt[active], logp[active], atol=1e-4, rtol=1e-5)
    vals, ids = logp.topk(8, -1)
    assert (top.tokens[active] == ids[active]).float().mean() > 0.999  # a near-tie may swap two ranks
    torch.testing.assert_close(top.logprobs[active], vals[active], atol=1e-4, rtol=1e-5)
    tail = logp.scatter(-1, ids, float("-inf")).logsumexp(-1)
    assert (top.tail[active].exp() - tail[active].exp()).abs().max() < 1e-4  # the tail is 1 - the top-K's mass


@engine
@pytest.mark.parametrize("name,top_k,exact", [("hpd", 264, False), ("fkl", 264, False), ("hpd", 8, True)])
def test_served_teacher_gives_the_in_process_loss_and_gradient(name, top_k, exact, teacher_server):
    """K = V (a complete teacher), or hpd at K = 8 with its samples outside the top-8 scored by a
    second request: the loss and gradient equal the in-process teacher's to fp32 tolerance."""
    from hpd.models.loading import load_model
    from hpd.objectives import get_objective
    from hpd.teachers.served import exact_scorer

    examples, tok = _examples()
    logits, b = _in_process(examples, tok)
    if exact:
        pool, seqs, T = TeacherServers(teacher_server.url), [e.prompt_ids + e.completion_ids for e in examples], b["input_ids"].shape[1]
        served = topk_teacher(pool.score(seqs, top_k), T, top_k, 264, score=exact_scorer(pool, seqs, T))
    else:
        served = _served(teacher_server.url, examples, b, top_k)
    student = load_model(STUDENT, dtype="float32")[0]
    ids, mask, labels = b["input_ids"], b["attention_mask"], b["labels"]
    obj, params = get_objective(name), list(student.parameters())
    results = []
    for teacher in (logits, served):
        out = obj(student(input_ids=ids, attention_mask=mask).logits, teacher, labels,
                  generator=torch.Generator().manual_seed(11))
        results.append((out, torch.autograd.grad(out.loss, params, allow_unused=True)))
    (a, ga), (c, gc) = results
    if exact:
        assert float(c.metrics["frac_sample_outside_topk"]) > 0.05  # the second request had samples to score
    assert float(c.loss) == pytest.approx(float(a.loss), rel=1e-4, abs=1e-5)
    for x, y in zip(gc, ga):
        if x is not None:
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-3)


@engine
def test_training_with_a_served_teacher_records_it_and_resumes_exactly(teacher_server, tmp_path, monkeypatch):
    from conftest import interrupted_at_step
    from hpd.training.trainer import train

    common = ["objective.name=hpd", "max_steps=6", "save.every=3", "teacher.server_top_k=8",
              "teacher.server_exact_samples=true"]
    whole = train(_cfg(tmp_path / "whole", teacher_server.url, *common))
    info = json.loads((whole / "metrics.jsonl").read_text().splitlines()[0])
    assert info["teacher_server"]["servers"] == [teacher_server.url]
    assert info["teacher_server"]["models"] == [str(Path(TEACHER).resolve())] and info["teacher_server"]["vocab_size"] == 264
    with interrupted_at_step(monkeypatch, 5):
        train(_cfg(tmp_path / "resumed", teacher_server.url, *common))
    a, c = _weights(whole), _weights(train(_cfg(tmp_path / "resumed", teacher_server.url, *common)))
    assert all(torch.equal(a[k], c[k]) for k in a)


@engine
@pytest.mark.parametrize("mode,match", [
    ("truncate", r"malformed or truncated response"),
    ("garble", r"lacks the sequence token .* \(malformed or truncated response\)"),
    ("slow", r"no answer within 1.5 s \(teacher.server_timeout\)"),
    ("down", r"cannot reach it"),
])
def test_a_failing_server_stops_the_run_with_its_name_and_the_run_resumes_exactly(mode, match, teacher_server, proxy,
                                                                                 tmp_path, monkeypatch):
    """The proxy turns bad after step 4: the run stops before any step trains on the bad answer
    (an error naming the server), keeps its step-3 checkpoint, and resumed against the good server
    ends with the weights of a run that never failed."""
    import hpd.training.trainer
    from hpd.training.trainer import train

    common = ["objective.name=hpd", "max_steps=6", "save.every=3", "teacher.server_timeout=1.5",
              "teacher.server_retries=1"]
    real_step = hpd.training.trainer.Trainer.train_step
    steps_taken = []

    def turns_bad(self):
        if self.step == 4:
            proxy.mode = mode  # from here on (step 5's teacher was asked during step 4: prefetched)
        out = real_step(self)
        steps_taken.append(self.step + 1)
        return out

    monkeypatch.setattr(hpd.training.trainer.Trainer, "train_step", turns_bad)
    run = tmp_path / "run"
    with pytest.raises(HPDError, match=rf"{proxy.url}: .*{match}"):
        train(_cfg(run, proxy.url, *common))
    # The proxy turns bad while step 5 starts: step 6's request meets the fault, and so does step 5's
    # when the prefetch thread had not sent it yet (a loaded machine). Either way the step whose
    # answer is bad never finishes, and steps 1-4 trained on good answers.
    assert steps_taken in ([1, 2, 3, 4], [1, 2, 3, 4, 5])
    assert [p.name for p in (run / "checkpoints").glob("step-*")] == ["step-00000003"] and not (run / "final").exists()
    monkeypatch.setattr(hpd.training.trainer.Trainer, "train_step", real_step)
    whole = train(_cfg(tmp_path / "whole", teacher_server.url, *common))
    resumed = train(_cfg(run, teacher_server.url, *common))  # the server is back (elsewhere: teacher.server is run-neutral)
    a, c = _weights(whole), _weights(resumed)
    assert all(torch.equal(a[k], c[k]) for k in a)


@engine
def test_another_tokenizer_or_vocabulary_is_refused_naming_both_sides(teacher_server, tmp_path):
    from hpd.models.loading import load_saved_tokenizer

    tok = load_saved_tokenizer(TEACHER)
    pool = TeacherServers(teacher_server.url)
    assert pool.check(tok, 264, 8)["models"] == [str(Path(TEACHER).resolve())]
    with pytest.raises(HPDError, match=rf"{teacher_server.url} serves .*teacher with a vocabulary of 264 tokens, but "
                                       r"the student's loss is over 300"):
        pool.check(tok, 300, 8)
    # A student whose tokenizer reads text otherwise (two byte tokens swapped).
    other = tmp_path / "student"
    other.mkdir()
    for f in Path(STUDENT).iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    spec = json.loads((other / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, e = next(k for k, v in vocab.items() if v == ord("a")), next(k for k, v in vocab.items() if v == ord("e"))
    vocab[a], vocab[e] = vocab[e], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(HPDError, match=rf"teacher server {teacher_server.url} serves .*teacher, whose tokenizer reads "
                                       r"the probe text .* as other token ids than the student \(.*student\)'s "
                                       r"\(first difference at token \d+: served \[.*\], student \[.*\]\)"):
        from hpd.training.trainer import train

        train(_cfg(tmp_path / "run", teacher_server.url, f"student.path={other}", "max_steps=1"))


@engine
def test_a_cache_built_by_one_or_two_servers_equals_the_in_process_cache(teacher_server, proxy, tmp_path):
    """The same positions and top-K tokens; log-probabilities within 1e-4 (the engine's fp32
    numerics), the tail mass within 1e-4; two servers share the batches and build the same cache."""
    from hpd.teachers.cache import TeacherCache, build_teacher_cache

    kw = dict(top_k=8, data=DataConfig(max_length=64), dtype="float32", batch_size=8, log=None)
    local = TeacherCache(build_teacher_cache(TEACHER, [DATA], tmp_path / "local", **kw))
    one = TeacherCache(build_teacher_cache(TEACHER, [DATA], tmp_path / "one", servers=teacher_server.url, **kw))
    two = TeacherCache(build_teacher_cache(TEACHER, [DATA], tmp_path / "two", servers=[teacher_server.url, proxy.url], **kw))
    assert proxy.requests > 3  # the second server scored batches too
    assert one.manifest["teacher"]["servers"] == [teacher_server.url] and one.manifest["positions"] == local.manifest["positions"]

    def arrays(c):
        return {k: np.concatenate([s[3][k] for s in c._shards]) for k in ("label_logp", "tail_logp", "topk_ids", "topk_logp")}

    ref = arrays(local)
    for cache in (one, two):
        got = arrays(cache)
        assert np.array_equal(cache.hashes, local.hashes) and np.array_equal(cache.offsets, local.offsets)
        assert np.abs(got["label_logp"] - ref["label_logp"]).max() < 1e-4
        assert (got["topk_ids"] == ref["topk_ids"]).mean() > 0.999
        assert np.abs(got["topk_logp"] - ref["topk_logp"]).max() < 1e-4
        assert np.abs(np.exp(got["tail_logp"]) - np.exp(ref["tail_logp"])).max() < 1e-4
    np.testing.assert_array_equal(arrays(one)["label_logp"], arrays(two)["label_logp"])


@engine
def test_a_packed_run_with_a_served_teacher_trains_as_the_padded_one(teacher_server, tmp_path):
    """The servers score whole rows; the view is packed like the batch, so packing changes nothing."""
    from hpd.training.trainer import train

    common = ["objective.name=hpd", "max_steps=3", "teacher.server_top_k=8"]
    padded = _weights(train(_cfg(tmp_path / "padded", teacher_server.url, *common)))
    packed = _weights(train(_cfg(tmp_path / "packed", teacher_server.url, *common, "data.packing=true")))
    for k in padded:
        torch.testing.assert_close(packed[k], padded[k], atol=1e-4, rtol=1e-4)  # Adam: a sign-like first step


# --- across tokenizers ----------------------------------------------------------------------------------------------


def _bpe_student(tmp_path=None):
    """A BPE student (the tokenizer trained offline in test_cross_tokenizer) of the bundled byte-level teacher."""
    from test_cross_tokenizer import _tiny, train_bpe

    bpe = train_bpe()
    student = _tiny(bpe, 4)
    if tmp_path is not None:
        from hpd.models.loading import save_model

        save_model(student, bpe, tmp_path / "bpe-student")
    return student, bpe


@engine
@pytest.mark.parametrize("top_k,exact", [(264, False), (8, True)])
def test_a_served_teacher_across_tokenizers_gives_the_online_loss_and_gradient(top_k, exact, teacher_server):
    """A BPE student, the bundled byte-level teacher served: its sequences tokenized here with its
    tokenizer, the engine's prompt log-probabilities over them lined up as online. K = V: hpd's loss and
    gradient equal the online cross-tokenizer teacher's; K = 8 with the samples outside the top-8 asked
    for by a second request: equal too (without it the tail estimate is used; the fractions are printed)."""
    from hpd.data.batches import make_batch
    from hpd.teachers.cross_tokenizer import CrossTokenizerTeacher, ServedCrossTokenizerTeacher
    from hpd.models.loading import load_model, load_saved_tokenizer
    from hpd.objectives import get_objective

    student, bpe = _bpe_student()
    t_tok = load_saved_tokenizer(TEACHER)
    teacher = load_model(TEACHER, dtype="float32")[0]
    examples = encode_file(DATA, bpe, DataConfig(max_length=64), teacher_tokenizer=t_tok)[0][:6]
    pool = TeacherServers(teacher_server.url)
    assert pool.check(t_tok, None, top_k, guess=len(t_tok))["vocab_size"] == 264
    cpu = torch.device("cpu")
    sources = {"online": CrossTokenizerTeacher(teacher, t_tok, bpe, cpu),
               "served": ServedCrossTokenizerTeacher(pool, top_k, 264, t_tok, bpe, cpu, exact_samples=exact)}
    if exact:
        sources["tail"] = ServedCrossTokenizerTeacher(pool, top_k, 264, t_tok, bpe, cpu)
    params = list(student.parameters())
    results = {}
    for name, src in sources.items():
        b = make_batch([e.prompt_ids for e in examples], [e.completion_ids for e in examples], pad_id=bpe.pad_token_id,
                       vocab_size=None, device=cpu)
        src.prepare(b, examples, "train", list(range(len(examples))))
        out = get_objective("hpd")(student(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).logits,
                                   src.view(b), b.labels, generator=torch.Generator().manual_seed(11))
        results[name] = (out, torch.autograd.grad(out.loss, params, allow_unused=True), b)
    (a, ga, ba), (c, gc, bc) = results["online"], results["served"]
    assert torch.equal(ba.labels, bc.labels) and ba.num_active > 0 and bc.xtok_masked == ba.xtok_masked
    if exact:
        assert float(c.metrics["frac_sample_outside_topk"]) > 0.05  # the second request had samples to score
        t = results["tail"][0].metrics
        print(f"\n[served across tokenizers, top-{top_k}] samples unscored (no single teacher token): "
              f"{t['frac_sample_unscored']:.3f}; scored from the tail estimate: {t['frac_sample_outside_topk']:.3f}")
    assert float(c.loss) == pytest.approx(float(a.loss), rel=1e-4, abs=1e-5)
    for x, y in zip(gc, ga):
        if x is not None:
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-3)


@engine
def test_training_with_a_served_teacher_across_tokenizers(teacher_server, tmp_path):
    """`hpd train teacher.server=URL teacher.cross_tokenizer=true teacher.path=TOKENIZER_DIR` with a BPE
    student: checked against the teacher's tokenizer, trains; the student's tokenizer as teacher.path is refused."""
    from hpd.training.trainer import train

    _bpe_student(tmp_path)
    common = [f"student.path={tmp_path / 'bpe-student'}", "teacher.cross_tokenizer=true", "objective.name=hpd",
              "max_steps=2", "teacher.server_top_k=8", "teacher.server_exact_samples=true"]
    run = train(_cfg(tmp_path / "run", teacher_server.url, *common, f"teacher.path={TEACHER}"))
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["teacher_server"]["vocab_size"] == 264
    step = [x for x in lines if x.get("type") == "train"][-1]
    assert np.isfinite(step["loss"]) and 0.0 <= step["xtok_frac_masked"] < 1.0
    with pytest.raises(HPDError, match="reads the probe text .* as other token ids than the teacher tokenizer"):
        train(_cfg(tmp_path / "refused", teacher_server.url, *common, f"teacher.path={tmp_path / 'bpe-student'}"))
    # A cache across tokenizers built by the server holds the one built from the model here.
    from hpd.teachers.cache import TeacherCache, build_teacher_cache

    kw = dict(top_k=8, data=DataConfig(max_length=64), dtype="float32", student=tmp_path / "bpe-student", log=None)
    local = TeacherCache(build_teacher_cache(TEACHER, [DATA], tmp_path / "local", **kw))
    served = TeacherCache(build_teacher_cache(TEACHER, [DATA], tmp_path / "served", servers=teacher_server.url, **kw))
    assert served.cross_tokenizer == local.cross_tokenizer and np.array_equal(served.teacher_hashes, local.teacher_hashes)
    assert np.array_equal(served.hashes, local.hashes) and np.array_equal(served.offsets, local.offsets)
    got, ref = (np.concatenate([sh[3]["label_logp"] for sh in c._shards]) for c in (served, local))
    assert np.abs(got - ref).max() < 1e-4


@engine
def test_serve_teacher_serves_with_the_model_in_the_engine_core_until_interrupted(repo_root):
    """`hpd serve-teacher` on a CPU machine: prints its URL once the engine answers, scores a
    token-id prompt there, runs the model inside vLLM's engine-core process (no `VLLM::Worker`
    process busy-polling beside it, as vLLM starts one by default), and a Ctrl-C ends every
    process it started."""
    import os
    import shutil
    import signal
    import subprocess
    import sys

    import psutil
    import requests

    from hpd.engine import engine_python

    if engine_python(required=False) is None:
        pytest.skip("the vLLM engine environment is absent: build it with `make engine` (or set HPD_ENGINE_PYTHON)")
    if shutil.which("nvidia-smi"):
        pytest.skip("on a GPU machine the engine core runs as vLLM starts it")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "hpd.apps.cli", "serve-teacher", TEACHER, "--host", "127.0.0.1", "--port", str(port),
         "--max-model-len", "256", "--max-logprobs", "8", "--threads", "1", "--kv-cache-gib", "0.25",
         "--engine-arg=--enforce-eager"],
        cwd=repo_root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env={**os.environ, "PYTHONPATH": str(repo_root)})
    started: list[psutil.Process] = []
    try:
        lines = []
        deadline = time.monotonic() + 600
        for line in proc.stdout:  # the engine's own log goes to a file; these are hpd's lines
            lines.append(line)
            if "serving" in line or time.monotonic() > deadline:
                break
        assert any(f"http://127.0.0.1:{port}" in ln for ln in lines), "".join(lines)
        started = psutil.Process(proc.pid).children(recursive=True)
        names = [" ".join(p.cmdline()) + " " + p.name() for p in started]
        assert any("vllm.entrypoints.openai.api_server" in n for n in names), names
        assert any("EngineCore" in n for n in names), names
        assert not any("VLLM::Worker" in n for n in names), names
        model = requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=30).json()["data"][0]["id"]
        answer = requests.post(f"http://127.0.0.1:{port}/v1/completions", timeout=120, json={
            "model": model, "prompt": [1, 72, 105, 33], "max_tokens": 1, "prompt_logprobs": 0}).json()
        logprobs = answer["choices"][0]["prompt_logprobs"]
        assert len(logprobs) == 4 and logprobs[0] is None
        assert all(float(next(iter(p.values()))["logprob"]) <= 0 for p in logprobs[1:])
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    gone, alive = psutil.wait_procs(started, timeout=30)
    assert not alive, [p.pid for p in alive]

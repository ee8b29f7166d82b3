"""Cross-tokenizer distillation: byte-offset alignment, HPD across tokenizers, ULD, the trainer path."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from hpd.teachers.cross_tokenizer import CrossTokenizerView
from hpd.teachers.alignment import EOS_MARKER, align_response, joint_spans, special_markers, token_bytes, token_map
from hpd.errors import HPDError
from hpd.objectives import IGNORE_INDEX, get_objective
from hpd.models.tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS, byte_tokenizer

SHIPPED = "examples/tiny.jsonl"


@pytest.fixture(scope="module")
def bpe():
    """A small byte-level BPE tokenizer trained offline on the shipped examples (300 tokens)."""
    return train_bpe()


def train_bpe():
    """The `bpe` fixture's tokenizer (also the student of the served teacher's test across tokenizers)."""
    texts = []
    for line in open(SHIPPED):
        row = json.loads(line)
        texts += [m["content"] for m in row["messages"]] if "messages" in row else [row["prompt"], row["completion"]]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=list(SPECIAL_TOKENS),
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                           show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|bos|>", eos_token="<|eos|>",
                                  pad_token="<|pad|>", additional_special_tokens=list(SPECIAL_TOKENS[3:]),
                                  clean_up_tokenization_spaces=False)
    tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def spm():
    """A SentencePiece-style tokenizer like Gemma's: spaces as '▁', BPE merges, byte fallback for the rest."""
    from tokenizers import normalizers

    words = ["▁the", "▁capital", "▁of", "▁is", "an", "in", "er", "▁a"]
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for c in "▁abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:+-":
        vocab.setdefault(c, len(vocab))
    merges = []
    for w in words:  # left-to-right merges that build each word
        for k in range(2, len(w) + 1):
            left, right = w[:k - 1], w[k - 1]
            vocab.setdefault(w[:k], len(vocab))
            if (left, right) not in merges:
                merges.append((left, right))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, fuse_unk=False))
    backend.normalizer = normalizers.Replace(" ", "\u2581")
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|bos|>", eos_token="<|eos|>",
                                  pad_token="<|pad|>", clean_up_tokenization_spaces=False)


def test_sentencepiece_style_bytes(spm):
    tb = token_bytes(spm)
    text = "the capital of Été is 東京 🙂\n"
    ids = spm(text, add_special_tokens=False)["input_ids"]
    assert "▁capital" in spm.convert_ids_to_tokens(ids) and "<0xE6>" in spm.convert_ids_to_tokens(ids)
    assert b"".join(tb[i] for i in ids) == text.encode()


@pytest.fixture(scope="module")
def byte_tok():
    return byte_tokenizer()


def _spans_tile(spans, a, b):
    """The joint spans cover both token sequences and the bytes once, in order, each spelling the same bytes."""
    assert spans[0][0] == spans[0][2] == spans[0][4] == 0
    for prev, nxt in zip(spans, spans[1:]):
        assert (prev[1], prev[3], prev[5]) == (nxt[0], nxt[2], nxt[4])
    assert (spans[-1][1], spans[-1][3], spans[-1][5]) == (len(a), len(b), sum(a))
    for a0, a1, b0, b1, c0, c1 in spans:
        assert a0 < a1 and b0 < b1 and c0 < c1
        assert sum(a[a0:a1]) == sum(b[b0:b1]) == c1 - c0


def test_joint_spans_closed_form():
    # "abcd": student a|bc|d, teacher abc|d -> {a, bc} = {abc}, {d} = {d}
    assert joint_spans([1, 2, 1], [3, 1]) == [(0, 2, 0, 1, 0, 3), (2, 3, 1, 2, 3, 4)]
    # identical tokenizations: one span per token
    assert joint_spans([2, 1, 3], [2, 1, 3]) == [(0, 1, 0, 1, 0, 2), (1, 2, 1, 2, 2, 3), (2, 3, 2, 3, 3, 6)]
    # crossing boundaries: ab|cd|ef vs a|bcd|e|f: one span for abcd, one for ef
    assert joint_spans([2, 2, 2], [1, 3, 1, 1]) == [(0, 2, 0, 2, 0, 4), (2, 3, 2, 4, 4, 6)]
    with pytest.raises(HPDError, match="different lengths"):
        joint_spans([1, 2], [2])


@settings(max_examples=60, deadline=None)
@given(a=st.lists(st.integers(1, 4), min_size=1, max_size=12), data=st.data())
def test_joint_spans_tile_random_splits(a, data):
    total = sum(a)
    cuts = data.draw(st.sets(st.integers(1, total - 1))) if total > 1 else set()
    edges = [0, *sorted(cuts), total]
    b = [y - x for x, y in zip(edges, edges[1:])]
    _spans_tile(joint_spans(a, b), a, b)


def test_align_response_closed_form(bpe, byte_tok):
    sb, tb = token_bytes(byte_tok), token_bytes(bpe)
    text = "hé a"
    ids = byte_tok(text, add_special_tokens=False)["input_ids"] + [byte_tok.eos_token_id]  # h, 0xC3, 0xA9, ' ', a, eos
    a = align_response(ids, sb, bpe, tb)
    spelled = [tb[t] for t in a.teacher_ids]
    assert b"".join(spelled) == text.encode() + EOS_MARKER
    assert a.teacher_ids[-1] == bpe.eos_token_id
    # the two UTF-8 bytes of é: the first starts where a teacher token starts only if the teacher splits there
    starts = {sum(len(p) for p in spelled[:j]) for j in range(len(spelled))}
    offsets = [0, 1, 2, 3, 4, 5]
    for i, off in enumerate(offsets):
        assert (a.start[i] >= 0) == (off in starts)
        if a.span[i] is not None:  # exactly this byte token's bytes
            j, l = a.span[i]
            assert b"".join(spelled[j:l]) == sb[ids[i]]
    assert a.span[-1] == (len(a.teacher_ids) - 1, len(a.teacher_ids))  # eos <-> eos


@settings(max_examples=80, deadline=None)
@given(text=st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)
       | st.text(alphabet=" \n\t ab.Réé東🙂", max_size=40),
       eos=st.booleans(), pair=st.sampled_from(["byte-bpe", "bpe-byte", "bpe-spm", "spm-byte"]))
def test_alignment_covers_text_once_in_order(bpe, byte_tok, spm, text, eos, pair):
    toks = {"byte": byte_tok, "bpe": bpe, "spm": spm}
    s_tok, t_tok = (toks[k] for k in pair.split("-"))
    sb, tb = token_bytes(s_tok), token_bytes(t_tok)
    ids = s_tok(text, add_special_tokens=False)["input_ids"]
    assert b"".join(sb[i] for i in ids) == text.encode()  # the table spells the student's tokens exactly
    ids = ids + ([s_tok.eos_token_id] if eos else [])
    a = align_response(ids, sb, t_tok, tb, special_markers(tb))
    s_len, t_len = [len(sb[i]) for i in ids], [len(tb[t]) for t in a.teacher_ids]
    assert b"".join(tb[t] for t in a.teacher_ids) == b"".join(sb[i] for i in ids)
    if ids:
        spans = joint_spans(s_len, t_len)
        _spans_tile(spans, s_len, t_len)
    starts = [j for j in a.start if j >= 0]
    assert starts == sorted(set(starts))  # in order, each teacher token once
    for i, sp in enumerate(a.span):
        if sp is not None:
            assert b"".join(tb[t] for t in a.teacher_ids[sp[0]:sp[1]]) == sb[ids[i]]
            assert a.start[i] == sp[0]


def test_alignment_stops_at_invalid_utf8(bpe, byte_tok):
    sb, tb = token_bytes(byte_tok), token_bytes(bpe)
    ids = [ord("a"), 0xC3, ord("b"), ord("c")]  # a rollout that left a character unfinished
    a = align_response(ids, sb, bpe, tb)
    assert b"".join(tb[t] for t in a.teacher_ids) == b"a"
    assert a.span[0] is not None and a.span[1:] == [None, None, None] and a.start[1:] == [-1, -1, -1]


def test_token_map(bpe, byte_tok):
    sb, tb = token_bytes(byte_tok), token_bytes(bpe)
    m = token_map(sb, bpe, tb)
    assert int(m[ord("a")]) == bpe.convert_tokens_to_ids("a")
    assert int(m[0xC3]) == -1  # half a character: no teacher token spells it
    assert int(m[byte_tok.eos_token_id]) == bpe.eos_token_id


def test_uld_matches_hand_computation():
    q = torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64)
    p = torch.tensor([[0.1, 0.6, 0.25, 0.05]], dtype=torch.float64)
    # sorted: q (0.5, 0.3, 0.2, 0), p (0.6, 0.25, 0.1, 0.05): |.| sum = 0.1 + 0.05 + 0.1 + 0.05 = 0.3
    z = q.log().clone().requires_grad_(True)
    chunk = type("C", (), {"sorted_logp": lambda self, name: p.log().sort(-1, descending=True).values})()
    obj = get_objective("uld")
    tw = obj.weights(torch.log_softmax(z.detach(), -1), chunk, torch.tensor([0]), None)
    assert float(tw.value) == pytest.approx(0.3, abs=1e-12)
    # the surrogate's gradient -sum_v w(v) grad log q(v) equals the closed form's
    surrogate = -(tw.weights * torch.log_softmax(z, -1)).sum()
    g_sur, = torch.autograd.grad(surrogate, z)
    qs = torch.softmax(z, -1).sort(-1, descending=True).values
    closed = (torch.nn.functional.pad(qs, (0, 1)) - p.sort(-1, descending=True).values).abs().sum()
    g_ref, = torch.autograd.grad(closed, z)
    torch.testing.assert_close(g_sur, g_ref)


def _tiny(tok, seed, **kw):
    from hpd.models.loading import build_tiny_model
    return build_tiny_model(tok, seed=seed, dtype=torch.float32, num_layers=1, hidden_size=32, num_heads=2,
                            intermediate_size=64, **kw).eval()


def test_hpd_across_tokenizers_equals_hand_computation(bpe, byte_tok):
    """One HPD loss through CrossTokenizerTeacher's view equals the weights computed by hand from full logits."""
    from hpd.data.batches import make_batch
    from hpd.teachers.cross_tokenizer import CrossTokenizerTeacher
    from hpd.data.encode import EncodedExample

    student, teacher = _tiny(byte_tok, 1), _tiny(bpe, 2)
    texts = [("Add: 4+5", "9 nine"), ("Reverse: cat", "tac")]
    s_prompts = [byte_tok(p, add_special_tokens=False)["input_ids"] for p, _ in texts]
    t_prompts = [bpe(p, add_special_tokens=False)["input_ids"] for p, _ in texts]
    comps = [byte_tok(c, add_special_tokens=False)["input_ids"] + [byte_tok.eos_token_id] for _, c in texts]
    examples = [EncodedExample(p, c, False, "t", teacher_prompt_ids=tp) for p, c, tp in zip(s_prompts, comps, t_prompts)]
    source = CrossTokenizerTeacher(teacher, bpe, byte_tok, torch.device("cpu"))
    batch = make_batch(s_prompts, comps, pad_id=byte_tok.pad_token_id, vocab_size=None, device=torch.device("cpu"))
    before = batch.cpu_labels.clone()
    source.prepare(batch, examples, "train", [0, 1])
    view = source.view(batch)
    labels = batch.labels
    samples = torch.randint(0, 256, labels.shape, generator=torch.Generator().manual_seed(0))
    samples[0, len(s_prompts[0]) - 1] = labels[0, len(s_prompts[0]) - 1]  # one sample equal to y
    with torch.no_grad():
        zs = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    out = get_objective("hpd")(zs, view, labels, sampled_tokens=samples)

    # By hand: the teacher's log-probabilities over its own sequence, summed over each aligned span.
    with torch.no_grad():
        zt = teacher(input_ids=batch.teacher_ids, attention_mask=batch.teacher_mask).logits
    lpt, lps = torch.log_softmax(zt.double(), -1), torch.log_softmax(zs.double(), -1)
    sb, tb = token_bytes(byte_tok), token_bytes(bpe)
    total, n, masked = 0.0, 0, 0
    for row, (sp, tp, comp) in enumerate(zip(s_prompts, t_prompts, comps)):
        a = align_response(comp, sb, bpe, tb)
        for i, y in enumerate(comp):
            pos = len(sp) + i - 1
            if a.span[i] is None:
                assert labels[row, pos] == IGNORE_INDEX and before[row, pos] == y
                masked += 1
                continue
            j, l = a.span[i]
            t = sum(float(lpt[row, len(tp) + k - 1, a.teacher_ids[k]]) for k in range(j, l))
            ctx = len(tp) + j - 1
            y_hat = int(samples[row, pos])
            s, s_hat = float(lps[row, pos, y]), float(lps[row, pos, y_hat])
            if y_hat == y:
                t_hat = t
            else:
                enc = bpe(bytes(sb[y_hat]).decode("utf-8", errors="strict"), add_special_tokens=False)["input_ids"] \
                    if sb[y_hat].isascii() else []
                t_hat = float(lpt[row, ctx, enc[0]]) if len(enc) == 1 else s_hat  # unscored: r_hat = 0
            r, r_hat = math.exp(s) * (t - s), math.exp(s_hat) * (t_hat - s_hat)
            A, B = r > 0, r_hat < 0
            w_y = r + A * math.exp(t) + (A and B) * math.exp(t)
            w_hat = (B and y_hat != y) * r_hat
            total -= w_y * s + w_hat * s_hat
            n += 1
    assert masked == batch.xtok_masked and n == batch.num_active > 0
    assert float(out.loss) == pytest.approx(total / n, rel=1e-5, abs=1e-6)
    assert 0.0 < out.metrics["frac_sample_unscored"] < 1.0  # random bytes: some are half a character


def test_vocab_objectives_refused_across_tokenizers(bpe, byte_tok):
    chunk = CrossTokenizerView  # the chunk raises with a message naming uld
    from hpd.teachers.cross_tokenizer import CrossTokenizerChunk
    c = CrossTokenizerChunk(torch.zeros(1, 5), torch.zeros(1), torch.zeros(1, dtype=torch.long), torch.zeros(3, dtype=torch.long))
    with pytest.raises(HPDError, match="uld"):
        get_objective("fkl").weights(torch.zeros(1, 3), c, torch.zeros(1, dtype=torch.long), None)
    with pytest.raises(HPDError, match="across tokenizers"):
        get_objective("hpdk").weights(torch.zeros(1, 3), c, torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    del chunk


def test_config_refuses_cross_tokenizer_misuse():
    from hpd.config import load_config
    with pytest.raises(HPDError, match="across tokenizers use one of"):
        load_config(None, overrides=["teacher.cross_tokenizer=true", "objective.name=fkl"])
    with pytest.raises(HPDError, match="regime.name dataset or student"):
        load_config(None, overrides=["teacher.cross_tokenizer=true", "objective.name=hpd", "regime.name=teacher"])


def test_train_refuses_another_tokenizer_without_the_flag_and_runs_with_it(bpe, tmp_path):
    """`hpd train` with a BPE teacher and the byte-level tiny student: refused, then one cross-tokenizer step per objective."""
    from hpd.models.loading import save_model
    from hpd.training.trainer import train

    tdir, sdir = tmp_path / "teacher", tmp_path / "student"
    save_model(_tiny(bpe, 3), bpe, tdir)
    save_model(_tiny(byte_tokenizer(), 4), byte_tokenizer(), sdir)
    base = {"student": {"path": str(sdir)},
            "teacher": {"path": str(tdir)}, "data": {"train": SHIPPED, "max_length": 64},
            "optim": {"batch_size": 4}, "max_steps": 1, "log": {"progress": False}}
    with pytest.raises(HPDError, match="teacher.cross_tokenizer=true"):
        train({**base, "objective": {"name": "hpd"}, "output_dir": str(tmp_path / "refused")})
    for name, regime in (("hpd", "dataset"), ("uld", "dataset"), ("hpd", "student")):
        cfg = {**base, "teacher": {"path": str(tdir), "cross_tokenizer": True}, "objective": {"name": name},
               "regime": {"name": regime, "max_new_tokens": 12}, "output_dir": str(tmp_path / f"{name}-{regime}")}
        run = train(cfg)
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        step = [x for x in lines if x.get("type") == "train"][-1]
        assert math.isfinite(step["loss"]) and 0.0 <= step["xtok_frac_masked"] < 1.0


@pytest.mark.parametrize("extra,match", [
    (["teacher.server=http://127.0.0.1:9", "teacher.path=none"], r"teacher.path to a directory holding the served teacher's tokenizer"),
    (["teacher.path=none"], r"needs a teacher"),
])
def test_cross_tokenizer_refuses_a_teacher_it_cannot_line_up(extra, match):
    from hpd.config import load_config

    with pytest.raises(HPDError, match=match):
        load_config(None, overrides=["teacher.cross_tokenizer=true", "objective.name=hpd", *extra])


# --- the cache across tokenizers ----------------------------------------------------------------------------------


def _pair(bpe, tmp_path):
    """A BPE teacher and a byte-level student, saved; the student's examples with their teacher prompts."""
    from hpd.config import DataConfig
    from hpd.data.encode import encode_file
    from hpd.models.loading import save_model

    teacher, student = _tiny(bpe, 3), _tiny(byte_tokenizer(), 4)
    tdir = save_model(teacher, bpe, tmp_path / "teacher")
    sdir = save_model(student, byte_tokenizer(), tmp_path / "student")
    examples = encode_file(SHIPPED, byte_tokenizer(), DataConfig(max_length=64), teacher_tokenizer=bpe)[0]
    return teacher, student, tdir, sdir, examples


def _loss_and_grad(student, source, examples, rows, name, samples_seed=0, **batch_kw):
    from hpd.data.batches import make_batch

    tok = byte_tokenizer()
    batch = make_batch([e.prompt_ids for e in examples], [e.completion_ids for e in examples], pad_id=tok.pad_token_id,
                       vocab_size=None, device=torch.device("cpu"), **batch_kw)
    source.prepare(batch, examples, "train", rows)
    view = source.view(batch)
    rows = batch.row_labels if batch.packing is not None else batch.labels
    samples = torch.randint(0, 258, rows.shape, generator=torch.Generator().manual_seed(samples_seed))
    if batch.packing is not None:  # the same draws, laid out as the packed batch
        samples = batch.packing.pack(samples)
    kw = dict(position_ids=batch.position_ids) if batch.position_ids is not None else dict(attention_mask=batch.attention_mask)
    logits = student(input_ids=batch.input_ids, **kw, use_cache=False).logits  # no KV cache: HF keeps packed rows apart
    out = get_objective(name)(logits, view, batch.labels, sampled_tokens=samples if name == "hpd" else None)
    params = [p for p in student.parameters() if p.requires_grad]
    return out, torch.autograd.grad(out.loss, params), batch


@pytest.mark.parametrize("name", ["hpd", "orkl", "sft", "uld"])
def test_a_cache_across_tokenizers_gives_the_online_loss_and_gradient(bpe, tmp_path, name):
    """Built with --student over the teacher's own tokens, K = V_t in float32: the loss and the student's
    gradients equal the online cross-tokenizer teacher's to fp32 tolerance, for every objective that runs
    across tokenizers."""
    from hpd.teachers.cross_tokenizer import CachedCrossTokenizerTeacher, CrossTokenizerTeacher
    from hpd.config import DataConfig
    from hpd.teachers.cache import TeacherCache, build_teacher_cache

    teacher, student, tdir, _, examples = _pair(bpe, tmp_path)
    cache = TeacherCache(build_teacher_cache(tdir, [SHIPPED], tmp_path / "cache", top_k=10**6, dtype="float32",
                                             data=DataConfig(max_length=64), student="tiny", log=None))
    assert cache.cross_tokenizer and cache.top_k == cache.vocab_size == teacher.get_output_embeddings().weight.shape[0]
    assert cache.teacher_hashes is not None
    examples = examples[:6]
    rows = cache.rows_of(examples, "test")
    whole = get_objective(name).support != "vocab"
    online = CrossTokenizerTeacher(teacher, bpe, byte_tokenizer(), torch.device("cpu"), whole_spans=whole)
    cached = CachedCrossTokenizerTeacher(cache, {"train": rows}, cache.tokenizer(), byte_tokenizer(), torch.device("cpu"),
                                         whole_spans=whole)
    (a, ga, ba), (c, gc, bc) = (_loss_and_grad(student, src, examples, list(range(6)), name) for src in (online, cached))
    assert torch.equal(ba.labels, bc.labels) and ba.num_active == bc.num_active > 0
    assert float(c.loss) == pytest.approx(float(a.loss), rel=1e-5, abs=1e-6)
    for x, y in zip(gc, ga):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-4)
    if name == "hpd":
        assert a.metrics["frac_sample_unscored"] == pytest.approx(c.metrics["frac_sample_unscored"])
        assert a.metrics["agreement"] == pytest.approx(c.metrics["agreement"])


def test_a_topk_cache_across_tokenizers_reads_y_exactly_and_estimates_samples_from_the_tail(bpe, tmp_path):
    """K = 8: orkl (the sequence token only) equals the online teacher; hpd reads a sample's teacher
    token from the top-K when it is there (exact) and from the tail spread evenly otherwise (counted)."""
    from hpd.teachers.cross_tokenizer import CachedCrossTokenizerTeacher, CrossTokenizerTeacher
    from hpd.config import DataConfig
    from hpd.teachers.cache import TeacherCache, build_teacher_cache

    teacher, student, tdir, _, examples = _pair(bpe, tmp_path)
    cache = TeacherCache(build_teacher_cache(tdir, [SHIPPED], tmp_path / "cache", top_k=8, dtype="float32",
                                             data=DataConfig(max_length=64), student="tiny", log=None))
    examples = examples[:6]
    rows = cache.rows_of(examples, "test")
    online = CrossTokenizerTeacher(teacher, bpe, byte_tokenizer(), torch.device("cpu"))
    cached = CachedCrossTokenizerTeacher(cache, {"train": rows}, cache.tokenizer(), byte_tokenizer(), torch.device("cpu"))
    (a, ga, _), (c, gc, _) = (_loss_and_grad(student, src, examples, list(range(6)), "orkl") for src in (online, cached))
    assert float(c.loss) == pytest.approx(float(a.loss), rel=1e-5)
    # hpd, chunk by chunk: the cached teacher at every student token equals the online one where the
    # mapped teacher token is the teacher's own or in its top-8, and the tail estimate elsewhere.
    from hpd.data.batches import make_batch

    tok = byte_tokenizer()
    views = []
    for src in (online, cached):
        b = make_batch([e.prompt_ids for e in examples], [e.completion_ids for e in examples], pad_id=tok.pad_token_id,
                       vocab_size=None, device=torch.device("cpu"))
        src.prepare(b, examples, "train", list(range(6)))
        views.append(src.view(b))
    pos = (b.labels.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)
    y = b.labels.reshape(-1)[pos]
    on, ca = (v.chunker(258, 1.0)(pos, y) for v in views)
    tokens = torch.randint(0, 258, y.shape, generator=torch.Generator().manual_seed(0))
    inverse = {int(t): i for i, t in enumerate(online.mapping.tolist()) if t >= 0}
    for i in range(0, len(tokens), 2):  # every other token: one spelling a teacher top-8 token, where there is one
        spelled = [inverse[int(t)] for t in ca.tokens[i, -8:] if int(t) in inverse and inverse[int(t)] != int(y[i])]
        tokens[i] = spelled[0] if spelled else tokens[i]
    want, got = on.at(tokens), ca.at(tokens)
    outside = ca.outside_topk(tokens)
    inside = ~outside & ~want.isnan()
    assert 0 < int(outside.sum()) < len(tokens) and int(inside.sum()) > 0
    torch.testing.assert_close(got[inside], want[inside], atol=1e-5, rtol=1e-5)
    mapped = online.mapping[tokens[outside]]
    estimate = ca.tail[outside] - math.log(cache.vocab_size - 8)
    torch.testing.assert_close(got[outside], estimate.to(got.dtype))
    assert bool(want.isnan().eq(got.isnan()).all()) and bool((mapped >= 0).all())
    torch.testing.assert_close(ca.at(y), on.at(y), atol=1e-5, rtol=1e-5)  # the sequence token: its exact span
    # ULD reads the top-8 and the tail spread evenly over the other V_t - 8 teacher tokens
    torch.testing.assert_close(ca.sorted_logp("uld")[:, :8], on.sorted_logp("uld")[:, :8], atol=1e-5, rtol=1e-5)


def test_a_cache_across_tokenizers_is_refused_for_another_teacher_tokenizer_or_mode(bpe, tmp_path, spm):
    from hpd.config import DataConfig
    from hpd.teachers.cache import TeacherCache, build_teacher_cache

    _, _, tdir, _, _ = _pair(bpe, tmp_path)
    cache = TeacherCache(build_teacher_cache(tdir, [SHIPPED], tmp_path / "cache", top_k=4, data=DataConfig(max_length=64),
                                             student="tiny", log=None))
    cache.check_run(tokenizer=byte_tokenizer(), cross_tokenizer=True, teacher_tokenizer=bpe)  # the right pair passes
    with pytest.raises(HPDError, match="teacher's tokenizer differs"):
        cache.check_run(cross_tokenizer=True, teacher_tokenizer=spm)
    with pytest.raises(HPDError, match="student's tokenizer differs.*rebuild it with this student"):
        cache.check_run(tokenizer=bpe, cross_tokenizer=True)
    with pytest.raises(HPDError, match="built across tokenizers .*set teacher.cross_tokenizer=true"):
        cache.check_run(cross_tokenizer=False)
    same = TeacherCache(build_teacher_cache(tdir, [SHIPPED], tmp_path / "same", top_k=4, data=DataConfig(max_length=64),
                                            log=None))
    with pytest.raises(HPDError, match="needs a cache built across tokenizers"):
        same.check_run(cross_tokenizer=True)


def test_train_from_a_cache_across_tokenizers_equals_the_online_run(bpe, tmp_path):
    """`hpd cache-teacher --config RUN.yaml` (student.path and teacher.cross_tokenizer from the run) then
    `hpd train teacher.cache=CACHE`: the teacher is never loaded and two hpd steps give the online run's weights;
    another teacher at teacher.path (another tokenizer) is refused before training."""
    import yaml
    from typer.testing import CliRunner

    from hpd.apps.cli import app
    from hpd.models.loading import save_model
    from hpd.training.trainer import train

    _, _, tdir, sdir, _ = _pair(bpe, tmp_path)
    base = {"student": {"path": str(sdir)}, "teacher": {"path": str(tdir), "cross_tokenizer": True},
            "data": {"train": SHIPPED, "max_length": 64}, "objective": {"name": "hpd"},
            "optim": {"batch_size": 4}, "max_steps": 2, "log": {"progress": False, "tensorboard": "off"}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(base))
    res = CliRunner().invoke(app, ["cache-teacher", "--config", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "cache"),
                                   "--top-k", "1000000", "--dtype", "float32"])
    assert res.exit_code == 0, res.output
    online = train({**base, "output_dir": str(tmp_path / "online")})
    cached = train({**base, "teacher": {"path": "none", "cache": str(tmp_path / "cache"), "cross_tokenizer": True},
                    "output_dir": str(tmp_path / "cached")})
    from safetensors.torch import load_file

    a, c = (load_file(str(r / "final" / "model.safetensors")) for r in (online, cached))
    for k in a:
        torch.testing.assert_close(c[k], a[k], atol=1e-5, rtol=1e-4)
    lines = [json.loads(x) for x in (cached / "metrics.jsonl").read_text().splitlines()]
    assert [x for x in lines if x.get("type") == "train"][-1]["xtok_frac_masked"] > 0
    packed = train({**base, "teacher": {"path": "none", "cache": str(tmp_path / "cache"), "cross_tokenizer": True},
                    "data": {**base["data"], "packing": True}, "output_dir": str(tmp_path / "packed")})
    p = load_file(str(packed / "final" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(p[k], a[k], atol=1e-4, rtol=1e-4)  # Adam's first steps: sign-like, so 1e-4
    other = save_model(_tiny(byte_tokenizer(), 5), byte_tokenizer(), tmp_path / "other-teacher")
    with pytest.raises(HPDError, match="teacher's tokenizer differs"):
        train({**base, "teacher": {"path": str(other), "cache": str(tmp_path / "cache"), "cross_tokenizer": True},
               "output_dir": str(tmp_path / "refused")})


def test_packed_and_streamed_runs_across_tokenizers(bpe, tmp_path):
    """data.packing: the maps are packed like the labels, so a packed step gives the padded step's loss and
    gradients; data.streaming: the teacher prompts come with each streamed example, and training runs."""
    from hpd.teachers.cross_tokenizer import CrossTokenizerTeacher
    from hpd.training.trainer import train

    teacher, student, tdir, sdir, examples = _pair(bpe, tmp_path)
    examples = examples[:5]
    for name in ("hpd", "uld"):
        src = CrossTokenizerTeacher(teacher, bpe, byte_tokenizer(), torch.device("cpu"),
                                    whole_spans=get_objective(name).support != "vocab")
        (a, ga, ba), (c, gc, bc) = (_loss_and_grad(student, src, examples, list(range(5)), name, pack=p, pack_length=400)
                                    for p in (False, True))
        assert bc.packing is not None and bc.labels.shape[0] < ba.labels.shape[0]  # several rows per packed row
        assert ba.num_active == bc.num_active
        assert float(c.loss) == pytest.approx(float(a.loss), rel=1e-5)
        for x, y in zip(gc, ga):
            torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-4)
    cfg = {"student": {"path": str(sdir)}, "teacher": {"path": str(tdir), "cross_tokenizer": True},
           "data": {"train": SHIPPED, "eval": SHIPPED, "max_length": 64, "streaming": True}, "objective": {"name": "hpd"},
           "optim": {"batch_size": 4}, "max_steps": 2, "log": {"progress": False, "tensorboard": "off"},
           "output_dir": str(tmp_path / "streamed")}
    run = train(cfg)
    step = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"train"' in x][-1]
    assert math.isfinite(step["loss"]) and 0.0 < step["xtok_frac_masked"] < 1.0

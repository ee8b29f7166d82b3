"""`hpdk`: HPD's token set plus the teacher's top-k, against the spec written out independently.

The reference weights here are computed in plain Python floats (float64) from `docs/objectives.md`,
position by position, not with the library's helpers.
"""

from __future__ import annotations

import math

import pytest
import torch

from hpd.errors import HPDError
from hpd.objectives import GatheredTeacher, HeadTeacher, RatioClip, TeacherChunk, TopKTeacher, get_objective, rollout_weights

D = torch.float64
pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")


def spec_weights(logq: list[float], logp: list[float], y: int, y_hat: int, k: int) -> dict[int, float]:
    """token -> weight at one position, from the spec (a token in several columns: its weights summed)."""
    q, p = [math.exp(x) for x in logq], [math.exp(x) for x in logp]
    r = q[y] * (logp[y] - logq[y])
    r_hat = q[y_hat] * (logp[y_hat] - logq[y_hat])
    A, B = r > 0, r_hat < 0
    w = {y: r + (p[y] if A else 0.0) + (p[y] if A and B else 0.0)}
    w[y_hat] = w.get(y_hat, 0.0) + (r_hat if B and y_hat != y else 0.0)
    for v in sorted(range(len(p)), key=lambda v: -p[v])[:k]:
        if v in (y, y_hat):
            continue  # weight 0 in its top-k column
        r_v = q[v] * (logp[v] - logq[v])
        w[v] = w.get(v, 0.0) + r_v + (p[v] if r_v > 0 else 0.0)
    return w


def spec_surrogate(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, y_hat: torch.Tensor, k: int) -> torch.Tensor:
    """-(1/N) sum_t sum_v w_t(v) log q(v) with the spec's weights (constants), autograd-able in `s`."""
    logq, logp = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    terms = []
    for b in range(y.shape[0]):
        for i in range(y.shape[1]):
            if y[b, i] == -100:
                continue
            w = spec_weights(logq[b, i].tolist(), logp[b, i].tolist(), int(y[b, i]), int(y_hat[b, i]), k)
            terms.append(sum(wv * logq[b, i, v] for v, wv in w.items()))
    return -torch.stack(terms).sum() / len(terms)


def random_case(B=3, T=6, V=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = (2 * torch.randn(B, T, V, generator=g, dtype=D)).requires_grad_()
    t = 2 * torch.randn(B, T, V, generator=g, dtype=D)
    y = torch.randint(0, V, (B, T), generator=g)
    y[0, 0] = y[2, 3] = -100
    y_hat = torch.randint(0, V, (B, T), generator=g)
    y_hat[1, 1] = y[1, 1]  # a sample equal to the data token
    # Positions where the data token, or the sample, is the teacher's most probable token.
    top1 = t.argmax(-1)
    y[1, 2], y_hat[2, 0] = top1[1, 2], top1[2, 0]
    return s, t, y, y_hat


def grad_of(loss, x):
    (g,) = torch.autograd.grad(loss, x)
    return g


# --- (1) topk = 0 is hpd, bit for bit ---------------------------------------------------------------

@pytest.mark.parametrize("chunked", [False, True])
def test_topk_0_is_hpd_exactly(chunked):
    g = torch.Generator().manual_seed(1)
    h, W = torch.randn(2, 7, 6, generator=g, dtype=D, requires_grad=True), torch.randn(11, 6, generator=g, dtype=D, requires_grad=True)
    th, tW = torch.randn(2, 7, 6, generator=g, dtype=D), torch.randn(11, 6, generator=g, dtype=D)
    y = torch.randint(0, 11, (2, 7), generator=g)
    y[0, :2] = -100
    outs = []
    for obj in (get_objective("hpd"), get_objective("hpdk", topk=0)):
        gen = torch.Generator().manual_seed(3)
        if chunked:
            out = obj.chunked(h, W, HeadTeacher(th, tW), y, chunk_size=4, generator=gen)
        else:
            out = obj(h @ W.T, th @ tW.T, y, generator=gen)
        outs.append((out, torch.autograd.grad(out.loss, (h, W))))
    (a, ga), (b, gb) = outs
    assert torch.equal(a.loss, b.loss) and torch.equal(a.value, b.value) and a.metrics == b.metrics
    assert all(torch.equal(x, z) for x, z in zip(ga, gb))


def test_topk_0_works_with_a_gathered_teacher():
    s, t, y, y_hat = random_case()
    tokens = torch.stack([y.clamp_min(0), y_hat], -1)
    gathered = GatheredTeacher(tokens, torch.log_softmax(t, -1).gather(-1, tokens))
    a = get_objective("hpd")(s, gathered, y, sampled_tokens=y_hat)
    b = get_objective("hpdk", topk=0)(s, gathered, y, sampled_tokens=y_hat)
    assert torch.equal(a.loss, b.loss)


# --- (2) the weights on a hand-built example ----------------------------------------------------------

# Three positions, V = 6, k = 3 (probabilities chosen without ties in the teacher's top 4).
P = [[0.50, 0.20, 0.15, 0.10, 0.03, 0.02],   # the teacher's top-1 is y = 0; y_hat = 2 is in the top 3
     [0.06, 0.68, 0.12, 0.05, 0.05, 0.04],   # y = 0 is wrong (the teacher prefers 1); y_hat = 3
     [0.30, 0.25, 0.20, 0.12, 0.08, 0.05]]   # y = y_hat = 4, outside the top 3
Q = [[0.10, 0.30, 0.10, 0.20, 0.20, 0.10],
     [0.40, 0.10, 0.10, 0.20, 0.10, 0.10],
     [0.05, 0.40, 0.25, 0.10, 0.10, 0.10]]
Y, Y_HAT = [0, 0, 4], [2, 3, 4]


def test_weights_on_a_hand_built_example_equal_the_spec():
    logq, logp = torch.tensor(Q, dtype=D).log(), torch.tensor(P, dtype=D).log()
    y, y_hat = torch.tensor(Y), torch.tensor(Y_HAT)
    tw = get_objective("hpdk", topk=3).weights(logq, TeacherChunk(logp), y, y_hat)
    assert tw.tokens.tolist() == [[0, 2, 0, 1, 2], [0, 3, 1, 2, 0], [4, 4, 0, 1, 2]]  # y, y_hat, then the top 3
    for i in range(3):
        expected = spec_weights(logq[i].tolist(), logp[i].tolist(), Y[i], Y_HAT[i], 3)
        got: dict[int, float] = {}
        for v, w in zip(tw.tokens[i].tolist(), tw.weights[i].tolist()):
            got[v] = got.get(v, 0.0) + w
        assert got.keys() == expected.keys()
        for v in got:
            assert got[v] == pytest.approx(expected[v], rel=1e-12, abs=1e-15), (i, v)
    w = tw.weights
    # Top-k columns holding y (positions 0 and 1) or y_hat (position 0) weigh nothing.
    assert w[0, 2] == 0 and w[0, 4] == 0 and w[1, 4] == 0
    # The teacher's preferred token at the wrong-y position: its reverse-KL weight plus p(v).
    assert float(w[1, 2]) == pytest.approx(0.10 * math.log(0.68 / 0.10) + 0.68, rel=1e-12)
    # An over-produced top-k token is pushed down by its reverse-KL weight alone.
    assert float(w[0, 3]) == pytest.approx(0.30 * math.log(0.20 / 0.30), rel=1e-12) and float(w[0, 3]) < 0
    # The data token keeps HPD's weight: w(y) = r < 0 where the teacher rejects it.
    assert float(w[1, 0]) == pytest.approx(0.40 * math.log(0.06 / 0.40), rel=1e-12)
    assert tw.stats["frac_teacher_top1_is_y"].tolist() == [1.0, 0.0, 0.0]
    assert tw.stats["topk_push"].tolist() == pytest.approx([0.0, float(w[1, 2] + w[1, 3]), float(w[2, 2])], rel=1e-12)


# --- (3) the gradient is that of the spec's surrogate -------------------------------------------------

@pytest.mark.parametrize("k", [1, 4, 13, 20])
def test_gradient_equals_autograd_of_the_spec_surrogate(k):
    s, t, y, y_hat = random_case()
    out = get_objective("hpdk", topk=k)(s, t, y, sampled_tokens=y_hat)
    ref = spec_surrogate(s, t, y, y_hat, k)
    assert float(out.loss) == pytest.approx(float(ref), rel=1e-10)
    torch.testing.assert_close(grad_of(out.loss, s), grad_of(ref, s), atol=1e-6, rtol=1e-6)
    hpd = get_objective("hpd")(s, t, y, sampled_tokens=y_hat)
    assert float(out.value) == float(hpd.value)  # HPD's value
    assert {k: v for k, v in out.metrics.items() if k in hpd.metrics} == hpd.metrics


def test_mixed_hpdk_is_ce_plus_the_scaled_spec_surrogate():
    s, t, y, y_hat = random_case(seed=2)
    out = get_objective("hpdk", topk=3, ce_weight=1.0, kd_weight=0.1)(s, t, y, sampled_tokens=y_hat)
    m = y != -100
    ce = -torch.log_softmax(s, -1).gather(-1, y.clamp_min(0)[..., None]).squeeze(-1)[m].mean()
    torch.testing.assert_close(grad_of(out.loss, s), grad_of(ce + 0.1 * spec_surrogate(s, t, y, y_hat, 3), s),
                               atol=1e-10, rtol=1e-8)


# --- (4) the chunked path ------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk_size", [1, 3, 100])
@pytest.mark.parametrize("teacher_kind", ["head", "cache"])
def test_chunked_equals_unchunked(chunk_size, teacher_kind):
    g = torch.Generator().manual_seed(4)
    B, T, H, V = 3, 7, 6, 17
    h, W = torch.randn(B, T, H, generator=g, dtype=D, requires_grad=True), torch.randn(V, H, generator=g, dtype=D, requires_grad=True)
    bias = torch.randn(V, generator=g, dtype=D, requires_grad=True)
    th, tW = torch.randn(B, T, H, generator=g, dtype=D), torch.randn(V, H, generator=g, dtype=D)
    y = torch.randint(0, V, (B, T), generator=g)
    y[0, :3] = -100
    logits = th @ tW.T
    teacher = HeadTeacher(th, tW) if teacher_kind == "head" else topk_teacher(logits, y, 6)
    obj = get_objective("hpdk", topk=4, temperature=1.0 if teacher_kind == "cache" else 1.5)
    ref = obj(h @ W.T + bias, logits if teacher_kind == "head" else teacher, y, generator=torch.Generator().manual_seed(2))
    out = obj.chunked(h, W, teacher, y, lm_head_bias=bias, chunk_size=chunk_size, generator=torch.Generator().manual_seed(2))
    assert float(out.loss) == pytest.approx(float(ref.loss), rel=1e-10, abs=1e-12)
    assert out.metrics.keys() == ref.metrics.keys()
    for key, val in ref.metrics.items():
        assert out.metrics[key] == pytest.approx(val, rel=1e-9, abs=1e-12), key
    for a, c in zip(torch.autograd.grad(out.loss, (h, W, bias)), torch.autograd.grad(ref.loss, (h, W, bias))):
        torch.testing.assert_close(a, c, atol=1e-10, rtol=1e-8)


# --- (5) a teacher read from a top-K cache --------------------------------------------------------------

def topk_teacher(t, y, K):
    """What a teacher cache holds, from logits `t (B, T, V)`: exact label log-prob, top-K, tail."""
    logp = torch.log_softmax(t, -1)
    vals, ids = logp.topk(K, -1)
    tail = logp.scatter(-1, ids, float("-inf")).logsumexp(-1)
    return TopKTeacher(logp.gather(-1, y.clamp_min(0)[..., None]).squeeze(-1), ids, vals, tail, t.shape[-1])


@pytest.mark.parametrize("K,k", [(4, 4), (7, 3), (3, 5)])
def test_a_topk_cache_gives_the_full_teachers_weights_at_the_top_k(K, k):
    s, t, y, y_hat = random_case(B=4, T=8, V=11)
    m = y != -100
    logq, labels, sample = torch.log_softmax(s.detach(), -1)[m], y[m], y_hat[m]
    pos = m.reshape(-1).nonzero().squeeze(1)
    obj = get_objective("hpdk", topk=k)
    full = obj.weights(logq, TeacherChunk(torch.log_softmax(t, -1)[m]), labels, sample)
    cached = obj.weights(logq, topk_teacher(t, y, K).chunker(11, 1.0)(pos, labels), labels, sample)
    kk = min(k, K)  # a cache with fewer than k top tokens gives its K
    assert cached.weights.shape == (len(labels), 2 + kk)
    assert torch.equal(cached.tokens[:, 2:], full.tokens[:, 2:2 + kk])
    torch.testing.assert_close(cached.weights[:, 2:], full.weights[:, 2:2 + kk], rtol=1e-12, atol=1e-15)
    assert torch.equal(cached.stats["frac_teacher_top1_is_y"], full.stats["frac_teacher_top1_is_y"])
    torch.testing.assert_close(cached.stats["r"], full.stats["r"], rtol=1e-12, atol=1e-15)  # the teacher at y: exact
    # HPD's two columns as hpd reads a cache: exact where it holds y_hat (in the top-K, or y itself);
    # elsewhere the teacher at y_hat is estimated from the tail (and with it B, which w(y) reads).
    held = (topk_teacher(t, y, K).tokens[m] == sample[:, None]).any(1) | (sample == labels)
    assert held.any() and (~held).any()
    torch.testing.assert_close(cached.weights[held, :2], full.weights[held, :2], rtol=1e-12, atol=1e-15)


# --- (6) what hpdk refuses ------------------------------------------------------------------------------

def test_a_gathered_teacher_is_refused_with_what_to_pass_instead():
    s, t, y, y_hat = random_case()
    tokens = torch.stack([y.clamp_min(0), y_hat], -1)
    gathered = GatheredTeacher(tokens, torch.log_softmax(t, -1).gather(-1, tokens))
    with pytest.raises(HPDError, match=r"objective 'hpdk' reads the teacher's 8 most probable tokens, but the teacher "
                                       r"was given as log-probabilities gathered at a few tokens; pass teacher logits "
                                       r"\(B, T, V\), a HeadTeacher, or a teacher cache .*--top-k K"):
        get_objective("hpdk")(s, gathered, y, sampled_tokens=y_hat)
    with pytest.raises(HPDError, match="hpdk with a GatheredTeacher needs sampled_tokens"):
        get_objective("hpdk")(s, gathered, y)


def test_a_cache_without_top_k_and_bad_topk_values_are_refused():
    s, t, y, y_hat = random_case()
    with pytest.raises(HPDError, match="'hpdk' reads the teacher beyond the sequence token, but the teacher cache holds "
                                       "no top-K tokens: rebuild it with --top-k"):
        get_objective("hpdk")(s, topk_teacher(t, y, 0), y, sampled_tokens=y_hat)
    with pytest.raises(HPDError, match=r"topk=2.5 must be a whole number in \[0, inf\)"):
        get_objective("hpdk", topk=2.5)
    with pytest.raises(HPDError, match=r"topk=-1 is out of range"):
        get_objective("hpdk", topk=-1)


def test_the_config_key_is_objective_hpdk_topk(repo_root):
    from hpd.config import load_config
    from hpd.training.setup import objective_from_config

    cfg = load_config(repo_root / "configs/tiny.yaml", ["objective.name=hpdk", "objective.hpdk_topk=4"])
    obj = objective_from_config(cfg)
    assert obj.name == "hpdk" and obj.topk == 4
    assert objective_from_config(load_config(repo_root / "configs/tiny.yaml", ["objective.name=hpdk"])).topk == 8
    with pytest.raises(HPDError, match="objective.hpdk_topk: expected an int, got 2.5"):
        load_config(repo_root / "configs/tiny.yaml", ["objective.name=hpdk", "objective.hpdk_topk=2.5"])


# --- (7) the mechanism: a wrong data token ------------------------------------------------------------

def test_a_wrong_data_token_hands_its_mass_to_the_teachers_choice_under_hpdk_only():
    """y = 0 is wrong (the teacher puts 0.9 on v* = 1) and the student sampled y_hat = 2. One gradient
    step: HPD pushes y and y_hat down but raises v* no more than an untouched token u = 3 with the same
    q (its mass only follows the renormalization); hpdk raises v* itself."""
    p = torch.tensor([[[0.02, 0.90, 0.04, 0.02, 0.02]]], dtype=D)
    q = torch.tensor([[[0.50, 0.10, 0.20, 0.10, 0.10]]], dtype=D)
    y, y_hat, v_star, u = torch.tensor([[0]]), torch.tensor([[2]]), 1, 3
    moves = {}
    for name, params in (("hpd", {}), ("hpdk", {"topk": 2})):
        z = q.log().clone().requires_grad_()
        out = get_objective(name, **params)(z, p.log(), y, sampled_tokens=y_hat, check_alignment=False)
        out.loss.backward()
        new = torch.log_softmax(z.detach() - 0.5 * z.grad, -1)[0, 0]
        old = q.log()[0, 0]
        moves[name] = (float(new[v_star] - old[v_star]), float((new[v_star] - new[u]) - (old[v_star] - old[u])))
    (hpd_rise, hpd_gain), (hpdk_rise, hpdk_gain) = moves["hpd"], moves["hpdk"]
    assert abs(hpd_gain) < 1e-12  # HPD: v* gains nothing on an untouched token
    assert hpdk_gain > 0.3  # hpdk: v* gains on it
    assert hpdk_rise > hpd_rise + 0.3


# --- rollout reuse: the weights over 2 + k tokens are fixed and clipped like HPD's --------------------

def test_rollout_weights_carry_the_top_k_columns():
    g = torch.Generator().manual_seed(1)
    hidden, W = torch.randn(2, 6, 8, generator=g), torch.randn(11, 8, generator=g)
    teacher = torch.randn(2, 6, 11, generator=g)
    labels = torch.randint(0, 11, (2, 6), generator=g)
    labels[0, :2] = -100
    obj = get_objective("hpdk", topk=3)
    rw, _ = rollout_weights(obj, hidden, W, teacher, labels, chunk_size=4, generator=torch.Generator().manual_seed(5))
    assert rw.weights.shape == rw.tokens.shape == (2, 6, 5)
    active = labels >= 0
    assert torch.equal(rw.tokens[..., 2:][active], teacher.topk(3, -1).indices[active])
    # At the rollout policy (ratio 1, nothing clipped) the PPO loss has the plain surrogate's gradient.
    h1 = hidden.clone().requires_grad_(True)
    sampled = rw.tokens[..., 1].masked_fill(~active, -100)
    obj.chunked(h1, W, teacher, labels, chunk_size=4, sampled_tokens=sampled).loss.backward()
    h2 = hidden.clone().requires_grad_(True)
    obj.chunked(h2, W, None, labels, chunk_size=4, rollout=rw, clip=RatioClip()).loss.backward()
    torch.testing.assert_close(h2.grad, h1.grad, rtol=1e-6, atol=1e-7)

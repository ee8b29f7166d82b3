"""Objective core: every objective against an independent closed form, in float64.

The closed forms here are written from `docs/objectives.md` with plain probabilities, not
with the library's helpers, so a wrong weight in the library cannot hide behind a shared bug.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hpd.errors import HPDError
from hpd.objectives import (
    OBJECTIVES, GatheredTeacher, HeadTeacher, TopKTeacher, get_objective, reduce_metrics, resolve_shared_vocab,
)

D = torch.float64
# The tests read values of differentiable losses with float(); that is what they mean to do.
pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")
VOCAB_OBJECTIVES = ["fkl", "rkl", "jsd", "skl", "srkl", "tvd", "akl", "todi", "abkl"]
# (alpha, beta) of abkl: the general case with either sign, and every limit (alpha, beta or alpha + beta -> 0).
ABKL_PARAMS = [(1.0, 1.0), (0.5, 0.5), (2.0, -0.5), (-0.5, 1.5), (-0.3, -0.4), (1.0, 0.0), (0.3, 0.0), (0.0, 1.0),
               (0.0, -0.6), (0.7, -0.7), (-1.2, 1.2), (0.0, 0.0)]


def make_batch(B=3, T=6, V=13, seed=0, masked=((0, 0), (2, 5), (1, 2))):
    g = torch.Generator().manual_seed(seed)
    s = (2 * torch.randn(B, T, V, generator=g, dtype=D)).requires_grad_()
    t = 2 * torch.randn(B, T, V, generator=g, dtype=D)
    y = torch.randint(0, V, (B, T), generator=g)
    for b, i in masked:
        y[b, i] = -100
    return s, t, y


def kl_rows(a, b):
    """KL(a || b) for probability rows."""
    return (a * (a.log() - b.log())).sum(-1)


def closed_form(name, s, t, y, **params):
    """Mean over active positions of the objective's divergence, from probabilities (autograd-able)."""
    m = y != -100
    q = torch.softmax(s, -1)[m]
    p = torch.softmax(t, -1)[m]
    if name == "fkl":
        per = kl_rows(p, q)
    elif name == "rkl":
        per = kl_rows(q, p)
    elif name == "jsd":
        beta = params.get("beta", 0.5)
        if beta == 0:
            per = kl_rows(p, q)
        elif beta == 1:
            per = kl_rows(q, p)
        else:
            mix = beta * p + (1 - beta) * q
            per = beta * kl_rows(p, mix) + (1 - beta) * kl_rows(q, mix)
    elif name == "skl":
        a = params.get("alpha", 0.1)
        per = kl_rows(p, a * p + (1 - a) * q)
    elif name == "srkl":
        a = params.get("alpha", 0.1)
        per = kl_rows(q, (1 - a) * p + a * q)
    elif name == "tvd":
        per = 0.5 * (p - q).abs().sum(-1)
    elif name == "akl":
        mu = params.get("mu", 0.5)
        per = []
        for pi, qi in zip(p, q):
            order = sorted(range(len(pi)), key=lambda v: -float(pi[v]))
            head, cum = set(), 0.0
            for rank, v in enumerate(order):
                cum += float(pi[v])
                if rank == 0 or cum <= mu:
                    head.add(v)
            gap = (pi - qi).abs().detach()
            g_head = sum(float(gap[v]) for v in head) / float(gap.sum())
            per.append(g_head * kl_rows(pi, qi) + (1 - g_head) * kl_rows(qi, pi))
        per = torch.stack(per)
    elif name == "todi":
        beta = params.get("beta", 1.0)
        a = torch.sigmoid(beta * (p.log() - q.log())).detach()
        per = (a * p * (p.log() - q.log()) + (1 - a) * q * (q.log() - p.log())).sum(-1)
    elif name == "abkl":
        per = abkl_rows(p, q, params.get("alpha", 1.0), params.get("beta", 1.0))
    else:
        raise KeyError(name)
    return per.sum() / m.sum()


def abkl_rows(p, q, a, b):
    """The alpha-beta divergence of the spec, case by case, for probability rows."""
    if a != 0 and b != 0 and a + b != 0:
        s = a + b
        return -(p ** a * q ** b - a / s * p ** s - b / s * q ** s).sum(-1) / (a * b)
    if a != 0 and b == 0:
        return (p ** a * (p ** a / q ** a).log() - p ** a + q ** a).sum(-1) / a ** 2
    if a == 0 and b != 0:
        return (q ** b * (q ** b / p ** b).log() - q ** b + p ** b).sum(-1) / b ** 2
    if a != 0:  # a = -b
        return ((q ** a / p ** a).log() + (q ** a / p ** a) ** -1 - 1).sum(-1) / a ** 2
    return 0.5 * ((q.log() - p.log()) ** 2).sum(-1)


def hpd_reference(s, t, y, y_hat):
    """The spec's HPD formula, position by position in plain Python: (surrogate loss, value)."""
    logq, logp = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    terms, values, n = [], [], 0
    for b in range(y.shape[0]):
        for i in range(y.shape[1]):
            if y[b, i] == -100:
                continue
            n += 1
            yy, yh = int(y[b, i]), int(y_hat[b, i])
            sv, tv = logq[b, i, yy], float(logp[b, i, yy])
            sh, th = logq[b, i, yh], float(logp[b, i, yh])
            r = math.exp(float(sv)) * (tv - float(sv))
            rh = math.exp(float(sh)) * (th - float(sh))
            A, Bf = r > 0, rh < 0
            w_y = r + (math.exp(tv) if A else 0.0) + (math.exp(tv) if (A and Bf) else 0.0)
            w_h = rh if (Bf and yh != yy) else 0.0
            terms.append(w_y * sv + w_h * sh)
            values.append(float(sh) - th)
    return -torch.stack(terms).sum() / n, sum(values) / n


def grad_of(loss, x):
    (g,) = torch.autograd.grad(loss, x)
    return g


# --- registry -----------------------------------------------------------------------------------

def test_registry_lists_every_objective():
    assert set(OBJECTIVES) == {"sft", "fkl", "rkl", "jsd", "skl", "srkl", "tvd", "akl", "todi", "abkl", "orkl", "hpd",
                               "hpdk", "uld"}


def test_every_objective_parameter_has_its_config_field():
    from hpd.config import OBJECTIVE_NAMES, OBJECTIVE_PARAM_FIELDS, ObjectiveConfig

    assert set(OBJECTIVE_NAMES) == set(OBJECTIVES)
    fields = set(ObjectiveConfig.__dataclass_fields__)
    for name, cls in OBJECTIVES.items():
        mapping = OBJECTIVE_PARAM_FIELDS.get(name, {})
        assert set(mapping) == set(cls.params), name
        assert set(mapping.values()) <= fields, name
        for param, key in mapping.items():  # the config's default is the objective's
            assert ObjectiveConfig.__dataclass_fields__[key].default == cls.params[param].default, (name, param)


def test_unknown_name_lists_allowed():
    with pytest.raises(ValueError, match="choose one of: sft, fkl"):
        get_objective("kld")


@pytest.mark.parametrize("name,params,match", [
    ("jsd", {"beta": 1.5}, r"beta=1.5 is out of range; allowed: \[0, 1\]"),
    ("skl", {"alpha": 1.0}, r"allowed: \[0, 1\)"),
    ("akl", {"mu": 0.0}, r"allowed: \(0, 1\]"),
    ("todi", {"beta": -1}, r"allowed: \(0, inf\)"),
    ("fkl", {"temperature": 0}, r"temperature=0 is out of range"),
    ("fkl", {"beta": 0.5}, r"no parameter beta; its parameters: temperature in \(0, inf\)"),
])
def test_bad_parameters_say_what_is_allowed(name, params, match):
    with pytest.raises(ValueError, match=match):
        get_objective(name, **params)


# --- gradients against closed forms -------------------------------------------------------------

@pytest.mark.parametrize("name,params", [
    ("fkl", {}), ("rkl", {}), ("jsd", {}), ("jsd", {"beta": 0.1}), ("jsd", {"beta": 0.0}), ("jsd", {"beta": 1.0}),
    ("skl", {}), ("skl", {"alpha": 0.0}), ("skl", {"alpha": 0.7}), ("srkl", {}), ("srkl", {"alpha": 0.5}),
    ("tvd", {}), ("akl", {}), ("akl", {"mu": 0.9}), ("todi", {}), ("todi", {"beta": 3.0}),
    *[("abkl", {"alpha": a, "beta": b}) for a, b in ABKL_PARAMS],
])
def test_vocab_objective_gradient_equals_closed_form(name, params):
    s, t, y = make_batch()
    out = get_objective(name, **params)(s, t, y)
    ref = closed_form(name, s, t, y, **params)
    assert float(out.value) == pytest.approx(float(ref.detach()), rel=1e-9, abs=1e-12)
    torch.testing.assert_close(grad_of(out.loss, s), grad_of(ref, s), atol=1e-6, rtol=1e-6)


def test_fkl_and_rkl_values_match_torch_kl_div():
    s, t, y = make_batch()
    m = y != -100
    logq, logp = torch.log_softmax(s, -1)[m], torch.log_softmax(t, -1)[m]
    n = int(m.sum())
    fkl = F.kl_div(logq, logp, log_target=True, reduction="sum") / n
    rkl = F.kl_div(logp, logq, log_target=True, reduction="sum") / n
    assert float(get_objective("fkl")(s, t, y).value) == pytest.approx(float(fkl.detach()), rel=1e-10)
    assert float(get_objective("rkl")(s, t, y).value) == pytest.approx(float(rkl.detach()), rel=1e-10)


def test_temperature_scales_both_distributions():
    s, t, y = make_batch()
    tau = 2.5
    out = get_objective("fkl", temperature=tau)(s, t, y)
    ref = closed_form("fkl", s / tau, t / tau, y)
    torch.testing.assert_close(grad_of(out.loss, s), grad_of(ref, s), atol=1e-7, rtol=1e-6)


def test_sft_is_cross_entropy():
    s, t, y = make_batch()
    out = get_objective("sft")(s, None, y)
    ref = F.cross_entropy(s.reshape(-1, s.shape[-1]), y.reshape(-1), ignore_index=-100)
    assert float(out.loss) == pytest.approx(float(ref), rel=1e-12)
    torch.testing.assert_close(grad_of(out.loss, s), grad_of(ref, s), atol=1e-9, rtol=1e-9)


def test_orkl_is_reinforce_with_the_log_ratio_reward_and_unbiased_for_reverse_kl():
    s, t, _ = make_batch(B=1, T=1, V=7, masked=())
    obj = get_objective("orkl")
    logq, logp = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    # One sample: the per-token advantage form -(log p(y) - log q(y)) log q(y).
    y = torch.tensor([[3]])
    ref = -(logp[0, 0, 3] - logq[0, 0, 3]).detach() * logq[0, 0, 3]
    torch.testing.assert_close(grad_of(obj(s, t, y).loss, s), grad_of(ref, s), atol=1e-12, rtol=1e-10)
    # Its expectation over y ~ q is exactly the reverse-KL gradient.
    q = logq.exp().detach()[0, 0]
    expected = sum(q[v] * grad_of(obj(s, t, torch.tensor([[v]])).loss, s) for v in range(7))
    torch.testing.assert_close(expected, grad_of(closed_form("rkl", s, t, torch.zeros(1, 1, dtype=torch.long)), s),
                               atol=1e-10, rtol=1e-8)


def test_hpd_with_fixed_samples_equals_spec_formula():
    s, t, y = make_batch(B=3, T=7, V=9, seed=3)
    y_hat = torch.randint(0, 9, y.shape, generator=torch.Generator().manual_seed(5))
    y_hat[0, 1] = y[0, 1]  # a sample equal to the sequence token
    out = get_objective("hpd")(s, t, y, sampled_tokens=y_hat)
    ref_loss, ref_value = hpd_reference(s, t, y, y_hat)
    assert float(out.loss) == pytest.approx(float(ref_loss), rel=1e-10)
    assert float(out.value) == pytest.approx(ref_value, rel=1e-6)
    torch.testing.assert_close(grad_of(out.loss, s), grad_of(ref_loss, s), atol=1e-10, rtol=1e-8)


def test_hpd_weights_each_case():
    """One position per case of (A, B), built so each indicator is known."""
    V = 4
    # teacher likes token 0; the student under-covers it (A) and over-produces token 1 (B).
    t = torch.log(torch.tensor([[[0.7, 0.1, 0.1, 0.1]]], dtype=D))
    s = torch.log(torch.tensor([[[0.1, 0.7, 0.1, 0.1]]], dtype=D)).requires_grad_()
    y, y_hat = torch.tensor([[0]]), torch.tensor([[1]])
    out = get_objective("hpd")(s, t, y, sampled_tokens=y_hat)
    m = out.metrics
    assert (m["frac_A"], m["frac_B"], m["frac_A_and_B"], m["frac_sample_differs"]) == (1.0, 1.0, 1.0, 1.0)
    r = 0.1 * math.log(0.7 / 0.1)
    r_hat = 0.7 * math.log(0.1 / 0.7)
    assert m["r_mean"] == pytest.approx(r) and m["r_hat_min"] == pytest.approx(r_hat)
    # gradient of -(w_y log q(0) + w_hat log q(1)) w.r.t. logits: -(w - q sum w)
    w = torch.tensor([r + 2 * 0.7, r_hat, 0, 0], dtype=D)
    q = torch.tensor([0.1, 0.7, 0.1, 0.1], dtype=D)
    torch.testing.assert_close(grad_of(out.loss, s)[0, 0], -(w - q * w.sum()), atol=1e-12, rtol=1e-10)
    # Swap roles: the student over-covers y (r < 0, not A), its sample is under-produced (not B).
    out = get_objective("hpd")(s, t, torch.tensor([[1]]), sampled_tokens=torch.tensor([[0]]))
    m = out.metrics
    assert (m["frac_A"], m["frac_B"], m["frac_A_and_B"]) == (0.0, 0.0, 0.0)
    w = torch.tensor([0, 0.7 * math.log(0.1 / 0.7), 0, 0], dtype=D)
    torch.testing.assert_close(grad_of(out.loss, s)[0, 0], -(w - q * w.sum()), atol=1e-12, rtol=1e-10)


def test_hpd_reports_spec_metrics():
    s, t, y = make_batch()
    m = get_objective("hpd")(s, t, y, generator=torch.Generator().manual_seed(0)).metrics
    for key in ["ce", "frac_A", "frac_B", "frac_sample_differs", "frac_A_and_B",
                "r_mean", "r_min", "r_max", "r_hat_mean", "r_hat_min", "r_hat_max"]:
        assert key in m and math.isfinite(m[key]), key
    assert m["r_min"] <= m["r_mean"] <= m["r_max"]


# --- properties -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", VOCAB_OBJECTIVES + ["orkl", "hpd"])
def test_identical_teacher_and_student_give_zero_divergence_and_gradient(name):
    s, _, y = make_batch()
    out = get_objective(name)(s, s.detach().clone(), y, generator=torch.Generator().manual_seed(1))
    assert abs(float(out.value)) < 1e-12
    assert grad_of(out.loss, s).abs().max() < 1e-12
    assert out.metrics["agreement"] == 1.0


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
@pytest.mark.parametrize("chunked", [False, True])
def test_all_masked_batch_gives_finite_zero_loss_and_zero_gradient(name, chunked):
    B, T, H, V = 2, 4, 5, 11
    h = torch.randn(B, T, H, dtype=D, requires_grad=True)
    W = torch.randn(V, H, dtype=D, requires_grad=True)
    teacher = torch.randn(B, T, V, dtype=D)
    y = torch.full((B, T), -100)
    obj = get_objective(name)
    if chunked:
        out = obj.chunked(h, W, teacher, y, chunk_size=3)
    else:
        out = obj(h @ W.T, teacher, y)
    assert float(out.loss) == 0.0 and float(out.value) == 0.0 and int(out.num_active) == 0
    gh, gw = torch.autograd.grad(out.loss, (h, W))
    assert gh.abs().max() == 0 and gw.abs().max() == 0
    assert all(math.isnan(v) for v in out.metrics.values())


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_num_tokens_scales_exactly(name):
    s, t, y = make_batch()
    n = int((y != -100).sum())
    obj = get_objective(name)
    a = obj(s, t, y, generator=torch.Generator().manual_seed(2))
    b = obj(s, t, y, num_tokens=4 * n, generator=torch.Generator().manual_seed(2))
    assert float(b.loss) * 4 == pytest.approx(float(a.loss), rel=1e-12)
    torch.testing.assert_close(grad_of(b.loss, s) * 4, grad_of(a.loss, s), rtol=1e-12, atol=1e-15)


def test_micro_batches_with_global_count_equal_one_batch():
    s, t, y = make_batch(B=4)
    n = int((y != -100).sum())
    obj = get_objective("fkl")
    whole = obj(s, t, y)
    parts = [obj(s[i:i + 2], t[i:i + 2], y[i:i + 2], num_tokens=n) for i in (0, 2)]
    assert float(sum(p.loss for p in parts)) == pytest.approx(float(whole.loss), rel=1e-12)
    assert reduce_metrics(parts)["kl"] == pytest.approx(whole.metrics["kl"], rel=1e-9)


def test_masking_is_exact():
    """Changing anything at an ignored position changes neither loss nor any gradient."""
    s, t, y = make_batch()
    for name in ["fkl", "hpd", "akl"]:
        obj = get_objective(name)
        a = obj(s, t, y, generator=torch.Generator().manual_seed(0))
        t2, y2 = t.clone(), y.clone()
        t2[0, 0] += 100 * torch.randn(t.shape[-1], dtype=D)
        s2 = s.detach().clone()
        s2[0, 0] += 5.0
        s2.requires_grad_()
        b = obj(s2, t2, y2, generator=torch.Generator().manual_seed(0))
        assert float(a.loss) == pytest.approx(float(b.loss), rel=1e-12)
        ga, gb = grad_of(a.loss, s), grad_of(b.loss, s2)
        assert gb[0, 0].abs().max() == 0
        torch.testing.assert_close(ga, gb)


# --- sampling ---------------------------------------------------------------------------------

def test_seeded_sampling_is_reproducible_and_seed_dependent():
    s, t, y = make_batch(B=4, T=16, V=50)
    obj = get_objective("hpd")
    a = obj(s, t, y, generator=torch.Generator().manual_seed(7))
    b = obj(s, t, y, generator=torch.Generator().manual_seed(7))
    c = obj(s, t, y, generator=torch.Generator().manual_seed(8))
    assert float(a.loss) == float(b.loss) and a.metrics == b.metrics
    assert float(a.loss) != float(c.loss)


def test_student_sample_follows_the_student_distribution():
    """Many positions with the same logits: the empirical frequencies of y_hat match q."""
    V, n = 5, 20000
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5], dtype=D)
    s = logits.expand(1, n, V).clone()
    t = torch.zeros(1, n, V, dtype=D)  # uniform teacher
    y = torch.zeros(1, n, dtype=torch.long)
    out = get_objective("hpd")(s, t, y, generator=torch.Generator().manual_seed(0))
    q = torch.softmax(logits, -1)
    # y_hat differs from y=0 with probability 1 - q(0).
    assert out.metrics["frac_sample_differs"] == pytest.approx(1 - float(q[0]), abs=0.012)
    # B = [q(y_hat) (log p - log q)(y_hat) < 0] holds exactly for tokens with q > 1/V.
    assert out.metrics["frac_B"] == pytest.approx(float(q[q > 1 / V].sum()), abs=0.012)


# --- chunked path -----------------------------------------------------------------------------

def _head_case(seed=0, B=3, T=7, H=6, V=17, bias=True, dtype=D):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=g, dtype=dtype).requires_grad_()
    W = torch.randn(V, H, generator=g, dtype=dtype).requires_grad_()
    b = torch.randn(V, generator=g, dtype=dtype).requires_grad_() if bias else None
    th, tW = torch.randn(B, T, H, generator=g, dtype=dtype), torch.randn(V, H, generator=g, dtype=dtype)
    y = torch.randint(0, V, (B, T), generator=g)
    y[0, :3] = -100
    y[2, -1] = -100
    return h, W, b, th, tW, y


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
@pytest.mark.parametrize("chunk_size", [1, 4, 1000])
def test_chunked_equals_unchunked(name, chunk_size):
    h, W, b, th, tW, y = _head_case()
    obj = get_objective(name, temperature=1.5) if name != "sft" else get_objective(name)
    ref = obj(h @ W.T + b, th @ tW.T, y, generator=torch.Generator().manual_seed(3))
    out = obj.chunked(h, W, HeadTeacher(th, tW), y, lm_head_bias=b, chunk_size=chunk_size,
                      generator=torch.Generator().manual_seed(3))
    assert float(out.loss) == pytest.approx(float(ref.loss), rel=1e-10, abs=1e-12)
    assert float(out.value) == pytest.approx(float(ref.value), rel=1e-6, abs=1e-9)
    for key, val in ref.metrics.items():
        assert out.metrics[key] == pytest.approx(val, rel=1e-6, abs=1e-9), key
    g_ref = torch.autograd.grad(ref.loss, (h, W, b))
    g_out = torch.autograd.grad(out.loss, (h, W, b))
    for a, c in zip(g_out, g_ref):
        torch.testing.assert_close(a, c, atol=1e-10, rtol=1e-8)


def test_chunked_with_teacher_logits_and_without_bias():
    h, W, _, th, tW, y = _head_case(bias=False)
    obj = get_objective("jsd", beta=0.3)
    ref = obj(h @ W.T, th @ tW.T, y)
    out = obj.chunked(h, W, th @ tW.T, y, chunk_size=5)
    torch.testing.assert_close(torch.autograd.grad(out.loss, (h, W)), torch.autograd.grad(ref.loss, (h, W)))


def test_chunked_bf16_runs_in_float32_and_keeps_dtypes():
    h, W, _, th, tW, y = _head_case(bias=False, dtype=torch.float32)
    hb, Wb = h.detach().bfloat16().requires_grad_(), W.detach().bfloat16().requires_grad_()
    out = get_objective("hpd").chunked(hb, Wb, HeadTeacher(th.bfloat16(), tW.bfloat16()), y, chunk_size=4,
                                       generator=torch.Generator().manual_seed(0))
    assert out.loss.dtype == torch.float32
    gh, gw = torch.autograd.grad(out.loss, (hb, Wb))
    assert gh.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16 and torch.isfinite(gw.float()).all()


# --- gathered teachers and vocabularies ---------------------------------------------------------

def test_one_hot_objectives_accept_gathered_teacher_logprobs():
    s, t, y = make_batch()
    logp = torch.log_softmax(t, -1)
    y_safe = y.clamp_min(0)
    y_hat = torch.randint(0, t.shape[-1], y.shape, generator=torch.Generator().manual_seed(0))
    for name in ["sft", "orkl", "hpd"]:
        obj = get_objective(name)
        full = obj(s, t, y, sampled_tokens=y_hat)
        tokens = torch.stack([y_safe, y_hat], -1)
        gathered = GatheredTeacher(tokens, logp.gather(-1, tokens))
        sparse = obj(s, gathered, y, sampled_tokens=y_hat)
        assert float(sparse.loss) == pytest.approx(float(full.loss), rel=1e-12)
        torch.testing.assert_close(grad_of(sparse.loss, s), grad_of(full.loss, s))


def test_gathered_teacher_errors_say_what_is_missing():
    s, t, y = make_batch()
    logp = torch.log_softmax(t, -1)
    tokens = y.clamp_min(0)[..., None]
    gathered = GatheredTeacher(tokens, logp.gather(-1, tokens))
    with pytest.raises(HPDError, match="needs the teacher's full distribution"):
        get_objective("fkl")(s, gathered, y)
    with pytest.raises(HPDError, match="needs sampled_tokens"):
        get_objective("hpd")(s, gathered, y)
    with pytest.raises(HPDError, match="gathered at other tokens"):
        get_objective("hpd")(s, gathered, y, sampled_tokens=(y.clamp_min(0) + 1) % s.shape[-1])


def test_teacher_needed_unless_sft():
    s, _, y = make_batch()
    with pytest.raises(HPDError, match="needs a teacher"):
        get_objective("fkl")(s, None, y)


def test_padded_vocabularies_align_to_the_shared_prefix():
    s, t, y = make_batch(V=13)
    # The teacher has 3 padding rows (logits that would take mass if they were kept).
    t_pad = torch.cat([t, torch.full((*t.shape[:2], 3), 5.0, dtype=D)], -1)
    for name in ["fkl", "hpd"]:
        obj = get_objective(name)
        ref = obj(s, t, y, generator=torch.Generator().manual_seed(0))
        out = obj(s, t_pad, y, vocab_size=13, generator=torch.Generator().manual_seed(0))
        assert float(out.loss) == pytest.approx(float(ref.loss), rel=1e-12)
    with pytest.raises(HPDError, match="student 13 rows, teacher 16 rows"):
        get_objective("fkl")(s, t_pad, y)


def test_labels_outside_the_shared_vocabulary_are_ignored():
    s, t, y = make_batch(V=13)
    y2 = y.clone()
    y2[1, 1] = 12  # the last shared-prefix token is fine ...
    out_in = get_objective("sft")(s, t, y2, vocab_size=12)
    y3 = y2.clone()
    y3[1, 1] = -100
    assert float(out_in.loss) == pytest.approx(float(get_objective("sft")(s, t, y3, vocab_size=12).loss))


def test_resolve_shared_vocab():
    assert resolve_shared_vocab(49152, 49152) == 49152
    assert resolve_shared_vocab(151936, 152064, tokenizer_size=151665) == 151936
    with pytest.raises(HPDError, match="student 100 rows, teacher 120 rows, tokenizer 110"):
        resolve_shared_vocab(100, 120, tokenizer_size=110)
    with pytest.raises(HPDError, match="student 100 rows, teacher 120 rows"):
        resolve_shared_vocab(100, 120)


@pytest.mark.parametrize("name", ["fkl", "hpd"])
def test_loss_is_full_precision_inside_autocast(name):
    """Under a bf16 autocast (mixed-precision training) the loss still runs in float32, exactly."""
    h, W, _, th, tW, y = _head_case(bias=False, dtype=torch.float32)
    obj = get_objective(name)
    ref = obj.chunked(h, W, HeadTeacher(th, tW), y, chunk_size=4, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = obj.chunked(h, W, HeadTeacher(th, tW), y, chunk_size=4, generator=torch.Generator().manual_seed(0))
        plain = obj(h @ W.T, th @ tW.T, y, generator=torch.Generator().manual_seed(0))
    assert out.loss.dtype == torch.float32 and float(out.loss) == float(ref.loss)
    assert plain.loss.dtype == torch.float32


# --- cached top-K teachers ----------------------------------------------------------------------

def topk_teacher(t, y, K, temperature=1.0):
    """What a teacher cache holds, from teacher logits `t (B, T, V)`: exact label log-prob, top-K, tail."""
    logp = torch.log_softmax(t / temperature, -1)
    vals, ids = logp.topk(K, -1)
    tail = logp.scatter(-1, ids, float("-inf")).logsumexp(-1)
    label = logp.gather(-1, y.clamp_min(0)[..., None]).squeeze(-1)
    return TopKTeacher(label, ids, vals, tail, t.shape[-1], temperature)


def _kwargs(name):
    """A seeded generator for the objectives that draw y_hat (hpd, hpdk), so two calls draw alike."""
    return {"generator": torch.Generator().manual_seed(5)} if OBJECTIVES[name].support == "pair" else {}


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
@pytest.mark.parametrize("K", ["V", "V-1"])
def test_complete_topk_teacher_equals_the_online_teacher(name, K):
    """K = V holds the whole distribution; K = V - 1 leaves one token in the tail bucket, which is
    then exact too: both give the online teacher's loss and gradient, on both paths."""
    h, W, b, th, tW, y = _head_case()
    V = W.shape[0]
    obj = get_objective(name, temperature=1.5) if name != "sft" else get_objective(name)
    cached = topk_teacher(th @ tW.T, y, V if K == "V" else V - 1, temperature=obj.temperature)
    ref = obj(h @ W.T + b, th @ tW.T, y, **_kwargs(name))
    g_ref = torch.autograd.grad(ref.loss, (h, W, b))
    for out in (obj(h @ W.T + b, cached, y, **_kwargs(name)),
                obj.chunked(h, W, cached, y, lm_head_bias=b, chunk_size=4, **_kwargs(name))):
        assert float(out.loss) == pytest.approx(float(ref.loss), rel=1e-9, abs=1e-12)
        assert float(out.value) == pytest.approx(float(ref.value), rel=1e-9, abs=1e-12)
        for a, c in zip(torch.autograd.grad(out.loss, (h, W, b)), g_ref):
            torch.testing.assert_close(a, c, atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("name,params", [
    ("fkl", {}), ("rkl", {}), ("jsd", {}), ("jsd", {"beta": 0.1}), ("skl", {}), ("srkl", {"alpha": 0.5}),
    ("tvd", {}), ("akl", {}), ("akl", {"mu": 0.9}), ("todi", {}), ("abkl", {}), ("abkl", {"alpha": 0.5, "beta": -0.2}),
    ("abkl", {"alpha": 0.0, "beta": 0.0}),
])
def test_bucketed_objective_gradient_equals_autograd_of_the_bucketed_closed_form(name, params):
    """K top tokens plus one tail bucket: the loss's gradient is that of the divergence between the
    K + 1-category teacher and student, the tail weight spread as w_v = w_tail q_v / q_tail."""
    s, t, y = make_batch(V=13)
    K = 4
    cached = topk_teacher(t, y, K)
    out = get_objective(name, **params)(s, cached, y)
    # The K + 1-category distributions, from probabilities (autograd flows through the student's).
    q = torch.softmax(s, -1)
    top_q = q.gather(-1, cached.tokens)
    q_b = torch.cat([top_q, (1 - top_q.sum(-1, keepdim=True))], -1)
    p_b = torch.cat([cached.logprobs.exp(), cached.tail.exp()[..., None]], -1)
    ref = closed_form(name, q_b.log(), p_b.log(), y, **params)
    assert float(out.value) == pytest.approx(float(ref.detach()), rel=1e-9, abs=1e-12)
    torch.testing.assert_close(grad_of(out.loss, s), grad_of(ref, s), atol=1e-8, rtol=1e-7)
    # ... and the chunked path agrees.
    h, W, b, th, tW, y2 = _head_case()
    cached2 = topk_teacher(th @ tW.T, y2, K)
    obj = get_objective(name, **params)
    a = obj(h @ W.T + b, cached2, y2)
    c = obj.chunked(h, W, cached2, y2, lm_head_bias=b, chunk_size=3)
    assert float(c.loss) == pytest.approx(float(a.loss), rel=1e-10, abs=1e-12)
    for ga, gc in zip(torch.autograd.grad(a.loss, (h, W, b)), torch.autograd.grad(c.loss, (h, W, b))):
        torch.testing.assert_close(gc, ga, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("K", [0, 3])
def test_one_hot_objectives_read_the_cache_exactly_at_the_sequence_token(K):
    s, t, y = make_batch()
    cached = topk_teacher(t, y, K)
    for name in ("sft", "orkl"):
        ref, out = get_objective(name)(s, t, y), get_objective(name)(s, cached, y)
        assert float(out.loss) == pytest.approx(float(ref.loss), rel=1e-12)
        torch.testing.assert_close(grad_of(out.loss, s), grad_of(ref.loss, s))


def test_hpd_reads_y_hat_from_the_topk_or_estimates_it_from_the_tail():
    s, t, y = make_batch(B=4, T=8, V=11)
    V, K = 11, 3
    cached = topk_teacher(t, y, K)
    logp = torch.log_softmax(t, -1)
    y_hat = torch.randint(0, V, y.shape, generator=torch.Generator().manual_seed(1))
    in_top = (cached.tokens == y_hat[..., None]).any(-1)
    assert in_top.any() and (~in_top).any()  # both cases occur
    # The expected teacher value at y_hat: exact in the top-K or at y, else tail / (V - K).
    exact = logp.gather(-1, y_hat[..., None]).squeeze(-1)
    estimate = cached.tail - math.log(V - K)
    t_hat = torch.where(in_top | (y_hat == y), exact, estimate)
    y_safe = y.clamp_min(0)
    gathered = GatheredTeacher(torch.stack([y_safe, y_hat], -1), torch.stack([logp.gather(-1, y_safe[..., None]).squeeze(-1), t_hat], -1))
    obj = get_objective("hpd")
    ref, out = obj(s, gathered, y, sampled_tokens=y_hat), obj(s, cached, y, sampled_tokens=y_hat)
    assert float(out.loss) == pytest.approx(float(ref.loss), rel=1e-12)
    assert float(out.value) == pytest.approx(float(ref.value), rel=1e-12)
    torch.testing.assert_close(grad_of(out.loss, s), grad_of(ref.loss, s))
    active = y != -100
    assert out.metrics["frac_sample_outside_topk"] == pytest.approx(float((~in_top)[active].float().mean()))
    # The estimate is not the exact value (so the test above would see a wrong branch).
    assert not torch.allclose(estimate[~in_top], exact[~in_top])


def test_topk_teacher_diagnostics_and_errors():
    s, t, y = make_batch()
    V = t.shape[-1]
    cached = topk_teacher(t, y, 4)
    m = get_objective("fkl")(s, cached, y).metrics
    full = get_objective("fkl")(s, t, y).metrics
    assert m["agreement"] == pytest.approx(full["agreement"]) and m["entropy"] == pytest.approx(full["entropy"])
    assert 0 < m["kl_topk"] <= full["kl"] + 1e-12  # coarser buckets: a lower bound of the KL
    with pytest.raises(HPDError, match="temperature 1, the objective uses 2: rebuild the cache with --temperature 2"):
        get_objective("sft", temperature=2.0)(s, cached, y)
    for name in ("fkl", "hpd"):
        with pytest.raises(HPDError, match="holds no top-K tokens: rebuild it with --top-k"):
            get_objective(name)(s, topk_teacher(t, y, 0), y)
    with pytest.raises(HPDError, match=f"normalized over {V} tokens, the loss over {V - 1}"):
        get_objective("sft")(s, cached, y, vocab_size=V - 1)


# --- ce_weight * CE + kd_weight * objective ----------------------------------------------------

def ce_reference(s, y):
    """Mean cross-entropy of the sequence tokens over active positions, from probabilities."""
    m = y != -100
    q = torch.softmax(s, -1)
    return -q.gather(-1, y.clamp_min(0)[..., None]).squeeze(-1)[m].log().sum() / m.sum()


@pytest.mark.parametrize("name,params", [("fkl", {}), ("akl", {}), ("todi", {}), ("jsd", {"beta": 0.3}), ("tvd", {})])
@pytest.mark.parametrize("ce_weight,kd_weight", [(1.0, 0.1), (0.3, 2.0), (0.0, 0.5)])
def test_mixed_vocab_objective_is_the_weighted_sum(name, params, ce_weight, kd_weight):
    """loss = ce_weight * CE + kd_weight * D: value and float64 gradient equal autograd of that sum."""
    s, t, y = make_batch()
    out = get_objective(name, ce_weight=ce_weight, kd_weight=kd_weight, **params)(s, t, y)
    ce, kd = ce_reference(s, y), closed_form(name, s, t, y, **params)
    ref = ce_weight * ce + kd_weight * kd
    assert float(out.value) == pytest.approx(float(ref.detach()), rel=1e-9, abs=1e-12)
    torch.testing.assert_close(grad_of(out.loss, s), grad_of(ref, s), atol=1e-6, rtol=1e-6)
    m = out.metrics  # both terms are logged, unweighted
    assert m["ce"] == pytest.approx(float(ce.detach()), rel=1e-9)
    assert m["kd_term"] == pytest.approx(float(kd.detach()), rel=1e-9)


def test_mixed_hpd_is_the_weighted_sum_of_ce_and_the_spec_formula():
    s, t, y = make_batch(B=3, T=7, V=9, seed=3)
    y_hat = torch.randint(0, 9, y.shape, generator=torch.Generator().manual_seed(5))
    y_hat[0, 1] = y[0, 1]
    out = get_objective("hpd", ce_weight=1.0, kd_weight=0.25)(s, t, y, sampled_tokens=y_hat)
    hpd_loss, hpd_value = hpd_reference(s, t, y, y_hat)
    ce = ce_reference(s, y)
    assert float(out.value) == pytest.approx(float(ce) + 0.25 * hpd_value, rel=1e-9)
    torch.testing.assert_close(grad_of(out.loss, s), grad_of(ce + 0.25 * hpd_loss, s), atol=1e-10, rtol=1e-8)
    assert out.metrics["frac_A"] == get_objective("hpd")(s, t, y, sampled_tokens=y_hat).metrics["frac_A"]


@pytest.mark.parametrize("name", ["fkl", "akl", "todi", "hpd", "orkl", "sft"])
@pytest.mark.parametrize("chunked", [False, True])
def test_ce_weight_1_kd_weight_0_is_sft(name, chunked):
    h, W, b, th, tW, y = _head_case()
    sft = get_objective("sft")
    obj = get_objective(name, ce_weight=1.0, kd_weight=0.0)
    if chunked:
        ref = sft.chunked(h, W, None, y, lm_head_bias=b, chunk_size=4)
        out = obj.chunked(h, W, HeadTeacher(th, tW), y, lm_head_bias=b, chunk_size=4, **_kwargs(name))
    else:
        ref = sft(h @ W.T + b, None, y)
        out = obj(h @ W.T + b, th @ tW.T, y, **_kwargs(name))
    assert abs(float(out.loss) - float(ref.loss)) <= 1e-12 and abs(float(out.value) - float(ref.value)) <= 1e-12
    for a, c in zip(torch.autograd.grad(out.loss, (h, W, b)), torch.autograd.grad(ref.loss, (h, W, b))):
        torch.testing.assert_close(a, c, atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
@pytest.mark.parametrize("teacher_kind", ["logits", "head", "topk"])
def test_mixed_chunked_equals_unchunked_and_the_sum_of_the_pure_losses(name, teacher_kind):
    """On both paths and with every kind of teacher: mixed loss = ce_weight * sft + kd_weight * pure."""
    h, W, b, th, tW, y = _head_case()
    logits = th @ tW.T
    teacher = {"logits": logits, "head": HeadTeacher(th, tW), "topk": topk_teacher(logits, y, 5)}[teacher_kind]
    pure, sft = get_objective(name), get_objective("sft")
    mixed = get_objective(name, ce_weight=0.6, kd_weight=0.2)
    ref = mixed(h @ W.T + b, logits if teacher_kind == "head" else teacher, y, **_kwargs(name))
    out = mixed.chunked(h, W, teacher, y, lm_head_bias=b, chunk_size=3, **_kwargs(name))
    parts = [o(h @ W.T + b, teacher if teacher_kind != "head" else logits, y, **_kwargs(name)) for o in (sft, pure)]
    expected = 0.6 * parts[0].loss + 0.2 * parts[1].loss
    g_expected = torch.autograd.grad(expected, (h, W, b))
    for got in (ref, out):
        assert float(got.loss) == pytest.approx(float(expected), rel=1e-10, abs=1e-12)
        assert float(got.value) == pytest.approx(float(0.6 * parts[0].value + 0.2 * parts[1].value), rel=1e-9)
        for a, c in zip(torch.autograd.grad(got.loss, (h, W, b)), g_expected):
            torch.testing.assert_close(a, c, atol=1e-10, rtol=1e-8)


def test_mixed_one_hot_objectives_with_a_gathered_teacher():
    s, t, y = make_batch()
    logp = torch.log_softmax(t, -1)
    y_hat = torch.randint(0, t.shape[-1], y.shape, generator=torch.Generator().manual_seed(0))
    tokens = torch.stack([y.clamp_min(0), y_hat], -1)
    gathered = GatheredTeacher(tokens, logp.gather(-1, tokens))
    for name in ["orkl", "hpd"]:
        obj = get_objective(name, ce_weight=0.5, kd_weight=2.0)
        full, sparse = obj(s, t, y, sampled_tokens=y_hat), obj(s, gathered, y, sampled_tokens=y_hat)
        assert float(sparse.loss) == pytest.approx(float(full.loss), rel=1e-12)
        torch.testing.assert_close(grad_of(sparse.loss, s), grad_of(full.loss, s))


@pytest.mark.parametrize("params,match", [
    ({"ce_weight": -1}, r"ce_weight=-1 is out of range; allowed: \[0, inf\)"),
    ({"kd_weight": float("nan")}, r"kd_weight=nan is out of range"),
    ({"ce_weight": 0, "kd_weight": 0}, r"ce_weight and kd_weight are both 0"),
])
def test_bad_mix_weights_say_what_is_allowed(params, match):
    with pytest.raises(HPDError, match=match):
        get_objective("fkl", **params)


def test_the_default_mix_is_the_pure_objective():
    obj = get_objective("akl")
    assert (obj.ce_weight, obj.kd_weight, obj.mixed) == (0.0, 1.0, False) and repr(obj) == "AdaptiveKL(mu=0.5, temperature=1)"
    assert repr(get_objective("akl", ce_weight=1, kd_weight=0.1)) == "AdaptiveKL(mu=0.5, temperature=1, ce_weight=1, kd_weight=0.1)"


# --- abkl: the alpha-beta divergence and its limits -----------------------------------------------

@pytest.mark.parametrize("params,other", [
    ({"alpha": 1.0, "beta": 0.0}, "fkl"),  # KL(p || q)
    ({"alpha": 0.0, "beta": 1.0}, "rkl"),  # KL(q || p)
])
def test_abkl_limits_are_forward_and_reverse_kl(params, other):
    s, t, y = make_batch()
    out, ref = get_objective("abkl", **params)(s, t, y), get_objective(other)(s, t, y)
    assert float(out.value) == pytest.approx(float(ref.value), rel=1e-12)
    torch.testing.assert_close(grad_of(out.loss, s), grad_of(ref.loss, s), atol=1e-12, rtol=1e-10)


def test_abkl_at_alpha_beta_1_is_half_the_squared_distance():
    s, t, y = make_batch()
    m = y != -100
    p, q = torch.softmax(t, -1)[m], torch.softmax(s, -1)[m]
    ref = 0.5 * ((p - q) ** 2).sum() / m.sum()
    out = get_objective("abkl")(s, t, y)
    assert float(out.value) == pytest.approx(float(ref.detach()), rel=1e-12)
    torch.testing.assert_close(grad_of(out.loss, s), grad_of(ref, s), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("limit,near", [
    ((1.0, 0.0), (1.0, 1e-5)), ((0.0, 1.0), (1e-5, 1.0)), ((0.7, -0.7), (0.7, -0.7 + 1e-5)),
    ((0.0, 0.0), (1e-5, 1e-5)), ((0.0, -0.6), (-1e-5, -0.6)),
])
def test_abkl_is_continuous_at_its_limits(limit, near):
    """The limit cases are the continuous extensions: a nearby general (alpha, beta) is close."""
    s, t, y = make_batch()
    out = get_objective("abkl", alpha=limit[0], beta=limit[1])(s, t, y)
    close = get_objective("abkl", alpha=near[0], beta=near[1])(s, t, y)
    assert float(close.value) == pytest.approx(float(out.value), rel=1e-3)
    torch.testing.assert_close(grad_of(close.loss, s), grad_of(out.loss, s), atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("alpha,beta", ABKL_PARAMS)
def test_abkl_is_zero_for_identical_distributions(alpha, beta):
    s, _, y = make_batch()
    out = get_objective("abkl", alpha=alpha, beta=beta)(s, s.detach().clone(), y)
    assert abs(float(out.value)) < 1e-12 and grad_of(out.loss, s).abs().max() < 1e-12

"""Student rollouts on a real vLLM server (`regime.backend=vllm`), against Hugging Face `generate`.

Every test here starts vLLM on 127.0.0.1 from the engine environment (`hpd.engine`: the
repository's .venv-vllm, `make engine`) on one of the bundled models and is skipped without it. A server takes
30-60 s to start on a CPU, so these tests are marked slow (`make test-slow`).

What they show: greedy rollouts equal HF `generate`'s token for token (Llama and Qwen2); sampled
first tokens follow the model's softmax as HF's samples do (chi-square tests), and whole sampled
completions are distributed as HF's; after an optimizer step the rollouts are the updated
student's (prompts longer than a KV block, so a stale prefix cache would show); a LoRA student is
served merged; on-policy (mixed) and OPSD runs train with vLLM rollouts, the greedy on-policy run
step for step equal to the same run with HF rollouts.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest
import torch

from hpd.config import load_config
from hpd.models.loading import apply_lora, load_model
from hpd.responses.regimes import SamplingSettings
from hpd.responses.rollout import encode_prompts, generate_completions
from hpd.training.trainer import Trainer
from hpd.engine import INSTALL_HINT, engine_python
from hpd.responses.vllm_generate import VLLMGenerate

ASSETS = Path(__file__).resolve().parents[1] / "hpd" / "assets"
TEACHER = ASSETS / "teacher"  # Llama, head_dim 48
LLAMA = ASSETS / "students" / "llama-3x128"  # Llama, head_dim 32
QWEN = ASSETS / "students" / "writer"  # Qwen2, head_dim 32
# (The 96-wide students have head_dim 24, which vLLM's CPU attention refuses.)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.engine,  # a real vLLM server: `make test-engine`
    pytest.mark.skipif(engine_python(required=False) is None,
                       reason=f"the vLLM engine environment is absent: {INSTALL_HINT}"),
    pytest.mark.usefixtures("single_torch_thread", "server_on_one_thread"),
]

# Short and long prompts: the long ones (> 128 tokens) fill whole KV blocks, which the server's
# prefix cache keeps across requests.
TEXTS = ["Add: 49+27", "Reverse: paper", "Sort: cloud smile bird", "Uppercase: music",
         "What is 12 times 7? Think step by step.", "Write a function that returns the square of x.",
         "Hello! How are you today?",
         "Read this carefully. " * 7 + "Now add 15 and 26, and say the result.",
         "A long story about a cat and a dog who became friends in the garden. " * 2 + "Reverse: garden"]


@pytest.fixture(scope="module")
def server_on_one_thread():
    """The servers' engines on one thread, unbound (the machine's cores are shared with the tests)."""
    old = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
    yield
    if old is None:
        os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
    else:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = old


@pytest.fixture(scope="module")
def teacher_served():
    model, tok = load_model(str(TEACHER))
    backend = VLLMGenerate(max_model_len=256)
    yield model, tok, backend
    backend.close()


def prompts_of(tok):
    return encode_prompts(tok, TEXTS)


def greedy(n: int) -> SamplingSettings:
    return SamplingSettings(max_new_tokens=n, temperature=0.0)


def hf_greedy(model, tok, prompts, n):
    return generate_completions(model, tok, prompts, max_new_tokens=n, temperature=0.0)


# --------------------------------------------------------------------------------------------
# Greedy rollouts equal HF generate
# --------------------------------------------------------------------------------------------


def test_greedy_rollouts_equal_hf_generate(teacher_served):
    model, tok, backend = teacher_served
    prompts = prompts_of(tok)
    assert max(len(p) for p in prompts) > 128
    ends = []
    for n in (6, 40):  # cut at max_new_tokens, or ended at eos
        out = backend.generate(model, tok, prompts, greedy(n), seed=0)
        assert out == hf_greedy(model, tok, prompts, n)
        ends += [o[-1] == tok.eos_token_id for o in out]
    assert any(ends) and not all(ends)  # both ways a completion ends are compared
    assert backend.generate(model, tok, prompts, greedy(40), seed=5) == out  # greedy ignores the seed
    assert backend.stats["syncs"] == 0  # no step taken: nothing pushed


# --------------------------------------------------------------------------------------------
# Sampled rollouts come from the model's distribution
# --------------------------------------------------------------------------------------------


def chi_square_p(observed: list[float], expected: list[float], dof: int) -> float:
    """P(chi2_dof >= the statistic): the survival function, as the regularized upper gamma."""
    stat = sum((o - e) ** 2 / e for o, e in zip(observed, expected))
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def goodness_of_fit(samples: list[int], probs: torch.Tensor) -> float:
    """Chi-square p-value of first-token samples against probabilities `probs` (V,): the tokens
    expected at least 5 times are their own bins, the rest pooled in one."""
    n, counts = len(samples), Counter(samples)
    big = [t for t in range(len(probs)) if n * probs[t] >= 5]
    obs = [counts[t] for t in big] + [n - sum(counts[t] for t in big)]
    exp = [n * float(probs[t]) for t in big] + [n * (1 - float(probs[big].sum()))]
    if exp[-1] < 5:  # the pooled rest too rare to test: drop its bin
        obs, exp = obs[:-1], exp[:-1]
    return chi_square_p(obs, exp, len(obs) - 1)


def homogeneity(a: list[tuple], b: list[tuple]) -> float:
    """Two-sample chi-square p-value that samples `a` and `b` (equal sizes) come from one
    distribution: outcomes seen at least 10 times in both together are bins, the rest pooled."""
    ca, cb = Counter(a), Counter(b)
    keys = [k for k in ca.keys() | cb.keys() if ca[k] + cb[k] >= 10]
    rows = [[ca[k] for k in keys] + [len(a) - sum(ca[k] for k in keys)],
            [cb[k] for k in keys] + [len(b) - sum(cb[k] for k in keys)]]
    cols = [x + y for x, y in zip(*rows)]
    keep = [j for j, c in enumerate(cols) if c > 0]
    total = len(a) + len(b)
    obs, exp = [], []
    for row in rows:
        for j in keep:
            obs.append(row[j])
            exp.append(sum(row) * cols[j] / total)
    return chi_square_p(obs, exp, len(keep) - 1)


N_SAMPLES = 2000
# Under the null hypothesis a p-value is uniform on [0, 1]: a correct sampler fails a test at 1e-3
# with probability 0.1%. The seeds are fixed, so each outcome is reproducible, not a flake; the
# negative control below shows that these sample sizes do detect a sampler off by a temperature.
P_MIN = 1e-3


@pytest.mark.parametrize("temperature, top_k", [(1.0, 0), (0.7, 0), (1.0, 5)])
def test_sampled_first_tokens_follow_the_model_distribution(teacher_served, temperature, top_k):
    model, tok, backend = teacher_served
    prompts = prompts_of(tok)
    with torch.no_grad():  # the prompt whose next token is least certain
        logits = [model(torch.tensor([p])).logits[0, -1].double() for p in prompts]
    k = max(range(len(prompts)), key=lambda i: -(logits[i].softmax(-1) * logits[i].log_softmax(-1)).sum())
    z = logits[k] / temperature
    if top_k:
        z = z.masked_fill(z < z.topk(top_k).values[-1], float("-inf"))
    probs = z.softmax(-1)
    assert (probs > 0.02).sum() >= 3  # a spread distribution, not one token
    settings = SamplingSettings(max_new_tokens=1, temperature=temperature, top_k=top_k, batch_size=N_SAMPLES)
    served = [c[0] for c in backend.generate(model, tok, [prompts[k]] * N_SAMPLES, settings, seed=1)]
    hf = [c[0] for c in generate_completions(model, tok, [prompts[k]] * N_SAMPLES, max_new_tokens=1,
                                             temperature=temperature, top_k=top_k, batch_size=N_SAMPLES, seed=1)]
    assert goodness_of_fit(hf, probs) > P_MIN  # the reference sampler passes the test ...
    assert goodness_of_fit(served, probs) > P_MIN  # ... and so does vLLM
    if top_k:
        assert set(served) <= set(probs.nonzero().flatten().tolist())  # nothing outside the top-k
    else:  # negative control: the same samples against the distribution at another temperature
        wrong = (logits[k] / (1.4 * temperature)).softmax(-1)
        assert goodness_of_fit(served, wrong) < 1e-6


def test_sampled_completions_are_distributed_as_hf_samples(teacher_served):
    """Whole 3-token completions (the joint law of successive tokens, the KV cache in use)."""
    model, tok, backend = teacher_served
    prompt = prompts_of(tok)[6]
    settings = SamplingSettings(max_new_tokens=3, temperature=1.0, batch_size=N_SAMPLES)
    served = [tuple(c) for c in backend.generate(model, tok, [prompt] * N_SAMPLES, settings, seed=2)]
    hf = [tuple(c) for c in generate_completions(model, tok, [prompt] * N_SAMPLES, max_new_tokens=3,
                                                 temperature=1.0, batch_size=N_SAMPLES, seed=2)]
    assert len(Counter(hf)) >= 10  # many distinct completions: a test with power
    assert homogeneity(served, hf) > P_MIN
    cold = [tuple(c) for c in generate_completions(model, tok, [prompt] * N_SAMPLES, max_new_tokens=3,
                                                   temperature=0.6, batch_size=N_SAMPLES, seed=2)]
    assert homogeneity(served, cold) < 1e-6  # negative control: another temperature is told apart
    # A call is a pure function of its seed; another seed draws other samples.
    assert backend.generate(model, tok, [prompt] * 8, settings, seed=2) == \
        [list(c) for c in served[:8]]
    assert backend.generate(model, tok, [prompt] * 8, settings, seed=3) != [list(c) for c in served[:8]]


# --------------------------------------------------------------------------------------------
# Weight sync: rollouts after an optimizer step are the updated student's
# --------------------------------------------------------------------------------------------


def sft_step(model, tok, prompts, lr=3e-2):
    """One real optimizer step (AdamW on the next-token loss of the prompts)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for p in prompts[:4]:
        ids = torch.tensor([p])
        model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()


def test_rollouts_after_an_optimizer_step_follow_the_updated_student():
    model, tok = load_model(str(LLAMA))
    prompts = prompts_of(tok)
    backend = VLLMGenerate(max_model_len=256)
    try:
        before = backend.generate(model, tok, prompts, greedy(24), seed=0)
        assert before == hf_greedy(model, tok, prompts, 24)
        for step in range(2):
            sft_step(model, tok, prompts)
            backend.after_optimizer_step(model)
            after = backend.generate(model, tok, prompts, greedy(24), seed=0)
            assert after == hf_greedy(model, tok, prompts, 24)
            assert backend.stats["syncs"] == step + 1 and backend.stats["last_sync_s"] > 0
        # the long prompts (whose KV blocks the prefix cache holds) changed too
        assert sum(a != b for a, b in zip(after, before)) >= 3 and after[-1] != before[-1]
        backend.generate(model, tok, prompts, greedy(4), seed=0)
        assert backend.stats["syncs"] == 2  # no step since the last push: nothing pushed
        assert backend.metrics()["vllm_server_cpu_s"] > 0
    finally:
        backend.close()
    assert backend.server is None


def test_a_lora_student_is_served_merged():
    model, tok = load_model(str(QWEN))
    model = apply_lora(model, rank=4, alpha=8)
    prompts = prompts_of(tok)
    sft_step(model, tok, prompts, lr=5e-2)  # adapters away from zero: the merge matters
    own = {k: v.clone() for k, v in model.state_dict().items()}
    backend = VLLMGenerate(max_model_len=256)
    try:
        out = backend.generate(model, tok, prompts, greedy(24), seed=0)
        assert out == hf_greedy(model, tok, prompts, 24)
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in own.items())  # the student untouched
        base = model.get_base_model()
        with model.disable_adapter():  # the adapters change what is served
            assert hf_greedy(base, tok, prompts, 24) != out
    finally:
        backend.close()


# --------------------------------------------------------------------------------------------
# Training runs with vLLM rollouts
# --------------------------------------------------------------------------------------------


def run(repo_root, tmp_path, name, overrides):
    cfg = load_config("configs/tiny.yaml", [
        f"output_dir={tmp_path / name}", f"student.path={LLAMA}", f"teacher.path={TEACHER}", "max_steps=4",
        "data.max_length=96", "regime.max_new_tokens=12", "optim.batch_size=4", "optim.lr=1e-2", "log.every=1",
        "log.progress=false", "log.tensorboard=off", "log.eval_every=0", "save.every=0", *overrides])
    os.chdir(repo_root)
    Trainer(cfg).run()
    return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
            if json.loads(line).get("type") == "train"]


def test_an_on_policy_run_with_vllm_rollouts_equals_the_run_with_hf_rollouts(repo_root, tmp_path):
    # Greedy rollouts make both runs deterministic functions of the weights: equal rollouts at
    # every step give equal losses; a stale or wrong served copy would part them.
    common = ["regime.name=mixed", "regime.mixed_lambda=0.75", "regime.temperature=0",
              "regime.allow_biased_rollouts=true"]
    hf = run(repo_root, tmp_path, "hf", [*common, "regime.backend=hf"])
    served = run(repo_root, tmp_path, "vllm", [*common, "regime.backend=vllm"])
    regimes = [r["regime"] for r in served]
    assert "student" in regimes[1:] and "dataset" in regimes  # on-policy steps after a step, and off-policy ones
    assert regimes == [r["regime"] for r in hf]
    assert [r["generated_tokens_total"] for r in served] == [r["generated_tokens_total"] for r in hf]
    assert [r["loss"] for r in served] == pytest.approx([r["loss"] for r in hf], rel=1e-5, abs=1e-6)
    # pushed only before a rollout that follows a step
    pushes = sum(1 for i, g in enumerate(regimes) if g == "student" and i > 0)
    assert served[-1]["vllm_syncs"] == pushes and served[-1]["vllm_sync_s"] > 0


def test_an_opsd_run_trains_on_vllm_rollouts(repo_root, tmp_path):
    rows = run(repo_root, tmp_path, "opsd", [
        "teacher.path=none", "regime.name=self", "opsd.response=rollout", "opsd.privileged_field=completion",
        "regime.temperature=1.0", "regime.backend=vllm"])
    assert len(rows) == 4 and all(r["regime"] == "self" for r in rows)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert rows[-1]["generated_tokens_total"] > rows[0]["generated_tokens_total"] > 0
    assert rows[-1]["vllm_syncs"] == 3

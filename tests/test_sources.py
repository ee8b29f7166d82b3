"""The small interfaces the training step is made of: response sources over a generation backend,
the generation cache, and teacher views (`hpd.responses.regimes`, `hpd.responses.rollout`, `hpd.responses.generation_cache`,
`hpd.objectives.surrogate`)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from hpd.config import load_config
from hpd.errors import HPDError
from hpd.responses.generation_cache import GenerationCache
from hpd.objectives import HeadTeacher, LogitsTeacher, as_teacher_view, get_objective
from hpd.responses.regimes import MixedResponses, StudentRollouts, response_source, step_regime
from hpd.responses.rollout import GenerationBackend


class FakeBackend(GenerationBackend):
    """Answers every prompt with its seed's last digit, ten times; records the weight syncs."""

    def __init__(self):
        self.calls, self.synced = [], []

    def generate(self, model, tokenizer, prompt_ids, settings, *, seed):
        self.calls.append((model, len(prompt_ids), seed))
        return [[seed % 10] * 10 for _ in prompt_ids]

    def after_optimizer_step(self, model):
        self.synced.append(model)


def _examples(n):
    return [SimpleNamespace(prompt_ids=[1, 2, 3 + i], completion_ids=[9]) for i in range(n)]


def test_mixed_responses_draw_per_step_and_roll_out_through_the_backend():
    backend, model = FakeBackend(), object()
    cfg = load_config(None, ["regime.name=mixed", "regime.mixed_lambda=0.5", "seed=5", "data.max_length=8"])
    source = response_source(cfg, student=model, teacher=None, tokenizer=None, train_data=_examples(3), rank=1,
                             cache_dir=None, backend=backend)
    assert isinstance(source, MixedResponses)
    regimes = [source.regime(k) for k in range(12)]
    assert regimes == [step_regime("mixed", 0.5, "dataset", seed=5, step=k) for k in range(12)]
    assert {"student", "dataset"} == set(regimes)
    for k, regime in enumerate(regimes):
        completions, sampled = source.completions(_examples(3), [0, 1, 2], step=k, micro=0)
        if regime == "dataset":
            assert completions is None and sampled == 0
        else:  # cut to data.max_length: prompt (3 tokens) + 5
            assert sampled == 15 and all(len(c) == 5 for c in completions)
    assert len(backend.calls) == regimes.count("student") and all(m is model for m, _, _ in backend.calls)
    assert len({seed for _, _, seed in backend.calls}) == len(backend.calls)  # a fresh seed per step
    source.after_optimizer_step(model)
    assert backend.synced == [model]


def test_student_rollouts_are_seeded_by_step_micro_batch_and_rank():
    def seeds(rank):
        backend = FakeBackend()
        src = StudentRollouts("student", None, None, None, seed=0, rank=rank, max_length=99, backend=backend)
        for step in range(2):
            for micro in range(2):
                src.completions(_examples(1), [0], step=step, micro=micro)
        return [s for *_, s in backend.calls]

    a = seeds(0)
    assert a == seeds(0) and len(set(a)) == 4 and not set(a) & set(seeds(1))


def test_generation_cache_is_fresh_for_its_key_and_resumes_partial_batches(tmp_path):
    out = tmp_path / "gen.jsonl"
    cache = GenerationCache(out, "k1")
    assert not cache.fresh() and cache.partial_batches() == {}
    cache.append_batch(0, [{"completion": "a"}])
    cache.append_batch(1, [{"completion": "b"}])
    assert GenerationCache(out, "k1").partial_batches() == {0: [{"completion": "a"}], 1: [{"completion": "b"}]}
    assert GenerationCache(out, "k2").partial_batches() == {} and not cache.partial.exists()  # stale: removed
    cache.store("x\n")
    assert cache.fresh() and not GenerationCache(out, "k2").fresh() and json.loads(cache.key_file.read_text())["key"] == "k1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gen.jsonl", "gen.jsonl.key"]


def test_teacher_views_chunk_themselves_and_unknown_teachers_are_refused():
    torch.manual_seed(0)
    h, W = torch.randn(2, 5, 8), torch.randn(11, 8)
    labels = torch.randint(0, 11, (2, 5))
    s = torch.randn(2, 5, 11, dtype=torch.float64)
    head, logits = HeadTeacher(h, W), h @ W.T
    assert isinstance(as_teacher_view(logits), LogitsTeacher) and as_teacher_view(head) is head
    a = get_objective("fkl")(s, head, labels).value
    b = get_objective("fkl")(s, logits, labels).value
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(HPDError, match="a teacher must be logits"):
        get_objective("fkl")(s, {"logits": logits}, labels)

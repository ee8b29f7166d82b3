"""Batched generation: determinism, eos handling, left padding, chat prompts."""

import pytest
import torch

from hpd.errors import HPDError
from hpd.models.loading import build_tiny_model
from hpd.responses.rollout import encode_prompts, generate_completions, generate_text
from hpd.models.tokenizer import byte_tokenizer

PROMPTS = ["a", "hello world", "xyz", "The quick brown fox jumps", "日本"]


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return build_tiny_model(tok, seed=0, num_layers=2, hidden_size=32, num_heads=4)


@pytest.fixture(scope="module")
def prompt_ids(tok):
    return [tok.encode(p) for p in PROMPTS]


def test_sampling_is_deterministic_per_seed(model, tok, prompt_ids):
    kw = dict(max_new_tokens=12, batch_size=2)
    a = generate_completions(model, tok, prompt_ids, seed=1, **kw)
    b = generate_completions(model, tok, prompt_ids, seed=1, **kw)
    c = generate_completions(model, tok, prompt_ids, seed=2, **kw)
    assert a == b
    assert a != c
    assert len(a) == len(prompt_ids)
    assert all(0 < len(x) <= 12 for x in a)


def test_seed_leaves_global_rng_untouched(model, tok, prompt_ids):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    generate_completions(model, tok, prompt_ids, max_new_tokens=4, seed=9)
    assert torch.equal(torch.rand(3), expected)


def test_sampling_without_seed_uses_global_rng(model, tok, prompt_ids):
    torch.manual_seed(5)
    a = generate_completions(model, tok, prompt_ids, max_new_tokens=8)
    torch.manual_seed(5)
    b = generate_completions(model, tok, prompt_ids, max_new_tokens=8)
    assert a == b


def test_greedy_is_deterministic_and_ignores_seed(model, tok, prompt_ids):
    a = generate_completions(model, tok, prompt_ids, max_new_tokens=10, temperature=0.0, seed=1)
    b = generate_completions(model, tok, prompt_ids, max_new_tokens=10, temperature=0.0, seed=2)
    assert a == b
    assert all(len(x) == 10 or x[-1] == tok.eos_token_id for x in a)


def test_left_padding_matches_unbatched_greedy(model, tok, prompt_ids):
    batched = generate_completions(model, tok, prompt_ids, max_new_tokens=10, temperature=0.0,
                                   batch_size=len(prompt_ids))
    alone = [
        generate_completions(model, tok, [p], max_new_tokens=10, temperature=0.0)[0]
        for p in prompt_ids
    ]
    assert batched == alone


def test_top_k_one_equals_greedy(model, tok, prompt_ids):
    greedy = generate_completions(model, tok, prompt_ids, max_new_tokens=8, temperature=0.0)
    top1 = generate_completions(model, tok, prompt_ids, max_new_tokens=8, top_k=1, seed=3)
    assert top1 == greedy


def test_stops_at_eos_and_strips_padding(tok, prompt_ids):
    model = build_tiny_model(tok, seed=0, num_layers=2, hidden_size=32, num_heads=4)
    first = generate_completions(model, tok, prompt_ids[:1], max_new_tokens=8, temperature=0.0)
    g1 = first[0][0]
    # Make eos a scaled copy of the first greedy token's head row: its logit then beats that
    # token's (positive, maximal) logit, so the first prompt ends with eos right away.
    with torch.no_grad():
        W = model.get_output_embeddings().weight
        W[tok.eos_token_id] = 10 * W[g1]
    out = generate_completions(model, tok, prompt_ids, max_new_tokens=8, temperature=0.0)
    assert out[0] == [tok.eos_token_id]
    for ids in out:
        assert 0 < len(ids) <= 8
        # eos appears at most once and only at the end; nothing follows it.
        assert tok.eos_token_id not in ids[:-1]
    # A row that finished early is not padded up to the batch's longest row.
    assert min(len(x) for x in out) < max(len(x) for x in out) or all(len(x) == 1 for x in out)


def test_restores_training_mode(model, tok, prompt_ids):
    model.train()
    generate_completions(model, tok, prompt_ids[:1], max_new_tokens=2, seed=0)
    assert model.training
    model.eval()
    generate_completions(model, tok, prompt_ids[:1], max_new_tokens=2, seed=0)
    assert not model.training


def test_bad_arguments_raise(model, tok, prompt_ids):
    with pytest.raises(HPDError, match="empty"):
        generate_completions(model, tok, [[]], max_new_tokens=2)
    with pytest.raises(HPDError, match="top_p"):
        generate_completions(model, tok, prompt_ids, top_p=0.0)
    assert generate_completions(model, tok, [], max_new_tokens=2) == []


def test_encode_prompts_templates(tok):
    chat = encode_prompts(tok, ["hi"])
    assert chat[0] == tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, return_dict=False
    )
    assert chat[0][-1] == tok.convert_tokens_to_ids("<|assistant|>")
    assert encode_prompts(tok, ["hi"], chat_template="none") == [tok.encode("hi")]
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]
    assert encode_prompts(tok, [messages])[0][-1] == tok.convert_tokens_to_ids("<|assistant|>")
    with pytest.raises(HPDError, match="chat template"):
        encode_prompts(tok, [messages], chat_template="none")


def test_generate_text_decodes_without_special_tokens(model, tok):
    prompts = ["hi", [{"role": "user", "content": "yo"}]]
    texts = generate_text(model, tok, prompts, max_new_tokens=8, temperature=0.0)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    ids = generate_completions(model, tok, encode_prompts(tok, prompts), max_new_tokens=8,
                               temperature=0.0)
    assert texts == [tok.decode(x, skip_special_tokens=True) for x in ids]
    assert not any("<|" in t for t in texts)

"""Model building, loading, saving, vocabulary alignment and LM-head access."""

import os

import pytest
import torch

from hpd.errors import HPDError
from hpd.models.loading import build_tiny_model, load_model, save_model, shared_vocab_size
from hpd.models.head import final_hidden_states, lm_head_of
from hpd.responses.rollout import generate_completions
from hpd.models.tokenizer import byte_tokenizer

TINY = {"num_layers": 1, "hidden_size": 32, "num_heads": 4}


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_tiny_model_is_deterministic_per_seed(tok):
    a = build_tiny_model(tok, seed=3, **TINY)
    b = build_tiny_model(tok, seed=3, **TINY)
    c = build_tiny_model(tok, seed=4, **TINY)
    assert _same_weights(a, b)
    assert not _same_weights(a, c)


def test_tiny_model_leaves_global_rng_alone(tok):
    state = torch.random.get_rng_state()
    build_tiny_model(tok, seed=5, **TINY)
    assert torch.equal(state, torch.random.get_rng_state())


def test_tiny_model_vocab_is_padded_to_multiple_of_8(tok):
    model = build_tiny_model(tok, **TINY)
    assert len(tok) == 263
    assert model.config.vocab_size == 264
    head = lm_head_of(model)
    W = head.weight
    assert W.shape == (264, 32) and head.bias is None and head.transform.is_identity
    assert model.get_input_embeddings().weight.shape == (264, 32)
    assert model.config.tie_word_embeddings is False
    assert W.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    assert (model.config.pad_token_id, model.config.bos_token_id, model.config.eos_token_id) == (
        256,
        257,
        258,
    )


def test_tiny_model_options_and_dtype(tok):
    model = build_tiny_model(tok, num_layers=3, hidden_size=48, num_heads=4, num_kv_heads=2,
                             intermediate_size=40, dtype=torch.bfloat16)
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_key_value_heads) == (3, 48, 2)
    assert cfg.intermediate_size == 40
    assert model.dtype == torch.bfloat16
    with pytest.raises(HPDError, match="num_heads"):
        build_tiny_model(tok, hidden_size=30, num_heads=4)


def test_load_tiny_uses_options_seed_and_dtype():
    model, tok = load_model("tiny", tiny=TINY, seed=7, dtype="bfloat16")
    assert len(tok) == 263 and model.config.hidden_size == 32
    assert model.dtype == torch.bfloat16
    again, _ = load_model("tiny", tiny=TINY, seed=7, dtype="bfloat16")
    assert _same_weights(model, again)
    with pytest.raises(HPDError, match="hidden"):
        load_model("tiny", tiny={"hidden": 8})
    with pytest.raises(HPDError, match="float32"):
        load_model("tiny", dtype="float8")


def test_save_then_load_round_trips(tok, tmp_path):
    model = build_tiny_model(tok, seed=1, **TINY)
    out = tmp_path / "student"
    save_model(model, tok, out)
    assert (out / "model.safetensors").is_file()
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()

    loaded, loaded_tok = load_model(str(out))
    assert type(loaded).__name__ == "LlamaForCausalLM"
    assert loaded.dtype == torch.float32
    assert _same_weights(model, loaded)
    assert loaded_tok.get_vocab() == tok.get_vocab()
    assert loaded_tok.chat_template == tok.chat_template
    prompt = [tok.encode("hi")]
    assert generate_completions(loaded, loaded_tok, prompt, max_new_tokens=6, temperature=0) == (
        generate_completions(model, tok, prompt, max_new_tokens=6, temperature=0)
    )
    assert len(generate_completions(loaded, loaded_tok, prompt, max_new_tokens=6, seed=0)[0]) > 0


def test_load_sets_missing_pad_token(tok, tmp_path):
    model = build_tiny_model(tok, **TINY)
    save_model(model, tok, tmp_path / "m")
    plain = byte_tokenizer()
    plain.pad_token = None
    assert plain.pad_token is None
    _, got = load_model(str(tmp_path / "m"), tokenizer=plain)
    assert got is plain and got.pad_token == "<|eos|>"


def test_missing_path_names_it(tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(HPDError, match="no-such-model"):
        load_model(missing)
    with pytest.raises(HPDError, match="config.json"):
        load_model(str(tmp_path))


def test_gguf_needs_the_gguf_package(tmp_path):
    try:
        import gguf  # noqa: F401
    except ImportError:
        f = tmp_path / "model.gguf"
        f.write_bytes(b"GGUF")
        with pytest.raises(HPDError, match="pip install gguf"):
            load_model(str(f))
    else:
        pytest.skip("gguf is installed; the missing-package error cannot be exercised")


def test_shared_vocab_size(tok):
    a = build_tiny_model(tok, **TINY)  # 264 rows
    assert shared_vocab_size(a, a, tok) == 264

    b = build_tiny_model(tok, **TINY)
    b.resize_token_embeddings(272)
    assert lm_head_of(b).weight.shape[0] == 272
    assert shared_vocab_size(a, b, tok) == 264
    assert shared_vocab_size(b, a, tok) == 264

    c = build_tiny_model(tok, **TINY)
    c.resize_token_embeddings(200)  # smaller than the tokenizer: a different vocabulary
    with pytest.raises(HPDError) as err:
        shared_vocab_size(a, c, tok)
    assert "264" in str(err.value) and "200" in str(err.value) and "263" in str(err.value)


def test_save_model_replaces_existing_dir_atomically(tok, tmp_path):
    out = tmp_path / "ckpt"
    first = build_tiny_model(tok, seed=1, **TINY)
    second = build_tiny_model(tok, seed=2, **TINY)
    save_model(first, tok, out)
    (out / "stale.txt").write_text("from the previous save")
    save_model(second, None, out)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temporary or backup directory left
    assert not (out / "stale.txt").exists()
    assert not (out / "tokenizer.json").exists()
    loaded, _ = load_model(str(out), tokenizer=tok)
    assert _same_weights(second, loaded)


def test_failed_save_keeps_previous_dir(tok, tmp_path, monkeypatch):
    out = tmp_path / "ckpt"
    first = build_tiny_model(tok, seed=1, **TINY)
    save_model(first, tok, out)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(tok), "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        save_model(build_tiny_model(tok, seed=2, **TINY), tok, out)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    loaded, _ = load_model(str(out), tokenizer=tok)
    assert _same_weights(first, loaded)


def test_save_model_refuses_a_file(tok, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(HPDError, match="file"):
        save_model(build_tiny_model(tok, **TINY), tok, f)


def test_hidden_states_times_head_equal_logits(tok):
    model = build_tiny_model(tok, seed=2, num_layers=2, hidden_size=32, num_heads=4,
                             num_kv_heads=2)
    g = torch.Generator().manual_seed(0)
    ids_BT = torch.randint(0, 256, (3, 9), generator=g)
    mask_BT = torch.ones_like(ids_BT)
    mask_BT[1, :4] = 0  # left padding
    mask_BT[2, :1] = 0
    h_BTH = final_hidden_states(model, ids_BT, mask_BT)
    assert h_BTH.shape == (3, 9, 32)
    W = lm_head_of(model).weight
    logits = model(input_ids=ids_BT, attention_mask=mask_BT).logits
    assert torch.allclose(h_BTH @ W.T, logits, atol=1e-5, rtol=0)


def test_hidden_states_with_lm_head_bias(tok):
    model = build_tiny_model(tok, **TINY)
    head = model.get_output_embeddings()
    head.bias = torch.nn.Parameter(torch.randn(head.out_features))
    ids_BT = torch.tensor([tok.encode("bias check")])
    W, b = lm_head_of(model).weight, lm_head_of(model).bias
    assert b is not None and b.shape == (264,)
    h_BTH = final_hidden_states(model, ids_BT, None)
    logits = model(input_ids=ids_BT).logits
    assert torch.allclose(h_BTH @ W.T + b, logits, atol=1e-5, rtol=0)


def _offline_env(cache) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "OMP_NUM_THREADS": "1"}


def test_a_hub_id_loads_from_a_populated_cache_offline(tok, tmp_path):
    # A cache laid out as huggingface_hub writes it: models--ORG--NAME/snapshots/REV/... and
    # refs/main naming REV. With HF_HUB_OFFLINE=1 nothing is fetched: the snapshot is what loads.
    import json
    import subprocess
    import sys

    model = build_tiny_model(tok, seed=3, **TINY)
    repo = tmp_path / "hub" / "models--hpd-test--tiny-llama"
    rev = "0123456789abcdef0123456789abcdef01234567"
    save_model(model, tok, repo / "snapshots" / rev)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    probe = ("import json, torch\nfrom hpd.models.loading import load_model\n"
             "m, t = load_model('hpd-test/tiny-llama', role='student')\n"
             "print(json.dumps({'path': m.name_or_path, 'sum': float(sum(p.double().sum() for p in m.parameters())), "
             "'vocab': len(t)}))")
    proc = subprocess.run([sys.executable, "-c", probe], env=_offline_env(tmp_path / "hub"), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["path"] == str(repo / "snapshots" / rev)
    assert got["sum"] == pytest.approx(float(sum(p.detach().double().sum() for p in model.parameters())), rel=1e-12)
    assert got["vocab"] == len(tok)


def test_a_hub_id_absent_from_the_cache_offline_is_a_clear_user_error(tmp_path):
    import subprocess
    import sys

    (tmp_path / "hub").mkdir()
    (tmp_path / "p.jsonl").write_text('{"prompt": "hi"}\n')
    proc = subprocess.run([sys.executable, "-m", "hpd.apps.cli", "generate", "--model", "hpd-test/absent", "--prompts",
                           str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "o.jsonl")],
                          env=_offline_env(tmp_path / "hub"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    msg = proc.stderr
    assert msg.startswith("error: model 'hpd-test/absent' is not on disk")
    assert str(tmp_path / "hub") in msg and "HF_HUB_OFFLINE" in msg and "hf download hpd-test/absent" in msg
    assert not (tmp_path / "o.jsonl").exists()


def test_hub_ids_are_told_from_local_paths(tmp_path, monkeypatch):
    from hpd.models.hub import looks_like_hub_id, resolve_model_path

    assert looks_like_hub_id("Qwen/Qwen2.5-0.5B-Instruct") and looks_like_hub_id("HuggingFaceTB/SmolLM2-135M")
    for name in ("tiny", "model", "./a/b", "/abs/x", "a/b/c", "../x", "a/b.gguf", "org/--x"):
        assert not looks_like_hub_id(name), name
    # A local directory shaped like an id is the directory, never a Hub lookup.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert resolve_model_path("org/name") == "org/name"


def test_teacher_vocab_size_is_one_check_for_every_teacher(tok):
    """hpd train's teacher check (hpd.vocab.teacher_vocab_size): one tokenizer; padding rows only when both are known."""
    import copy

    from hpd.errors import HPDError
    from hpd.vocab import teacher_vocab_size

    assert teacher_vocab_size(264, 264) == 264  # equal heads, tokenizers unknown
    assert teacher_vocab_size(264, 272, tok, tok) == 264  # padding past the one tokenizer's 263 tokens
    with pytest.raises(HPDError, match="272 rows.*not known"):
        teacher_vocab_size(264, 272, tok, None)  # the teacher's tokenizer unknown: padding or another vocabulary?
    other = copy.deepcopy(tok)
    other.add_tokens(["<x>"])
    with pytest.raises(HPDError, match="differs"):
        teacher_vocab_size(264, 264, tok, other)
    assert teacher_vocab_size(264, 512, tok, other, cross_tokenizer=True) is None  # the hook: checks skipped

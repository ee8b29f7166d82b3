"""On-policy self-distillation (regime `self`): prompts, alignment, teacher weights, LoRA, training.

Tiny random models and the byte tokenizer; nothing is downloaded. Seconds each.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hpd.config import load_config
from hpd.data.rows import Example, load_examples
from hpd.data.collate import build_batch
from hpd.data.encode import encode_self_distillation, privileged_prompt
from hpd.errors import HPDError
from hpd.models.loading import apply_lora, load_model, save_model
from hpd.teachers.sources import SelfTeacher, aligned_positions, prompt_ending_mismatches, teacher_view
from hpd.models.tokenizer import byte_tokenizer

TEMPLATE = load_config(None).opsd.teacher_template
REF = "7+5=12. 12*2=24. Answer: 24"
QUESTION = "Start at 7, add 5, times 2."


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def tiny(seed: int = 0, tokenizer=None):
    return load_model("tiny", tokenizer=tokenizer, tiny={"num_layers": 2, "hidden_size": 32, "num_heads": 4}, seed=seed)


def encode(rows: list[dict], chat_template: str = "auto", template: str = TEMPLATE, **kw):
    tok = byte_tokenizer()
    examples = [Example(r["prompt"], r.get("completion", ""), f"row{i}", {k: v for k, v in r.items()
                        if k not in ("prompt", "completion")}) for i, r in enumerate(rows)]
    return tok, encode_self_distillation(examples, tok, privileged_field="reference", teacher_template=template,
                                         max_length=kw.pop("max_length", 256), chat_template=chat_template, **kw)


def rand_model_(model, seed=1, scale=0.5):
    """Perturb every weight of `model` in place (a stand-in for training)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


# --------------------------------------------------------------------------------------------
# Prompt construction
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chat_template", ["auto", "none"])
def test_privileged_text_is_only_in_the_teachers_context(chat_template):
    tok, [e] = encode([{"prompt": QUESTION, "reference": REF}], chat_template=chat_template)
    student = tok.decode(e.prompt_ids)
    teacher = tok.decode(e.teacher_prompt_ids)
    assert REF not in student and "Reference solution" not in student
    assert QUESTION in student and QUESTION in teacher and REF in teacher
    # the privileged text comes before the same instruction, and both contexts end alike
    assert teacher.index(REF) < teacher.index(QUESTION)
    assert e.teacher_prompt_ids[-len(e.prompt_ids) + (1 if chat_template == "auto" else 0):][-5:] == e.prompt_ids[-5:]
    # the response both score is the privileged text (+ eos)
    assert tok.decode(e.completion_ids[:-1]) == REF and e.completion_ids[-1] == tok.eos_token_id
    if chat_template == "auto":  # chat-templated like the student's prompt
        assert student.startswith("<|bos|><|user|>") and student.endswith("<|end|><|assistant|>")
        assert teacher.startswith("<|bos|><|user|>") and teacher.endswith("<|end|><|assistant|>")


def test_privileged_prompt_of_a_chat_rewrites_only_the_last_user_message():
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "first"},
            {"role": "assistant", "content": "ok"}, {"role": "user", "content": QUESTION}]
    out = privileged_prompt(chat, REF, "Ref: {privileged} | {prompt}")
    assert out[:3] == chat[:3] and out[3] == {"role": "user", "content": f"Ref: {REF} | {QUESTION}"}
    assert chat[3]["content"] == QUESTION  # the input is not modified
    # braces in the texts are not template slots
    assert privileged_prompt("a {privileged} b", "c {prompt} d", "{privileged}/{prompt}") == "c {prompt} d/a {privileged} b"


def test_a_row_without_the_privileged_field_is_an_error_or_skipped():
    rows = [{"prompt": QUESTION, "reference": REF}, {"prompt": "no reference here", "completion": "x"}]
    with pytest.raises(HPDError, match=r"row1: field 'reference'.*missing"):
        encode(rows)
    from hpd.data.rows import LoadStats

    stats = LoadStats()
    _, out = encode(rows, on_bad_row="skip", stats=stats)
    assert len(out) == 1 and stats.skipped == 1 and "reference" in stats.skip_reasons[0]


def test_the_privileged_field_may_be_the_completion(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": QUESTION, "completion": REF}) + "\n")
    examples, _ = load_examples(str(path))
    tok = byte_tokenizer()
    [e] = encode_self_distillation(examples, tok, privileged_field="completion", teacher_template=TEMPLATE, max_length=256)
    assert REF in tok.decode(e.teacher_prompt_ids) and tok.decode(e.completion_ids[:-1]) == REF


def test_prompt_endings_that_differ_are_found():
    _, good = encode([{"prompt": QUESTION, "reference": REF}], chat_template="none")
    _, bad = encode([{"prompt": QUESTION, "reference": REF}], chat_template="none", template="{prompt}\n{privileged}")
    assert prompt_ending_mismatches([e.prompt_ids for e in good], [e.teacher_prompt_ids for e in good]) == []
    assert prompt_ending_mismatches([e.prompt_ids for e in bad], [e.teacher_prompt_ids for e in bad]) == [0]


def test_config_rules_of_the_self_regime():
    ok = load_config(None, ["regime.name=self", "teacher.path=none"])
    assert ok.opsd.teacher_weights == "frozen" and ok.opsd.privileged_field == "reference"
    with pytest.raises(HPDError, match="student is its own teacher.*teacher.path=none"):
        load_config(None, ["regime.name=self"])
    with pytest.raises(HPDError, match="sft never reads the teacher"):
        load_config(None, ["regime.name=self", "teacher.path=none", "objective.name=sft"])
    with pytest.raises(HPDError, match=r"\{prompt\} exactly once"):
        load_config(None, ["regime.name=self", "teacher.path=none", "opsd.teacher_template=only {privileged}"])
    with pytest.raises(HPDError, match="opsd.teacher_weights"):
        load_config(None, ["opsd.teacher_weights=stale"])
    with pytest.raises(HPDError, match="'none' is allowed only"):
        load_config(None, ["teacher.path=none", "objective.name=hpd"])


# --------------------------------------------------------------------------------------------
# Position alignment
# --------------------------------------------------------------------------------------------


def _two_contexts():
    tok, enc = encode([{"prompt": QUESTION, "reference": REF},
                       {"prompt": "Start at 3, times 4.", "reference": "3*4=12. Answer: 12"}])
    completions = [e.completion_ids for e in enc]
    s = build_batch([e.prompt_ids for e in enc], completions, pad_id=tok.pad_token_id)
    t = build_batch([e.teacher_prompt_ids for e in enc], completions, pad_id=tok.pad_token_id)
    return tok, enc, s, t


def test_the_teacher_scores_the_students_response_tokens_position_by_position():
    tok, enc, s, t = _two_contexts()
    index = aligned_positions(s["labels"], t["labels"], [len(e.prompt_ids) for e in enc],
                              [len(e.teacher_prompt_ids) for e in enc])
    active = s["labels"] != -100
    assert torch.equal(t["labels"].gather(1, index)[active], s["labels"][active])
    model, _ = tiny()
    model.eval()
    view = teacher_view(model, t["input_ids"], t["attention_mask"], chunked=False, index=index)
    assert view.shape[:2] == s["labels"].shape
    for b, e in enumerate(enc):  # each row alone, unpadded: the teacher's logits at its own positions
        ids = torch.tensor([e.teacher_prompt_ids + e.completion_ids])
        with torch.no_grad():
            alone = model(input_ids=ids).logits[0]
        P_t, P_s, L = len(e.teacher_prompt_ids), len(e.prompt_ids), len(e.completion_ids)
        torch.testing.assert_close(view[b, P_s - 1:P_s - 1 + L], alone[P_t - 1:P_t - 1 + L], rtol=1e-5, atol=1e-5)
    # the chunked view gathers hidden states at the same positions
    head = teacher_view(model, t["input_ids"], t["attention_mask"], chunked=True, index=index)
    torch.testing.assert_close((head.hidden @ head.weight.T)[active], view[active], rtol=1e-5, atol=1e-5)


def test_sequences_that_do_not_line_up_are_an_error():
    tok, enc, s, t = _two_contexts()
    lengths_s, lengths_t = [len(e.prompt_ids) for e in enc], [len(e.teacher_prompt_ids) for e in enc]
    other = build_batch([e.teacher_prompt_ids for e in enc], [enc[1].completion_ids, enc[0].completion_ids],
                        pad_id=tok.pad_token_id)
    with pytest.raises(HPDError, match="do not line up"):
        aligned_positions(s["labels"], other["labels"], lengths_s, lengths_t)
    with pytest.raises(HPDError, match="do not line up"):  # off by one prompt token
        aligned_positions(s["labels"], t["labels"], lengths_s, [n + 1 for n in lengths_t])


# --------------------------------------------------------------------------------------------
# Teacher weights: frozen, ema, live
# --------------------------------------------------------------------------------------------


def _ids():
    tok = byte_tokenizer()
    ids = torch.tensor([tok.encode("Start at 3, times 4.")])
    return ids, torch.ones_like(ids)


def _train_steps(model, steps=3):
    """A few real optimizer steps on a language-model loss."""
    ids, mask = _ids()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(steps):
        model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


def test_a_frozen_teachers_outputs_do_not_change_as_the_student_trains():
    model, _ = tiny()
    initial, _ = tiny()
    teacher = SelfTeacher(model, "frozen")
    ids, mask = _ids()
    before = teacher.view(ids, mask, chunked=False)
    _train_steps(model)
    with torch.no_grad():
        student_now = model(input_ids=ids, attention_mask=mask).logits
        initial_out = initial.eval()(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(student_now, before, atol=1e-3)  # the student did move
    assert torch.equal(teacher.view(ids, mask, chunked=False), before)
    torch.testing.assert_close(before, initial_out)
    # the swap does not leak: the student computes with its own weights afterwards, in train mode
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, student_now)
    assert model.training
    # the chunked view's head is the frozen head, even after the student's head changes again
    head = teacher.view(ids, mask, chunked=True)
    rand_model_(model)
    torch.testing.assert_close(head.hidden @ head.weight.T, before)


def test_an_ema_teacher_follows_the_student_with_its_decay():
    model, _ = tiny()
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    teacher = SelfTeacher(model, "ema", ema_decay=0.75)
    _train_steps(model)
    teacher.update()
    expected, _ = tiny()
    with torch.no_grad():
        for n, p in expected.named_parameters():
            p.copy_(0.75 * init[n] + 0.25 * dict(model.named_parameters())[n])
    ids, mask = _ids()
    with torch.no_grad():
        want = expected.eval()(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(teacher.view(ids, mask, chunked=False), want, rtol=1e-5, atol=1e-5)
    # a resumed teacher continues from the saved average
    fresh = SelfTeacher(model, "ema", ema_decay=0.75)
    fresh.load_state_dict(teacher.state_dict())
    torch.testing.assert_close(fresh.view(ids, mask, chunked=False), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(HPDError, match="same opsd.teacher_weights"):
        SelfTeacher(model, "frozen").load_state_dict(teacher.state_dict())


def test_a_live_teacher_is_the_current_student_without_gradient():
    model, _ = tiny()
    teacher = SelfTeacher(model, "live")
    assert teacher.shadow is None
    _train_steps(model)
    ids, mask = _ids()
    view = teacher.view(ids, mask, chunked=False)
    with torch.no_grad():
        now = model.eval()(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(view, now) and not view.requires_grad


def test_the_frozen_teacher_of_a_lora_student_is_the_base_model_with_adapters_disabled():
    base, _ = tiny()
    reference, _ = tiny()  # the same base weights, never wrapped
    student = apply_lora(base, rank=4, alpha=8.0)
    teacher = SelfTeacher(student, "frozen")
    assert teacher.shadow is None  # no copy of the weights
    trainable = [n for n, p in student.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    _train_steps(student)
    ids, mask = _ids()
    with torch.no_grad():
        student_out = student(input_ids=ids, attention_mask=mask).logits
        base_out = reference.eval()(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(student_out, base_out, atol=1e-3)  # the adapters did learn
    torch.testing.assert_close(teacher.view(ids, mask, chunked=False), base_out, rtol=1e-5, atol=1e-5)
    head = teacher.view(ids, mask, chunked=True)
    torch.testing.assert_close(head.hidden @ head.weight.T, base_out, rtol=1e-5, atol=1e-5)
    # the adapters are active again after the teacher's pass
    with torch.no_grad():
        torch.testing.assert_close(student(input_ids=ids, attention_mask=mask).logits, student_out)


def test_lora_adapters_are_seeded():
    a = apply_lora(tiny()[0], rank=4, alpha=8.0, seed=3).state_dict()
    b = apply_lora(tiny()[0], rank=4, alpha=8.0, seed=3).state_dict()
    c = apply_lora(tiny()[0], rank=4, alpha=8.0, seed=4).state_dict()
    lora_a = [k for k in a if "lora_A" in k]
    assert lora_a and all(torch.equal(a[k], b[k]) for k in a) and not all(torch.equal(a[k], c[k]) for k in lora_a)


def test_a_lora_student_is_saved_merged_as_a_plain_model(tmp_path):
    from transformers import AutoModelForCausalLM

    base, tok = tiny()
    student = apply_lora(base, rank=4, alpha=8.0)
    _train_steps(student)
    save_model(student, tok, tmp_path / "out")
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    ids, mask = _ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits,
                                   student.eval()(input_ids=ids, attention_mask=mask).logits, rtol=1e-4, atol=1e-4)
    assert not any("lora" in n for n, _ in loaded.named_parameters())
    assert any("lora" in n for n, _ in student.named_parameters())  # the student itself stays wrapped


# --------------------------------------------------------------------------------------------
# hpd train with regime self
# --------------------------------------------------------------------------------------------

FAST = ["data.max_length=64", "regime.max_new_tokens=8", "log.progress=false", "log.tensorboard=off", "log.every=1",
        "teacher.path=none", "regime.name=self", "opsd.privileged_field=completion", "optim.schedule=constant",
        "optim.warmup_ratio=0"]


@pytest.fixture()
def _at_root(monkeypatch, repo_root):
    monkeypatch.chdir(repo_root)


def _run(out: Path, *overrides: str):
    from hpd.training.trainer import train

    return train(load_config("configs/tiny.yaml", [*FAST, f"output_dir={out}", *overrides]))


def _records(run_dir: Path, kind="train"):
    from hpd.training.metrics_file import read_records

    return read_records(run_dir / "metrics.jsonl", kind)


@pytest.mark.usefixtures("_at_root")
@pytest.mark.parametrize(("objective", "response", "weights"), [
    ("hpd", "reference", "frozen"), ("hpd", "rollout", "ema"), ("jsd", "rollout", "live"), ("orkl", "rollout", "frozen"),
])
def test_self_distillation_trains(objective, response, weights, tmp_path):
    run = _run(tmp_path / "run", "max_steps=3", f"objective.name={objective}", f"opsd.response={response}",
               f"opsd.teacher_weights={weights}", "save.every=0")
    recs = _records(run)
    assert len(recs) == 3 and all(r["regime"] == "self" and r["loss"] == r["loss"] for r in recs)
    generated = recs[-1]["generated_tokens_total"]
    assert (generated == 0) if response == "reference" else (generated > 0)
    info = _records(run, "info")[0]
    assert info["teacher_parameters"] == 0 and info["teacher_prompt_ending_mismatches"] == 0
    assert (run / "final" / "model.safetensors").is_file()


@pytest.mark.usefixtures("_at_root")
@pytest.mark.parametrize("extra", [["opsd.teacher_weights=ema"], ["student.lora_rank=4", "opsd.teacher_weights=frozen"]],
                         ids=["ema", "lora"])
def test_a_resumed_self_distillation_run_equals_an_uninterrupted_one(extra, tmp_path):
    """The EMA teacher and the LoRA adapters go through checkpoints."""
    common = ["objective.name=hpd", "opsd.response=reference", "save.every=2", *extra]
    whole = _run(tmp_path / "whole", "max_steps=4", *common)
    part = tmp_path / "part"
    _run(part, "max_steps=2", *common)
    _run(part, "max_steps=4", *common)
    from safetensors.torch import load_file

    a, b = load_file(str(whole / "final" / "model.safetensors")), load_file(str(part / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    assert [r["loss"] for r in _records(whole)] == pytest.approx([r["loss"] for r in _records(part)], abs=1e-6)


@pytest.mark.usefixtures("_at_root")
def test_a_template_whose_ending_differs_warns(tmp_path, capsys):
    run = _run(tmp_path / "run", "max_steps=1", "data.chat_template=none",
               "opsd.teacher_template={prompt} (reference: {privileged})")
    assert _records(run, "info")[0]["teacher_prompt_ending_mismatches"] > 0
    assert "first response token follows different contexts" in capsys.readouterr().out


@pytest.mark.usefixtures("_at_root")
def test_diagnostics_land_on_the_logged_steps(tmp_path):
    """log.every = log.diagnostics_every = 2: every logged line carries agreement / KL / entropy."""
    run = _run(tmp_path / "run", "max_steps=4", "objective.name=hpd", "opsd.response=reference", "log.every=2",
               "log.diagnostics_every=2", "save.every=0")
    recs = _records(run)
    assert [r["step"] for r in recs] == [2, 4] and all("kl" in r and "agreement" in r for r in recs)

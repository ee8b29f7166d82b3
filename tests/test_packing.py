"""Sequence packing (`data.packing`, `hpd.data.packing`): packed rows train exactly as padded ones.

The references are the padded paths: the same rows, the same loss module, the same teacher; the
packed batch must give the same loss and gradients (fp32 rounding apart) and, after a few steps of
`hpd train`, the same weights, for llama and qwen2 students, with and without the chunked loss,
with an online teacher, a teacher cache, the OPSD self-teacher, and in the Trainer integration.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hpd.data.batches import make_batch
from hpd.config import DataConfig, load_config
from hpd.errors import HPDError
from hpd.models.loading import load_model, save_model, shared_vocab_size
from hpd.objectives import get_objective
from hpd.data.packing import Packing, check_packing
from hpd.responses.regimes import derive_seed
from hpd.teachers.sources import ModelTeacher
from hpd.training.step import DistillationLoss
from hpd.training.trainer import train

pytestmark = [pytest.mark.usefixtures("single_torch_thread"),
              pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.filterwarnings("ignore::UserWarning")]

TINY = {"num_layers": 2, "hidden_size": 32, "num_heads": 4, "intermediate_size": 64}
FAST = ["data.max_length=48", "log.progress=false", "log.tensorboard=off", "log.every=1", "save.every=0",
        "log.eval_every=0", "save.dtype=fp32", "max_steps=3"]


@pytest.fixture(autouse=True)
def _at_repo_root(monkeypatch, repo_root):
    monkeypatch.chdir(repo_root)


def _rows(tok):
    """Rows of very different lengths (3 to ~40 tokens), so padding would be most of a padded batch."""
    pairs = [("Add: 2+2 ", "4"), ("Write a short line about the sea and the sky: ", "blue over blue, all day long"),
             ("Hi ", "yo"), ("Reverse: lamp ", "pmal")]
    prompts = [tok(q)["input_ids"] for q, _ in pairs]
    completions = [tok.encode(a, add_special_tokens=False) + [tok.eos_token_id] for _, a in pairs]
    return prompts, completions


def _loss_and_grads(student, teacher, tok, objective, chunk_size, pack, pack_length=0):
    prompts, completions = _rows(tok)
    b = make_batch(prompts, completions, pad_id=tok.pad_token_id, vocab_size=None, device=torch.device("cpu"), pack=pack,
                   pack_length=pack_length)
    source = ModelTeacher(teacher)
    source.prepare(b, [], "train", range(len(prompts)))
    module = DistillationLoss(student, get_objective(objective), chunk_size=chunk_size,
                              vocab_size=shared_vocab_size(student, teacher, tok))
    g = torch.Generator().manual_seed(derive_seed(0, 0, 0, 0, "sample"))
    student.zero_grad(set_to_none=True)
    out = module(b.input_ids, b.attention_mask, b.labels, source.view(b), num_tokens=torch.tensor(float(b.num_active)),
                 generator=g, diagnostics=True, position_ids=b.position_ids)
    out["loss"].backward()
    grads = {k: p.grad.clone() for k, p in student.named_parameters()}
    return b, float(out["loss"]), float(out["output"].value), grads


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("chunk_size", [0, 16])
@pytest.mark.parametrize("objective", ["hpd", "jsd"])
@pytest.mark.parametrize("pack_length", [0, 10**6])
def test_a_packed_batch_gives_the_padded_loss_and_gradients(arch, chunk_size, objective, pack_length):
    teacher, tok = load_model("tiny", tiny={**TINY, "arch": arch}, seed=1)
    student, _ = load_model("tiny", tiny={**TINY, "arch": arch}, seed=2)
    teacher.requires_grad_(False).eval()
    padded, loss, value, grads = _loss_and_grads(student, teacher, tok, objective, chunk_size, pack=False)
    packed, p_loss, p_value, p_grads = _loss_and_grads(student, teacher, tok, objective, chunk_size, pack=True,
                                                       pack_length=pack_length)
    B, T = padded.input_ids.shape
    tokens = int(padded.attention_mask.sum())
    if pack_length:  # no padding in the packed forward: one row holding exactly the rows' tokens
        assert packed.input_ids.shape == (1, tokens) and bool(packed.attention_mask.all())
    else:  # rows no longer than the longest, fewer of them
        assert packed.input_ids.shape[1] == T and packed.input_ids.shape[0] < B
    assert int(packed.attention_mask.sum()) == tokens
    assert packed.input_ids.numel() < 0.8 * padded.input_ids.numel()  # these rows are mostly padding when padded
    assert packed.num_active == padded.num_active
    assert p_loss == pytest.approx(loss, rel=1e-5, abs=1e-6) and p_value == pytest.approx(value, rel=1e-5, abs=1e-6)
    for k in grads:
        torch.testing.assert_close(p_grads[k], grads[k], rtol=1e-4, atol=1e-6)


def test_the_packed_forward_without_restarted_positions_would_differ():
    """The equality above is not vacuous: the same packed row read as one sequence gives other states."""
    from hpd.models.head import final_hidden_states

    model, tok = load_model("tiny", tiny=TINY, seed=1)
    prompts, completions = _rows(tok)
    b = make_batch(prompts, completions, pad_id=tok.pad_token_id, vocab_size=None, device=torch.device("cpu"), pack=True)
    with torch.no_grad():
        right = final_hidden_states(model, b.input_ids, b.attention_mask, b.position_ids)
        leaked = final_hidden_states(model, b.input_ids, b.attention_mask)
    assert float((right - leaked).abs().max()) > 1e-2


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "model.safetensors"))


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=2e-5)


def _train_both(tmp_path: Path, *overrides: str, pack_length: int = 0) -> tuple[Path, Path]:
    runs = []
    for pack in ("false", "true"):
        cfg = load_config("configs/tiny.yaml", [*FAST, f"output_dir={tmp_path / pack}", f"data.packing={pack}",
                                                f"data.pack_length={pack_length}", *overrides])
        runs.append(train(cfg))
    return runs[0], runs[1]


@pytest.mark.parametrize(("arch", "chunk_size", "pack_length"),
                         [("llama", 0, 0), ("llama", 256, 10**5), ("qwen2", 0, 10**5), ("qwen2", 256, 0)])
def test_packed_training_ends_with_the_padded_runs_weights(arch, chunk_size, pack_length, tmp_path):
    padded, packed = _train_both(tmp_path, f"student.tiny_arch={arch}", f"teacher.tiny_arch={arch}",
                                 f"objective.chunk_size={chunk_size}", pack_length=pack_length)
    _assert_same_weights(padded, packed)
    # and training moved them: equal weights are not the initial ones
    init, _ = load_model("tiny", tiny={"arch": arch, "num_layers": 2, "hidden_size": 64, "num_heads": 4,
                                       "intermediate_size": 128}, seed=0)
    w = _weights(packed)
    assert any(float((w[k] - p.detach()).abs().max()) > 1e-4 for k, p in init.state_dict().items() if k in w)


def test_packed_self_distillation_ends_with_the_padded_runs_weights(tmp_path):
    padded, packed = _train_both(tmp_path, "teacher.path=none", "regime.name=self", "opsd.privileged_field=completion",
                                 "opsd.teacher_template={privileged} | {prompt}", pack_length=100)
    _assert_same_weights(padded, packed)


def test_packed_training_from_a_teacher_cache_ends_with_the_padded_runs_weights(tmp_path):
    from hpd.teachers.cache import build_teacher_cache

    model, tok = load_model("tiny", tiny={"num_layers": 2, "hidden_size": 64, "intermediate_size": 128}, seed=7)
    teacher_dir = save_model(model, tok, tmp_path / "teacher")
    cache = build_teacher_cache(teacher_dir, ["examples/tiny.jsonl"], tmp_path / "cache", top_k=8,
                                data=DataConfig(max_length=48), log=None)
    padded, packed = _train_both(tmp_path, f"teacher.path={teacher_dir}", f"teacher.cache={cache}",
                                 "data.eval_fraction=0")
    _assert_same_weights(padded, packed)


def test_models_that_would_leak_attention_across_packed_rows_are_refused(tmp_path):
    model, _ = load_model("tiny", tiny=TINY, seed=1)
    check_packing(model)  # sdpa: fine
    model.config._attn_implementation = "paged|sdpa"
    with pytest.raises(HPDError, match="attention implementation is 'paged|sdpa'.*supported: eager, sdpa"):
        check_packing(model)
    model.config._attn_implementation = "sdpa"

    # A model whose code drops position_ids (so rows attend to each other) fails the probe.
    decoder = model.get_decoder()
    real = decoder.forward

    def no_positions(*args, position_ids=None, **kw):
        return real(*args, **kw)

    decoder.forward = no_positions
    with pytest.raises(HPDError, match="other hidden states for packed rows"):
        check_packing(model, "teacher")


def test_a_trainer_integration_takes_packed_batches_and_gives_the_padded_loss(tmp_path):
    from transformers import DataCollatorWithFlattening, TrainingArguments

    from hpd.integrations import DistillationTrainer

    teacher, tok = load_model("tiny", tiny=TINY, seed=1)
    student0, _ = load_model("tiny", tiny=TINY, seed=2)
    teacher.requires_grad_(False).eval()
    prompts, completions = _rows(tok)
    rows = [{"input_ids": p + c, "labels": [-100] * len(p) + c} for p, c in zip(prompts, completions)]
    T = max(len(r["input_ids"]) for r in rows)
    padded = {"input_ids": torch.tensor([r["input_ids"] + [tok.pad_token_id] * (T - len(r["input_ids"])) for r in rows]),
              "attention_mask": torch.tensor([[1] * len(r["input_ids"]) + [0] * (T - len(r["input_ids"])) for r in rows]),
              "labels": torch.tensor([r["labels"] + [-100] * (T - len(r["labels"])) for r in rows])}
    packed = DataCollatorWithFlattening()(copy.deepcopy(rows))
    assert "attention_mask" not in packed and packed["input_ids"].shape[0] == 1
    n = torch.tensor(sum(len(c) for c in completions))
    out = {}
    for name, inputs in (("padded", padded), ("packed", packed)):
        args = TrainingArguments(str(tmp_path / name), max_steps=1, per_device_train_batch_size=4, report_to=[],
                                 use_cpu=True, save_strategy="no", disable_tqdm=True, seed=3)
        trainer = DistillationTrainer(model=copy.deepcopy(student0), args=args, teacher=teacher, objective="hpd",
                                      chunk_size=8)
        loss = trainer.training_step(trainer.model, dict(inputs), num_items_in_batch=n)
        out[name] = float(loss), {k: p.grad.clone() for k, p in trainer.model.named_parameters()}
    assert out["packed"][0] == pytest.approx(out["padded"][0], rel=1e-5)
    for k, g in out["padded"][1].items():
        torch.testing.assert_close(out["packed"][1][k], g, rtol=1e-4, atol=1e-6)


def test_a_teacher_cache_refuses_packed_integration_batches(tmp_path):
    from hpd.integrations import HFDistillation, _CacheTeacher

    loss = HFDistillation.__new__(HFDistillation)
    loss.teacher = _CacheTeacher.__new__(_CacheTeacher)
    student, _ = load_model("tiny", tiny=TINY, seed=2)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with pytest.raises(HPDError, match="teacher cache is read by padded rows"):
        loss.loss(student=student, input_ids=ids, attention_mask=None, labels=ids, num_items_in_batch=3,
                  position_ids=torch.tensor([[0, 1, 2, 0, 1]]))


def test_packing_lays_rows_end_to_end_in_batch_order():
    p = Packing([2, 3], width=5)
    x = torch.arange(6).reshape(2, 3)
    assert p.pack(x).tolist() == [[0, 1, 3, 4, 5]]
    assert p.position_ids().tolist() == [[0, 1, 0, 1, 2]]
    # OPSD: an index into padded teacher rows becomes one into the packed teacher row
    assert p.pack_index(torch.tensor([[0, 1, 0], [2, 3, 0]]), p.like([4, 5])).tolist() == [[0, 1, 6, 7, 4]]
    # width 0: packed rows no longer than the longest row; next fit keeps the batch order
    q = Packing([3, 1, 4, 1, 2])
    assert q.bins == [[0, 1], [2], [3, 4]] and q.width == 4
    assert q.pack(torch.ones(5, 4, dtype=torch.long), fill=-1).tolist() == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, -1]]
    assert q.position_ids().tolist() == [[0, 1, 2, 0], [0, 1, 2, 3], [0, 0, 1, 0]]  # the padding: a segment of its own
    assert q.like([5, 2, 4, 2, 2]).width == 7


def test_packed_on_policy_training_ends_with_the_padded_runs_weights(tmp_path):
    """Student rollouts are generated from the prompts as ever, then packed for the loss."""
    padded, packed = _train_both(tmp_path, "regime.name=student", "regime.max_new_tokens=8", "max_steps=2",
                                 "student.lora_rank=4", pack_length=10**5)
    _assert_same_weights(padded, packed)


def test_the_integration_refuses_packed_batches_for_a_teacher_that_would_leak(tmp_path):
    from transformers import DataCollatorWithFlattening, TrainingArguments

    from hpd.integrations import DistillationTrainer

    teacher, tok = load_model("tiny", tiny=TINY, seed=1)
    student, _ = load_model("tiny", tiny=TINY, seed=2)
    teacher.config._attn_implementation = "paged|sdpa"
    prompts, completions = _rows(tok)
    packed = DataCollatorWithFlattening()([{"input_ids": p + c, "labels": [-100] * len(p) + c}
                                           for p, c in zip(prompts, completions)])
    args = TrainingArguments(str(tmp_path / "out"), max_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                             disable_tqdm=True)
    trainer = DistillationTrainer(model=student, args=args, teacher=teacher, objective="fkl")
    with pytest.raises(HPDError, match="the teacher's attention implementation is 'paged|sdpa'"):
        trainer.training_step(trainer.model, dict(packed), num_items_in_batch=torch.tensor(9))

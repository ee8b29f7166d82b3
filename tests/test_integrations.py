"""hpd inside Hugging Face loops: `DistillationTrainer`, `HPDLoss` (compute_loss_func), TRL's SFTTrainer.

The reference is `hpd train`'s own loss module (`hpd.training.step.DistillationLoss`) on the batch
`hpd.data.collate.build_batch` makes of the same (prompt, completion) tokens: aligned labels built
from the tokens, not from the shift under test. Tiny random models, nothing downloaded.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import Trainer, TrainingArguments

from hpd.config import DataConfig
from hpd.data.collate import build_batch
from hpd.errors import HPDError
from hpd.integrations import DistillationTrainer, HPDLoss, trainer_rows
from hpd.models.loading import load_model, save_model, shared_vocab_size
from hpd.objectives import get_objective, shift_labels
from hpd.responses.regimes import derive_seed
from hpd.teachers.sources import teacher_view
from hpd.training.step import DistillationLoss

pytestmark = [pytest.mark.usefixtures("single_torch_thread"),
              pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.filterwarnings("ignore::UserWarning")]

TINY = {"num_layers": 1, "hidden_size": 32, "intermediate_size": 64}
PAIRS = [("Add: 2+2 ", "4"), ("Reverse: dog ", "god"), ("Upper: cat ", "CAT"), ("Add: 10+5 ", "15")]


@pytest.fixture(scope="module")
def models():
    teacher, tok = load_model("tiny", tiny=TINY, seed=1)
    student, _ = load_model("tiny", tiny=TINY, seed=2)
    return teacher.requires_grad_(False).eval(), student, tok


def _tokens(tok, pairs=PAIRS):
    prompts = [tok(q)["input_ids"] for q, _ in pairs]
    completions = [tok.encode(a, add_special_tokens=False) + [tok.eos_token_id] for _, a in pairs]
    return prompts, completions


def collate(rows, pad_id):
    """Right-padded HF batch: labels unshifted, -100 on the prompt and the padding."""
    T = max(len(r["input_ids"]) for r in rows)
    pad = lambda xs, v: xs + [v] * (T - len(xs))  # noqa: E731
    return {"input_ids": torch.tensor([pad(r["input_ids"], pad_id) for r in rows]),
            "attention_mask": torch.tensor([pad([1] * len(r["input_ids"]), 0) for r in rows]),
            "labels": torch.tensor([pad(r["labels"], -100) for r in rows])}


def _hf_batch(tok, prompts, completions):
    rows = [{"input_ids": p + c, "labels": [-100] * len(p) + c} for p, c in zip(prompts, completions)]
    return rows, collate(rows, tok.pad_token_id)


def _args(tmp_path, **kw):
    kw = {"max_steps": 1, "per_device_train_batch_size": 4, "report_to": [], "use_cpu": True, "save_strategy": "no",
          "logging_steps": 1, "disable_tqdm": True, "seed": 3, **kw}
    return TrainingArguments(str(tmp_path / "out"), **kw)


def _hpd_train_loss(student, teacher, tok, prompts, completions, objective, chunk_size, seed):
    """Loss and gradients of `hpd train`'s loss module on the batch build_batch makes (step 0, micro 0)."""
    b = build_batch(prompts, completions, pad_id=tok.pad_token_id)
    module = DistillationLoss(student, objective, chunk_size=chunk_size, vocab_size=shared_vocab_size(student, teacher, tok))
    view = teacher_view(teacher, b["input_ids"], b["attention_mask"], chunked=True)
    n = (b["labels"] != -100).sum()
    g = torch.Generator().manual_seed(derive_seed(seed, 0, 0, 0, "sample"))
    out = module(b["input_ids"], b["attention_mask"], b["labels"], view, num_tokens=n, generator=g, diagnostics=True)
    out["loss"].backward()
    metrics = {**out["output"].metrics, "value": float(out["output"].value)}
    grads = {k: p.grad.clone() for k, p in student.named_parameters() if p.grad is not None}
    return out["loss"].detach(), grads, b, metrics


CASES = [("hpd", {}, 0, "trainer"), ("hpd", {}, 4, "trainer"), ("fkl", {"ce_weight": 0.5, "kd_weight": 2.0}, 4, "trainer"),
         ("jsd", {"beta": 0.3}, 0, "trainer"), ("hpd", {}, 0, "loss_func"), ("skl", {"alpha": 0.2}, 0, "loss_func")]


@pytest.mark.parametrize("name,params,chunk_size,way", CASES)
def test_a_trainer_step_gives_hpd_trains_loss_and_gradients(models, tmp_path, name, params, chunk_size, way):
    teacher, student0, tok = models
    prompts, completions = _tokens(tok)
    ref_student = copy.deepcopy(student0)
    want_loss, want_grads, b, want_metrics = _hpd_train_loss(ref_student, teacher, tok, prompts, completions,
                                               get_objective(name, **params), chunk_size, seed=3)

    student = copy.deepcopy(student0)
    _, inputs = _hf_batch(tok, prompts, completions)
    assert torch.equal(inputs["input_ids"], b["input_ids"])
    if way == "trainer":
        trainer = DistillationTrainer(model=student, args=_args(tmp_path), teacher=teacher, objective=name,
                                      objective_params=params, chunk_size=chunk_size)
    else:
        loss_fn = HPDLoss(teacher=teacher, objective=name, objective_params=params)
        trainer = Trainer(model=student, args=_args(tmp_path), compute_loss_func=loss_fn)
        loss_fn.attach(trainer)
    n = (inputs["labels"][:, 1:] != -100).sum()  # what the Trainer counts as num_items_in_batch
    loss = trainer.training_step(trainer.model, dict(inputs), num_items_in_batch=n)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    for k, p in student.named_parameters():
        torch.testing.assert_close(p.grad, want_grads[k], rtol=1e-4, atol=1e-6, msg=k)
    # What the logs will show for this step: hpd train's metrics line, prefixed.
    source = trainer.distillation if way == "trainer" else loss_fn
    got = source.pop_metrics("train", trainer.accelerator)
    assert got.keys() == {f"hpd/{k}" for k in want_metrics}
    for k, v in want_metrics.items():
        assert got[f"hpd/{k}"] == pytest.approx(v, rel=1e-4, abs=1e-6), k


def test_a_lora_student_in_the_trainer_gets_hpd_trains_gradients(models, tmp_path):
    pytest.importorskip("peft")
    from hpd.models.loading import apply_lora

    teacher, student0, tok = models
    prompts, completions = _tokens(tok)
    ref = apply_lora(copy.deepcopy(student0), rank=4, alpha=8, seed=5)
    want_loss, want_grads, _, _ = _hpd_train_loss(ref, teacher, tok, prompts, completions, get_objective("hpd"), 4, seed=3)
    student = apply_lora(copy.deepcopy(student0), rank=4, alpha=8, seed=5)
    trainer = DistillationTrainer(model=student, args=_args(tmp_path), teacher=teacher, objective="hpd", chunk_size=4)
    _, inputs = _hf_batch(tok, prompts, completions)
    loss = trainer.training_step(trainer.model, inputs, num_items_in_batch=(inputs["labels"][:, 1:] != -100).sum())
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    trained = [k for k, p in student.named_parameters() if p.requires_grad]
    assert trained and all("lora" in k for k in trained)
    for k in trained:
        torch.testing.assert_close(dict(student.named_parameters())[k].grad, want_grads[k], rtol=1e-4, atol=1e-6, msg=k)


def test_unshifted_labels_are_shifted_by_the_integration_and_refused_by_the_objective_api(models):
    teacher, student, tok = models
    prompts, completions = _tokens(tok)
    b = build_batch(prompts, completions, pad_id=tok.pad_token_id)
    _, inputs = _hf_batch(tok, prompts, completions)
    assert torch.equal(shift_labels(inputs["labels"]), b["labels"])
    with torch.no_grad():
        logits = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        t_logits = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    obj = get_objective("fkl")
    with pytest.raises(HPDError, match="unshifted.*shift_labels"):
        obj(logits, t_logits, inputs["labels"])
    with pytest.raises(HPDError, match="unshifted"):
        obj.chunked(torch.randn(*b["input_ids"].shape, 8), torch.randn(logits.shape[-1], 8),
                    t_logits, inputs["labels"])
    # What the old silent misalignment trained: the positions one to the right of the aligned ones.
    def trained_positions(labels, **kw):
        z = logits.clone().requires_grad_(True)
        obj(z, t_logits, labels, **kw).loss.backward()
        return z.grad.abs().sum(-1) > 0

    right = trained_positions(b["labels"])
    assert torch.equal(right, b["labels"] != -100)
    assert not torch.equal(trained_positions(inputs["labels"], check_alignment=False), right)
    # Aligned labels with an active first position (random labels, windows) still pass.
    obj(logits, t_logits, torch.randint(0, 200, b["labels"].shape))


def test_a_short_trainer_run_moves_the_student_toward_the_teacher(models, tmp_path):
    teacher, student0, tok = models
    rows, _ = _hf_batch(tok, *_tokens(tok))
    trainer = DistillationTrainer(model=copy.deepcopy(student0), args=_args(tmp_path, max_steps=30, learning_rate=1e-2),
                                  train_dataset=rows, eval_dataset=rows, data_collator=lambda r: collate(r, tok.pad_token_id),
                                  teacher=teacher, objective="fkl")
    before = trainer.evaluate()["eval_hpd/kl"]
    trainer.train()
    after = trainer.evaluate()["eval_hpd/kl"]
    assert after < 0.5 * before, (before, after)


def test_hpd_metrics_reach_the_trainers_logs(models, tmp_path):
    teacher, student0, tok = models
    rows, _ = _hf_batch(tok, *_tokens(tok))
    want = {"loss", "hpd/value", "hpd/frac_A", "hpd/frac_B", "hpd/r_mean", "hpd/r_hat_mean", "hpd/kl", "hpd/agreement"}
    collator = lambda r: collate(r, tok.pad_token_id)  # noqa: E731
    trainer = DistillationTrainer(model=copy.deepcopy(student0), args=_args(tmp_path, max_steps=2), train_dataset=rows,
                                  data_collator=collator, teacher=teacher)
    trainer.train()
    assert want <= set(trainer.state.log_history[0]) and want <= set(trainer.state.log_history[1])
    assert 0.0 <= trainer.state.log_history[0]["hpd/frac_A"] <= 1.0
    loss_fn = HPDLoss(teacher=teacher, objective="hpd")
    plain = Trainer(model=copy.deepcopy(student0), args=_args(tmp_path, max_steps=2), train_dataset=rows,
                    data_collator=collator, compute_loss_func=loss_fn)
    loss_fn.attach(plain)
    plain.train()
    assert want <= set(plain.state.log_history[0])
    assert "eval_hpd/frac_A" in plain.evaluate(rows)


def test_hpd_loss_needs_attach_and_a_teacher(models, tmp_path):
    teacher, student0, tok = models
    with pytest.raises(HPDError, match="needs a teacher"):
        HPDLoss(objective="hpd")
    loss_fn = HPDLoss(teacher=teacher)
    trainer = Trainer(model=copy.deepcopy(student0), args=_args(tmp_path), compute_loss_func=loss_fn)
    _, inputs = _hf_batch(tok, *_tokens(tok))
    with pytest.raises(HPDError, match="attach"):
        trainer.training_step(trainer.model, dict(inputs), num_items_in_batch=torch.tensor(9))


def test_a_second_loss_is_refused(models, tmp_path):
    # (packed batches are taken: tests/test_packing.py)
    teacher, student0, tok = models
    with pytest.raises(HPDError, match="computes its own loss"):
        DistillationTrainer(model=student0, args=_args(tmp_path), teacher=teacher, compute_loss_func=lambda *a, **k: 0)


def test_a_teacher_cache_in_the_trainer_gives_the_online_teachers_loss(models, tmp_path):
    from hpd.teachers.cache import build_teacher_cache

    teacher, student0, tok = models
    teacher_dir = save_model(teacher, tok, tmp_path / "teacher")
    data = DataConfig(max_length=48)
    cache = build_teacher_cache(teacher_dir, ["examples/tiny.jsonl"], tmp_path / "cache", top_k=10**6, dtype="float32",
                                data=data, log=None)
    rows = trainer_rows("examples/tiny.jsonl", tok, data)[:4]
    losses = []
    for source in (teacher_dir, cache):
        trainer = DistillationTrainer(model=copy.deepcopy(student0), args=_args(tmp_path), teacher=source, objective="hpd")
        batch = collate(rows, tok.pad_token_id)
        losses.append(trainer.training_step(trainer.model, batch, num_items_in_batch=(batch["labels"][:, 1:] != -100).sum()))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    # A row the cache does not hold is refused, saying so.
    other = collate([{"input_ids": rows[0]["input_ids"] + [65], "labels": rows[0]["labels"] + [65]}], tok.pad_token_id)
    with pytest.raises(HPDError, match="does not hold"):
        trainer.training_step(trainer.model, other, num_items_in_batch=torch.tensor(5))


def test_trl_sft_trainer_distills_with_hpds_loss(models, tmp_path):
    trl = pytest.importorskip("trl", reason="TRL is optional: pip install 'hpd-distill[trl]'")
    from datasets import Dataset

    from hpd.integrations import DistillationSFTTrainer

    teacher, student0, tok = models
    ds = Dataset.from_list([{"prompt": q, "completion": a} for q, a in PAIRS])
    args = trl.SFTConfig(str(tmp_path / "sft"), max_steps=2, per_device_train_batch_size=4, report_to=[], use_cpu=True,
                         save_strategy="no", logging_steps=1, disable_tqdm=True, seed=3)
    trainer = DistillationSFTTrainer(model=copy.deepcopy(student0), args=args, train_dataset=ds, processing_class=tok,
                                     teacher=teacher, objective="hpd")
    batch = next(iter(trainer.get_train_dataloader()))
    # The reference: hpd train's loss on the (prompt, completion) tokens TRL encoded (it appends EOS).
    prompts, completions = [], []
    for ids, mask, lab in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist(), batch["labels"].tolist()):
        n, first = sum(mask), next(t for t, y in enumerate(lab) if y != -100)
        prompts.append(ids[:first]), completions.append(ids[first:n])
    ref = copy.deepcopy(student0)
    want_loss, want_grads, _, _ = _hpd_train_loss(ref, teacher, tok, prompts, completions, get_objective("hpd"), 1024, seed=3)
    n = (batch["labels"][:, 1:] != -100).sum()
    loss = trainer.training_step(trainer.model, dict(batch), num_items_in_batch=n)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    for k, p in trainer.model.named_parameters():
        torch.testing.assert_close(p.grad, want_grads[k], rtol=1e-4, atol=1e-6, msg=k)
    trainer.model.zero_grad()
    trainer.train()
    assert {"hpd/frac_A", "hpd/r_mean"} <= set(trainer.state.log_history[0])
    # The compute_loss_func way through SFTTrainer too.
    loss_fn = HPDLoss(teacher=teacher, objective="fkl")
    sft = trl.SFTTrainer(model=copy.deepcopy(student0), args=args, train_dataset=ds, processing_class=tok,
                         compute_loss_func=loss_fn)
    loss_fn.attach(sft)
    sft.train()
    assert {"hpd/kl", "hpd/value"} <= set(sft.state.log_history[0])


# --- gradient accumulation and data parallelism: the gradient of the global token mean ------------------------

MORE = PAIRS + [("Add: 7+8 ", "15"), ("Reverse: star ", "rats"), ("Upper: sun ", "SUN"), ("Sort: b a ", "a b")]


def _grads_of_one_step(out: str, per_device: int, grad_accum: int, chunk_size: int) -> None:
    """Train one fkl step (no clipping) on the 8 rows of MORE; rank 0 saves the gradients it steps with."""
    from transformers import TrainerCallback

    teacher, tok = load_model("tiny", tiny=TINY, seed=1)
    student, _ = load_model("tiny", tiny=TINY, seed=2)
    rows, _ = _hf_batch(tok, *_tokens(tok, MORE))

    class Grab(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            if state.is_world_process_zero:
                torch.save({k: p.grad.clone() for k, p in model.named_parameters()}, out)

    args = TrainingArguments(out + ".run", max_steps=1, per_device_train_batch_size=per_device,
                             gradient_accumulation_steps=grad_accum, max_grad_norm=0.0, report_to=[], save_strategy="no",
                             seed=3, disable_tqdm=True, use_cpu=True)
    trainer = DistillationTrainer(model=student, args=args, train_dataset=rows, teacher=teacher, objective="fkl",
                                  chunk_size=chunk_size, data_collator=lambda r: collate(r, tok.pad_token_id),
                                  callbacks=[Grab()])
    trainer.train()


def _reference_grads(models):
    teacher, student0, tok = models
    student = copy.deepcopy(student0)
    _, grads, _, _ = _hpd_train_loss(student, teacher, tok, *_tokens(tok, MORE), get_objective("fkl"), 4, seed=3)
    return grads


def _assert_same_grads(got, want):
    for k, g in want.items():
        torch.testing.assert_close(got[k], g, rtol=1e-4, atol=1e-7, msg=k)


def test_gradient_accumulation_gives_the_gradient_of_the_whole_batch(models, tmp_path):
    out = str(tmp_path / "grads.pt")
    _grads_of_one_step(out, per_device=4, grad_accum=2, chunk_size=4)  # two micro-batches of 4 rows
    _assert_same_grads(torch.load(out), _reference_grads(models))


@pytest.mark.slow
def test_two_processes_give_the_gradient_of_the_whole_batch(models, tmp_path):
    """DDP (2 CPU processes, gloo) through the chunked path's hidden-state capture: the same gradient."""
    import os
    import socket
    import subprocess
    import sys

    out = str(tmp_path / "grads.pt")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           __file__, out, "4", "1", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "'epoch': '1.0'" in res.stdout or "'epoch': '1'" in res.stdout, res.stdout[-2000:]  # 2 x 4 rows: one epoch
    _assert_same_grads(torch.load(out), _reference_grads(models))


if __name__ == "__main__":  # the worker of the two-process test
    import sys

    torch.set_num_threads(1)
    _grads_of_one_step(sys.argv[1], *map(int, sys.argv[2:]))


def test_a_teacher_object_of_another_vocabulary_is_refused_before_any_step(models, tmp_path):
    """A teacher model object is checked as `hpd train` checks a teacher path (hpd.vocab.teacher_vocab_size)."""
    teacher, student0, tok = models
    bigger = copy.deepcopy(teacher)
    bigger.resize_token_embeddings(512)  # another tokenizer's head: 512 rows against the student's 264
    # Its tokenizer unknown, the extra rows could be anything: refused, even with the student's tokenizer at hand.
    with pytest.raises(HPDError, match="512 rows.*not known"):
        DistillationTrainer(model=copy.deepcopy(student0), args=_args(tmp_path), teacher=bigger, processing_class=tok)
    loss_fn = HPDLoss(teacher=bigger)
    trainer = Trainer(model=copy.deepcopy(student0), args=_args(tmp_path), compute_loss_func=loss_fn,
                      processing_class=tok)
    with pytest.raises(HPDError, match="512 rows"):
        loss_fn.attach(trainer)
    # Its own tokenizer given, and not the student's: refused by name.
    other = copy.deepcopy(tok)
    other.add_tokens([f"<extra{i}>" for i in range(200)])
    with pytest.raises(HPDError, match="differs"):
        DistillationTrainer(model=copy.deepcopy(student0), args=_args(tmp_path), teacher=bigger, teacher_tokenizer=other,
                            processing_class=tok)
    # The student's tokenizer: the extra rows are padding, and the loss runs over the shared 264.
    ok = DistillationTrainer(model=copy.deepcopy(student0), args=_args(tmp_path), teacher=bigger, teacher_tokenizer=tok,
                             processing_class=tok, chunk_size=4)
    assert ok.distillation.vocab_size(ok.model, tok) == 264
    _, inputs = _hf_batch(tok, *_tokens(tok))
    loss = ok.training_step(ok.model, dict(inputs), num_items_in_batch=(inputs["labels"][:, 1:] != -100).sum())
    assert torch.isfinite(loss)
    with pytest.raises(HPDError, match="teacher model object"):
        HPDLoss(teacher=None, objective="sft", teacher_tokenizer=tok)


def test_a_matching_teacher_object_still_distills_and_a_student_head_hpd_cannot_view_is_refused(models, tmp_path):
    teacher, student0, tok = models
    trainer = DistillationTrainer(model=copy.deepcopy(student0), args=_args(tmp_path), teacher=teacher,
                                  teacher_tokenizer=tok, processing_class=tok, chunk_size=4)
    _, inputs = _hf_batch(tok, *_tokens(tok))
    assert torch.isfinite(trainer.training_step(trainer.model, dict(inputs), num_items_in_batch=torch.tensor(9)))
    odd = copy.deepcopy(student0)
    odd.config.logits_scaling = 2.0  # a logit transform hpd does not know llama to apply
    with pytest.raises(HPDError, match="logits_scaling.*chunk_size=0"):
        DistillationTrainer(model=odd, args=_args(tmp_path), teacher=teacher, chunk_size=4)
    DistillationTrainer(model=odd, args=_args(tmp_path), teacher=teacher, chunk_size=0)  # the model's own logits


@pytest.mark.parametrize("way", ["trainer", "loss_func"])
def test_the_logged_loss_is_the_objectives_value_and_the_backward_uses_the_surrogate(models, tmp_path, way):
    """jsd's surrogate (what the gradient comes from) is not its value: the logs show the value as `loss`.

    The backward is unchanged: the step returns the surrogate with `hpd train`'s gradients
    (test_a_trainer_step_gives_hpd_trains_loss_and_gradients, jsd among its cases), logged here as hpd/surrogate.
    """
    teacher, student0, tok = models
    prompts, completions = _tokens(tok)
    params = {"beta": 0.5}
    want_loss, _, _, want_metrics = _hpd_train_loss(copy.deepcopy(student0), teacher, tok, prompts, completions,
                                                    get_objective("jsd", **params), 0, seed=3)
    assert abs(float(want_loss) - want_metrics["value"]) > 1e-3  # the two differ here, so the test can tell them apart
    rows, _ = _hf_batch(tok, prompts, completions)
    kw = dict(args=_args(tmp_path, learning_rate=0.0), train_dataset=rows, eval_dataset=rows,
              data_collator=lambda r: collate(r, tok.pad_token_id))
    student = copy.deepcopy(student0)
    if way == "trainer":
        trainer = DistillationTrainer(model=student, teacher=teacher, objective="jsd", objective_params=params,
                                      chunk_size=0, **kw)
    else:
        loss_fn = HPDLoss(teacher=teacher, objective="jsd", objective_params=params)
        trainer = Trainer(model=student, compute_loss_func=loss_fn, **kw)
        loss_fn.attach(trainer)
    done = trainer.train()
    logged = trainer.state.log_history[0]
    assert logged["loss"] == logged["hpd/value"] == pytest.approx(want_metrics["value"], rel=1e-4)
    # the closing summary too: the value over the run (one step here), the Trainer's own number beside it
    assert done.metrics["train_loss"] == trainer.state.log_history[-1]["train_loss"] == logged["hpd/value"]
    assert done.metrics["hpd/train_surrogate"] == pytest.approx(float(want_loss), rel=1e-4)
    assert logged["hpd/surrogate"] == pytest.approx(float(want_loss), abs=1e-4)  # the Trainer rounds it to 4 places
    ev = trainer.evaluate()
    assert ev["eval_loss"] == ev["eval_hpd/value"] == pytest.approx(want_metrics["value"], rel=1e-4)
    assert ev["eval_hpd/surrogate"] == pytest.approx(float(want_loss), rel=1e-4)


def test_on_policy_regimes_are_refused_with_the_hpd_train_command(models, tmp_path):
    teacher, student0, _ = models
    with pytest.raises(HPDError, match=r"hpd train CONFIG objective.name=jsd objective.beta=0.5 regime.name=mixed "
                                       r"regime.mixed_lambda=0.3$"):
        DistillationTrainer(model=student0, args=_args(tmp_path), teacher=teacher, objective="jsd",
                            objective_params={"beta": 0.5}, regime="mixed", mixed_lambda=0.3)
    with pytest.raises(HPDError, match=r"objective.name=jsd objective.beta=0.9 regime.name=mixed regime.mixed_lambda=1$"):
        HPDLoss(teacher=teacher, objective="jsd", objective_params={"beta": 0.9, "lmbda": 1.0})  # TRL GKDConfig's name
    with pytest.raises(HPDError, match=r"objective.name=rkl regime.name=student$"):
        HPDLoss(teacher=teacher, objective="rkl", regime="student")
    with pytest.raises(HPDError, match="unknown regime 'onpolicy'"):
        HPDLoss(teacher=teacher, regime="onpolicy")

"""Distill inside your own Hugging Face loop: `transformers.Trainer` and TRL's `SFTTrainer`.

Two ways in, both taking Hugging Face's own batches (`input_ids`, `attention_mask`, and
*unshifted* `labels` with -100 where ignored, as HF collators and TRL build them), a teacher
model, a teacher directory or a teacher cache (`hpd cache-teacher`), and any objective of
`hpd.objectives` by name with its parameters (`ce_weight`/`kd_weight` included):

- `DistillationTrainer(teacher=..., objective=..., objective_params=..., model=..., args=...)`, a
  `transformers.Trainer` with plain `TrainingArguments`; `DistillationSFTTrainer` is the same on
  TRL's `SFTTrainer` (`DistillationMixin` puts it on any Trainer subclass). With `chunk_size > 0`
  (the default) the student's `(B, T, V)` logits are never built: the model's forward stops at
  its final hidden states and the loss projects chunks of positions through the LM head.
- `HPDLoss(teacher=..., objective=...)`, a `compute_loss_func` for a `Trainer` or `SFTTrainer`
  you already have; `loss.attach(trainer)` lets it read each batch's inputs (the teacher runs on
  them) and puts its metrics into the trainer's logs. It reads the logits the model computed.

Both shift the labels themselves (`hpd.objectives.shift_labels`), normalize by the Trainer's
`num_items_in_batch` (the token count of the whole accumulated batch, over every process) and
call the objective's one loss routine (`Objective.__call__` / `.chunked`), the code `hpd train`
runs: same loss, same gradients. The objective's value and metrics (`frac_A`, `frac_B`,
`r_mean`, `r_hat_mean`, teacher agreement, `kl`, ...) appear in the logs as `hpd/<name>`
(`eval_hpd/<name>` for evaluation). The logged `loss` (`eval_loss`) is the objective's value, the
number to compare runs by; the Trainer's own, the surrogate that carries the gradient, is logged
as `hpd/surrogate`. Responses are the Trainer's batches: on-policy regimes (GKD's `mixed`,
`student`) are `hpd train`'s, and asking for one here (`regime=`, or TRL's `lmbda`) is refused
with the `hpd train` command that runs it.

    >>> import torch
    >>> from transformers import TrainingArguments
    >>> from hpd.integrations import DistillationTrainer
    >>> from hpd.models.loading import load_model
    >>> teacher, tok = load_model("tiny", tiny={"num_layers": 1, "hidden_size": 32}, seed=1)
    >>> student, _ = load_model("tiny", tiny={"num_layers": 1, "hidden_size": 32}, seed=2)
    >>> ids = tok("question: 2+2? answer: 4")["input_ids"]
    >>> rows = [{"input_ids": ids, "labels": [-100] * 16 + ids[16:]}] * 4
    >>> args = TrainingArguments("/tmp/hpd-doc-hf", max_steps=2, per_device_train_batch_size=2, report_to=[],
    ...                          use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True)
    >>> trainer = DistillationTrainer(model=student, args=args, train_dataset=rows, teacher=teacher, objective="hpd")
    >>> _ = trainer.train()  # doctest: +SKIP
    >>> "hpd/frac_A" in trainer.state.log_history[0]  # doctest: +SKIP
    True
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import Tensor, nn

from hpd.data.batches import MicroBatch
from hpd.errors import HPDError
from hpd.models.head import lm_head_of
from hpd.models.loading import load_model, vocab_rows
from hpd.objectives import (
    DEFAULT_CHUNK_SIZE, IGNORE_INDEX, Objective, ObjectiveOutput, get_objective, resolve_shared_vocab, shift_labels,
)
from hpd.data.packing import check_packing
from hpd.responses.regimes import derive_seed
from hpd.teachers.cache import TeacherCache
from hpd.teachers.sources import ModelTeacher, TeacherSource
from hpd.vocab import teacher_vocab_size

METRIC_PREFIX = "hpd/"


# --------------------------------------------------------------------------------------------
# The teacher of a Hugging Face batch
# --------------------------------------------------------------------------------------------


@dataclass
class _Example:
    """A batch row as hpd's data encoding sees it (what a teacher cache is keyed by)."""

    prompt_ids: list[int]
    completion_ids: list[int]
    source: str


def _examples_of(input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> list[_Example]:
    """Rows `(B, T)` of a right-padded HF batch as (prompt, completion) token lists.

    The prompt is every token before the first labeled one, the completion the rest of the row's
    attended tokens: the split `hpd.data` writes, so the rows find their teacher-cache entries.
    """
    out = []
    for b, (ids, mask, lab) in enumerate(zip(input_ids.tolist(), attention_mask.tolist(), labels.tolist())):
        n = sum(mask)
        if any(mask[n:]) or not all(mask[:n]):
            raise HPDError("a teacher cache needs right-padded rows (tokenizer.padding_side='right') without packing: "
                           f"batch row {b} has attention mask {mask}")
        first = next((t for t, y in enumerate(lab[:n]) if y != IGNORE_INDEX), n)
        out.append(_Example(ids[:first], ids[first:n], f"batch row {b}"))
    return out


class _CacheTeacher(TeacherSource):
    """A teacher cache read for HF batches: each row is looked up by the hash of its tokens."""

    def __init__(self, cache: TeacherCache):
        self.cache = cache

    def prepare(self, batch, examples, split, indices) -> None:
        batch.cache_rows = self.cache.rows_of(examples, f"{split} batch")

    def view(self, batch):
        return self.cache.teacher(batch.cache_rows, batch.cpu_labels).to(batch.input_ids.device)


def teacher_source(teacher: Any) -> tuple[TeacherSource | None, Any]:
    """`teacher` as a `TeacherSource`, and its tokenizer when known (a directory holds one).

    teacher: a model, a model directory, a teacher cache (`TeacherCache` or its directory), or None.
    """
    if teacher is None or isinstance(teacher, TeacherSource):
        return teacher, None
    if isinstance(teacher, TeacherCache):
        return _CacheTeacher(teacher), None
    if isinstance(teacher, nn.Module):
        teacher.requires_grad_(False).eval()
        return ModelTeacher(teacher), None
    if isinstance(teacher, (str, os.PathLike)):
        path = Path(teacher)
        if (path / "manifest.json").is_file():
            return _CacheTeacher(TeacherCache(path)), None
        model, tokenizer = load_model(str(path), role="teacher")
        return teacher_source(model)[0], tokenizer
    raise HPDError(f"teacher must be a model, a model directory, a teacher cache (hpd cache-teacher) or None, "
                   f"got {type(teacher).__name__}")


def on_policy_refusal(objective: str | Objective, params: dict[str, Any], regime: str, mixed_lambda: float = 0.5) -> HPDError:
    """The one-line refusal of a response regime other than "dataset", naming its `hpd train` command.

    The Trainer integrations distill on the batches the Trainer gives; rollouts of the student
    (on-policy GKD: `mixed`, `student`), teacher generations and self-distillation are `hpd train`'s
    regimes (`hpd.responses.regimes`), which generate, cache and seed them.

        >>> print(on_policy_refusal("jsd", {"beta": 0.5}, "mixed", 0.5))  # doctest: +ELLIPSIS
        the Trainer integration distills on the Trainer's own batches ...: hpd train CONFIG objective.name=jsd objective.beta=0.5 regime.name=mixed regime.mixed_lambda=0.5
    """
    from hpd.responses.regimes import REGIMES

    if regime not in REGIMES:
        return HPDError(f"unknown regime {regime!r}: the Trainer integration takes 'dataset'; hpd train takes "
                        f"{', '.join(REGIMES)}")
    name = objective.name if isinstance(objective, Objective) else objective
    command = " ".join([f"hpd train CONFIG objective.name={name}", *(f"objective.{k}={v}" for k, v in params.items()),
                        f"regime.name={regime}", *([f"regime.mixed_lambda={mixed_lambda:g}"] if regime == "mixed" else [])])
    return HPDError(f"the Trainer integration distills on the Trainer's own batches (regime 'dataset'); regime "
                    f"'{regime}' generates its responses during training, which hpd train does: {command}")


def make_objective(objective: str | Objective, params: dict[str, float] | None = None) -> Objective:
    """An objective of the registry by name (or `module:Class`) with its parameters, or one given as is."""
    if isinstance(objective, Objective):
        if params:
            raise HPDError("objective parameters go either into the Objective you pass or into objective_params, not both")
        return objective
    return get_objective(objective, **(params or {}))


def trainer_rows(path: str | os.PathLike, tokenizer, data: Any = None) -> list[dict[str, list[int]]]:
    """A data file tokenized exactly as `hpd train` and `hpd cache-teacher` do, as HF training rows.

    Each row is `{"input_ids": prompt + completion, "labels": -100 on the prompt, then the completion}`
    (HF's unshifted convention), so a teacher cache built from the same file with the same `data`
    settings (`hpd.config.DataConfig`; default: its defaults) holds every row. `datasets.Dataset.from_list`
    turns them into a dataset for `Trainer` or `SFTTrainer`.
    """
    from hpd.config import DataConfig
    from hpd.data.encode import encode_file

    encoded, _ = encode_file(str(path), tokenizer, data if data is not None else DataConfig())
    return [{"input_ids": list(e.prompt_ids) + list(e.completion_ids),
             "labels": [IGNORE_INDEX] * len(e.prompt_ids) + list(e.completion_ids)} for e in encoded]


# --------------------------------------------------------------------------------------------
# The loss of one HF batch, and the metrics it leaves for the logs
# --------------------------------------------------------------------------------------------


class HFDistillation:
    """Objective + teacher for Hugging Face batches; what `HPDLoss` and `DistillationMixin` share.

    objective:        a registry name (`hpd`, `fkl`, `jsd`, ...; `hpd train --help` lists them) or
                      an `Objective`; objective_params: its parameters, e.g. `{"beta": 0.5}`, `ce_weight`,
                      `kd_weight`, `temperature`.
    teacher:          a teacher model (`nn.Module`, moved to the batch's device at first use), a model
                      directory, a teacher cache (`TeacherCache` or its directory), or None (`sft`).
    teacher_tokenizer: the tokenizer of a teacher model object (a directory brings its own). The
                      teacher is checked as `hpd train` checks one (`hpd.vocab.teacher_vocab_size`):
                      one tokenizer; heads that differ only by padding rows need both tokenizers.
    chunk_size:       positions per chunk of the memory-lean path (0: the model's logits).
    diagnostics:      also log teacher agreement, KL(teacher || student) and student entropy.
    regime:           where the response tokens come from: only "dataset" (the Trainer's batches);
                      on-policy ones (GKD's "mixed", "student") are refused with the `hpd train`
                      command that runs them (`on_policy_refusal`).
    """

    # The hook of a cross-tokenizer mode: True would skip the one-tokenizer checks (nothing aligns
    # two tokenizations yet, so it stays False).
    cross_tokenizer = False

    def __init__(self, teacher: Any = None, objective: str | Objective = "hpd", objective_params: dict | None = None, *,
                 chunk_size: int = DEFAULT_CHUNK_SIZE, diagnostics: bool = True, regime: str = "dataset",
                 mixed_lambda: float = 0.5, teacher_tokenizer: Any = None):
        params = dict(objective_params or {})
        if "lmbda" in params:  # TRL's GKDConfig name for the share of on-policy steps
            regime, mixed_lambda = "mixed", float(params.pop("lmbda"))
        if regime != "dataset":
            raise on_policy_refusal(objective, params, regime, mixed_lambda)
        self.objective = make_objective(objective, params)
        self.teacher, self.teacher_tokenizer = teacher_source(teacher)
        if teacher_tokenizer is not None:
            if not isinstance(self.teacher, ModelTeacher):
                raise HPDError("teacher_tokenizer goes with a teacher model object: a model directory brings its own "
                               "tokenizer, and a teacher cache records the one it was built with")
            self.teacher_tokenizer = teacher_tokenizer
        if self.teacher is None and self.objective.needs_teacher:
            raise HPDError(f"objective '{self.objective.name}' needs a teacher: pass teacher=MODEL, a model directory "
                           "or a teacher cache")
        if isinstance(self.teacher, _CacheTeacher):
            self.teacher.cache.check_run(temperature=self.objective.temperature, support=self.objective.support,
                                         objective=self.objective.name)
        if chunk_size < 0:
            raise HPDError(f"chunk_size must be >= 0 (0: the model's logits), got {chunk_size}")
        self.chunk_size = chunk_size
        self.diagnostics = diagnostics
        self._vocab: tuple[int, int | None] | None = None  # (student head rows, shared vocabulary size)
        # split -> running sums/counts/mins/maxs of the statistics since the last log, on the device:
        # constant memory whatever the logging interval, and no host read until the log.
        self._pending: dict[str, dict[str, dict[str, Tensor]]] = {}
        self._micro: dict[str, tuple[int, int]] = {}  # split -> (step, micro-batches seen in it)
        self._packing_checked = False

    def generator(self, seed: int, step: int, rank: int, split: str, device: torch.device) -> torch.Generator:
        """The draws (HPD's sample) of the next micro-batch of optimizer step `step`, seeded as `hpd train`
        seeds them: from (seed, step, micro-batch, rank, "sample" or "eval")."""
        last, seen = self._micro.get(split, (step, 0))
        micro = seen if last == step else 0
        self._micro[split] = (step, micro + 1)
        g = torch.Generator(device=device) if device.type != "mps" else torch.Generator()
        return g.manual_seed(derive_seed(seed, step, micro, rank, "sample" if split == "train" else "eval"))

    def vocab_size(self, student: nn.Module, tokenizer=None) -> int | None:
        """The vocabulary the student shares with the teacher (None without a teacher)."""
        rows = vocab_rows(student)
        if self._vocab is not None and self._vocab[0] == rows:
            return self._vocab[1]
        size = None
        tokenizer = tokenizer if hasattr(tokenizer, "get_vocab") else None  # a processor or None: not checked
        tok_len = len(tokenizer) if tokenizer is not None else None
        if isinstance(self.teacher, _CacheTeacher) and tokenizer is not None:
            self.teacher.cache.check_run(tokenizer=tokenizer)
        if isinstance(self.teacher, ModelTeacher):
            # The check `hpd train` makes of a teacher path, for a directory and a model object alike.
            size = teacher_vocab_size(rows, vocab_rows(self.teacher.model), tokenizer, self.teacher_tokenizer,
                                      cross_tokenizer=self.cross_tokenizer)
        elif isinstance(self.teacher, _CacheTeacher):
            cached = self.teacher.cache.vocab_size
            size = rows if rows == cached else resolve_shared_vocab(rows, cached, tok_len)
            if size != cached:
                raise HPDError(f"the teacher cache is normalized over {cached} tokens but the student shares {size} "
                               f"with it: rebuild the cache with --vocab-size {size}")
        self._vocab = (rows, size)
        return size

    def teacher_view(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor, hf_labels: Tensor, split: str,
                     position_ids: Tensor | None = None):
        """The teacher's view of the batch `(B, T)` (aligned `labels`, and the batch's own `hf_labels`);
        None without a teacher. position_ids: a packed batch's, which the teacher reads it with."""
        if self.teacher is None or not (self.objective.needs_teacher or self.diagnostics):
            return None
        if isinstance(self.teacher, ModelTeacher):
            device = input_ids.device
            if next(self.teacher.model.parameters()).device != device:
                self.teacher.model.to(device)
        cpu_labels = labels.cpu()
        batch = MicroBatch(input_ids, attention_mask, labels, cpu_labels=cpu_labels,
                           num_active=int((cpu_labels != IGNORE_INDEX).sum()), prompts=[], completions=[],
                           position_ids=position_ids)
        examples = _examples_of(input_ids, attention_mask, hf_labels) if isinstance(self.teacher, _CacheTeacher) else []
        self.teacher.prepare(batch, examples, split, range(input_ids.shape[0]))
        return self.teacher.view(batch)

    def loss(self, *, student: nn.Module, input_ids: Tensor, attention_mask: Tensor | None, labels: Tensor,
             num_items_in_batch: Tensor | int | None, logits: Tensor | None = None, hidden: Tensor | None = None,
             generator: torch.Generator | None = None, tokenizer=None, position_ids: Tensor | None = None) -> Tensor:
        """The loss of one HF batch: `labels (B, T)` unshifted, and the student's `logits (B, T, V)`
        or its final `hidden` states `(B, T, H)` (the chunked path, through `student`'s LM head).

        A packed (padding-free) batch comes without an attention mask and with `position_ids (B, T)`
        restarting at each packed row (TRL's `padding_free`, `DataCollatorWithFlattening`): the
        teacher reads it with the same position ids (so attention stays within each row), and no
        position predicts across a row boundary.

        The objective's output is kept for the logs (`pop_metrics`), filed under train or eval by
        `student.training`.
        """
        if labels is None:
            raise HPDError("the batch has no labels: distillation needs HF labels (-100 where ignored) in the batch")
        packed = attention_mask is None and position_ids is not None
        if packed and isinstance(self.teacher, _CacheTeacher):
            raise HPDError("a teacher cache is read by padded rows: packed / padding-free batches (position_ids, no "
                           "attention_mask) need an online teacher; set packing=False and padding_free=False")
        if packed and not self._packing_checked:  # once: models whose attention would leak across rows stop here
            check_packing(student, "student")
            if isinstance(self.teacher, ModelTeacher):
                check_packing(self.teacher.model.to(input_ids.device), "teacher")
            self._packing_checked = True
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        aligned = shift_labels(labels.to(input_ids.device))
        if packed:  # the last token of a packed row predicts nothing: the next row starts anew
            aligned = aligned.masked_fill(shift_labels(position_ids.to(aligned.device)) == 0, IGNORE_INDEX)
        split = "train" if student.training else "eval"
        view = self.teacher_view(input_ids, attention_mask, aligned, labels, split,
                                 position_ids=position_ids if packed else None)
        kw = dict(generator=generator, num_tokens=num_items_in_batch, vocab_size=self.vocab_size(student, tokenizer),
                  diagnostics=self.diagnostics)
        if hidden is not None:
            out = self.objective.chunked(hidden, lm_head_of(student), view, aligned, chunk_size=self.chunk_size, **kw)
        else:
            out = self.objective(logits, view, aligned, **kw)
        self._keep(split, out, num_items_in_batch)
        return out.loss

    def _keep(self, split: str, out: ObjectiveOutput, num_items: Tensor | int | None) -> None:
        """Add a batch's statistics, and its value as a token sum, to the split's running reductions."""
        dev = out.value.device
        denom = out.num_active if num_items is None else torch.as_tensor(num_items)
        parts = {"sums": {**out.sums, "value": out.value.detach().double() * denom.to(dev).double()},
                 "counts": {**out.counts, "value": out.num_active.to(dev).double()},
                 "mins": out.mins, "maxs": out.maxs}
        # "run": the training value since the start, for the Trainer's closing `train_loss` (`into_logs`).
        whole = {"sums": {"value": parts["sums"]["value"]}, "counts": {"value": parts["counts"]["value"]}, "mins": {}, "maxs": {}}
        for key, part in ((split, parts), *((("run", whole),) if split == "train" else ())):
            acc = self._pending.setdefault(key, {kind: {} for kind in parts})
            for kind, combine in (("sums", torch.add), ("counts", torch.add), ("mins", torch.minimum), ("maxs", torch.maximum)):
                for name, t in part[kind].items():
                    have = acc[kind].get(name)
                    acc[kind][name] = t.detach() if have is None else combine(have, t.detach())

    def pop_metrics(self, split: str, accelerator=None) -> dict[str, float]:
        """The objective's value and metrics since the last call, token means over every process."""
        from hpd.training.step import global_metrics

        acc = self._pending.pop(split, None)
        processes = 1 if accelerator is None else accelerator.num_processes
        if acc is None and processes == 1:
            return {}
        zero = torch.zeros(())
        # Every process takes part in the gather, with or without statistics of its own.
        outputs = [] if acc is None else [ObjectiveOutput(loss=zero, value=zero, num_active=zero, **acc)]
        metrics = global_metrics(outputs, accelerator if processes > 1 else _ONE_PROCESS)
        prefix = f"eval_{METRIC_PREFIX}" if split == "eval" else METRIC_PREFIX
        return {prefix + k: v for k, v in metrics.items()}

    def into_logs(self, logs: dict[str, float], accelerator=None) -> None:
        """Put the metrics since the last log into a Trainer's `logs`, and the objective's value as
        its `loss` (`eval_loss`): the Trainer's own number is the surrogate whose gradient is the
        objective's (`hpd.objectives.surrogate`), not a value to compare runs by (negative for
        jsd, for instance); it stays in the logs as `hpd/surrogate` (`eval_hpd/surrogate`). The closing
        `train_loss` of `Trainer.train` becomes the value over the whole run (`hpd/train_surrogate`
        the Trainer's; `TrainOutput.training_loss`, which the Trainer keeps apart, stays its own)."""
        for split, prefix in (("train", ""), ("eval", "eval_")):
            if (prefix + "loss" in logs) if split == "train" else any(k.startswith("eval_") for k in logs):
                logs.update(self.pop_metrics(split, accelerator))
                value = logs.get(f"{prefix}{METRIC_PREFIX}value")
                if value is not None and prefix + "loss" in logs:
                    logs[f"{prefix}{METRIC_PREFIX}surrogate"] = logs[prefix + "loss"]
                    logs[prefix + "loss"] = value
        if "train_loss" in logs:
            value = self.pop_metrics("run", accelerator).get(f"{METRIC_PREFIX}value")
            if value is not None:
                logs[f"{METRIC_PREFIX}train_surrogate"], logs["train_loss"] = logs["train_loss"], value


class _OneProcess:
    num_processes = 1


_ONE_PROCESS = _OneProcess()


class _CaptureHidden:
    """Inside the block, the LM head returns `(B, T, 0)` logits and keeps its input, the final hidden states.

    So the model's forward (through its DDP wrapper, which must see it) builds no `(B, T, V)`
    tensor; the placeholder still depends on the hidden states and the head, so a wrapper looking
    for unused parameters finds them used.
    """

    def __init__(self, student: nn.Module):
        # A head whose logits hpd cannot reproduce is refused here, with the reason.
        lm_head_of(student, hint="pass chunk_size=0 (the loss then reads the model's logits)")
        self.head, self.hidden, self.handle = student.get_output_embeddings(), None, None

    def _hook(self, module, args, output):
        self.hidden = args[0]
        bias = None if module.bias is None else module.bias[:0]
        return torch.nn.functional.linear(args[0], module.weight[:0], bias)

    def __enter__(self):
        self.handle = self.head.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# --------------------------------------------------------------------------------------------
# A Trainer that distills
# --------------------------------------------------------------------------------------------


class DistillationMixin:
    """`compute_loss` and `log` of a Trainer that distills; put it first: `class T(DistillationMixin, SFTTrainer)`.

    Keyword arguments taken besides the Trainer's own: `teacher`, `teacher_tokenizer`, `objective`
    (default "hpd"), `objective_params`, `chunk_size`, `diagnostics` (see `HFDistillation`).
    The student's head and the teacher's vocabulary are checked here, before any step.
    """

    def __init__(self, *args, teacher: Any = None, objective: str | Objective = "hpd", objective_params: dict | None = None,
                 chunk_size: int = DEFAULT_CHUNK_SIZE, diagnostics: bool = True, regime: str = "dataset",
                 mixed_lambda: float = 0.5, teacher_tokenizer: Any = None, **kwargs):
        if kwargs.get("compute_loss_func") is not None:
            raise HPDError("a DistillationTrainer computes its own loss: drop compute_loss_func")
        self.distillation = HFDistillation(teacher, objective, objective_params, chunk_size=chunk_size,
                                           diagnostics=diagnostics, regime=regime, mixed_lambda=mixed_lambda,
                                           teacher_tokenizer=teacher_tokenizer)
        super().__init__(*args, **kwargs)
        if self.model is not None:  # (None with model_init: checked at the first loss)
            student = self.accelerator.unwrap_model(self.model)
            if chunk_size:
                lm_head_of(student, hint="pass chunk_size=0 (the loss then reads the model's logits)")
            self.distillation.vocab_size(student, getattr(self, "processing_class", None))
        # The loss is normalized by num_items_in_batch (the whole accumulated batch), never a per-batch mean.
        self.loss_is_scaled_for_ga = True
        # Makes the Trainer count num_items_in_batch (it does so for models taking loss kwargs).
        self.model_accepts_loss_kwargs = True
        if chunk_size and any(k in str(self.accelerator.distributed_type) for k in ("FSDP", "DEEPSPEED")):
            raise HPDError("the chunked loss reads the LM head outside the model's forward, which FSDP and DeepSpeed "
                           "shard: pass chunk_size=0 (the loss then reads the model's logits)")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        inputs["use_cache"] = False
        student = self.accelerator.unwrap_model(model)
        if self.distillation.chunk_size > 0:
            with _CaptureHidden(student) as cap:
                outputs = model(**inputs)
            hidden, logits = cap.hidden, None
        else:
            outputs = model(**inputs)
            hidden, logits = None, outputs.logits
        ids = inputs["input_ids"]
        g = self.distillation.generator(self.args.seed, self.state.global_step, self.args.process_index,
                                        "train" if student.training else "eval", ids.device)
        loss = self.distillation.loss(student=student, input_ids=ids, attention_mask=inputs.get("attention_mask"),
                                      labels=labels, num_items_in_batch=num_items_in_batch, logits=logits, hidden=hidden,
                                      generator=g, tokenizer=getattr(self, "processing_class", None),
                                      position_ids=inputs.get("position_ids"))
        if num_items_in_batch is None and student.training:
            loss = loss / self.current_gradient_accumulation_steps  # a per-batch mean: the Trainer's GA scaling
        elif self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # num_items_in_batch counts every process's tokens and DDP averages the gradients: scale back up.
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        self.distillation.into_logs(logs, self.accelerator)
        super().log(logs, *args, **kwargs)


class DistillationTrainer(DistillationMixin, transformers.Trainer):
    """A `transformers.Trainer` that distills `teacher` into `model` with one of hpd's objectives.

        DistillationTrainer(model=student, args=TrainingArguments(...), train_dataset=ds,
                            teacher=teacher, objective="hpd", objective_params={"ce_weight": 0.5})
    """


# --------------------------------------------------------------------------------------------
# A compute_loss_func for a Trainer you already have
# --------------------------------------------------------------------------------------------


class HPDLoss(HFDistillation):
    """A `compute_loss_func(outputs, labels, num_items_in_batch)` for `Trainer` and TRL's `SFTTrainer`.

        loss = HPDLoss(teacher=teacher, objective="jsd", objective_params={"beta": 0.5})
        trainer = SFTTrainer(model=student, args=..., train_dataset=ds, compute_loss_func=loss)
        loss.attach(trainer)

    `attach` hooks the student so the loss sees each batch's inputs (the teacher runs on them) and
    puts the metrics into the trainer's logs (trackers included). The loss reads the logits the
    model computed (the reference path): for the memory-lean chunked path use `DistillationTrainer`
    or `DistillationSFTTrainer`.
    """

    def __init__(self, teacher: Any = None, objective: str | Objective = "hpd", objective_params: dict | None = None, *,
                 diagnostics: bool = True, regime: str = "dataset", mixed_lambda: float = 0.5,
                 teacher_tokenizer: Any = None):
        super().__init__(teacher, objective, objective_params, chunk_size=0, diagnostics=diagnostics, regime=regime,
                         mixed_lambda=mixed_lambda, teacher_tokenizer=teacher_tokenizer)
        self.trainer = None
        self.student: nn.Module | None = None
        self._inputs: dict[str, Tensor] | None = None

    def attach(self, trainer) -> HPDLoss:
        """Read `trainer`'s batches and write into its logs; returns self."""
        from transformers import TrainerCallback

        if trainer.compute_loss_func is not self:
            raise HPDError("attach the HPDLoss to the trainer it is the compute_loss_func of")
        if self.trainer is not None:
            raise HPDError("this HPDLoss is attached already: make one HPDLoss per trainer")
        self.trainer = trainer
        self.student = trainer.accelerator.unwrap_model(trainer.model)
        self.vocab_size(self.student, getattr(trainer, "processing_class", None))  # refused here, before any step
        self.student.register_forward_pre_hook(self._remember_inputs, with_kwargs=True)
        loss = self

        class _Metrics(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                loss.into_logs(logs, trainer.accelerator)
                if state.log_history:  # the Trainer recorded the logs before its callbacks ran
                    state.log_history[-1].update(logs)

        # First, so that the trackers' callbacks (report_to) see the metrics too.
        trainer.callback_handler.callbacks.insert(0, _Metrics())
        return self

    def _remember_inputs(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None:
            self._inputs = {"input_ids": ids, "attention_mask": kwargs.get("attention_mask"),
                            "position_ids": kwargs.get("position_ids")}

    def __call__(self, outputs, labels: Tensor, num_items_in_batch: Tensor | int | None = None) -> Tensor:
        if self.trainer is None or self._inputs is None:
            raise HPDError("HPDLoss reads each batch's inputs: call loss.attach(trainer) after building the trainer")
        inputs = self._inputs
        self._inputs = None  # one forward, one loss: never a stale batch
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        t = self.trainer
        g = self.generator(t.args.seed, t.state.global_step, t.args.process_index,
                           "train" if self.student.training else "eval", logits.device)
        return self.loss(student=self.student, input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                         labels=labels, num_items_in_batch=num_items_in_batch, logits=logits, generator=g,
                         tokenizer=getattr(self.trainer, "processing_class", None), position_ids=inputs["position_ids"])


def __getattr__(name: str):
    # TRL is optional (pip install 'hpd-distill[trl]'): its trainer class is built when first asked for.
    if name == "DistillationSFTTrainer":
        try:
            from trl import SFTTrainer
        except ImportError:
            raise HPDError("DistillationSFTTrainer needs TRL: pip install 'hpd-distill[trl]'") from None

        cls = type("DistillationSFTTrainer", (DistillationMixin, SFTTrainer), {
            "__doc__": "TRL's `SFTTrainer` distilling with one of hpd's objectives (see `DistillationMixin`).",
            "__module__": __name__})
        globals()[name] = cls
        return cls
    raise AttributeError(name)


__all__ = ["DistillationMixin", "DistillationSFTTrainer", "DistillationTrainer", "HFDistillation", "HPDLoss",
           "METRIC_PREFIX", "make_objective", "teacher_source", "trainer_rows"]

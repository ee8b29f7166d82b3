"""Where the teacher's view comes from: a separate model, a top-K cache, or the student itself (OPSD).

A `TeacherSource` is what the trainer asks for the teacher: `prepare(batch, examples, split,
indices)` adds to a micro-batch what the source reads (the privileged sequences, the cache rows),
`view(batch)` returns the teacher view the objectives understand (`hpd.objectives.TeacherView`),
`after_step()` runs after each optimizer step (the EMA), and `state_dict()` / `load_state_dict()`
carry its state through checkpoints. Four implementations: `ModelTeacher` (a teacher model run
online), `CachedTeacher` (a top-K cache built by `hpd cache-teacher`), `ServedTeacher` (a teacher
behind inference servers, `hpd.teachers.served`) and `OPSDTeacher` (the student shown a privileged context). A new source is one new class with these five methods.

On-policy self-distillation (OPSD, arXiv 2601.18734) needs no second model: the same network,
shown a privileged context (a verified reference solution before the question), teaches its own
version that sees the question alone, on the same response tokens. This module holds what that
needs beyond the ordinary teacher:

- `teacher_view`: the teacher's hidden states and LM head (or logits) that an objective reads,
  optionally gathered from the teacher's own (longer) sequence at the positions that line up with
  the student's;
- `aligned_positions`: that gather index, checked: the teacher must predict exactly the student's
  response tokens, position by position, or it is an error;
- `prompt_ending_mismatches`: rows whose teacher prompt ends on another token than the student's,
  so the first response token would follow different contexts (the trainer warns);
- `SelfTeacher`: the teacher's weights: `frozen` (the initial weights; with a LoRA student the
  base model with its adapters disabled, so no copy), `ema` (a moving average of the trainable
  weights) or `live` (the current weights), all without gradient. A shadow copy of the trainable
  parameters is swapped in for the teacher's forward pass (tensor references, not copies), so a
  full fine-tune keeps one extra copy and a LoRA student only a copy of its adapters.

    >>> import torch
    >>> from hpd.models.loading import load_model
    >>> from hpd.teachers.sources import SelfTeacher, aligned_positions
    >>> model, tok = load_model("tiny", tiny={"num_layers": 1, "hidden_size": 32})
    >>> teacher = SelfTeacher(model, "frozen")
    >>> ids = torch.tensor([tok.encode("hello")]); mask = torch.ones_like(ids)
    >>> before = teacher.view(ids, mask, chunked=False)
    >>> with torch.no_grad():
    ...     _ = [p.add_(1.0) for p in model.parameters()]   # the student moves on
    >>> torch.equal(teacher.view(ids, mask, chunked=False), before)   # the frozen teacher does not
    True
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from hpd.data.collate import build_batch
from hpd.errors import HPDError
from hpd.models.head import final_hidden_states, lm_head_of, model_inputs
from hpd.models.loading import is_peft_model
from hpd.objectives import IGNORE_INDEX, HeadTeacher, TeacherView

TEACHER_WEIGHTS = ("frozen", "ema", "live")


def _gather_positions(x_BTD: Tensor, index_BT: Tensor) -> Tensor:
    """`x[b, index[b, t]]` for every (b, t): `(B, T', D)` -> `(B, T, D)`."""
    return x_BTD.gather(1, index_BT[:, :, None].expand(-1, -1, x_BTD.shape[-1]))


@torch.no_grad()
def teacher_view(teacher: nn.Module | None, input_ids: Tensor, attention_mask: Tensor, chunked: bool,
                 index: Tensor | None = None, position_ids: Tensor | None = None):
    """What the objective reads of the teacher: its hidden states and head (chunked), or its logits.

    input_ids, attention_mask: `(B, T')` the teacher's sequences. index: `(B, T)` optional, the
    teacher position aligned with each student position (see `aligned_positions`); the view is then
    `(B, T, .)` like the student's. position_ids: `(B, T')` of a packed batch (`hpd.data.packing`), the
    same packing the student sees. The head is detached, so it keeps the weights of this moment
    even if the parameters are swapped or stepped afterwards.
    """
    if teacher is None:
        return None
    if chunked:
        head = lm_head_of(teacher)
        hidden = final_hidden_states(teacher, input_ids, attention_mask, position_ids)
        if index is not None:
            hidden = _gather_positions(hidden, index)
        return HeadTeacher.of(hidden, head)
    logits = teacher(input_ids=input_ids, **model_inputs(attention_mask, position_ids), use_cache=False).logits
    return logits if index is None else _gather_positions(logits, index)


def aligned_positions(student_labels: Tensor, teacher_labels: Tensor, student_prompt_lengths: Sequence[int],
                      teacher_prompt_lengths: Sequence[int]) -> Tensor:
    """The teacher position predicting the same token as each student position, checked.

    student_labels `(B, T)`, teacher_labels `(B, T')` (shifted labels, `-100` off the response),
    prompt lengths per row. Returns `(B, T)` long: at an active student position t of row b,
    `t + Pt_b - Ps_b`; 0 elsewhere. Raises `HPDError` when the teacher's labels at those positions
    are not the student's (the sequences do not hold the same response at the same offsets).
    """
    B, T = student_labels.shape
    shift = torch.as_tensor([t - s for s, t in zip(student_prompt_lengths, teacher_prompt_lengths)],
                            dtype=torch.long, device=student_labels.device)
    positions = torch.arange(T, device=student_labels.device)[None, :] + shift[:, None]
    active = student_labels != IGNORE_INDEX
    index = torch.where(active, positions, torch.zeros_like(positions))
    if bool((index >= teacher_labels.shape[1]).any()) or bool((index < 0).any()):
        raise HPDError("self-distillation: teacher and student sequences do not line up: a student response position "
                       "falls outside the teacher's sequence")
    gathered = teacher_labels.gather(1, index)
    bad = active & (gathered != student_labels)
    if bool(bad.any()) or int((teacher_labels != IGNORE_INDEX).sum()) != int(active.sum()):
        row = int(bad.any(1).nonzero()[0]) if bool(bad.any()) else 0
        raise HPDError(
            f"self-distillation: teacher and student sequences do not line up (row {row}): the teacher must score "
            "exactly the student's response tokens at the same response positions"
        )
    return index


def prompt_ending_mismatches(student_prompts: Sequence[Sequence[int]], teacher_prompts: Sequence[Sequence[int]]) -> list[int]:
    """Rows whose teacher prompt ends with another token than the student prompt.

    There the first response token is predicted after different text in the two contexts (e.g. a
    teacher template that does not end with `{prompt}`, or a tokenizer that merges the template's
    last characters with the question's), so the teacher's first-token opinion is about another
    context.
    """
    return [i for i, (s, t) in enumerate(zip(student_prompts, teacher_prompts)) if not s or not t or s[-1] != t[-1]]


class SelfTeacher:
    """The student as its own teacher, with `frozen`, `ema` or `live` weights (never a gradient).

    `view(...)` runs the teacher's forward pass (eval mode, no grad) and returns `teacher_view`'s
    result. `update()` moves the EMA after an optimizer step. `state_dict()` / `load_state_dict()`
    carry the EMA through checkpoints (the frozen weights are the initial ones, rebuilt at load).
    """

    def __init__(self, student: nn.Module, weights: str = "frozen", ema_decay: float = 0.99):
        if weights not in TEACHER_WEIGHTS:
            raise HPDError(f"teacher weights must be one of {TEACHER_WEIGHTS}, got {weights!r}")
        self.student, self.weights, self.decay = student, weights, float(ema_decay)
        self.lora_frozen = weights == "frozen" and is_peft_model(student)
        self.params = {n: p for n, p in student.named_parameters() if p.requires_grad}
        # frozen (full weights) and ema keep a shadow of the trainable parameters; a frozen LoRA
        # student needs none (its base weights never change), nor does the live teacher.
        self.shadow: dict[str, Tensor] | None = None
        if weights == "ema" or (weights == "frozen" and not self.lora_frozen):
            self.shadow = {n: p.detach().clone() for n, p in self.params.items()}

    @contextlib.contextmanager
    def weights_in_place(self) -> Iterator[nn.Module]:
        """The student module carrying the teacher's weights, in eval mode, inside the block."""
        was_training = self.student.training
        self.student.eval()
        swapped: dict[str, Tensor] = {}
        try:
            if self.lora_frozen:
                with self.student.disable_adapter():
                    yield self.student
                return
            if self.shadow is not None:
                for n, p in self.params.items():
                    swapped[n], p.data = p.data, self.shadow[n]
            yield self.student
        finally:
            for n, data in swapped.items():
                self.params[n].data = data
            self.student.train(was_training)

    @torch.no_grad()
    def view(self, input_ids: Tensor, attention_mask: Tensor, chunked: bool, index: Tensor | None = None,
             position_ids: Tensor | None = None):
        with self.weights_in_place() as model:
            return teacher_view(model, input_ids, attention_mask, chunked, index, position_ids)

    @torch.no_grad()
    def update(self) -> None:
        """After an optimizer step: shadow <- decay * shadow + (1 - decay) * student (ema only)."""
        if self.weights != "ema":
            return
        for n, p in self.params.items():
            self.shadow[n].lerp_(p.detach(), 1.0 - self.decay)

    def state_dict(self) -> dict[str, Any]:
        return {"weights": self.weights, "shadow": self.shadow if self.weights == "ema" else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("weights") != self.weights:
            raise HPDError(f"the checkpoint's self-teacher has {state.get('weights')} weights, this run "
                           f"{self.weights}: resume with the same opsd.teacher_weights")
        if self.weights == "ema":
            for n, t in state["shadow"].items():
                self.shadow[n].copy_(t)


# --------------------------------------------------------------------------------------------
# Teacher sources: what the trainer asks for the teacher of a micro-batch
# --------------------------------------------------------------------------------------------


class TeacherSource:
    """The teacher of a run, as the trainer sees it (see the module docstring)."""

    parameters: int = 0  # the teacher model's parameter count (logged; 0 when no separate model runs)

    def prepare(self, batch, examples: Sequence[Any], split: str, indices: Sequence[int]) -> None:
        """Add to `batch` (an `hpd.data.batches.MicroBatch` of `examples`, rows `indices` of the `split`
        data, "train" or "eval") what `view` reads, and its `teacher_tokens` (forward cost)."""

    def view(self, batch) -> TeacherView:
        """The teacher's view of `batch`: `(B, T, .)` aligned with the student's positions."""
        raise NotImplementedError

    def after_step(self) -> None:
        """Called after every optimizer step that was taken."""

    def stats(self) -> dict[str, float]:
        """What this source has to report in the logged metrics (e.g. positions it could not score)."""
        return {}

    def step_counts(self) -> dict[str, float]:
        """Counts of the training batches viewed since the last call (the same keys, in the same order,
        at every call, on every process), reset by the call: the trainer sums them over processes into
        the run's cumulative totals, logged every step (e.g. the tokens each routed teacher taught)."""
        return {}

    def state_dict(self) -> dict[str, Any] | None:
        """What a checkpoint must hold to continue this source (None: nothing)."""
        return None

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore `state_dict()`'s result from a checkpoint."""


class ModelTeacher(TeacherSource):
    """A teacher model run online on the student's sequences (no gradient).

    The view is always its hidden states and LM head (`HeadTeacher`), chunked loss or not: the
    objective projects only the active positions, so no `(B, T, V)` teacher logits are computed
    for prompt and padding positions.
    """

    def __init__(self, model: nn.Module):
        lm_head_of(model)  # a teacher whose logits its head view cannot reproduce is refused here, by name
        self.model = model
        self.parameters = sum(p.numel() for p in model.parameters())

    def prepare(self, batch, examples, split, indices) -> None:
        batch.teacher_tokens = int(batch.attention_mask.sum())

    def view(self, batch) -> TeacherView:
        return teacher_view(self.model, batch.input_ids, batch.attention_mask, chunked=True,
                            position_ids=batch.position_ids)


class CachedTeacher(TeacherSource):
    """A teacher read from a top-K cache (`hpd.teachers.cache.TeacherCache`): no forward pass.

    rows: the cache row of every example of each split (`{"train": [...], "eval": [...]}`).
    """

    def __init__(self, cache, rows: dict[str, list[int]], device: torch.device):
        self.cache, self.rows, self.device = cache, rows, device

    def prepare(self, batch, examples, split, indices) -> None:
        batch.cache_rows = [self.rows[split][i] for i in indices]

    def view(self, batch) -> TeacherView:
        if batch.packing is not None:  # the cache holds padded rows: read them so, then pack like the batch
            return batch.packing.pack_view(self.cache.teacher(batch.cache_rows, batch.row_labels)).to(self.device)
        return self.cache.teacher(batch.cache_rows, batch.cpu_labels).to(self.device)


class OPSDTeacher(TeacherSource):
    """The student as its own teacher (`SelfTeacher`), shown each example's privileged prompt.

    It scores the same response tokens after the privileged prompt; the view is gathered at the
    teacher positions aligned with the student's (`aligned_positions`, checked).
    """

    def __init__(self, teacher: SelfTeacher, pad_id: int, device: torch.device):
        self.teacher, self.pad_id, self.device = teacher, pad_id, device

    def prepare(self, batch, examples, split, indices) -> None:
        teacher_prompts = [e.teacher_prompt_ids for e in examples]
        t = build_batch(teacher_prompts, batch.completions, pad_id=self.pad_id)
        labels = batch.row_labels if batch.packing is not None else batch.cpu_labels
        index = aligned_positions(labels, t["labels"], [len(p) for p in batch.prompts],
                                  [len(p) for p in teacher_prompts])
        batch.teacher_tokens = int(t["attention_mask"].sum())
        if batch.packing is not None:
            # The teacher's sequences packed like the student's (the same rows together), positions restarted,
            # the aligned index pointing into the packed row.
            tp = batch.packing.like([len(p) + len(c) for p, c in zip(teacher_prompts, batch.completions)])
            index = batch.packing.pack_index(index, tp)
            t = {"input_ids": tp.pack(t["input_ids"], fill=self.pad_id), "attention_mask": tp.pack(t["attention_mask"])}
            batch.teacher_positions = tp.position_ids(self.device)
        batch.teacher_ids, batch.teacher_mask = t["input_ids"].to(self.device), t["attention_mask"].to(self.device)
        batch.teacher_index = index.to(self.device)

    def view(self, batch) -> TeacherView:
        return self.teacher.view(batch.teacher_ids, batch.teacher_mask, chunked=True, index=batch.teacher_index,
                                 position_ids=batch.teacher_positions)

    def after_step(self) -> None:
        self.teacher.update()

    def state_dict(self) -> dict[str, Any]:
        return self.teacher.state_dict()

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        self.teacher.load_state_dict(state or {})


class ServedTeacher(TeacherSource):
    """A teacher behind inference servers (`teacher.server`; `hpd.teachers.served.TeacherServers`): the cache's
    semantics (`TopKTeacher`: exact at the sequence token, top-K plus a tail elsewhere) with no model
    here. A micro-batch's request leaves in `prepare` (on a thread, so it overlaps the student's
    compute on the batches before it) and is awaited in `view`."""

    prefetches = True  # the trainer prepares the next step's batches early, so their answers overlap this step

    def __init__(self, servers, top_k: int, vocab_size: int, device: torch.device,
                 temperature: float = 1.0, exact_samples: bool = False):
        if abs(temperature - 1.0) > 1e-12:
            raise HPDError(f"a served teacher returns log-probabilities at temperature 1, objective.temperature is "
                           f"{temperature:g}: use objective.temperature=1 with teacher.server")
        self.servers, self.top_k, self.vocab_size, self.device = servers, min(top_k, vocab_size), vocab_size, device
        self.exact_samples = exact_samples  # hpd's samples outside the top-K asked for exactly (a second request)

    def _fetch(self, sequences: list[list[int]], T: int, first: list[int] | None = None):
        from hpd.teachers.served import exact_scorer, topk_teacher

        # The prompt's positions are left zero, as padding is: no loss reads them (`build_batch`'s labels).
        return topk_teacher(self.servers.score(sequences, self.top_k, first), T, self.top_k, self.vocab_size,
                            score=exact_scorer(self.servers, sequences, T) if self.exact_samples else None)

    def prepare(self, batch, examples, split, indices) -> None:
        batch.teacher_tokens = int(batch.attention_mask.sum())
        sequences = [list(p) + list(c) for p, c in zip(batch.prompts, batch.completions)]
        # The servers score whole rows: the view is of the padded rows `(B, T)`, packed like the batch in `view`.
        T = int((batch.row_labels if batch.packing is not None else batch.input_ids).shape[1])
        first = [max(len(p) - 1, 0) for p in batch.prompts]  # position len(prompt) - 1 predicts the first response token
        batch.teacher_request = self.servers.submit(self._fetch, sequences, T, first)

    def view(self, batch):
        view = batch.teacher_request.result()
        if batch.packing is not None:
            view = batch.packing.pack_view(view)
        return view.to(self.device)




__all__ = ["CachedTeacher", "ModelTeacher", "OPSDTeacher", "SelfTeacher", "ServedTeacher", "TEACHER_WEIGHTS", "TeacherSource",
           "aligned_positions", "prompt_ending_mismatches", "teacher_view"]

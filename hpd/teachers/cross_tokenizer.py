"""Distillation across tokenizers: the two tokenizations of one text, lined up by byte offsets.

A teacher of another family tokenizes the same response differently. Both tokenizations spell
the same bytes, so each token is a byte span of the response, and the two are compared where
their boundaries agree (docs/objectives.md, "Across tokenizers"):

- `hpd.teachers.alignment`: the byte-offset alignment itself (`token_bytes`, `joint_spans`,
  `align_response`, `token_map`).
- `CrossTokenizerSource` (a `hpd.teachers.sources.TeacherSource`): lines each batch up with the teacher
  (its sequences, the index maps, the masked positions); three sources differ only in where the
  teacher's log-probabilities come from. `CrossTokenizerTeacher`: the online teacher runs on its own
  tokenization (`CrossTokenizerView`); HPD, orkl and sft read the teacher's log-probability of a
  student token as the sum of the log-probabilities of the teacher tokens spelling it; `uld` reads
  the teacher's next-token distribution over its own vocabulary. `CachedCrossTokenizerTeacher` (a
  cache built with `hpd cache-teacher --student`) and `ServedCrossTokenizerTeacher` (inference
  servers) have them as a top-K over the teacher's own tokens (`CrossTokenizerTopKView`): the same
  span sums at the sequence token, the cache's top-K semantics elsewhere (exact at K = V_t).

    >>> from hpd.teachers.cross_tokenizer import CrossTokenizerTeacher, CachedCrossTokenizerTeacher
    >>> issubclass(CachedCrossTokenizerTeacher, CrossTokenizerTeacher.__mro__[1])   # one shared source
    True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from hpd.data.collate import build_batch
from hpd.errors import HPDError
from hpd.models.head import final_hidden_states, lm_head_of
from hpd.objectives import IGNORE_INDEX, TeacherChunk, TeacherView
from hpd.objectives.base import upcast
from hpd.objectives.head import IDENTITY, LogitTransform
from hpd.teachers.sources import TeacherSource

from hpd.teachers.alignment import align_response, EOS_MARKER, joint_spans, ResponseAlignment, special_markers, token_bytes, token_map


class CrossTokenizerChunk(TeacherChunk):
    """The teacher at C student positions, across tokenizers (see `CrossTokenizerView`).

    At the sequence token it holds the exact span log-probability; at any other student token, the
    teacher's log-probability of the teacher token spelling the same text alone (`token_map`), NaN
    where there is none (`partial`: HPD then leaves its sample term out and counts it). Its
    distribution is over the teacher's vocabulary, read by `uld` only.
    """

    partial = True

    def __init__(self, logp_teacher: Tensor, label_logp: Tensor, labels: Tensor, mapping: Tensor):
        super().__init__(logp_teacher, None)
        self.label_logp, self.labels, self.mapping = label_logp, labels, mapping

    @property
    def is_full(self) -> bool:
        return False  # over the teacher's vocabulary, not the student's

    def agrees(self, student_top1: Tensor) -> Tensor:
        """`(C,)` bool: the student's most probable token spells the teacher's most probable token."""
        return self.mapping[student_top1] == self.logp.argmax(-1)

    def full(self, objective: str) -> Tensor:
        raise HPDError(
            f"objective '{objective}' compares the two distributions token by token, which needs one vocabulary; "
            "across tokenizers use uld (ULD's sorted probabilities), hpd, orkl or sft"
        )

    def top(self, k: int, objective: str):
        raise HPDError(f"objective '{objective}' reads the teacher's top tokens as student tokens, which another "
                       "tokenizer cannot give: across tokenizers use hpd, orkl, sft or uld")

    def sorted_logp(self, objective: str) -> Tensor:
        return self.logp.sort(-1, descending=True).values

    def at(self, tokens: Tensor) -> Tensor:
        mapped = self.mapping[tokens]
        other = self.logp.gather(1, mapped.clamp_min(0)[:, None]).squeeze(1)
        other = torch.where(mapped >= 0, other, torch.full_like(other, float("nan")))
        return torch.where(tokens == self.labels, self.label_logp.to(other.dtype), other)


class CrossTokenizerTopKChunk(CrossTokenizerChunk):
    """`CrossTokenizerChunk` from a teacher known by its top-K over its own vocabulary (a cache, a server).

    inner: the teacher's `TeacherChunk` at the aligned teacher positions (its own token there first,
    then its top-K and the tail, as `hpd.objectives.TopKTeacher` gives it). The sequence token is the
    exact span log-probability as online; another student token's mapped teacher token is exact when
    it is the teacher's own token there or in the top-K, else the tail spread evenly over the
    `V_t - K` tokens outside (as a cache gives any token outside its top-K), or an exact value handed
    in by `with_exact` (a served teacher's second request). `uld` reads the top-K plus the spread tail.
    """

    def __init__(self, inner: TeacherChunk, label_logp: Tensor, labels: Tensor, mapping: Tensor,
                 exact: tuple[Tensor, Tensor] | None = None):
        TeacherChunk.__init__(self, inner.logp, inner.tokens, tail=inner.tail, num_topk=inner.num_topk,
                              vocab_size=inner.vocab_size)
        self.inner, self.label_logp, self.labels, self.mapping, self.exact = inner, label_logp, labels, mapping, exact

    def agrees(self, student_top1: Tensor) -> Tensor:
        if not self.num_topk:  # no top-K stored: the teacher's most probable token is unknown (not counted)
            return torch.full(student_top1.shape, float("nan"), device=student_top1.device)
        return self.mapping[student_top1] == self.tokens[:, -self.num_topk]  # the top-K in rank order

    def sorted_logp(self, objective: str) -> Tensor:
        return self.inner.sorted_logp(objective)

    def _held(self, mapped: Tensor) -> tuple[Tensor, Tensor]:
        hit = self.tokens == mapped[:, None]
        return hit.any(1), self.logp.gather(1, hit.to(torch.uint8).argmax(1, keepdim=True)).squeeze(1)

    def at(self, tokens: Tensor) -> Tensor:
        mapped = self.mapping[tokens]
        found, value = self._held(mapped)
        value = upcast(value)
        nan = torch.full_like(value, float("nan"))
        if self.tail is not None:
            estimate = upcast(self.tail) - math.log(self.vocab_size - self.num_topk)
            value = torch.where(found, value, estimate.to(value.dtype))
        else:
            value = torch.where(found, value, nan)
        value = torch.where(mapped >= 0, value, nan)
        if self.exact is not None:
            ex_tokens, ex_logp = self.exact
            value = torch.where(tokens == ex_tokens, ex_logp.to(value.dtype), value)
        return torch.where(tokens == self.labels, self.label_logp.to(value.dtype), value)

    def outside_topk(self, tokens: Tensor) -> Tensor:
        """`(C,)` bool: `tokens` has a teacher counterpart that is neither the teacher's own token there nor
        in its top-K (`at` estimates it from the tail, unless `with_exact` gave its exact value)."""
        mapped = self.mapping[tokens]
        return (mapped >= 0) & ~self._held(mapped)[0] & (tokens != self.labels)

    def with_exact(self, tokens: Tensor, logp: Tensor) -> CrossTokenizerTopKChunk:
        return CrossTokenizerTopKChunk(self.inner, self.label_logp, self.labels, self.mapping, (tokens, logp))


def _span_logp(token_logp: Tensor, B: int, Tt: int, span_lo: Tensor, span_hi: Tensor) -> Tensor:
    """The teacher's log-probability of each student token's text span, flat like `span_lo`.

    token_logp: `(B * T',)` float64, the teacher's log-probability of its own token at each of its
    positions (0 off its response); span_lo, span_hi: flat indices into the per-row cumulative sums
    `(B, T' + 1)`: the span is the sum over `[lo, hi)`, through a cumulative sum (float64: long
    responses do not drift).
    """
    cum = torch.nn.functional.pad(token_logp.reshape(B, Tt).cumsum(1), (1, 0)).reshape(-1)  # cum[:, k] = sum_{p<k}
    return cum[span_hi.reshape(-1)] - cum[span_lo.reshape(-1)]


@dataclass
class CrossTokenizerView(TeacherView):
    """The teacher's view of a student batch, from the teacher run on its own tokenization.

    hidden:     `(B, T', H_t)` the teacher's final hidden states over its sequences; weight `(V_t, H_t)`,
                bias `(V_t,)` or None: its LM head.
    labels:     `(B, T')` the teacher's shifted labels (its response tokens).
    context:    shaped like the student's labels (`(B, T)`, or packed), long: the flat teacher position
                `b * T' + t` predicting the teacher token that starts where the student's token at that
                position starts (read where the student position is active).
    span_lo, span_hi: shaped like `context`, long: flat indices `b * (T' + 1) + k` such that the teacher
                positions `[lo, hi)` of row b predict the teacher tokens that spell the student's token
                exactly; the label's log-probability is their sum.
    mapping:    `(V_s,)` long: `token_map`.
    """

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None
    labels: Tensor
    context: Tensor
    span_lo: Tensor
    span_hi: Tensor
    mapping: Tensor
    chunk_size: int = 1024
    transform: LogitTransform = IDENTITY  # what the teacher applies to h @ W.T + b (a softcap, a scale)
    vocab_size = None  # the teacher's vocabulary is another one: the loss runs over the student's

    def _logits(self, h: Tensor, w: Tensor, b: Tensor | None, tau: float) -> Tensor:
        z = torch.addmm(b, h, w.T) if b is not None else h @ w.T
        if not self.transform.is_identity:
            z = self.transform(z)
        return z.div_(tau) if tau != 1.0 else z

    def chunker(self, V, tau):
        w = upcast(self.weight.detach())
        b = None if self.bias is None else upcast(self.bias.detach())
        hid = self.hidden.detach().reshape(-1, self.hidden.shape[-1])
        B, Tt = self.labels.shape
        flat_labels = self.labels.reshape(-1)
        # The teacher's log-probability of each of its own response tokens, chunked.
        token_logp = torch.zeros(B * Tt, dtype=torch.float64, device=hid.device)
        active = (flat_labels != IGNORE_INDEX).nonzero().squeeze(1)
        for s in range(0, active.numel(), self.chunk_size):
            p = active[s:s + self.chunk_size]
            logp = torch.log_softmax(self._logits(upcast(hid[p]), w, b, tau), -1)
            token_logp[p] = logp.gather(1, flat_labels[p][:, None]).squeeze(1).double()
        label_logp = _span_logp(token_logp, B, Tt, self.span_lo, self.span_hi)
        context = self.context.reshape(-1)
        mapping = self.mapping.to(hid.device)

        def chunk(pos: Tensor, labels: Tensor) -> TeacherChunk:
            logp = torch.log_softmax(self._logits(upcast(hid[context[pos]]), w, b, tau), -1)
            return CrossTokenizerChunk(logp, label_logp[pos].to(logp.dtype), labels, mapping)
        return chunk


@dataclass
class CrossTokenizerTopKView(TeacherView):
    """`CrossTokenizerView`'s semantics from the teacher's log-probabilities over its own tokens.

    teacher: `hpd.objectives.TopKTeacher` `(B, T')` / `(B, T', K)` over the teacher's sequences and
    vocabulary (a cache read with the teacher's labels, a server's answer); labels `(B, T')`,
    context, span_lo, span_hi and mapping as in `CrossTokenizerView`. With K = V_t it is exactly the
    online view (the teacher's whole distribution at each aligned position); else see
    `CrossTokenizerTopKChunk`. `score` (set when the `TopKTeacher` has one, a served teacher's exact
    scorer over its own positions): the teacher's exact log-probability of student tokens at student
    positions, asked at the aligned teacher position for the mapped teacher token.
    """

    teacher: Any
    labels: Tensor
    context: Tensor
    span_lo: Tensor
    span_hi: Tensor
    mapping: Tensor
    vocab_size = None  # the loss runs over the student's vocabulary

    def to(self, device) -> CrossTokenizerTopKView:
        return CrossTokenizerTopKView(self.teacher.to(device), *(x.to(device) for x in (
            self.labels, self.context, self.span_lo, self.span_hi, self.mapping)))

    def check(self, obj, tau, labels):
        self.teacher.check(obj, tau, self.labels)

    @property
    def score(self):
        inner = self.teacher.score
        if inner is None:
            return None
        context, mapping = self.context.reshape(-1), self.mapping

        def score(positions: Tensor, tokens: Tensor) -> Tensor:
            return inner(context[positions], mapping[tokens])
        return score

    def chunker(self, V, tau):
        t = self.teacher
        B, Tt = self.labels.shape
        t_labels = self.labels.reshape(-1)
        token_logp = torch.where(t_labels != IGNORE_INDEX, upcast(t.label_logprobs.reshape(-1)).double(), 0.0)
        label_logp = _span_logp(token_logp, B, Tt, self.span_lo, self.span_hi)
        context, mapping = self.context.reshape(-1), self.mapping
        inner = t.chunker(t.vocab_size, tau)  # over the teacher's own vocabulary

        def chunk(pos: Tensor, labels: Tensor) -> TeacherChunk:
            ctx = context[pos]
            tk = inner(ctx, t_labels[ctx].clamp_min(0))
            if tk.is_full:  # K = V_t: the teacher's whole distribution, as online
                return CrossTokenizerChunk(tk.logp, label_logp[pos].to(tk.logp.dtype), labels, mapping)
            return CrossTokenizerTopKChunk(tk, label_logp[pos], labels, mapping)
        return chunk


class CrossTokenizerSource(TeacherSource):
    """What every cross-tokenizer teacher source shares: `prepare` lines each batch up with the teacher.

    It re-tokenizes each response's text with the teacher (`align_response`), builds the teacher's
    sequences (its own prompt: `EncodedExample.teacher_prompt_ids`, the prompt rendered with the
    teacher's chat template) and the index maps, and masks the student positions the objective
    cannot score (labels -100): for hpd, orkl and sft, tokens that are not a joint span by
    themselves; for uld, tokens that do not start at a teacher boundary. It counts them in
    `batch.xtok_masked` / `batch.xtok_positions`; `stats()` returns the running fractions. A packed
    batch (`data.packing`) gets its maps packed like its labels; the teacher's sequences stay padded.
    The subclasses say where the teacher's log-probabilities come from (`view`).
    """

    def __init__(self, teacher_tokenizer, student_tokenizer, device: torch.device, *, whole_spans: bool = True):
        self.t_tok, self.device, self.whole_spans = teacher_tokenizer, device, whole_spans
        self.s_bytes, self.t_bytes = token_bytes(student_tokenizer), token_bytes(teacher_tokenizer)
        self.mapping = token_map(self.s_bytes, teacher_tokenizer, self.t_bytes)
        self.markers = special_markers(self.t_bytes)
        self.pad_id = teacher_tokenizer.pad_token_id if teacher_tokenizer.pad_token_id is not None else 0
        self.counts = {"positions": 0, "masked": 0}

    def align(self, batch, examples: Sequence[Any]) -> tuple[dict[str, Tensor], list[list[int]]]:
        """Line `batch` up with the teacher (see the class); returns the teacher's padded batch
        (`hpd.data.collate.build_batch`'s dict, on the CPU) and its sequences (prompt + response tokens).
        Sets `batch.xtok = (teacher labels, context, span_lo, span_hi)` on the CPU."""
        t_prompts = []
        for e in examples:
            if e.teacher_prompt_ids is None:
                raise HPDError("cross-tokenizer distillation needs the teacher's prompts (teacher.cross_tokenizer=true "
                               "renders them when the data is loaded)")
            t_prompts.append(e.teacher_prompt_ids)
        aligned = [align_response(c, self.s_bytes, self.t_tok, self.t_bytes, self.markers) for c in batch.completions]
        t = build_batch(t_prompts, [a.teacher_ids for a in aligned], pad_id=self.pad_id)
        packing = batch.packing
        row_labels = batch.row_labels if packing is not None else batch.cpu_labels
        B, T = row_labels.shape
        Tt = t["input_ids"].shape[1]
        context = torch.zeros(B, T, dtype=torch.long)
        lo, hi = torch.zeros(B, T, dtype=torch.long), torch.zeros(B, T, dtype=torch.long)
        keep = torch.zeros(B, T, dtype=torch.bool)
        for row, (a, sp, tp) in enumerate(zip(aligned, batch.prompts, t_prompts)):
            for i, (j, span) in enumerate(zip(a.start, a.span)):
                pos = len(sp) + i - 1
                if pos < 0 or pos >= T or j < 0 or (self.whole_spans and span is None):
                    continue
                keep[row, pos] = True
                context[row, pos] = row * Tt + len(tp) + j - 1
                if span is not None:
                    lo[row, pos] = row * (Tt + 1) + len(tp) + span[0] - 1
                    hi[row, pos] = row * (Tt + 1) + len(tp) + span[1] - 1
        active = row_labels != IGNORE_INDEX
        masked = active & ~keep
        batch.xtok_positions, batch.xtok_masked = int(active.sum()), int(masked.sum())
        self.counts["positions"] += batch.xtok_positions
        self.counts["masked"] += batch.xtok_masked
        if batch.xtok_masked:
            row_labels = row_labels.masked_fill(masked, IGNORE_INDEX)
            if packing is not None:
                batch.row_labels = row_labels
                batch.cpu_labels = packing.pack(row_labels, fill=IGNORE_INDEX)
            else:
                batch.cpu_labels = row_labels
            batch.labels = batch.cpu_labels.to(batch.labels.device)
            batch.num_active = int((batch.cpu_labels != IGNORE_INDEX).sum())
        if packing is not None:  # the maps laid out as the packed labels are
            context, lo, hi = (packing.pack(x) for x in (context, lo, hi))
        batch.xtok = (t["labels"], context, lo, hi)
        return t, [list(tp) + list(a.teacher_ids) for tp, a in zip(t_prompts, aligned)]

    def stats(self) -> dict[str, float]:
        """The fraction of the student's response positions masked so far (not alignable)."""
        n = self.counts["positions"]
        return {"xtok_frac_masked": self.counts["masked"] / n if n else float("nan")}


class CrossTokenizerTeacher(CrossTokenizerSource):
    """An online teacher with another tokenizer: a `hpd.teachers.sources.TeacherSource` (see
    `CrossTokenizerSource`); the teacher runs on its own padded sequences. HPD, orkl and sft read
    the teacher's log-probability of a student token as the sum of the log-probabilities of the
    teacher tokens spelling it; `uld` reads the teacher's next-token distribution over its own
    vocabulary."""

    def __init__(self, model: nn.Module, teacher_tokenizer, student_tokenizer, device: torch.device, *,
                 whole_spans: bool = True, chunk_size: int = 1024):
        super().__init__(teacher_tokenizer, student_tokenizer, device, whole_spans=whole_spans)
        self.model, self.chunk_size = model, chunk_size
        self.parameters = sum(p.numel() for p in model.parameters())

    def prepare(self, batch, examples: Sequence[Any], split: str, indices: Sequence[int]) -> None:
        t, _ = self.align(batch, examples)
        batch.teacher_ids, batch.teacher_mask = t["input_ids"].to(self.device), t["attention_mask"].to(self.device)
        batch.xtok = tuple(x.to(self.device) for x in batch.xtok)
        batch.teacher_tokens = int(t["attention_mask"].sum())

    @torch.no_grad()
    def view(self, batch) -> TeacherView:
        head = lm_head_of(self.model).detached()
        hidden = final_hidden_states(self.model, batch.teacher_ids, batch.teacher_mask)
        labels, context, lo, hi = batch.xtok
        return CrossTokenizerView(hidden, head.weight, head.bias, labels, context, lo, hi, self.mapping,
                                  chunk_size=self.chunk_size, transform=head.transform)


class CachedCrossTokenizerTeacher(CrossTokenizerSource):
    """A teacher of another tokenizer read from a cache built across tokenizers (`hpd cache-teacher
    --student DIR`): the cache holds the teacher's log-probabilities over its own tokenization of
    each response (`hpd.teachers.cache`), found by the student's sequence; `view` reads them at the
    teacher's positions and lines them up as the online teacher does (`CrossTokenizerTopKView`).

    rows: the cache row of every example of each split (`{"train": [...], "eval": [...]}`). The
    teacher's sequence of each row, rebuilt here with the cache's teacher tokenizer, must be the one
    the cache was built over (its hash is checked): else an error, never another teacher's values.
    """

    def __init__(self, cache, rows: dict[str, list[int]], teacher_tokenizer, student_tokenizer, device: torch.device,
                 *, whole_spans: bool = True):
        super().__init__(teacher_tokenizer, student_tokenizer, device, whole_spans=whole_spans)
        self.cache, self.rows = cache, rows

    def prepare(self, batch, examples, split, indices) -> None:
        from hpd.fingerprints import sequence_hash

        _, sequences = self.align(batch, examples)
        batch.cache_rows = [self.rows[split][i] for i in indices]
        t_prompts = [e.teacher_prompt_ids for e in examples]
        for row, tp, seq, e in zip(batch.cache_rows, t_prompts, sequences, examples):
            if sequence_hash(tp, seq[len(tp):]) != int(self.cache.teacher_hashes[row]):
                raise HPDError(f"the teacher cache '{self.cache.path}' holds another teacher sequence for {e.source} "
                               "than this run builds (its teacher prompt or response tokens differ: another "
                               "data.chat_template or teacher tokenizer?): rebuild it with `hpd cache-teacher "
                               "--config RUN.yaml`")

    def view(self, batch) -> TeacherView:
        labels, context, lo, hi = batch.xtok
        topk = self.cache.teacher(batch.cache_rows, labels)
        return CrossTokenizerTopKView(topk, labels, context, lo, hi, self.mapping).to(self.device)


class ServedCrossTokenizerTeacher(CrossTokenizerSource):
    """A teacher of another tokenizer behind inference servers (`teacher.server` with
    `teacher.cross_tokenizer`): each batch's teacher sequences (its own tokenization, built here
    with its tokenizer) are scored by the servers as a same-tokenizer served teacher's are (the
    prompt log-probabilities: exact at the teacher's own tokens, top-K plus a tail elsewhere), and
    lined up as online (`CrossTokenizerTopKView`). HPD's sample is read at the teacher token
    spelling its text alone: from the top-K, else from the tail, or exactly by a second request
    (`exact_samples`, `teacher.server_exact_samples`)."""

    prefetches = True

    def __init__(self, servers, top_k: int, vocab_size: int, teacher_tokenizer, student_tokenizer,
                 device: torch.device, *, whole_spans: bool = True, temperature: float = 1.0,
                 exact_samples: bool = False):
        from hpd.teachers.sources import ServedTeacher

        super().__init__(teacher_tokenizer, student_tokenizer, device, whole_spans=whole_spans)
        self.served = ServedTeacher(servers, top_k, vocab_size, device, temperature=temperature,
                                    exact_samples=exact_samples)

    def prepare(self, batch, examples, split, indices) -> None:
        t, sequences = self.align(batch, examples)
        batch.teacher_tokens = int(t["attention_mask"].sum())
        batch.teacher_request = self.served.servers.submit(self.served._fetch, sequences, int(t["input_ids"].shape[1]))

    def view(self, batch) -> TeacherView:
        labels, context, lo, hi = batch.xtok
        return CrossTokenizerTopKView(batch.teacher_request.result(), labels, context, lo, hi,
                                      self.mapping).to(self.device)


__all__ = ["CachedCrossTokenizerTeacher", "CrossTokenizerChunk", "CrossTokenizerSource", "CrossTokenizerTeacher",
           "CrossTokenizerTopKChunk", "CrossTokenizerTopKView", "CrossTokenizerView", "EOS_MARKER", "ResponseAlignment",
           "ServedCrossTokenizerTeacher", "align_response", "joint_spans", "special_markers", "token_bytes", "token_map"]

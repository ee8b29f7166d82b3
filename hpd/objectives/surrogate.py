"""The one routine that turns an objective's token weights into a loss.

Over 600 lines: the teacher views and the one loss routine that reads them change together
(each view gives the routine its own chunker, the routine's plan reads the views' fields); apart,
each would import the other's private pieces.

    L = -(1/N) sum_t sum_{v in S_t} sg(w_t(v)) log q(v | x<t)

It does, once for every objective: the cross-entropy mix `ce_weight * CE(y) + kd_weight * D`
(as token weights `ce_weight [v = y] + kd_weight w(v)`), masking (labels `-100`, and tokens outside the shared
vocabulary), normalization by a global token count `N` (`num_tokens`, so gradient accumulation and
world size never change the loss scale), float32 arithmetic, the student sample `y_hat` of HPD
(inverse-CDF sampling from one seeded uniform per position, so chunking never changes the draw),
the statistics the trainer logs, and chunking.

Two paths share all of that and differ only in how the gradient is obtained:

- `objective_loss` (the reference): student logits `(B, T, V)` in, autograd through
  `log_softmax` for the gradient.
- `chunked_objective_loss` (the memory-lean path): final hidden states `(B, T, H)` and the LM head
  (`hpd.objectives.head.LMHead`: weight `(V, H)`, bias, and the model's logit transform, e.g. a
  softcap) in; logits are computed for `chunk_size` positions at a time and the gradient of the
  surrogate with respect to them is written in closed form, `dL/dz = (q sum_v w(v) - w) / tau`
  (times the transform's derivative), and pushed straight into the hidden states and the head. No
  `(B, T, V)` tensor ever exists.

The teacher may be given as logits `(B, T, V)`, as a `HeadTeacher` (its hidden states and LM
head: chunked alike, so neither model's full logits exist), for one-hot objectives as a
`GatheredTeacher` holding log-probabilities at a few tokens per position, or as a `TopKTeacher`
read from a teacher cache (`hpd.teachers.cache`): exact at the sequence token, top-K plus one tail
bucket elsewhere.

    >>> import torch
    >>> from hpd.objectives import get_objective, HeadTeacher
    >>> h = torch.randn(2, 8, 16, requires_grad=True); W = torch.randn(50, 16, requires_grad=True)
    >>> teacher = HeadTeacher(torch.randn(2, 8, 16), torch.randn(50, 16))
    >>> labels = torch.randint(0, 50, (2, 8))
    >>> out = get_objective("fkl").chunked(h, W, teacher, labels, chunk_size=4)
    >>> out.loss.backward(); W.grad.shape
    torch.Size([50, 16])
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable

import torch
from torch import Tensor

from hpd.errors import HPDError
from hpd.vocab import resolve_shared_vocab
from hpd.objectives.tensors import (
    IGNORE_INDEX, ObjectiveOutput, TeacherChunk, TeacherParts, TokenWeights, bucket_logq, kl, merge_weights,
    refuse_unshifted_labels, upcast,
)
from hpd.objectives.clip import RatioClip, RolloutWeights
from hpd.objectives.head import LMHead, LogitTransform, as_lm_head

if TYPE_CHECKING:  # only a type here; `Objective`'s calls enter this module, which never imports it back
    from hpd.objectives.base import Objective

DEFAULT_CHUNK_SIZE = 1024


class TeacherView:
    """What an objective reads of the teacher for one batch, and how to read it chunk by chunk.

    Each kind of view (logits, hidden states + head, gathered log-probabilities, a cached top-K)
    says how big its vocabulary is, checks itself against the objective, and hands the surrogate a
    `chunker`: a function from active positions to the teacher's log-probabilities there. So the
    surrogate never asks which kind it holds, and a new teacher source needs only a new view.
    """

    # hpd's sample must be given (the view holds the teacher at chosen tokens only).
    needs_given_samples = False
    # Each view has `vocab_size`: the rows of the teacher's distribution, or None when unknown.

    def check(self, obj: Objective, tau: float, labels: Tensor) -> None:
        """Raise `HPDError` when this view cannot serve `obj` at temperature `tau` on `labels (B, T)`."""

    def check_vocab(self, V: int) -> None:
        """Raise `HPDError` when the loss's vocabulary `V` is not the one this view is normalized over."""

    def chunker(self, V: int, tau: float):
        """`f(pos (C,), labels (C,)) -> TeacherChunk`: the teacher at flat positions `pos` of `(B, T)`."""
        raise NotImplementedError


@dataclass
class LogitsTeacher(TeacherView):
    """A teacher given by its logits `(B, T, V)` (plain tensors passed as the teacher become this)."""

    logits: Tensor

    @property
    def vocab_size(self) -> int:
        return self.logits.shape[-1]

    def check(self, obj, tau, labels):
        if self.logits.shape[:2] != labels.shape:
            raise HPDError(f"teacher logits {tuple(self.logits.shape)} do not match labels {tuple(labels.shape)}")

    def chunker(self, V, tau):
        t = self.logits

        def chunk(pos: Tensor, labels: Tensor) -> TeacherChunk:
            z = upcast(t.detach().reshape(-1, t.shape[-1])[pos, :V])
            if tau != 1.0:
                z.div_(tau)  # z is this chunk's own tensor (an indexed copy)
            return TeacherChunk(torch.log_softmax(z, -1))
        return chunk


@dataclass
class GatheredTeacher(TeacherView):
    """Teacher log-probabilities gathered at a few tokens per position.

    tokens:   `(B, T, K)` token ids (for `sft`/`orkl`: the labels; for `hpd`: labels and samples).
    logprobs: `(B, T, K)` the teacher's log-probabilities of those tokens, at the loss temperature.
    """

    tokens: Tensor
    logprobs: Tensor
    needs_given_samples = True
    vocab_size = None  # unknown: only a few tokens per position

    def chunker(self, V, tau):
        K = self.tokens.shape[-1]
        tokens, logprobs = self.tokens.reshape(-1, K), self.logprobs.reshape(-1, K)
        return lambda pos, labels: TeacherChunk(upcast(logprobs[pos]), tokens[pos])


@dataclass
class TopKTeacher(TeacherView):
    """A teacher read from a cache: exact at the sequence token, top-K tokens plus a tail elsewhere.

    label_logprobs: `(B, T)` the teacher's log-probability of `labels[:, t]` (unread where ignored).
    tokens:         `(B, T, K)` int64 ids of the teacher's top-K tokens (K may be 0: one-hot only).
    logprobs:       `(B, T, K)` their log-probabilities.
    tail:           `(B, T)` log of the teacher's mass outside the top-K.
    vocab_size:     the vocabulary the log-probabilities are normalized over.
    temperature:    the loss temperature they were computed at (must be the objective's).

    One-hot objectives (`sft`, `orkl`) are exact; `hpd` reads the teacher at its sample `y_hat`
    from the top-K, else estimates it as `tail - log(V - K)` (the tail mass spread evenly) and logs
    `frac_sample_outside_topk` (unless `score` is given: `score(positions (N,), tokens (N,))`, the
    positions flat in `(B, T)`, returns the teacher's exact `(N,)` log-probabilities of those tokens
    there, and the samples outside the top-K are read from it: a served teacher asks its server); `hpdk` takes its top-k tokens from the first `min(k, K)` of the
    top-K; full-vocabulary objectives work over the K top tokens plus one tail bucket. With K = V
    the teacher is complete and every objective is exact.
    """

    label_logprobs: Tensor
    tokens: Tensor
    logprobs: Tensor
    tail: Tensor
    vocab_size: int
    temperature: float = 1.0
    score: Callable[[Tensor, Tensor], Tensor] | None = None

    def to(self, device: torch.device | str) -> TopKTeacher:
        """The same teacher with its tensors on `device` (no copy when they are there already)."""
        return replace(self, label_logprobs=self.label_logprobs.to(device), tokens=self.tokens.to(device),
                       logprobs=self.logprobs.to(device), tail=self.tail.to(device))

    def check(self, obj, tau, labels):
        if abs(self.temperature - tau) > 1e-12:
            raise HPDError(f"the cached teacher was computed at temperature {self.temperature:g}, the objective "
                           f"uses {tau:g}: rebuild the cache with --temperature {tau:g}")
        if self.tokens.shape[-1] == 0 and obj.support != "token":
            raise HPDError(f"objective '{obj.name}' reads the teacher beyond the sequence token, but the teacher "
                           "cache holds no top-K tokens: rebuild it with --top-k K (e.g. 32)")

    def check_vocab(self, V):
        if V != self.vocab_size:
            raise HPDError(f"the cached teacher is normalized over {self.vocab_size} tokens, the loss over {V}: "
                           f"rebuild the cache with --vocab-size {V}")

    def chunker(self, V, tau):
        K = self.tokens.shape[-1]
        n = self.label_logprobs.numel()
        label_lp, all_ids, all_lp = self.label_logprobs.reshape(-1), self.tokens.reshape(n, K), self.logprobs.reshape(n, K)
        tail = self.tail.reshape(-1)

        def chunk(pos: Tensor, labels: Tensor) -> TeacherChunk:
            label_logp = upcast(label_lp[pos])[:, None]
            ids, logp = all_ids[pos], upcast(all_lp[pos])
            if K >= V:  # the whole distribution
                full = torch.empty_like(logp).scatter_(1, ids, logp)
                return TeacherChunk(full.scatter_(1, labels[:, None], label_logp))
            tokens, logp = torch.cat([labels[:, None], ids], 1), torch.cat([label_logp, logp], 1)
            if K == 0:
                return TeacherChunk(logp, tokens)
            return TeacherChunk(logp, tokens, tail=upcast(tail[pos]), num_topk=K, vocab_size=V)
        return chunk


@dataclass
class HeadTeacher(TeacherView):
    """A teacher given by its final hidden states and LM head, so its logits can be chunked too.

    hidden: `(B, T, H)` final (normed) hidden states; weight: `(V, H)`; bias: `(V,)` or None;
    transform: what the model applies to `h @ W.T + b` (`LogitTransform`; None: nothing).
    `HeadTeacher.of(hidden, head)` builds one from an `LMHead` (`hpd.models.head.lm_head_of`).
    """

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None = None
    transform: LogitTransform | None = None

    @classmethod
    def of(cls, hidden: Tensor, head: LMHead) -> HeadTeacher:
        """The view of `hidden (B, T, H)` through `head`, detached."""
        head = head.detached()
        return cls(hidden.detach(), head.weight, head.bias, head.transform)

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]

    def chunker(self, V, tau):
        w = upcast(self.weight.detach()[:V])
        b = None if self.bias is None else upcast(self.bias.detach()[:V])
        hid = self.hidden.detach().reshape(-1, self.hidden.shape[-1])

        transform = self.transform

        def chunk(pos: Tensor, labels: Tensor) -> TeacherChunk:
            h = upcast(hid[pos])
            z = torch.addmm(b, h, w.T) if b is not None else h @ w.T
            if transform is not None:
                transform.apply_(z)
            if tau != 1.0:
                z.div_(tau)  # z is this chunk's own tensor (a product)
            return TeacherChunk(torch.log_softmax(z, -1))
        return chunk


def as_teacher_view(teacher) -> TeacherView | None:
    """`teacher` as a `TeacherView`: a plain logits tensor `(B, T, V)` is wrapped, None stays None."""
    if teacher is None or isinstance(teacher, TeacherView):
        return teacher
    if isinstance(teacher, Tensor):
        return LogitsTeacher(teacher)
    raise HPDError(f"a teacher must be logits (B, T, V) or a TeacherView (HeadTeacher, GatheredTeacher, TopKTeacher), "
                   f"got {type(teacher).__name__}")


class _Stats:
    """Running sums, counts and extremes of per-position statistics, kept on device."""

    def __init__(self):
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, Tensor] = {}
        self.mins: dict[str, Tensor] = {}
        self.maxs: dict[str, Tensor] = {}

    def add(self, name: str, values: Tensor, extreme: bool = False) -> None:
        values = upcast(values.detach())
        valid = ~values.isnan()
        s, c = values.nansum(), valid.sum()
        self.sums[name] = self.sums[name] + s if name in self.sums else s
        self.counts[name] = self.counts[name] + c if name in self.counts else c
        if extreme:
            inf = torch.full_like(values, float("inf"))
            lo = torch.where(valid, values, inf).min() if values.numel() else inf.new_tensor(float("inf"))
            hi = torch.where(valid, values, -inf).max() if values.numel() else inf.new_tensor(float("-inf"))
            self.mins[name] = torch.minimum(self.mins[name], lo) if name in self.mins else lo
            self.maxs[name] = torch.maximum(self.maxs[name], hi) if name in self.maxs else hi


def _inverse_cdf_sample(logq: Tensor, u: Tensor) -> Tensor:
    """One draw per row of `logq (C, V)` from uniforms `u (C,)`, as `(C,)` token ids."""
    cdf = logq.exp().cumsum_(-1)
    target = (u.to(cdf.dtype) * cdf[:, -1]).unsqueeze(1).contiguous()
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=logq.shape[1] - 1)


class _Plan:
    """Everything the two paths share for one batch: active positions, teacher rows, samples, stats."""

    def __init__(self, obj: Objective, teacher, labels: Tensor, student_vocab: int, *, sampled_tokens, generator,
                 num_tokens, vocab_size, diagnostics, device, rollout: RolloutWeights | None = None,
                 clip: RatioClip | None = None, check_alignment=True):
        if labels.dim() != 2:
            raise HPDError(f"labels must be (B, T), got shape {tuple(labels.shape)}")
        if check_alignment:
            refuse_unshifted_labels(labels)
        B, T = labels.shape
        self.obj, self.tau = obj, float(obj.temperature)
        if rollout is not None and (teacher is not None or sampled_tokens is not None):
            raise HPDError("weights fixed at rollout time replace the teacher and the samples: pass rollout alone")
        if teacher is None and obj.needs_teacher and rollout is None:
            raise HPDError(f"objective '{obj.name}' needs a teacher; only 'sft' runs without one")
        teacher = as_teacher_view(teacher)
        teacher_vocab = None
        if teacher is not None:
            teacher_vocab = teacher.vocab_size
            teacher.check(obj, self.tau, labels)
        if vocab_size is None:
            if teacher_vocab is not None and teacher_vocab != student_vocab:
                resolve_shared_vocab(student_vocab, teacher_vocab)  # raises with both sizes
            vocab_size = student_vocab
        elif vocab_size > student_vocab or (teacher_vocab is not None and vocab_size > teacher_vocab):
            raise HPDError(f"vocab_size={vocab_size} exceeds the student ({student_vocab}) or teacher ({teacher_vocab}) vocabulary")
        self.V = vocab_size
        if teacher is not None:
            teacher.check_vocab(self.V)

        flat = labels.reshape(-1).to(device)
        active = (flat != IGNORE_INDEX) & (flat >= 0) & (flat < self.V)
        self.sample: Tensor | None = None
        self.uniform: Tensor | None = None
        pair = obj.support == "pair" and rollout is None  # reused rollouts carry their y_hat
        if pair and sampled_tokens is not None:
            if sampled_tokens.shape != labels.shape:
                raise HPDError(f"sampled_tokens {tuple(sampled_tokens.shape)} must match labels {tuple(labels.shape)}")
            flat_sample = sampled_tokens.reshape(-1).to(device)
            active &= (flat_sample >= 0) & (flat_sample < self.V)
        self.pos = active.nonzero().squeeze(1)  # (N,)
        self.N = self.pos.numel()
        self.labels = flat[self.pos]
        if pair:
            if sampled_tokens is not None:
                self.sample = flat_sample[self.pos]
            elif teacher is not None and teacher.needs_given_samples:
                raise HPDError(f"{obj.name} with a GatheredTeacher needs sampled_tokens: the teacher must be gathered at them")
            else:
                gen_device = generator.device if generator is not None else device
                self.uniform = torch.rand(self.N, generator=generator, device=gen_device, dtype=torch.float64).to(device)

        self.teacher = teacher
        self._chunk = teacher.chunker(self.V, self.tau) if teacher is not None else None
        # Reused rollouts: the weights, their tokens and the rollout policy's log-probabilities,
        # at the active positions, each (N, K).
        self.rollout: RolloutWeights | None = None
        if rollout is not None:
            if rollout.weights.shape[:2] != labels.shape:
                raise HPDError(f"rollout weights {tuple(rollout.weights.shape)} do not match labels {tuple(labels.shape)}")
            K = rollout.weights.shape[2]
            self.rollout = RolloutWeights(*(x.reshape(B * T, K).to(device)[self.pos] for x in
                                            (rollout.weights, rollout.tokens, rollout.old_logp)))
            self.clip = clip or RatioClip()
        self.denom = torch.as_tensor(self.N if num_tokens is None else num_tokens, dtype=torch.float32, device=device).clamp_min(1)
        self.diagnostics = diagnostics
        self.stats = _Stats()
        self.value_sum = torch.zeros((), dtype=torch.float32, device=device)

    @torch.no_grad()
    def teacher_chunk(self, pos: Tensor, labels: Tensor) -> TeacherChunk | None:
        """The teacher at positions `pos (C,)` whose sequence tokens are `labels (C,)`."""
        return None if self._chunk is None else self._chunk(pos, labels)

    @torch.no_grad()
    def terms(self, logq: Tensor, sl: slice) -> TokenWeights:
        """Token weights at the active positions `sl`, from the detached `logq (C, V)`; records stats."""
        y = self.labels[sl]
        if self.rollout is not None:
            return self._clipped(logq, sl, y)
        sample = None
        if self.obj.support == "pair":
            sample = self.sample[sl] if self.sample is not None else _inverse_cdf_sample(logq, self.uniform[sl])
        teacher = self.teacher_chunk(self.pos[sl], y)
        if isinstance(teacher, TeacherParts):  # a teacher per row: each part weighed by its own teacher
            parts = [(rows, self._weigh(logq[rows], chunk, y[rows], None if sample is None else sample[rows], pos, view))
                     for rows, chunk, pos, view in teacher.parts]
            return merge_weights(parts, logq.shape[0], self.V, y)
        return self._weigh(logq, teacher, y, sample, self.pos[sl], self.teacher)

    def _weigh(self, logq: Tensor, teacher: TeacherChunk | None, y: Tensor, sample: Tensor | None, pos: Tensor,
               view) -> TokenWeights:
        """The objective's weights at C positions from their teacher chunk (`pos (C,)`: the positions in
        `view`, the teacher view they came from, which may score samples outside its top-K); records stats."""
        score = getattr(view, "score", None)
        if sample is not None and teacher is not None and teacher.is_topk and score is not None:
            exact = teacher.at(sample)  # exact inside the top-K; the samples outside it are asked for
            outside = teacher.outside_topk(sample)
            if bool(outside.any()):
                exact[outside] = score(pos[outside], sample[outside]).to(exact)
            teacher = teacher.with_exact(sample, exact)
        tw = self.obj.weights(logq, teacher, y, sample)
        ce = -logq.gather(1, y[:, None]).squeeze(1)
        st = self.stats
        st.add("ce", ce)
        st.add("kd_term", tw.value)  # the objective's own term: value = ce_weight * ce + kd_weight * kd_term
        if self.obj.mixed:
            tw = tw.mixed_with_ce(y, ce, self.obj.ce_weight, self.obj.kd_weight)
        self.value_sum = self.value_sum + tw.value.sum()  # promotes to float64 when the inputs are
        if self.diagnostics and teacher is not None and teacher.is_full:
            logp = teacher.logp
            st.add("agreement", (logq.argmax(-1) == logp.argmax(-1)).float())
            st.add("kl", kl(logp, logq))
            st.add("entropy", -(logq.exp() * logq).sum(-1))
        elif self.diagnostics and teacher is not None and teacher.partial:  # another tokenizer: top-1 spelled alike
            st.add("agreement", teacher.agrees(logq.argmax(-1)).float())
            st.add("entropy", -(logq.exp() * logq).sum(-1))
        elif self.diagnostics and teacher is not None and teacher.is_topk:
            ids, logp_b = teacher.buckets(self.obj.name)
            top1 = ids.gather(1, logp_b[:, :-1].argmax(1, keepdim=True)).squeeze(1)
            st.add("agreement", (logq.argmax(-1) == top1).float())
            # KL over the K + 1 buckets: a lower bound of the full KL, hence its own name.
            st.add("kl_topk", kl(logp_b, bucket_logq(logq, ids)))
            st.add("entropy", -(logq.exp() * logq).sum(-1))
        if sample is not None and teacher is not None and teacher.is_topk:
            st.add("frac_sample_outside_topk", teacher.outside_topk(sample).float())
        for name, values in tw.stats.items():
            st.add(name, values, extreme=name in self.obj.extremes)
        return tw

    def _clipped(self, logq: Tensor, sl: slice, y: Tensor) -> TokenWeights:
        """The weights fixed at rollout time, clipped PPO-style by the ratio to the rollout policy."""
        r = self.rollout
        tw = TokenWeights(weights=r.weights[sl], tokens=r.tokens[sl], value=torch.zeros_like(y, dtype=logq.dtype))
        tw, stats = self.clip.apply(tw, logq.gather(1, tw.tokens), r.old_logp[sl].to(logq.dtype), y)
        self.value_sum = self.value_sum + tw.value.sum()
        self.stats.add("ce", -logq.gather(1, y[:, None]).squeeze(1))
        for name, values in stats.items():
            self.stats.add(name, values, extreme=name == "ratio")
        return tw

    def output(self, loss: Tensor) -> ObjectiveOutput:
        st = self.stats
        return ObjectiveOutput(
            loss=loss,
            value=(self.value_sum / self.denom).detach(),
            num_active=torch.tensor(self.N, dtype=torch.int64),
            sums=st.sums, counts=st.counts, mins=st.mins, maxs=st.maxs,
        )


def _full_precision(device: torch.device):
    """Losses are computed in float32 (or float64) even inside a bf16/fp16 autocast region."""
    return torch.autocast(device_type=device.type, enabled=False)


def _picked(logq: Tensor, tw: TokenWeights) -> Tensor:
    """`log q` at the objective's token set: `(C, V)` or `(C, K)`."""
    return logq if tw.tokens is None else logq.gather(1, tw.tokens)


def objective_loss(obj: Objective, student_logits: Tensor, teacher, labels: Tensor, *, sampled_tokens: Tensor | None = None,
                   generator: torch.Generator | None = None, num_tokens: int | Tensor | None = None,
                   vocab_size: int | None = None, diagnostics: bool = True, rollout: RolloutWeights | None = None,
                   clip: RatioClip | None = None, check_alignment: bool = True) -> ObjectiveOutput:
    """The reference path: loss of `obj` from aligned student logits.

    student_logits: `(B, T, V_s)`, position t predicts `labels[:, t]`.
    teacher:        logits `(B, T, V_t)`, a `HeadTeacher`, a `GatheredTeacher`, or None (sft).
    labels:         `(B, T)` sequence tokens, `-100` where ignored.
    sampled_tokens: `(B, T)` HPD's `y_hat`; if None it is drawn from the student with `generator`.
    num_tokens:     the global count of active tokens to normalize by (default: this batch's).
    vocab_size:     shared vocabulary size when the models' sizes differ by padding rows.
    diagnostics:    also report teacher-student agreement, KL(p||q) and student entropy.
    rollout:        weights fixed at rollout time (`rollout_weights`), used instead of the objective's
                    own (teacher None): the loss is then their PPO loss, clipped as `clip` says
                    (`hpd.objectives.clip`).
    check_alignment: refuse labels that look unshifted (Hugging Face's `labels[:, t] = input_ids[:, t]`;
                    see `hpd.objectives.base.refuse_unshifted_labels`); False for aligned labels that
                    label the last position (a window cut from longer sequences).
    """
    B, T, Vs = student_logits.shape
    with _full_precision(student_logits.device):
        plan = _Plan(obj, teacher, labels, Vs, sampled_tokens=sampled_tokens, generator=generator, num_tokens=num_tokens,
                     vocab_size=vocab_size, diagnostics=diagnostics, device=student_logits.device, rollout=rollout,
                     clip=clip, check_alignment=check_alignment)
        z = upcast(student_logits.reshape(B * T, Vs)[plan.pos, : plan.V])
        if plan.tau != 1.0:
            z = z / plan.tau
        logq = torch.log_softmax(z, -1)
        tw = plan.terms(logq.detach(), slice(0, plan.N))
        loss = -(tw.weights * _picked(logq, tw)).sum() / plan.denom
    return plan.output(loss)


class _ChunkedSurrogate(torch.autograd.Function):
    """Surrogate loss from active hidden states `(N, H)` and an LM head `(V_s, H)`, chunk by chunk.

    The forward pass computes the gradients too (the surrogate's gradient with respect to the
    logits is closed-form), so only `(chunk, V)` logits exist at a time; backward scales them.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, transform: LogitTransform, plan: _Plan,
                chunk_size: int) -> Tensor:
        V, tau = plan.V, plan.tau
        plain = transform.is_identity
        W = upcast(weight[:V])
        b = None if bias is None else upcast(bias[:V])
        dt = W.dtype
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        # grad_h rows and grad_w's first V rows are written (not accumulated) by the first chunk that
        # reaches them, so neither (V, H) nor (N, H) buffer is zero-filled first.
        grad_h = torch.empty(hidden.shape, dtype=dt, device=hidden.device) if need_h else None
        grad_w = torch.empty(weight.shape, dtype=dt, device=weight.device) if need_w else None
        if need_w and (plan.N == 0 or V < weight.shape[0]):
            grad_w[V if plan.N else 0:].zero_()  # padding rows past the shared vocabulary get none
        grad_b = torch.zeros(bias.shape, dtype=dt, device=bias.device) if need_b else None
        total = torch.zeros((), dtype=dt, device=hidden.device)
        for start in range(0, plan.N, chunk_size):
            sl = slice(start, min(start + chunk_size, plan.N))
            h = hidden[sl].to(dt)
            z = torch.addmm(b, h, W.T) if b is not None else h @ W.T
            deriv = None if plain else transform.apply_(z)  # (C, V) for a softcap, else None
            if tau != 1.0:
                z.div_(tau)
            logq = torch.log_softmax(z, -1)
            del z
            tw = plan.terms(logq, sl)
            total -= (tw.weights * _picked(logq, tw)).sum()
            g = logq.exp_()  # reuse the buffer: q
            g.mul_(tw.weights.sum(-1, keepdim=True))
            if tw.tokens is None:
                g.sub_(tw.weights)
            else:
                g.scatter_add_(1, tw.tokens, -tw.weights)
            if tau != 1.0:
                g.div_(tau)
            if not plain:
                transform.backward_(g, deriv)  # the chain rule through the model's logit transform
            del deriv
            if need_h:
                torch.mm(g, W, out=grad_h[sl])
            if need_w:
                if start == 0:
                    torch.mm(g.T, h, out=grad_w[:V])
                else:
                    grad_w[:V].addmm_(g.T, h)
            if need_b:
                grad_b[:V] += g.sum(0)
            del g, logq
        # Kept on ctx rather than saved for backward: they are neither inputs nor outputs, and
        # backward scales them in place instead of allocating (V, H)-sized copies.
        ctx.grads = (grad_h, grad_w, grad_b)
        ctx.denom = plan.denom
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total / plan.denom

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        if ctx.grads is None:
            raise RuntimeError("the chunked surrogate's backward ran twice: its gradients were consumed by the first")
        scale = grad_out / ctx.denom
        grads = [None if g is None else g.mul_(scale).to(dtype) for g, dtype in zip(ctx.grads, ctx.dtypes)]
        ctx.grads = None
        return (*grads, None, None, None)


def chunked_objective_loss(obj: Objective, hidden: Tensor, lm_head_weight: Tensor | LMHead, teacher, labels: Tensor, *,
                           lm_head_bias: Tensor | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
                           sampled_tokens: Tensor | None = None, generator: torch.Generator | None = None,
                           num_tokens: int | Tensor | None = None, vocab_size: int | None = None,
                           diagnostics: bool = True, rollout: RolloutWeights | None = None,
                           clip: RatioClip | None = None, check_alignment: bool = True) -> ObjectiveOutput:
    """The memory-lean path: same loss and gradients as `objective_loss(obj, head.logits(hidden), ...)`.

    hidden:         `(B, T, H)` the student's final hidden states (gradients flow into them).
    lm_head_weight: the student's LM head: an `LMHead` (`hpd.models.head.lm_head_of(model)`: weight,
                    bias and the model's logit transform), or its weight `(V_s, H)` alone (then
                    logits = h @ W.T + b with lm_head_bias `(V_s,)` or None).
    chunk_size:     active positions per chunk; peak extra memory is about a few `(chunk_size, V)`
                    float32 buffers.
    Other arguments as in `objective_loss`.
    """
    if chunk_size < 1:
        raise HPDError(f"chunk_size must be >= 1, got {chunk_size}")
    B, T, H = hidden.shape
    head = as_lm_head(lm_head_weight, lm_head_bias)
    with _full_precision(hidden.device):
        plan = _Plan(obj, teacher, labels, head.vocab_size, sampled_tokens=sampled_tokens, generator=generator,
                     num_tokens=num_tokens, vocab_size=vocab_size, diagnostics=diagnostics, device=hidden.device,
                     rollout=rollout, clip=clip, check_alignment=check_alignment)
        active_hidden = hidden.reshape(B * T, H)[plan.pos]
        loss = _ChunkedSurrogate.apply(active_hidden, head.weight, head.bias, head.transform, plan, chunk_size)
    return plan.output(loss)


@torch.no_grad()
def rollout_weights(obj: Objective, hidden: Tensor, lm_head_weight: Tensor | LMHead, teacher, labels: Tensor, *,
                    lm_head_bias: Tensor | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
                    generator: torch.Generator | None = None, num_tokens: int | Tensor | None = None,
                    vocab_size: int | None = None, diagnostics: bool = True) -> tuple[RolloutWeights, ObjectiveOutput]:
    """The objective's token weights under the rollout policy, fixed for reuse (no gradient).

    hidden: `(B, T, H)` the rollout policy's final hidden states; other arguments as in
    `chunked_objective_loss`. HPD's `y_hat` is drawn here, once, as the trained path would draw it.
    Returns the weights with their tokens and the policy's log-probabilities of them, each
    `(B, T, K)`, and the objective's output at rollout time (its value and statistics; loss 0).
    Only objectives over a few tokens per position (`{y}`, `{y, y_hat}`, hpdk's `{y, y_hat}` plus
    the teacher's top-k: K = 2 + k) can be fixed: a weight over the whole vocabulary is no advantage
    of a sampled token.
    """
    if obj.support == "vocab":
        raise HPDError(f"objective '{obj.name}' weighs the whole vocabulary at each position, which PPO-style "
                       "reuse cannot clip (it needs sampled tokens): reuse rollouts with orkl or hpd, or set "
                       "regime.minibatches=1 regime.epochs=1")
    B, T, H = hidden.shape
    head = as_lm_head(lm_head_weight, lm_head_bias)
    with _full_precision(hidden.device):
        plan = _Plan(obj, teacher, labels, head.vocab_size, sampled_tokens=None, generator=generator,
                     num_tokens=num_tokens, vocab_size=vocab_size, diagnostics=diagnostics, device=hidden.device)
        W = upcast(head.weight[:plan.V])
        b = None if head.bias is None else upcast(head.bias[:plan.V])
        active = hidden.reshape(B * T, H)[plan.pos]
        parts: list[tuple[Tensor, Tensor, Tensor]] = []
        for start in range(0, plan.N, chunk_size):
            sl = slice(start, min(start + chunk_size, plan.N))
            z = active[sl].to(W.dtype) @ W.T
            if b is not None:
                z = z + b
            head.transform.apply_(z)
            logq = torch.log_softmax(z / plan.tau if plan.tau != 1.0 else z, -1)
            tw = plan.terms(logq, sl)
            parts.append((tw.weights, tw.tokens, logq.gather(1, tw.tokens)))
        K = parts[0][0].shape[1] if parts else 1 + (obj.support == "pair")
        dense = []
        for i, dtype in enumerate((torch.float32, torch.long, torch.float32)):
            out = torch.zeros(B * T, K, dtype=dtype, device=hidden.device)
            if parts:
                out[plan.pos] = torch.cat([p[i] for p in parts]).to(dtype)
            dense.append(out.reshape(B, T, K))
        loss = torch.zeros((), device=hidden.device)
    return RolloutWeights(*dense), plan.output(loss)

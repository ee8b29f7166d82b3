"""A teacher per row: each training row names its teacher among several (`teacher.named`).

Multi-teacher distillation as TRL, verl and NeMo RL route it: a data column (`data.teacher_column`,
default `teacher`) names the teacher of each row, among the run's named teachers (`teacher.named`:
each a model run online, a teacher cache, or inference servers) and the run's own teacher (the
`teacher` section: path, cache or server), called `default`, which teaches the rows that name none.

`RoutedTeacher` is one `TeacherSource` holding the others: `prepare` splits a micro-batch's rows by
teacher into sub-batches (the same rows, padded alike) and lets each teacher's source prepare its
own; `view` asks each for its rows' view and returns one `RoutedView` of the whole batch, which
tells the loss which teacher holds each position. The trainer never sees the names. Rows of
several teachers share a micro-batch; each position is weighed by its own teacher exactly as that
teacher alone would weigh it (`hpd.objectives.tensors.TeacherParts`): an online teacher's rows with
its full distribution, a cache's or a server's with their top-K plus a tail. Nothing is converted
between the kinds, so any mix works with every objective that each teacher serves on its own
(`hpd` reads `log p(y)` and `log p(y_hat)` from whichever teacher holds the row).

    >>> import torch
    >>> from hpd.objectives import get_objective
    >>> from hpd.teachers.routing import RoutedView
    >>> a, b = torch.randn(1, 3, 7), torch.randn(1, 3, 7)       # two teachers' logits, one row each
    >>> owner = torch.tensor([[0, 0, 0], [1, 1, 1]])            # batch row 0 -> teacher 0, row 1 -> 1
    >>> local = torch.tensor([[0, 1, 2], [0, 1, 2]])            # the position in its teacher's view
    >>> labels = torch.tensor([[1, 2, -100], [3, 4, -100]])
    >>> view = RoutedView([a, b], owner, local, [labels[:1], labels[1:]])
    >>> s = torch.randn(2, 3, 7)
    >>> routed = get_objective("fkl")(s, view, labels).loss
    >>> by_hand = get_objective("fkl")(s, torch.cat([a, b]), labels).loss
    >>> bool(torch.isclose(routed, by_hand))
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from hpd.errors import HPDError
from hpd.objectives import TeacherView
from hpd.objectives.surrogate import as_teacher_view
from hpd.objectives.tensors import TeacherParts
from hpd.teachers.sources import TeacherSource

DEFAULT = "default"  # the name of the teacher section's own teacher


@dataclass
class RoutedView(TeacherView):
    """The teachers' views of one micro-batch, each of its own rows.

    views:  each teacher's view of its sub-batch (logits, `HeadTeacher`, `TopKTeacher`, ...).
    owner:  `(B, T)` long: the index in `views` of the teacher holding each position of the batch.
    local:  `(B, T)` long: that position, flat in its teacher's view (`b_r * T_r + t`).
    labels: each view's labels `(B_r, T_r)` (what it is checked against).
    With data.packing, `owner` and `local` are packed like the batch (`Packing.pack_view`).
    """

    views: list
    owner: Tensor
    local: Tensor
    labels: list

    def __post_init__(self):
        self.views = [as_teacher_view(v) for v in self.views]

    @property
    def needs_given_samples(self) -> bool:
        return any(v.needs_given_samples for v in self.views)

    @property
    def vocab_size(self) -> int | None:
        sizes = [v.vocab_size for v in self.views]
        return None if None in sizes else min(sizes)

    def check(self, obj, tau, labels):
        for v, lab in zip(self.views, self.labels):
            v.check(obj, tau, lab)

    def check_vocab(self, V):
        for v in self.views:
            v.check_vocab(V)

    def chunker(self, V, tau):
        chunkers = [v.chunker(V, tau) for v in self.views]
        owner, local = self.owner.reshape(-1), self.local.reshape(-1)

        def chunk(pos: Tensor, labels: Tensor) -> TeacherParts:
            o = owner[pos]
            parts = []
            for r in torch.unique(o).tolist():
                if r < 0:
                    raise HPDError("a labelled position of the batch has no teacher: the routed view was not built "
                                   "from this batch")
                rows = (o == r).nonzero().squeeze(1)
                at = local[pos[rows]]
                parts.append((rows, chunkers[r](at, labels[rows]), at, self.views[r]))
            return TeacherParts(parts)
        return chunk


class RoutedTeacher(TeacherSource):
    """Several teachers, one per row (see the module docstring).

    names:   the teachers' names; sources: their `TeacherSource`s (None: a name no row may use,
             the absent default).
    routes:  per split ("train", "eval"), the index in `names` of every example's teacher.
    make_batch: `(prompts, completions) -> MicroBatch`, the trainer's batch builder (unpacked).
    """

    def __init__(self, names: Sequence[str], sources: Sequence[TeacherSource | None], routes: dict[str, list[int]],
                 make_batch: Callable[[list, list], Any]):
        self.names, self.sources, self.routes, self.make_batch = list(names), list(sources), routes, make_batch
        self.parameters = sum(s.parameters for s in sources if s is not None)
        self.prefetches = any(getattr(s, "prefetches", False) for s in sources if s is not None)
        self._counts = {self.count_key(n): 0.0 for n, s in zip(self.names, self.sources) if s is not None}

    @staticmethod
    def count_key(name: str) -> str:
        """The metric of the training tokens a teacher taught (cumulative over the run)."""
        return f"routed_tokens_{name}"

    def prepare(self, batch, examples, split, indices) -> None:
        route = [self.routes[split][i] for i in indices]
        parts = []
        for r in sorted(set(route)):
            rows = [j for j, x in enumerate(route) if x == r]
            sub = self.make_batch([batch.prompts[j] for j in rows], [batch.completions[j] for j in rows])
            self.sources[r].prepare(sub, [examples[j] for j in rows], split, [indices[j] for j in rows])
            parts.append((r, rows, sub))
        batch.teacher_routes = (split, parts)
        batch.teacher_tokens = sum(sub.teacher_tokens for _, _, sub in parts)

    def view(self, batch) -> RoutedView:
        split, parts = batch.teacher_routes
        padded = batch.row_labels if batch.packing is not None else batch.labels
        B, T = len(batch.prompts), padded.shape[1]
        owner = torch.full((B, T), -1, dtype=torch.long)
        local = torch.zeros((B, T), dtype=torch.long)
        views, labels = [], []
        for k, (r, rows, sub) in enumerate(parts):
            views.append(self.sources[r].view(sub))
            labels.append(sub.labels)
            Tr, at = sub.input_ids.shape[1], torch.tensor(rows)
            owner[at, :Tr] = k
            local[at, :Tr] = torch.arange(len(rows))[:, None] * Tr + torch.arange(Tr)[None, :]
            if split == "train":
                self._counts[self.count_key(self.names[r])] += sub.num_active
        device = batch.labels.device
        view = RoutedView(views, owner.to(device), local.to(device), labels)
        return batch.packing.pack_view(view) if batch.packing is not None else view

    def after_step(self) -> None:
        for s in self.sources:
            if s is not None:
                s.after_step()

    def stats(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for s in self.sources:
            if s is not None:
                out.update(s.stats())
        return out

    def step_counts(self) -> dict[str, float]:
        counts, self._counts = self._counts, dict.fromkeys(self._counts, 0.0)
        return counts

    def state_dict(self) -> dict[str, Any]:
        return {"routed": {n: s.state_dict() for n, s in zip(self.names, self.sources) if s is not None}}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        saved = (state or {}).get("routed", {})
        for n, s in zip(self.names, self.sources):
            if s is not None:
                s.load_state_dict(saved.get(n))


def route_rows(examples: Sequence[Any], names: Sequence[str], has_default: bool, column: str) -> list[int]:
    """The index in `names` of each example's teacher (its `teacher` attribute: the row's
    `column`, None when absent); `HPDError` naming the row for a name that is not a teacher, or a
    row without one when there is no default teacher."""
    index = {n: i for i, n in enumerate(names) if n != DEFAULT or has_default}
    known = ", ".join(index)
    out = []
    for e in examples:
        name = e.teacher
        if name is None:
            if not has_default:
                raise HPDError(f"{e.source}: the row names no teacher (column '{column}') and the run has no default "
                               f"teacher (teacher.path=none): name one of {known} in every row, or set teacher.path")
            name = DEFAULT
        if not isinstance(name, str) or name not in index:
            raise HPDError(f"{e.source}: teacher {name!r} (column '{column}') is not one of the run's teachers "
                           f"({known}): fix the row, or add it to teacher.named")
        out.append(index[name])
    return out


def cache_rows(cache, examples: Sequence[Any], what: str, data: Any, mine: Callable[[Any], bool] | None = None) -> list[int]:
    """The cache row of every example that `mine` keeps (all without it), -1 at the others (never
    read); `HPDError` saying what differs when the cache lacks some (`TeacherCache.rows_of`)."""
    keep = [j for j, e in enumerate(examples) if mine is None or mine(e)]
    found = cache.rows_of([examples[j] for j in keep], what, data) if keep else []
    rows = [-1] * len(examples)
    for j, row in zip(keep, found):
        rows[j] = row
    return rows


class NamedTeachers:
    """The run's named teachers (`teacher.named`), loaded and checked against the student at start.

    Each is checked as a run's only teacher would be (`hpd.vocab`: one tokenizer, heads that differ
    by padding rows at most; a cache's tokenizer fingerprint, temperature and top-K; a server's
    probe text and vocabulary), and an error names the teacher. `vocab_size` is then the one
    vocabulary every teacher and the student share; `router` builds the run's `RoutedTeacher`.
    """

    def __init__(self, cfg, student, tokenizer, objective, device: torch.device, log: Callable[[str], None]):
        from hpd.models.loading import load_model, vocab_rows
        from hpd.models.head import lm_head_of
        from hpd.teachers.served import TeacherServers
        from hpd.teachers.cache import TeacherCache
        from hpd.vocab import resolve_shared_vocab, teacher_vocab_size

        t = cfg.teacher
        self.cfg, self.device, self.objective, self.log = cfg, device, objective, log
        rows = vocab_rows(student)
        student_name = f"the student ({cfg.student.path})"
        self.entries: list[dict[str, Any]] = []  # name, kind, what, the loaded thing, shared vocabulary, exact?
        for name, spec in t.named.items():
            kind, what = spec.source()
            try:
                if kind == "path":
                    model, tok = load_model(what, dtype=t.dtype, trust_remote_code=t.trust_remote_code, role="teacher")
                    lm_head_of(model)
                    shared = teacher_vocab_size(rows, vocab_rows(model), tokenizer, tok, student=student_name,
                                                teacher=f"teacher '{name}' ({what})")
                    # A full replica on every process (never sharded: the processes' batches need not
                    # hold rows of the same teachers, and a sharded forward needs them all). It runs on
                    # its rows padded, never packed, so any attention implementation does.
                    thing, exact = model.requires_grad_(False).eval().to(device), False
                    record: Any = what
                elif kind == "cache":
                    thing = TeacherCache(what)
                    thing.check_run(tokenizer=tokenizer, temperature=objective.temperature, support=objective.support,
                                    objective=objective.name)
                    shared = (resolve_shared_vocab(rows, thing.vocab_size, len(tokenizer))
                              if rows != thing.vocab_size else rows)
                    if shared != thing.vocab_size:
                        raise HPDError(f"the teacher cache is normalized over {thing.vocab_size} tokens but the "
                                       f"student shares {shared} with it: rebuild the cache with --vocab-size {shared}")
                    exact, record = True, str(thing.path)
                else:
                    thing = TeacherServers(what, timeout=t.server_timeout, retries=t.server_retries, log=log)
                    info = thing.check(tokenizer, None, t.server_top_k, student=student_name, guess=rows)
                    shared = info["vocab_size"]
                    if rows != shared and resolve_shared_vocab(rows, shared, len(tokenizer)) != shared:
                        raise HPDError(f"it serves {shared} vocabulary rows, the student has {rows}: a served teacher "
                                       f"is normalized over all its rows")
                    exact, record = True, info
            except HPDError as e:
                raise HPDError(f"teacher '{name}' ({kind} {what}): {e}") from None
            self.entries.append({"name": name, "kind": kind, "what": what, "thing": thing, "shared": shared,
                                 "exact": exact, "record": record})
            log(f"teacher '{name}': {kind} {what}, vocabulary {shared}")

    def vocab_size(self, default: int | None, default_exact: bool) -> int:
        """The vocabulary the loss runs over: every teacher's, `default` (the default teacher's, None
        without one; `default_exact`: normalized over exactly it, a cache or a server) included."""
        sides = [(e["name"], e["shared"], e["exact"]) for e in self.entries]
        if default is not None:
            sides.append((DEFAULT, default, default_exact))
        V = min(s for _, s, _ in sides)
        for name, shared, exact in sides:
            if exact and shared != V:
                other = next(n for n, s, _ in sides if s == V)
                raise HPDError(f"teacher '{name}' is normalized over {shared} tokens, teacher '{other}' shares only {V} "
                               "with the student: every teacher of a run must share one vocabulary with the student")
        return V

    def describe(self) -> dict[str, Any]:
        """What the run records of its named teachers (metrics.jsonl's info record)."""
        return {e["name"]: {e["kind"]: e["record"]} for e in self.entries}

    def router(self, default: TeacherSource | None, data: dict[str, Sequence[Any]], make_batch: Callable,
               vocab_size: int, pad_id: int) -> RoutedTeacher:
        """The run's `RoutedTeacher`: `default` (the teacher section's source, or None) and the named
        teachers, each row of `data` (per split) routed by its teacher column."""
        from hpd.teachers.sources import CachedTeacher, ModelTeacher, ServedTeacher

        cfg, names = self.cfg, [DEFAULT] + [e["name"] for e in self.entries]
        routes = {split: route_rows(examples, names, default is not None, cfg.data.teacher_column)
                  for split, examples in data.items()}
        self.rows = {n: routes["train"].count(i) for i, n in enumerate(names) if i or default is not None}
        self.log("training rows per teacher: " + ", ".join(f"{n} {k}" for n, k in self.rows.items())
                 + "".join(f"; warning: teacher '{n}' teaches no training row" for n, k in self.rows.items() if not k))
        sources: list[TeacherSource | None] = [default]
        for i, e in enumerate(self.entries, start=1):
            if e["kind"] == "path":
                sources.append(ModelTeacher(e["thing"]))
            elif e["kind"] == "cache":
                rows = {split: cache_rows(e["thing"], examples, f"{split} (teacher '{e['name']}')", cfg.data,
                                          lambda x, name=e["name"]: x.teacher == name)
                        for split, examples in data.items()}
                sources.append(CachedTeacher(e["thing"], rows, self.device))
            else:
                t = cfg.teacher
                sources.append(ServedTeacher(e["thing"], t.server_top_k, vocab_size, self.device,
                                             temperature=self.objective.temperature,
                                             exact_samples=t.server_exact_samples))
        return RoutedTeacher(names, sources, routes, make_batch)


__all__ = ["DEFAULT", "NamedTeachers", "cache_rows", "RoutedTeacher", "RoutedView", "route_rows"]

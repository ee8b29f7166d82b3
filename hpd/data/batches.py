"""The micro-batch a training step works on: response tokens after their prompts, on the device.

A `ResponseSource` (`hpd.responses`) decides which completions a step trains on; `make_batch`
turns (prompt, completion) pairs into a `MicroBatch`; the run's `TeacherSource` (`hpd.teachers`)
then adds what its view needs (the privileged sequences of OPSD, the cache rows of a teacher
cache) in `prepare`.

    >>> import torch
    >>> from hpd.data.batches import make_batch
    >>> b = make_batch([[5, 6]], [[7, 8, 9]], pad_id=0, vocab_size=None, device=torch.device("cpu"))
    >>> b.labels.tolist(), b.num_active
    ([[-100, 7, 8, 9, -100]], 3)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from hpd.data.collate import build_batch
from hpd.objectives import IGNORE_INDEX
from hpd.data.packing import Packing


@dataclass
class MicroBatch:
    """A micro-batch `(B, T)`; a teacher source may add the teacher's own sequences `(B, T')` and
    the teacher position aligned with each student position `(B, T)` (OPSD), or cache rows."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    # Read on the host (counts, cache rows) from these, never from the device tensors: no sync.
    cpu_labels: torch.Tensor
    num_active: int  # positions with a label
    prompts: list[list[int]]  # the token lists it was built from
    completions: list[list[int]]
    teacher_tokens: int = 0  # tokens through the teacher's forward (set by the teacher source)
    teacher_ids: torch.Tensor | None = None  # OPSD: the privileged teacher's sequences
    teacher_mask: torch.Tensor | None = None
    teacher_index: torch.Tensor | None = None
    cache_rows: list[int] | None = None  # the teacher-cache rows of its sequences (with teacher.cache)
    # Packed (data.packing, `hpd.data.packing`): the tensors above are `(R, W)`, the rows end to end;
    # position_ids restart per row, packing says where each row sits, row_labels are the labels `(B, T)`
    # of the padded rows (what a teacher cache is read with).
    position_ids: torch.Tensor | None = None
    packing: Packing | None = None
    row_labels: torch.Tensor | None = None
    teacher_positions: torch.Tensor | None = None  # OPSD, packed: the teacher sequences' position_ids
    teacher_request: Any = None  # the served teacher's answer on its way (a Future, with teacher.server)
    teacher_routes: Any = None  # a teacher per row (teacher.named): the split and each teacher's sub-batch


def make_batch(prompts: list[list[int]], completions: list[list[int]], *, pad_id: int, vocab_size: int | None,
               device: torch.device, pack: bool = False, pack_length: int = 0) -> MicroBatch:
    """Prompts + completions as a `MicroBatch` on `device`; labels past `vocab_size` are ignored.

    pack: the rows end to end in packed rows of `pack_length` tokens at most (0: the longest row's
    length), positions restarted per row (`hpd.data.packing.Packing`)."""
    b = build_batch(prompts, completions, pad_id=pad_id)
    labels = b["labels"]
    if vocab_size is not None:
        labels = labels.masked_fill(labels >= vocab_size, IGNORE_INDEX)
    num_active = int((labels != IGNORE_INDEX).sum())
    if not pack:
        return MicroBatch(b["input_ids"].to(device), b["attention_mask"].to(device), labels.to(device),
                          cpu_labels=labels, num_active=num_active, prompts=prompts, completions=completions)
    p = Packing([len(q) + len(c) for q, c in zip(prompts, completions)], width=pack_length)
    packed = p.pack(labels, fill=IGNORE_INDEX)
    return MicroBatch(p.pack(b["input_ids"], fill=pad_id).to(device), p.pack(b["attention_mask"]).to(device),
                      packed.to(device),
                      cpu_labels=packed, num_active=num_active, prompts=prompts, completions=completions,
                      position_ids=p.position_ids(device), packing=p, row_labels=labels)


__all__ = ["MicroBatch", "make_batch"]

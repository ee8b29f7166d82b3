"""Token ids -> tensors: a right-padded training batch with labels already shifted
(`model(input_ids).logits[:, t]` predicts `labels[:, t]`), and left-padded prompts for generation.

    >>> batch = build_batch([[1, 2], [3]], [[4, 5], [6]], pad_id=0)
    >>> batch["labels"].tolist()
    [[-100, 4, 5, -100], [6, -100, -100, -100]]
    >>> batch_for_generation([[1, 2], [3]], pad_id=0)[0].tolist()
    [[1, 2], [0, 3]]
"""

from __future__ import annotations

from __future__ import annotations

from collections.abc import Sequence

import torch

from hpd.objectives.base import IGNORE_INDEX  # the label of a position without a target



def build_batch(
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    *,
    pad_id: int,
) -> dict[str, torch.Tensor]:
    """Right-padded batch of prompt + completion with labels already shifted.

    Returns (T = the longest prompt + completion):
      input_ids      (B, T) long: prompt, completion, then pad_id
      attention_mask (B, T) long: 1 on prompt and completion tokens
      labels         (B, T) long: labels[b, t] = input_ids[b, t + 1] when that token is a
                     completion token, else -100 (prompt, padding, the last position). So
                     `model(input_ids).logits[:, t]` aligns with `labels[:, t]` without a shift.
      response_mask  (B, T) bool: labels != -100
      prompt_lengths (B,)   long
    """
    if len(prompt_ids) != len(completion_ids):
        raise ValueError(
            f"build_batch got {len(prompt_ids)} prompts but {len(completion_ids)} completions"
        )
    if not prompt_ids:
        raise ValueError("build_batch needs at least one sequence")
    lengths = [len(p) + len(c) for p, c in zip(prompt_ids, completion_ids)]
    B, T = len(lengths), max(lengths)
    if T == 0:
        raise ValueError("build_batch got only empty sequences")
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    for b, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        n_p, n = len(p), len(p) + len(c)
        if n == 0:
            continue
        input_ids[b, :n] = torch.tensor(list(p) + list(c), dtype=torch.long)
        attention_mask[b, :n] = 1
        # Completion token j sits at position n_p + j and is predicted at position n_p + j - 1.
        # With an empty prompt the first completion token has no predicting position.
        start = max(n_p - 1, 0)
        labels[b, start : n - 1] = input_ids[b, start + 1 : n]
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "response_mask": labels != IGNORE_INDEX,
        "prompt_lengths": torch.tensor([len(p) for p in prompt_ids], dtype=torch.long),
    }


def batch_for_generation(
    prompt_ids: Sequence[Sequence[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts for `generate`: (input_ids (B, T), attention_mask (B, T) long).

    Left padding puts every prompt's last token in the last column, where generation continues.
    """
    if not prompt_ids:
        raise ValueError("batch_for_generation needs at least one prompt")
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("batch_for_generation got an empty prompt; generation needs a context")
    B, T = len(prompt_ids), max(len(p) for p in prompt_ids)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    for b, p in enumerate(prompt_ids):
        input_ids[b, T - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        attention_mask[b, T - len(p) :] = 1
    return input_ids, attention_mask

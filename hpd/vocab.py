"""The vocabulary a student and a teacher share: one rule for the models, the cache and the loss.

Logit distillation compares two distributions over one vocabulary. LM heads are often padded
past the tokenizer's length (to a multiple of 64 or 128), so two models of one tokenizer may
have heads of different widths; they share the rows up to the smaller one. Anything else is
another tokenizer, which is an error.

    >>> from hpd.vocab import resolve_shared_vocab
    >>> resolve_shared_vocab(151936, 152064, tokenizer_size=151665)
    151936
"""

from __future__ import annotations

from hpd.errors import HPDError


def resolve_shared_vocab(student_size: int, teacher_size: int, tokenizer_size: int | None = None) -> int:
    """The vocabulary both models share.

    Equal sizes are shared as they are. Sizes that differ only by trailing padding rows (both at
    least the tokenizer's length) share the smaller one. Anything else is a tokenizer mismatch.
    """
    if student_size == teacher_size:
        return student_size
    if tokenizer_size is not None and tokenizer_size <= min(student_size, teacher_size):
        return min(student_size, teacher_size)
    known = "" if tokenizer_size is None else f", tokenizer {tokenizer_size}"
    raise HPDError(
        f"teacher and student vocabularies differ: student {student_size} rows, teacher {teacher_size} rows{known}. "
        "Logit-level distillation needs one tokenizer; sizes may differ only by padding rows past the tokenizer's length"
    )


__all__ = ["resolve_shared_vocab"]

"""The vocabulary a student and a teacher share: one rule for the models, the cache and the loss.

Logit distillation compares two distributions over one vocabulary. LM heads are often padded
past the tokenizer's length (to a multiple of 64 or 128), so two models of one tokenizer may
have heads of different widths; they share the rows up to the smaller one. Anything else is
another tokenizer, which is an error. `teacher_vocab_size` is the check every entry of a teacher
model makes (`hpd train`'s teacher path, the Trainer integrations' teacher path or object):
the tokenizers, where known, must be one, and only then may the heads differ by padding rows.

    >>> from hpd.vocab import resolve_shared_vocab, teacher_vocab_size
    >>> resolve_shared_vocab(151936, 152064, tokenizer_size=151665)
    151936
    >>> teacher_vocab_size(264, 264)  # equal heads: shared, whether or not the tokenizers are known
    264
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


def teacher_vocab_size(student_rows: int, teacher_rows: int, student_tokenizer=None, teacher_tokenizer=None, *,
                       student: str = "the student", teacher: str = "the teacher",
                       cross_tokenizer: bool = False) -> int | None:
    """The vocabulary a student and a teacher model share, after checking that they share a tokenizer.

    student_rows, teacher_rows: their LM heads' rows. The tokenizers (either may be None: unknown)
    must have one vocabulary when both are known; the heads may then differ by padding rows past
    its length. When either is unknown, the heads must be equal: extra rows could be another
    tokenizer's tokens as well as padding. `student`, `teacher` name the models in messages.
    cross_tokenizer: the hook of a mode that aligns two tokenizations instead of sharing one
    vocabulary; it skips these checks and returns None (no shared vocabulary).
    """
    if cross_tokenizer:
        return None
    if student_tokenizer is not None and teacher_tokenizer is not None:
        if student_tokenizer is not teacher_tokenizer and student_tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
            raise HPDError(f"the tokenizer of {student} ({len(student_tokenizer)} tokens) differs from that of {teacher} "
                           f"({len(teacher_tokenizer)} tokens): logit distillation needs one tokenizer (hpd train: "
                           "teacher.cross_tokenizer=true distills across tokenizers with hpd, orkl, sft or uld)")
        return resolve_shared_vocab(student_rows, teacher_rows, len(student_tokenizer))
    if student_rows != teacher_rows:
        unknown = "the teacher's" if teacher_tokenizer is None else "the student's"
        raise HPDError(f"the LM head of {teacher} has {teacher_rows} rows, that of {student} {student_rows}, and {unknown} tokenizer "
                       "is not known, so hpd cannot tell padding rows from another tokenizer: logit distillation needs "
                       "one tokenizer; pass both tokenizers (e.g. teacher_tokenizer=..., and the trainer's "
                       "processing_class) if the extra rows are padding")
    return student_rows


__all__ = ["resolve_shared_vocab", "teacher_vocab_size"]

"""Examples -> token ids: each prompt and completion tokenized (through the chat template or as
plain text), the completion ended with eos, rows over `data.max_length` truncated from the prompt's
left (or skipped), OPSD's privileged prompts for the teacher.

    >>> from hpd.data.rows import Example
    >>> from hpd.models.tokenizer import byte_tokenizer
    >>> enc = encode_example(Example(prompt="2+2=", completion="4", source="doc"), byte_tokenizer(), max_length=64)
    >>> enc.completion_ids[-1] == byte_tokenizer().eos_token_id, enc.truncated
    (True, False)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hpd.errors import HPDError
from hpd.data.rows import CHAT_TEMPLATE_MODES, Example, LoadStats, load_examples


@dataclass
class EncodedExample:
    """Token ids of one example: the prompt, then the completion (its text tokens + eos).

    `teacher_prompt_ids`: self-distillation only, the teacher's prompt (the privileged context
    before the same instruction); the teacher scores the same completion after it.
    """

    prompt_ids: list[int]
    completion_ids: list[int]
    truncated: bool
    source: str
    teacher_prompt_ids: list[int] | None = None
    # The value of the row's data.teacher_column as read (None when absent): the name of its teacher
    # with teacher.named (`hpd.teachers.routing` checks it).
    teacher: Any = None


def _input_ids(encoded: Any) -> list[int]:
    """Token ids from what a tokenizer call returned (BatchEncoding, dict or list)."""
    ids = encoded["input_ids"] if not isinstance(encoded, list) else encoded
    return [int(t) for t in ids]


def _adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts its bos token in front when asked for special tokens."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = _input_ids(tokenizer("a", add_special_tokens=True))
    return bool(ids) and ids[0] == bos


def _use_template(tokenizer: Any, chat_template: str) -> bool:
    if chat_template not in CHAT_TEMPLATE_MODES:
        raise HPDError(f"chat_template must be one of {CHAT_TEMPLATE_MODES}, got {chat_template!r}")
    has = bool(getattr(tokenizer, "chat_template", None))
    if chat_template == "on" and not has:
        raise HPDError(
            "chat_template='on' but the tokenizer has no chat template: use a tokenizer that has "
            "one (an instruct model's), or set chat_template to 'auto' or 'none'"
        )
    return has and chat_template != "none"


def _plain_text(prompt: str | list[dict]) -> str:
    """Messages rendered without a chat template: 'role: content' lines, then 'assistant: '."""
    if isinstance(prompt, str):
        return prompt
    lines = [f"{m['role']}: {m['content']}" for m in prompt]
    return "\n".join(lines) + "\nassistant: "


def _encode_prompt(prompt: str | list[dict], tokenizer: Any, use_template: bool, adds_bos: bool):
    if use_template:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        # Render to text, then encode without special tokens: the template already writes the
        # ones it wants (bos included), and the text return type is stable across transformers
        # versions where the tokenized one is a list in 4.x and a BatchEncoding in 5.x.
        try:
            text = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        except Exception as e:  # jinja's raise_exception, unknown roles, template bugs
            raise HPDError(
                f"the tokenizer's chat template failed on these messages: {e}; fix the messages, "
                "or set chat_template='none' to encode plain text"
            ) from None
        return _input_ids(tokenizer(text, add_special_tokens=False))
    ids = _input_ids(tokenizer(_plain_text(prompt), add_special_tokens=False))
    # Added by hand rather than with add_special_tokens=True, which for some tokenizers would
    # also append eos to the prompt.
    return [tokenizer.bos_token_id] + ids if adds_bos else ids


def encode_prompt(
    prompt: str | list[dict], tokenizer: Any, *, chat_template: str = "auto"
) -> list[int]:
    """Token ids of a prompt, ready for the completion (or for generation) to follow.

    With a chat template (`chat_template` "auto" and the tokenizer has one, or "on"): a text
    prompt becomes one user message, and the messages are templated with the generation prompt
    (the assistant header) appended. Without one ("none", or "auto" and none defined): the text
    (messages as 'role: content' lines) is encoded, after bos when the tokenizer normally adds it.
    """
    use = _use_template(tokenizer, chat_template)
    return _encode_prompt(prompt, tokenizer, use, adds_bos=not use and _adds_bos(tokenizer))


def _encode_completion(completion: str, tokenizer: Any) -> list[int]:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise HPDError(
            "the tokenizer has no eos token, so completions cannot be terminated: set "
            "tokenizer.eos_token (e.g. to the model's end-of-turn token)"
        )
    return _input_ids(tokenizer(completion, add_special_tokens=False)) + [eos]


def _fit(prompt_ids: list[int], completion_ids: list[int], max_length: int):
    """Cut (prompt, completion) to max_length tokens; return them and whether anything was cut.

    The completion loses its end first. When the prompt is too long to leave room, it loses its
    beginning (the most recent context matters most) so that min(len(completion), max_length//4)
    completion tokens still fit, and at least one prompt token stays so that the first completion
    token has a position predicting it.
    """
    p, c = len(prompt_ids), len(completion_ids)
    if p + c <= max_length:
        return prompt_ids, completion_ids, False
    min_c = max(1, min(c, max_length // 4, max_length - 1))
    if p <= max_length - min_c:
        return prompt_ids, completion_ids[: max_length - p], True
    keep_p = max_length - min_c
    return prompt_ids[p - keep_p :], completion_ids[:min_c], True


def _check_max_length(max_length: int) -> None:
    if not isinstance(max_length, int) or max_length < 2:
        raise HPDError(
            f"max_length must be an integer >= 2 (a prompt token and a completion token), got "
            f"{max_length!r}"
        )


def encode_example(
    ex: Example, tokenizer: Any, *, max_length: int, chat_template: str = "auto"
) -> EncodedExample | None:
    """Tokenize one example to at most `max_length` tokens; None when it has no completion.

    Completion ids are the completion's text tokens followed by eos. Too long: see `_fit`
    (completion cut at its end, then prompt cut at its start); the completion is never empty.
    """
    _check_max_length(max_length)
    use = _use_template(tokenizer, chat_template)
    adds_bos = not use and _adds_bos(tokenizer)
    return _encode_example(ex, tokenizer, max_length, use, adds_bos)


def _encode_example(
    ex: Example, tokenizer: Any, max_length: int, use_template: bool, adds_bos: bool
) -> EncodedExample | None:
    if not ex.completion:
        return None
    prompt_ids = _encode_prompt(ex.prompt, tokenizer, use_template, adds_bos)
    completion_ids = _encode_completion(ex.completion, tokenizer)
    prompt_ids, completion_ids, truncated = _fit(prompt_ids, completion_ids, max_length)
    return EncodedExample(prompt_ids, completion_ids, truncated, ex.source)


def encode_dataset(
    examples: Sequence[Example],
    tokenizer: Any,
    *,
    max_length: int,
    chat_template: str = "auto",
    stats: LoadStats | None = None,
) -> list[EncodedExample]:
    """Encode every example (see `encode_example`); truncations are counted in `stats.truncated`.

    Examples without a completion (prompt-only rows) are dropped and counted as skipped; if none
    is left, `HPDError`.
    """
    _check_max_length(max_length)
    use = _use_template(tokenizer, chat_template)
    adds_bos = not use and _adds_bos(tokenizer)
    out: list[EncodedExample] = []
    for ex in examples:
        enc = _encode_example(ex, tokenizer, max_length, use, adds_bos)
        if enc is None:
            if stats is not None:
                stats.note_skip(f"{ex.source}: no completion to train on")
            continue
        if enc.truncated and stats is not None:
            stats.truncated += 1
        out.append(enc)
    if examples and not out:
        raise HPDError(
            "no example has a completion to train on: the data holds prompts only; add "
            "completions (or messages ending with an assistant turn), or use a regime that "
            "generates responses"
        )
    return out


def encode_file(path: str, tokenizer: Any, settings: Any,
                teacher_tokenizer: Any = None) -> tuple[list[EncodedExample], LoadStats]:
    """A data file loaded and tokenized exactly as training does (the one place for that).

    settings: the `data` config section (`hpd.config.DataConfig`): its row fields, `on_bad_row`,
    `max_length` and `chat_template` are used. Training and the teacher cache both call this, so
    the cache holds the very sequences a run trains on.

    With `teacher_tokenizer` (another tokenizer than the student's: cross-tokenizer distillation),
    each example also gets `teacher_prompt_ids`: its prompt rendered and encoded as the teacher's
    own (its chat template), cut to `max_length` at its start.
    """
    examples, stats = load_examples(path, prompt_field=settings.prompt_field, completion_field=settings.completion_field,
                                    messages_field=settings.messages_field, on_bad_row=settings.on_bad_row)
    encoded = encode_dataset(examples, tokenizer, max_length=settings.max_length, chat_template=settings.chat_template,
                             stats=stats)
    kept = [ex for ex in examples if ex.completion]  # encode_dataset drops exactly the others
    column = getattr(settings, "teacher_column", None)
    if column is not None:
        for enc, ex in zip(encoded, kept, strict=True):
            enc.teacher = ex.extra.get(column)
    if teacher_tokenizer is not None:
        add_teacher_prompts(encoded, kept, teacher_tokenizer, settings)
    return encoded, stats


def add_teacher_prompts(encoded: Sequence[EncodedExample], examples: Sequence[Example], teacher_tokenizer: Any,
                        settings: Any) -> None:
    """Give each encoded example `teacher_prompt_ids`: its example's prompt rendered and encoded as
    the teacher's own (its chat template, per `settings.chat_template`), cut to `settings.max_length`
    at its start (cross-tokenizer distillation; `encode_file` and the streamed data both use it)."""
    use = _use_template(teacher_tokenizer, settings.chat_template)
    adds_bos = not use and _adds_bos(teacher_tokenizer)
    for enc, ex in zip(encoded, examples, strict=True):
        enc.teacher_prompt_ids = _encode_prompt(ex.prompt, teacher_tokenizer, use, adds_bos)[-settings.max_length:]


def privileged_prompt(prompt: str | list[dict], privileged: str, template: str) -> str | list[dict]:
    """The teacher's prompt of self-distillation: `template` with `{privileged}` and `{prompt}` filled.

    For chat messages the last user message is the one rewritten (the earlier turns stay). Plain
    replacement, not `str.format`, so braces in the texts or the template are left alone.

        >>> privileged_prompt("Add 2 and 3.", "2+3=5", "Reference: {privileged}\\n{prompt}")
        'Reference: 2+3=5\\nAdd 2 and 3.'
    """

    def fill(text: str) -> str:
        # One pass over the template, so a {prompt} inside the privileged text is not expanded.
        head, _, tail = template.partition("{privileged}")
        return head.replace("{prompt}", text) + privileged + tail.replace("{prompt}", text)

    if isinstance(prompt, str):
        return fill(prompt)
    users = [i for i, m in enumerate(prompt) if m["role"] == "user"]
    if not users:
        raise HPDError("self-distillation needs a user message in the prompt to put the privileged text in")
    out = [dict(m) for m in prompt]
    out[users[-1]]["content"] = fill(out[users[-1]]["content"])
    return out


def encode_self_distillation(
    examples: Sequence[Example],
    tokenizer: Any,
    *,
    privileged_field: str,
    teacher_template: str,
    completion_field: str = "completion",
    max_length: int,
    chat_template: str = "auto",
    on_bad_row: str = "error",
    stats: LoadStats | None = None,
) -> list[EncodedExample]:
    """Encode (question, privileged text) rows for on-policy self-distillation.

    The student's prompt is the question alone (as `encode_example` builds it); the teacher's is
    `privileged_prompt(question, privileged, teacher_template)`, templated the same way. The
    completion is the privileged text (+ eos): the response of the `reference` mode and of
    evaluation. The student sequence is cut to `max_length` as usual; the teacher's prompt, to
    `max_length` tokens at its start (its end holds the question and the generation prompt).
    A row without the privileged field raises `HPDError` (or is skipped with `on_bad_row="skip"`).
    """
    _check_max_length(max_length)
    use = _use_template(tokenizer, chat_template)
    adds_bos = not use and _adds_bos(tokenizer)
    out: list[EncodedExample] = []
    for ex in examples:
        text = ex.completion if privileged_field == completion_field else ex.extra.get(privileged_field)
        if not isinstance(text, str) or not text.strip():
            problem = (f"{ex.source}: field '{privileged_field}' (the privileged text of self-distillation, "
                       f"opsd.privileged_field) is {'missing' if text is None else 'not a non-empty string'}")
            if on_bad_row == "skip":
                if stats is not None:
                    stats.note_skip(problem)
                continue
            raise HPDError(problem + ". Fix the row, point opsd.privileged_field at the right key, or set "
                           "data.on_bad_row=skip")
        enc = _encode_example(Example(ex.prompt, text, ex.source, ex.extra), tokenizer, max_length, use, adds_bos)
        teacher_prompt = privileged_prompt(ex.prompt, text, teacher_template)
        teacher_ids = _encode_prompt(teacher_prompt, tokenizer, use, adds_bos)
        if len(teacher_ids) > max_length:
            teacher_ids, enc.truncated = teacher_ids[len(teacher_ids) - max_length:], True
        enc.teacher_prompt_ids = teacher_ids
        if enc.truncated and stats is not None:
            stats.truncated += 1
        out.append(enc)
    if examples and not out:
        raise HPDError(f"no row has the privileged field '{privileged_field}' (opsd.privileged_field)")
    return out

"""Training data: load rows, tokenize them with label masks, collate batches, order them.

Rows come from JSONL, JSON, parquet or a `datasets.save_to_disk` directory and hold either
`prompt` + `completion` or chat `messages` (the last assistant turn is the completion). Bad rows
raise `HPDError` naming the file and line (or skip with `on_bad_row="skip"`). Batches carry labels
that are already shifted: `model(input_ids).logits[:, t]` predicts `labels[:, t]`, so objectives
never shift again. `EpochSampler` gives a seeded, resumable order of examples that splits the
same way across any number of data-parallel ranks.

    >>> import json, tempfile, os
    >>> from hpd.data.rows import load_examples, encode_dataset, build_batch
    >>> from hpd.models.tokenizer import byte_tokenizer
    >>> d = tempfile.mkdtemp(); path = os.path.join(d, "train.jsonl")
    >>> with open(path, "w") as f:
    ...     _ = f.write(json.dumps({"prompt": "2+2=", "completion": "4"}) + "\\n")
    ...     _ = f.write(json.dumps({"messages": [{"role": "user", "content": "hi"},
    ...                                          {"role": "assistant", "content": "hello"}]}))
    >>> examples, stats = load_examples(path)
    >>> stats.rows, examples[1].completion
    (2, 'hello')
    >>> tok = byte_tokenizer()
    >>> enc = encode_dataset(examples, tok, max_length=64)
    >>> batch = build_batch([e.prompt_ids for e in enc], [e.completion_ids for e in enc],
    ...                     pad_id=tok.pad_token_id)
    >>> batch["input_ids"].shape == batch["labels"].shape
    True
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from hpd.errors import HPDError
from hpd.objectives.base import IGNORE_INDEX  # the label of a position without a target

# How many skip reasons `LoadStats` keeps: enough to see the pattern, not a copy of the file.
MAX_SKIP_REASONS = 5
CHAT_TEMPLATE_MODES = ("auto", "on", "none")


# --------------------------------------------------------------------------------------------
# Rows -> examples
# --------------------------------------------------------------------------------------------


@dataclass
class Example:
    """One training (or generation) example before tokenization.

    `prompt` is plain text, or the chat messages (`[{"role", "content"}, ...]`) before the
    completion. `completion` is the target text ("" for prompt-only rows loaded with
    `require_completion=False`). `source` locates the row (`"train.jsonl:17"` for a 1-based line,
    `"train.parquet[3]"` for a 0-based row index). `extra` holds the row's other fields, e.g. a
    `reference` answer used for self-distillation.
    """

    prompt: str | list[dict]
    completion: str
    source: str
    extra: dict = field(default_factory=dict)


@dataclass
class LoadStats:
    """What loading (and later encoding) did: usable rows, skipped rows and why, truncations."""

    rows: int = 0
    skipped: int = 0
    skip_reasons: list[str] = field(default_factory=list)
    truncated: int = 0

    def note_skip(self, reason: str) -> None:
        self.skipped += 1
        if len(self.skip_reasons) < MAX_SKIP_REASONS:
            self.skip_reasons.append(reason)


class _RowError(Exception):
    """A row-level problem; the loader adds the file and line before it reaches the user."""


def _lone_surrogate(value: Any, where: str = "") -> str | None:
    """The place ('messages[1].content') of the first string holding a lone surrogate, else None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return repr(where or "value")
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _lone_surrogate(item, f"{where}[{key}]" if isinstance(key, int) else f"{where}.{key}" if where else str(key))
        if found is not None:
            return found
    return None


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _parse_messages(value: Any, name: str) -> list[dict]:
    """Validate a list of chat messages; return copies without None-valued keys.

    Parquet and `datasets` store messages as structs whose unused keys come back as None (e.g.
    `tool_calls: None`); some chat templates render those as the text "None", so they are dropped.
    """
    if not isinstance(value, list):
        raise _RowError(
            f"field '{name}' must be a list of {{role, content}} objects, got {_type_name(value)}"
        )
    if not value:
        raise _RowError(f"field '{name}' is an empty list")
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise _RowError(
                f"{name}[{i}] must be an object with 'role' and 'content', got {_type_name(msg)}"
            )
        role, content = msg.get("role"), msg.get("content")
        if not isinstance(role, str) or not role:
            raise _RowError(f"{name}[{i}] needs a non-empty string 'role', got {role!r}")
        if not isinstance(content, str):
            raise _RowError(
                f"{name}[{i}] ({role}) 'content' must be a string, got {_type_name(content)} "
                "(only text content is supported)"
            )
        out.append({k: v for k, v in msg.items() if v is not None})
    return out


def _parse_row(
    row: Any,
    *,
    prompt_field: str,
    completion_field: str,
    messages_field: str,
    require_completion: bool,
) -> tuple[str | list[dict], str, dict]:
    """Turn one raw row into (prompt, completion, extra), or raise `_RowError` saying why."""
    if not isinstance(row, dict):
        raise _RowError(f"expected a JSON object, got {_type_name(row)}")
    bad = _lone_surrogate(row)
    if bad is not None:
        # JSON may spell one half of a UTF-16 pair ("\\ud800") alone: no character, so no tokenizer
        # or UTF-8 file can take it.
        raise _RowError(f"field {bad} holds a lone surrogate (a \\ud800-\\udfff escape without its pair), "
                        "which is not a Unicode character")

    # A row may carry both (ultrachat has a `prompt` column next to `messages`): messages win and
    # the other fields go to `extra`. None counts as absent because columnar formats fill missing
    # fields with None.
    if row.get(messages_field) is not None:
        messages = _parse_messages(row[messages_field], messages_field)
        last = messages[-1]
        if last["role"] == "assistant":
            prompt: str | list[dict] = messages[:-1]
            completion = last["content"]
            if not completion.strip():
                raise _RowError(
                    f"the final assistant message of '{messages_field}' is empty (it is the "
                    "completion to train on)"
                )
        elif require_completion:
            raise _RowError(
                f"the last message of '{messages_field}' must be an assistant turn (the "
                f"completion), got role '{last['role']}'"
            )
        else:
            prompt, completion = messages, ""
        if not prompt:
            raise _RowError(
                f"'{messages_field}' has no message before the final assistant turn (the prompt "
                "is empty)"
            )
        extra = {k: v for k, v in row.items() if k != messages_field}
        return prompt, completion, extra

    expected = f"(expected '{prompt_field}' and '{completion_field}', or '{messages_field}')"
    raw_prompt = row.get(prompt_field)
    if raw_prompt is None:
        raise _RowError(f"field '{prompt_field}' is missing {expected}")
    if isinstance(raw_prompt, list):
        prompt = _parse_messages(raw_prompt, prompt_field)
    elif isinstance(raw_prompt, str):
        if not raw_prompt.strip():
            raise _RowError(f"field '{prompt_field}' is empty")
        prompt = raw_prompt
    else:
        raise _RowError(
            f"field '{prompt_field}' must be a string or a list of messages, got "
            f"{_type_name(raw_prompt)}"
        )

    raw_completion = row.get(completion_field)
    if raw_completion is None:
        if require_completion:
            raise _RowError(f"field '{completion_field}' is missing {expected}")
        completion = ""
    elif isinstance(raw_completion, str):
        completion = raw_completion
        if require_completion and not completion.strip():
            raise _RowError(f"field '{completion_field}' is empty")
    elif isinstance(raw_completion, list):
        # TRL's conversational prompt-completion format: completion = [one assistant message].
        msgs = _parse_messages(raw_completion, completion_field)
        if len(msgs) != 1 or msgs[0]["role"] != "assistant":
            raise _RowError(
                f"field '{completion_field}' as a list must hold exactly one assistant message, "
                f"got roles {[m['role'] for m in msgs]}"
            )
        completion = msgs[0]["content"]
        if require_completion and not completion.strip():
            raise _RowError(f"field '{completion_field}' is empty")
    else:
        raise _RowError(
            f"field '{completion_field}' must be a string, got {_type_name(raw_completion)}"
        )
    extra = {k: v for k, v in row.items() if k not in (prompt_field, completion_field)}
    return prompt, completion, extra


# Each reader yields (location for messages, source tag, row or _RowError).
_Located = tuple[str, str, Any]


def _json_row_problem(text: str, e: json.JSONDecodeError) -> str:
    """What is wrong with a JSONL row: cut at its end (the parser ran out of text), or invalid."""
    if e.pos >= len(text.rstrip()) or e.msg.startswith("Unterminated string"):
        return ("invalid JSON: the row is truncated (unterminated JSON: it ends before its closing "
                "quote, bracket or brace; was the file cut?)")
    return f"invalid JSON ({e.msg} at column {e.colno})"


def _iter_jsonl(path: str) -> Iterator[_Located]:
    # Read bytes and decode line by line so that bad UTF-8 is reported (and skippable) per line.
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            loc, src = f"{path} line {lineno}", f"{path}:{lineno}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield loc, src, _RowError(f"not valid UTF-8 ({e.reason} at byte {e.start})")
                continue
            if lineno == 1:
                text = text.lstrip("\ufeff")
            if not text.strip():
                continue
            try:
                yield loc, src, json.loads(text)
            except json.JSONDecodeError as e:
                yield loc, src, _RowError(_json_row_problem(text, e))


_JSON_WS = " \t\n\r"


def _iter_json_array(path: str, text: str, start: int) -> Iterator[_Located]:
    """Yield the elements of a top-level JSON array with the line each one starts on.

    `json.load` would lose the positions, and a message saying "element 812" is much less useful
    than the line an editor can jump to.
    """
    decoder = json.JSONDecoder()
    n = len(text)
    line, line_pos = 1, 0  # line number of offset `line_pos`, advanced incrementally

    def skip_ws(i: int) -> int:
        while i < n and text[i] in _JSON_WS:
            i += 1
        return i

    def line_of(i: int) -> int:
        nonlocal line, line_pos
        line += text.count("\n", line_pos, i)
        line_pos = i
        return line

    def syntax_error(msg: str, i: int) -> HPDError:
        ln = line_of(i)
        return HPDError(f"{path} line {ln}: {msg}; the file is not valid JSON, fix it first")

    i = skip_ws(start + 1)  # past '['
    if i < n and text[i] == "]":
        i = skip_ws(i + 1)
        if i != n:
            raise syntax_error("unexpected content after the closing ']'", i)
        return
    while True:
        try:
            obj, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise HPDError(
                f"{path} line {e.lineno}: invalid JSON ({e.msg} at column {e.colno}); the file is "
                "not valid JSON, fix it first"
            ) from None
        ln = line_of(i)
        yield f"{path} line {ln}", f"{path}:{ln}", obj
        i = skip_ws(end)
        if i < n and text[i] == ",":
            i = skip_ws(i + 1)
        elif i < n and text[i] == "]":
            i = skip_ws(i + 1)
            if i != n:
                raise syntax_error("unexpected content after the closing ']'", i)
            return
        else:
            raise syntax_error("expected ',' or ']' after an array element", i)


def _iter_json(path: str) -> Iterator[_Located]:
    with open(path, "rb") as f:
        head = f.read(4096).decode("utf-8", errors="replace").lstrip("\ufeff" + _JSON_WS)
    if not head.startswith("["):
        # Not an array: JSON-lines content under a .json name (common for HF exports).
        yield from _iter_jsonl(path)
        return
    try:
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise HPDError(f"{path} is not valid UTF-8 text ({e.reason} at byte {e.start})") from None
    yield from _iter_json_array(path, text, text.index("["))


def _iter_parquet(path: str) -> Iterator[_Located]:
    import pyarrow.parquet as pq

    # Record batch by record batch, so that a streamed run (data.streaming) holds one batch, not the file.
    i = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                yield f"{path} row index {i}", f"{path}[{i}]", row
                i += 1
    except Exception as e:  # pyarrow raises several types for corrupt / non-parquet files
        raise HPDError(f"could not read parquet file {path}: {e}") from None


def _split_path(path: str) -> tuple[str, str | None]:
    """`dir:split` -> (dir, split) when `dir` exists; anything else is a plain path."""
    if not os.path.exists(path) and ":" in path:
        base, split = path.rsplit(":", 1)
        if split and os.path.isdir(base):
            return base, split
    return path, None


def _iter_saved_dataset(path: str, split: str | None, shown: str) -> Iterator[_Located]:
    import datasets

    try:
        ds = datasets.load_from_disk(path)
    except FileNotFoundError:
        raise HPDError(
            f"directory {path} is not a dataset saved with datasets' save_to_disk (no "
            "dataset_info.json / dataset_dict.json); point data at a .jsonl, .json or .parquet "
            "file or such a directory"
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds.keys())
        if split is None:
            if "train" in ds:
                split = "train"
            elif len(splits) == 1:
                split = splits[0]
            else:
                raise HPDError(
                    f"dataset {path} has splits {splits} and none is called 'train': choose one "
                    f"with '{path}:<split>'"
                )
        if split not in ds:
            raise HPDError(f"dataset {path} has no split '{split}'; its splits are {splits}")
        ds = ds[split]
        shown = f"{path}:{split}"
    elif split is not None:
        raise HPDError(
            f"dataset {path} has no splits (it is a single Dataset): drop ':{split}' from the path"
        )
    for i, row in enumerate(ds):
        yield f"{shown} row index {i}", f"{shown}[{i}]", row


def _iter_rows(path: str) -> Iterator[_Located]:
    base, split = _split_path(path)
    if os.path.isdir(base):
        yield from _iter_saved_dataset(base, split, path)
        return
    if not os.path.exists(path):
        from hpd.data.hub import is_hub_id, iter_hub_rows

        if is_hub_id(path):  # org/name[:config][:split] and no local path of that name (hpd.data.hub)
            yield from iter_hub_rows(path)
            return
    _check_exists(path)
    lower = path.lower()
    if lower.endswith((".jsonl", ".ndjson")):
        yield from _iter_jsonl(path)
    elif lower.endswith(".json"):
        yield from _iter_json(path)
    elif lower.endswith(".parquet"):
        yield from _iter_parquet(path)
    else:
        raise HPDError(
            f"don't know how to read {path}: use a .jsonl, .json or .parquet file, or a directory "
            "written by datasets' save_to_disk (optionally 'dir:split')"
        )


def parse_rows(
    rows: Iterable[_Located],
    *,
    prompt_field: str = "prompt",
    completion_field: str = "completion",
    messages_field: str = "messages",
    on_bad_row: str = "error",
    require_completion: bool = True,
    stats: LoadStats,
    skip_hint: str = "set data.on_bad_row=skip",
) -> Iterator[Example]:
    """The examples of raw rows `(location, source tag, row)` (`iter_rows`), one at a time: a bad
    row raises `HPDError` naming its location (and `skip_hint`, see `load_examples`), or is counted
    in `stats` with `on_bad_row="skip"`."""
    if on_bad_row not in ("error", "skip"):
        raise HPDError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    for loc, src, row in rows:
        try:
            if isinstance(row, _RowError):
                raise row
            prompt, completion, extra = _parse_row(
                row,
                prompt_field=prompt_field,
                completion_field=completion_field,
                messages_field=messages_field,
                require_completion=require_completion,
            )
        except _RowError as e:
            if on_bad_row == "skip":
                stats.note_skip(f"{loc}: {e}")
                continue
            raise HPDError(
                f"{loc}: {e}. Fix the row, or {skip_hint} to skip bad rows."
            ) from None
        yield Example(prompt=prompt, completion=completion, source=src, extra=extra)


def iter_rows(path: str, *, streaming: bool = False) -> Iterator[_Located]:
    """The raw rows of a data source, lazily where it can be (JSONL line by line, a Hub dataset
    streamed with `streaming=True`): `(location for messages, source tag, row or row error)`."""
    path = os.fspath(path)
    if streaming and not os.path.exists(path):
        from hpd.data.hub import is_hub_id, iter_hub_rows

        if is_hub_id(path):
            return iter_hub_rows(path, streaming=True)
    return _iter_rows(path)


def _check_exists(path: str) -> None:
    if not os.path.exists(path):
        raise HPDError(f"data file {path} not found: check the path (relative to {os.getcwd()}), or name a Hub "
                       "dataset as org/name[:config][:split]")


def data_digest(path: str | os.PathLike) -> str:
    """A content hash of what a data path names (any form `load_examples` reads), for cache keys.

    A file: sha256 of its bytes. A `save_to_disk` directory (`dir` or `dir:split`): its files,
    each named by its path under the directory, and the split.
    """
    import hashlib
    from pathlib import Path

    from hpd.fingerprints import hash_files

    path = os.fspath(path)
    base, split = _split_path(path)
    if not os.path.exists(base):
        from hpd.data.hub import hub_digest, is_hub_id

        if is_hub_id(path):  # a Hub dataset: the fingerprint datasets keeps of its content
            return hub_digest(path)
    if os.path.isdir(base):
        root = Path(base)
        files = sorted(p for p in root.rglob("*") if p.is_file())
        return hashlib.sha256(f"{hash_files(files, root=root)}:{split or ''}".encode()).hexdigest()[:24]
    _check_exists(path)
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:24]


def load_examples(
    path: str,
    *,
    prompt_field: str = "prompt",
    completion_field: str = "completion",
    messages_field: str = "messages",
    on_bad_row: str = "error",
    require_completion: bool = True,
    skip_hint: str = "set data.on_bad_row=skip",
) -> tuple[list[Example], LoadStats]:
    """Load examples from a JSONL / JSON / parquet file or a `save_to_disk` directory.

    `path` may be `dir:split` for a saved `DatasetDict` (default split: "train", or the only one).
    Each row holds `prompt_field` + `completion_field`, or `messages_field` (chat messages whose
    last assistant turn is the completion). A malformed row raises `HPDError` naming the file and
    line (row index for parquet / datasets); with `on_bad_row="skip"` it is counted in the
    returned stats instead. `require_completion=False` accepts prompt-only rows (completion "").
    Every command reads its data here (train, cache-teacher, generate, eval, bench); `skip_hint`
    is how the calling command's user asks for `on_bad_row="skip"` (e.g. `pass --on-bad-row skip`).
    """
    path = os.fspath(path)
    stats = LoadStats()
    examples = list(parse_rows(_iter_rows(path), prompt_field=prompt_field, completion_field=completion_field,
                               messages_field=messages_field, on_bad_row=on_bad_row,
                               require_completion=require_completion, stats=stats, skip_hint=skip_hint))
    stats.rows = len(examples)
    if not examples:
        why = (
            f"{stats.skipped} bad rows were skipped, e.g. {stats.skip_reasons[0]}"
            if stats.skipped
            else "it is empty"
        )
        raise HPDError(f"dataset {path} has no usable rows ({why})")
    return examples, stats


# --------------------------------------------------------------------------------------------
# Examples -> token ids
# --------------------------------------------------------------------------------------------


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
    if teacher_tokenizer is not None:
        kept = [ex for ex in examples if ex.completion]  # encode_dataset drops exactly the others
        use = _use_template(teacher_tokenizer, settings.chat_template)
        adds_bos = not use and _adds_bos(teacher_tokenizer)
        for enc, ex in zip(encoded, kept, strict=True):
            enc.teacher_prompt_ids = _encode_prompt(ex.prompt, teacher_tokenizer, use, adds_bos)[-settings.max_length:]
    return encoded, stats


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


# --------------------------------------------------------------------------------------------
# Token ids -> tensors
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Order
# --------------------------------------------------------------------------------------------


class EpochSampler:
    """Seeded, resumable, data-parallel-consistent order of example indices.

    The order is one stream: the permutation of epoch 0 (torch.Generator seeded with `seed`),
    then epoch 1's (seed + 1), and so on forever. Each call takes the next global batch of
    `batch_size * num_replicas` indices from the stream (crossing into the next epoch when the
    current one runs out, so every batch is full) and returns rank `rank`'s contiguous slice of
    `batch_size`. Hence one process with batch B*R sees the same examples per step as R processes
    with B each, and every index appears once in each epoch's stretch of the stream.

    The state (epoch, position in the global stream) is the same on every rank, and a sampler
    restored with `load_state_dict` returns exactly the batch the saved one would have returned.

        >>> s = EpochSampler(10, batch_size=4, seed=0)
        >>> first = next(s); state = s.state_dict(); second = next(s)
        >>> t = EpochSampler(10, batch_size=4, seed=0); t.load_state_dict(state)
        >>> next(t) == second
        True
    """

    def __init__(
        self,
        num_examples: int,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if num_examples < 1:
            raise HPDError(f"EpochSampler needs at least one example, got {num_examples}")
        if batch_size < 1:
            raise HPDError(f"batch_size must be >= 1, got {batch_size}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise HPDError(
                f"rank must be in [0, num_replicas), got rank={rank}, num_replicas={num_replicas}"
            )
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self.position = 0  # indices of the current epoch already consumed (globally)
        self._order: list[int] | None = None
        self._order_epoch = -1

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.num_replicas

    @property
    def steps_per_epoch(self) -> float:
        """Global batches per epoch (fractional when the epoch size is not a multiple)."""
        return self.num_examples / self.global_batch_size

    def _epoch_order(self, epoch: int) -> list[int]:
        if self._order_epoch != epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed + epoch)
                self._order = torch.randperm(self.num_examples, generator=g).tolist()
            else:
                self._order = list(range(self.num_examples))
            self._order_epoch = epoch
        assert self._order is not None
        return self._order

    def next_global_batch(self) -> list[int]:
        """The next `batch_size * num_replicas` indices of the stream (all ranks' slices)."""
        out: list[int] = []
        while len(out) < self.global_batch_size:
            order = self._epoch_order(self.epoch)
            take = min(self.global_batch_size - len(out), self.num_examples - self.position)
            out.extend(order[self.position : self.position + take])
            self.position += take
            if self.position == self.num_examples:
                self.epoch, self.position = self.epoch + 1, 0
        return out

    def __next__(self) -> list[int]:
        """This rank's next micro-batch of `batch_size` example indices."""
        g = self.next_global_batch()
        return g[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]

    def __iter__(self) -> Iterator[list[int]]:
        return self

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "num_examples": self.num_examples,
            "shuffle": int(self.shuffle),
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a saved state; the data and seed must be the ones it was saved with."""
        if state["num_examples"] != self.num_examples:
            raise HPDError(
                f"cannot resume the data order: the checkpoint saw {state['num_examples']} "
                f"examples but the data now has {self.num_examples}; resume with the same data"
            )
        if state["seed"] != self.seed or bool(state.get("shuffle", 1)) != self.shuffle:
            raise HPDError(
                f"cannot resume the data order: the checkpoint used seed={state['seed']}, "
                f"shuffle={bool(state.get('shuffle', 1))} but this run has seed={self.seed}, "
                f"shuffle={self.shuffle}; resume with the same seed"
            )
        if not 0 <= state["position"] < self.num_examples:
            raise HPDError(f"corrupt sampler state: position {state['position']} out of range")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

"""Training data, first stage: rows from files -> `Example`s (then `hpd.data.encode` tokenizes
them with label masks, `hpd.data.collate` makes batches, `hpd.data.order` orders them).

Rows come from JSONL, JSON, parquet or a `datasets.save_to_disk` directory and hold either
`prompt` + `completion` or chat `messages` (the last assistant turn is the completion). Bad rows
raise `HPDError` naming the file and line (or skip with `on_bad_row="skip"`). Batches carry labels
that are already shifted: `model(input_ids).logits[:, t]` predicts `labels[:, t]`, so objectives
never shift again.

    >>> import json, tempfile, os
    >>> from hpd.data.rows import load_examples
    >>> from hpd.data.encode import encode_dataset
    >>> from hpd.data.collate import build_batch
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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any


from hpd.errors import HPDError

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

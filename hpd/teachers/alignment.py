"""Two tokenizations of one text lined up by byte offsets (distillation across tokenizers).

- `token_bytes(tokenizer)`: the bytes every token id spells (byte-level BPE, SentencePiece with
  byte fallback, added tokens); special tokens are markers that only the same special matches.
- `joint_spans(a, b)`: the smallest runs of both tokenizations whose byte spans coincide; they
  tile the text once, in order.
- `align_response(...)`: one response in student tokens -> the teacher's tokens of the same
  text, and for each student token the teacher token starting at the same byte (the same
  context for both) and, where the student token is one joint span by itself, the teacher
  tokens spelling exactly its bytes.
- `token_map(...)`: each student token id -> the teacher token id spelling the same bytes.

`hpd.teachers.cross_tokenizer` builds the teacher sources on it (docs/objectives.md, "Across tokenizers").

    >>> from hpd.teachers.alignment import joint_spans
    >>> joint_spans([1, 2, 1], [3, 1])   # byte lengths of student and teacher tokens
    [(0, 2, 0, 1, 0, 3), (2, 3, 1, 2, 3, 4)]
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from hpd.errors import HPDError
from hpd.models.tokenizer import _bytes_to_unicode

# A special token's "bytes": 0xFF never occurs in UTF-8 text, so a marker matches only the same
# special (the end of the response matches the teacher's eos, whatever the two are called).
_MARK = b"\xff"
EOS_MARKER = _MARK + b"eos" + _MARK


def _decoder_kinds(tokenizer) -> set[str]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise HPDError("cross-tokenizer distillation needs fast tokenizers (tokenizer.json) for both models")
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    kinds = {decoder.get("type")}
    for d in decoder.get("decoders") or []:
        kinds.add(d.get("type"))
        if d.get("type") == "Replace" and d.get("pattern", {}).get("String") == "\u2581":
            kinds.add("Metaspace")
    return kinds


def token_bytes(tokenizer) -> list[bytes]:
    """The bytes each token id spells in text, indexed by id (`len(tokenizer)` entries).

    Byte-level BPE tokens map back through GPT-2's byte alphabet; SentencePiece tokens turn `▁`
    into a space and `<0xHH>` into that byte; added tokens spell their content. Special tokens
    get a marker (`0xFF name 0xFF`, never valid UTF-8), the eos token `EOS_MARKER`.
    """
    kinds = _decoder_kinds(tokenizer)
    byte_level = "ByteLevel" in kinds
    metaspace = "Metaspace" in kinds or "ByteFallback" in kinds
    inverse = {c: b for b, c in _bytes_to_unicode().items()}
    n = len(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(n)))
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    special_ids = set(tokenizer.all_special_ids)
    out: list[bytes] = []
    for i, piece in enumerate(pieces):
        tok = added.get(i)
        if i == tokenizer.eos_token_id:
            out.append(EOS_MARKER)
        elif i in special_ids or (tok is not None and tok.special):
            out.append(_MARK + (piece or str(i)).encode() + _MARK)
        elif tok is not None or piece is None:
            out.append((tok.content if tok is not None else "").encode())
        elif byte_level:
            try:
                out.append(bytes(inverse[c] for c in piece))
            except KeyError:  # a vocabulary entry outside the byte alphabet: spell it as text
                out.append(piece.encode())
        elif metaspace and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            out.append(bytes([int(piece[3:5], 16)]))
        elif metaspace:
            out.append(piece.replace("\u2581", " ").encode())
        else:
            out.append(piece.encode())
    return out


def joint_spans(a: Sequence[int], b: Sequence[int]) -> list[tuple[int, int, int, int, int, int]]:
    """The smallest runs of two tokenizations of one text whose byte spans coincide.

    a, b: byte lengths of the tokens of each (both summing to the text's length). Returns, in
    order, `(a0, a1, b0, b1, byte0, byte1)`: tokens `a[a0:a1]` and `b[b0:b1]` spell exactly bytes
    `byte0:byte1`. The spans tile the text once, in order, and cover every token of both once.
    """
    if sum(a) != sum(b):
        raise HPDError(f"the two tokenizations spell texts of different lengths ({sum(a)} and {sum(b)} bytes)")
    spans, i, j, ea, eb, start, i0, j0 = [], 0, 0, 0, 0, 0, 0, 0
    while i < len(a) or j < len(b):
        # Advance the side that ends first; a span closes where both end at the same byte.
        if i < len(a) and (ea <= eb or j >= len(b)):
            ea += a[i]
            i += 1
        else:
            eb += b[j]
            j += 1
        if ea == eb and i > i0 and j > j0:
            spans.append((i0, i, j0, j, start, ea))
            i0, j0, start = i, j, ea
    if (i0, j0) != (len(a), len(b)):  # zero-length tokens at the end join the last span
        s = spans.pop() if spans else (0, 0, 0, 0, 0, 0)
        spans.append((s[0], len(a), s[2], len(b), s[4], ea))
    return spans


@dataclass
class ResponseAlignment:
    """One response in both tokenizations (student token i, teacher token j).

    teacher_ids: the teacher's tokens of the response text (its eos where the student's ends).
    start:       per student token, the teacher token that starts at the same byte (both models
                 then predict it after the same text), or -1.
    span:        per student token, `(j, l)`: teacher tokens `j..l-1` spell exactly its bytes
                 (it is a joint span by itself), or None.
    """

    teacher_ids: list[int]
    start: list[int]
    span: list[tuple[int, int] | None]


def _valid_utf8_prefix(data: bytes) -> int:
    """Length of the longest prefix of `data` that is valid UTF-8."""
    try:
        data.decode("utf-8")
        return len(data)
    except UnicodeDecodeError as e:
        return e.start


def align_response(student_ids: Sequence[int], student_bytes: Sequence[bytes], teacher_tokenizer,
                   teacher_bytes: Sequence[bytes], markers: dict[bytes, int] | None = None) -> ResponseAlignment:
    """Tokenize a student response's text with the teacher and line the two up (see the class).

    The text between special tokens is encoded by the teacher in one piece (its own canonical
    tokenization); the student's eos becomes the teacher's eos. From the first byte that is not
    valid UTF-8 (a byte-level rollout cut inside a character) on, the teacher sees nothing and the
    student tokens there are unaligned. Raises `HPDError` when the teacher's tokens do not spell
    the text (a tokenizer that normalizes text) or a special token has no teacher counterpart.
    markers: `special_markers(teacher_bytes)`, computed when not given.
    """
    pieces = [student_bytes[i] for i in student_ids]
    teacher_ids: list[int] = []
    marker_ids = markers
    run: list[bytes] = []
    t_lengths: list[int] = []
    usable = 0  # bytes of the response the teacher sequence spells

    def flush() -> bool:
        nonlocal usable
        text = b"".join(run)
        run.clear()
        if not text:
            return True
        good = _valid_utf8_prefix(text)
        if good:
            ids = teacher_tokenizer(text[:good].decode("utf-8"), add_special_tokens=False)["input_ids"]
            spelled = b"".join(teacher_bytes[t] for t in ids)
            if spelled != text[:good]:
                raise HPDError(
                    f"the teacher's tokenizer does not spell the text back byte for byte ({text[:good][:40]!r} -> "
                    f"{spelled[:40]!r}): it normalizes text, so the two tokenizations cannot be lined up exactly"
                )
            teacher_ids.extend(ids)
            t_lengths.extend(len(teacher_bytes[t]) for t in ids)
            usable += good
        return good == len(text)

    complete = True
    for piece in pieces:
        if piece.startswith(_MARK):
            if not (complete := flush()):
                break
            if marker_ids is None:
                marker_ids = special_markers(teacher_bytes)
            if piece not in marker_ids:
                raise HPDError(f"the student's special token {piece.strip(_MARK).decode(errors='replace')!r} in a "
                               "response has no counterpart among the teacher's special tokens")
            teacher_ids.append(marker_ids[piece])
            t_lengths.append(len(piece))
            usable += len(piece)
        else:
            run.append(piece)
    if complete:
        flush()

    s_lengths = [len(p) for p in pieces]
    # Student tokens past the bytes the teacher spells stay unaligned: cut the student side there.
    n_aligned, total = 0, 0
    while n_aligned < len(pieces) and total + s_lengths[n_aligned] <= usable:
        total += s_lengths[n_aligned]
        n_aligned += 1
    # A cut inside a student token: that token is a virtual piece of the bytes the teacher has,
    # and the joint span holding it is left out.
    s_len = s_lengths[:n_aligned] + ([usable - total] if usable > total else [])
    spans = joint_spans(s_len, t_lengths)
    if usable > total:
        spans = spans[:-1]
    start, span = [-1] * len(pieces), [None] * len(pieces)
    for s0, s1, t0, t1, _, _ in spans:
        if s0 < s1 and t0 < t1:
            start[s0] = t0
            if s1 - s0 == 1:
                span[s0] = (t0, t1)
    return ResponseAlignment(teacher_ids, start, span)


def special_markers(token_bytes_: Sequence[bytes]) -> dict[bytes, int]:
    """Marker -> id of every special token of a `token_bytes` table (the first id of a marker)."""
    out: dict[bytes, int] = {}
    for i, b in enumerate(token_bytes_):
        if b.startswith(_MARK):
            out.setdefault(b, i)
    return out


def token_map(student_bytes: Sequence[bytes], teacher_tokenizer, teacher_bytes: Sequence[bytes]) -> Tensor:
    """`(V_s,)` long: the teacher token that spells each student token's text alone, or -1.

    A student token maps when the teacher's own tokenization of its text is one token (eos maps to
    eos, a special to the same special); partial UTF-8 tokens and multi-token texts map to -1.
    """
    out = torch.full((len(student_bytes),), -1, dtype=torch.long)
    markers = special_markers(teacher_bytes)
    texts, ids = [], []
    for i, b in enumerate(student_bytes):
        if b.startswith(_MARK):
            out[i] = markers.get(b, -1)
        elif b and _valid_utf8_prefix(b) == len(b):
            texts.append(b.decode("utf-8"))
            ids.append(i)
    if texts:
        encoded = teacher_tokenizer(texts, add_special_tokens=False)["input_ids"]
        for i, b, enc in zip(ids, (student_bytes[i] for i in ids), encoded):
            if len(enc) == 1 and teacher_bytes[enc[0]] == b:
                out[i] = enc[0]
    return out

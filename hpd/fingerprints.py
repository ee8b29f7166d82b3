"""Fingerprints of models and tokenizers: the keys under which caches are stored and checked.

Three ways to name "the same model", each kept because caches on disk are keyed by it:

- `model_fingerprint(model)`: a model in memory (names, shapes, two sums per tensor); the key of
  the teacher's generations in regime `teacher`.
- `weights_fingerprint(path)`: the bytes of a model's weight files on disk (sha256, exact); what a
  teacher cache records (`hpd cache-teacher`).
- `files_stamp(path)`: the names, sizes and modification times of a model's files (cheap, no
  read); what `hpd generate` keys its output by.

and `tokenizer_fingerprint(tokenizer)`: the vocabulary (token -> id).

    >>> from hpd.models import load_model
    >>> from hpd.fingerprints import model_fingerprint
    >>> m, _ = load_model("tiny", tiny={"num_layers": 1, "hidden_size": 32}, seed=0)
    >>> model_fingerprint(m) == model_fingerprint(load_model("tiny", tiny={"num_layers": 1, "hidden_size": 32}, seed=0)[0])
    True
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from hpd.errors import HPDError

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


def model_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of a model's weights in memory (names, shapes and two sums per tensor)."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.state_dict().items():
            x = p.detach().double()
            h.update(f"{name}:{tuple(p.shape)}:{float(x.sum()):.10e}:{float(x.abs().sum()):.10e}".encode())
    return h.hexdigest()[:16]


def weights_fingerprint(path: str | os.PathLike) -> str:
    """sha256 of a model's weight files (and config.json), read from disk without loading it."""
    p = Path(path)
    files = [p] if p.is_file() else sorted(f for f in p.iterdir() if f.suffix in _WEIGHT_SUFFIXES or f.name == "config.json")
    if not files:
        raise HPDError(f"no weight files in '{p}': pass a Hugging Face model directory or a .gguf file")
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()[:24]


def files_stamp(model: str, h: "hashlib._Hash") -> None:
    """Feed `h` the names, sizes and mtimes of the files of `model` (a directory or a file), or
    the name itself when it is no path (e.g. `tiny`)."""
    p = Path(model)
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p] if p.is_file() else []
    h.update(model.encode() if not files else b"")
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(p) if p.is_dir() else f.name}:{st.st_size}:{st.st_mtime_ns}".encode())


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of a tokenizer's vocabulary (token -> id): what logit distillation needs to share.

    Templates and special-token choices change the sequences, which the sequence hashes catch.
    """
    return hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()[:24]


__all__ = ["files_stamp", "model_fingerprint", "tokenizer_fingerprint", "weights_fingerprint"]

"""Fingerprints of models and tokenizers: the keys under which caches are stored and checked.

Three ways to name "the same model", each kept because caches on disk are keyed by it:

- `model_fingerprint(model)`: a model in memory (names, shapes, two sums per tensor); the key of
  the teacher's generations in regime `teacher`.
- `weights_fingerprint(path)`: the bytes of a model's weight files and config.json on disk
  (sha256, exact); what a teacher cache records (`hpd cache-teacher`). With `with_config=False`,
  the weight files alone: what `hpd bench` records of its models (`OUT/bench.json`).
- `model_content_hash(path)`: the bytes of everything on disk that decides what a model generates
  (weights, config, generation config, tokenizer and chat template files), nothing else: files
  written beside a model (evaluation outputs, a model card) and modification times leave it
  unchanged; what `hpd generate` keys its output by.

and `tokenizer_fingerprint(tokenizer)`: the vocabulary (token -> id).

    >>> from hpd.models.loading import load_model
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
from typing import Sequence

import numpy as np
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


def hash_files(files: list[Path], root: Path | None = None) -> str:
    """sha256 of each file's name then bytes, in the order given (the key teacher caches record);
    with `root`, each file is named by its path under `root`, so a move between folders counts."""
    h = hashlib.sha256()
    for f in files:
        h.update((f.relative_to(root).as_posix() if root is not None else f.name).encode())
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()[:24]


def weights_fingerprint(path: str | os.PathLike, *, with_config: bool = True) -> str:
    """sha256 of a model's weight files (and config.json), read from disk without loading it.

    with_config=False hashes what the model has learned alone: the key of `hpd bench`'s record of
    its models, which must not change when config.json only gains keys that change nothing (the
    legacy RoPE keys `hpd.models.portable` adds)."""
    p = Path(path)
    files = [p] if p.is_file() else sorted(
        f for f in p.iterdir() if f.suffix in _WEIGHT_SUFFIXES or (with_config and f.name == "config.json"))
    if not files:
        raise HPDError(f"no weight files in '{p}': pass a Hugging Face model directory or a .gguf file")
    return hash_files(files)


# Files beside the weights that change what a model computes or generates from a prompt.
_MODEL_FILES = frozenset({
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model",
    "chat_template.jinja", "chat_template.json",
})


def model_content_hash(model: str | os.PathLike) -> str:
    """One content hash of a model: its weight files and the files of `_MODEL_FILES` (the bytes,
    by name); a `.gguf` file's bytes; a name that is no path (e.g. `tiny`) hashes as itself."""
    p = Path(model)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and (
            f.suffix in _WEIGHT_SUFFIXES or f.name in _MODEL_FILES or f.name.endswith(".safetensors.index.json")))
        if not any(f.suffix in _WEIGHT_SUFFIXES for f in files):
            raise HPDError(f"no weight files in '{p}': pass a Hugging Face model directory or a .gguf file")
    elif p.is_file():
        files = [p]
    else:
        return hashlib.sha256(os.fspath(model).encode()).hexdigest()[:24]
    return hash_files(files)


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of a tokenizer's vocabulary (token -> id): what logit distillation needs to share.

    Templates and special-token choices change the sequences, which the sequence hashes catch.
    """
    return hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()[:24]


__all__ = ["hash_files", "model_content_hash", "model_fingerprint", "tokenizer_fingerprint", "weights_fingerprint"]


def sequence_hash(prompt_ids: Sequence[int], completion_ids: Sequence[int]) -> int:
    """A 63-bit hash of one example's token ids (the prompt/completion split included): the key a
    teacher cache finds an example's rows by (`hpd.teachers.cache`)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(np.asarray([len(prompt_ids)], dtype=np.int64).tobytes())
    h.update(np.asarray(list(prompt_ids) + list(completion_ids), dtype=np.int64).tobytes())
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)

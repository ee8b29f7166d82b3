"""Make a model directory written by transformers 5 load the same under transformers 4.4x-4.5x.

vLLM and lm-eval environments often pin transformers 4.x. A directory saved under transformers 5
loads there *wrongly* or not at all:

- `config.json` keeps RoPE in `rope_parameters` only; 4.x does not read that key and silently
  uses its default `rope_theta` (10000: logits off by up to 1.5 for a model trained with 100000).
  We add the legacy keys beside it: `rope_theta`, `rope_scaling` (the same parameters, for a
  scaled RoPE) and `torch_dtype` (4.x's name of `dtype`). transformers 5 reads `rope_parameters`
  first and ignores the rest, so the same file serves both.
- `tokenizer_config.json` names the class `TokenizersBackend`, which 4.x does not have: we name
  `PreTrainedTokenizerFast` (the same `tokenizer.json`, loaded by both), list the extra special
  tokens under the key 4.x reads (`additional_special_tokens`; 5.x reads it too), and copy the
  chat template into the file (4.x before 4.47 reads it only there).

`make_portable(dir)` rewrites the two files in place; `hpd.models.loading.save_model` calls it on every
model it writes (`final/`, `hpd convert`, exported teachers). `tests/test_portable.py` loads such
a directory under transformers 4.57 (a separate environment) and compares the logits.

    >>> import json, tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / "config.json").write_text(json.dumps({"rope_parameters": {"rope_theta": 1e5, "rope_type": "default"}}))
    >>> make_portable(d)
    >>> conf = json.loads((d / "config.json").read_text())
    >>> conf["rope_theta"], conf["rope_scaling"], conf["rope_parameters"]["rope_theta"]
    (100000.0, None, 100000.0)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from hpd.files import atomic_write_text

# transformers 5 tokenizer class names -> a class transformers 4.x has that loads the same
# tokenizer.json (5.x maps it back to its own backend).
_TOKENIZER_CLASSES = {"TokenizersBackend": "PreTrainedTokenizerFast"}


def _read(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def _write(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def _legacy_config(conf: dict[str, Any]) -> dict[str, Any]:
    """`conf` plus the keys transformers 4.x reads in place of 5.x's (rope, dtype); recursive for
    composite configs (e.g. a `text_config`)."""
    out = dict(conf)
    rope = conf.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        out["rope_theta"] = rope["rope_theta"]
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        # 4.x: rope_scaling null = plain RoPE; otherwise a dict naming rope_type and its factors.
        out["rope_scaling"] = scaling if scaling.get("rope_type", "default") != "default" else None
        if "partial_rotary_factor" in rope and "partial_rotary_factor" not in conf:
            out["partial_rotary_factor"] = rope["partial_rotary_factor"]
    if "dtype" in conf and "torch_dtype" not in conf:
        out["torch_dtype"] = conf["dtype"]
    for key, value in conf.items():
        if key.endswith("_config") and isinstance(value, dict) and "model_type" in value:
            out[key] = _legacy_config(value)
    return out


def _legacy_tokenizer_config(conf: dict[str, Any], chat_template: str | None) -> dict[str, Any]:
    out = dict(conf)
    cls = conf.get("tokenizer_class")
    if cls in _TOKENIZER_CLASSES:
        out["tokenizer_class"] = _TOKENIZER_CLASSES[cls]
    extra = conf.get("extra_special_tokens")
    if isinstance(extra, list):
        # 4.x reads extra_special_tokens as a {name: token} mapping and fails on a list; the list's
        # meaning (more special tokens) is additional_special_tokens in both versions.
        out.pop("extra_special_tokens")
        out["additional_special_tokens"] = list(dict.fromkeys([*conf.get("additional_special_tokens", []), *extra]))
    # Loader options recorded by the load that preceded the save; not a property of the tokenizer.
    for key in ("is_local", "local_files_only"):
        out.pop(key, None)
    if chat_template is not None and "chat_template" not in conf:
        out["chat_template"] = chat_template
    return out


def make_portable(model_dir: str | os.PathLike) -> None:
    """Rewrite `config.json` and `tokenizer_config.json` of `model_dir` (written by
    `save_pretrained`) so that transformers 4.4x-4.5x and 5.x load the same model and tokenizer."""
    d = Path(model_dir)
    conf = _read(d / "config.json")
    if conf is not None:
        _write(d / "config.json", _legacy_config(conf))
    tok = _read(d / "tokenizer_config.json")
    if tok is not None:
        template_file = d / "chat_template.jinja"
        template = template_file.read_text(encoding="utf-8") if template_file.is_file() else None
        _write(d / "tokenizer_config.json", _legacy_tokenizer_config(tok, template))


__all__ = ["make_portable"]

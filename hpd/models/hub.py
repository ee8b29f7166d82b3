"""Where a model named by the user lives on disk: a local path, or a Hugging Face Hub id.

`resolve_model_path` is the one place a model name becomes a path: `hpd.models.loading.load_model` calls
it (so the student, the teacher, `hpd generate`, `hpd eval` and `hpd cache-teacher` all take Hub
ids), and so does whatever fingerprints a model's files. A name that is a local file or directory,
or one of the special names ('tiny', 'none', 'teacher'), is returned as it is. A name shaped like
`org/name` that is not on disk is a Hub id: `huggingface_hub.snapshot_download` fetches its config,
tokenizer and safetensors weights into the HF cache (HF_HUB_CACHE, or HF_HOME/hub), or, when the
Hub cannot be reached or HF_HUB_OFFLINE=1, returns the snapshot already in that cache. When neither
works, the error names the id and the ways out.

    >>> resolve_model_path("tiny")
    'tiny'
    >>> looks_like_hub_id("Qwen/Qwen2.5-0.5B-Instruct"), looks_like_hub_id("./models/x"), looks_like_hub_id("a/b/c")
    (True, False, False)
"""

from __future__ import annotations

import re
from pathlib import Path

from hpd.errors import HPDError

SPECIAL_NAMES = ("tiny", "none", "teacher")

# `org/name` as the Hub spells repository ids: one slash, no leading dot, no '..' or '--'.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")

# What loading a causal LM reads: config, generation config and tokenizer files (json, txt,
# sentencepiece, tiktoken, jinja chat templates), safetensors weights, and the code of models
# that need trust_remote_code. Other weight formats (.bin, .gguf, .onnx) are not fetched.
MODEL_FILES = ("*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja", "*.py")


def looks_like_hub_id(name: str) -> bool:
    """Whether `name` has the shape of a Hub repository id (`org/name`)."""
    return bool(_HUB_ID.match(name)) and ".." not in name and "--" not in name and not name.endswith(".gguf")


def resolve_model_path(name: str, *, role: str = "", download: bool = True) -> str:
    """A local path for the model `name`: `name` itself when it is on disk, a special name or no
    Hub id; else the local snapshot of the Hub repository `name`.

    download=False only looks in the local cache and returns `name` unchanged when it is not
    there (for checks that need the files only if they are at hand). `role` names the model in
    messages ("student", "teacher").
    """
    if name in SPECIAL_NAMES or Path(name).exists() or not looks_like_hub_id(name):
        return name
    from huggingface_hub import constants, snapshot_download

    try:
        return snapshot_download(name, allow_patterns=list(MODEL_FILES), local_files_only=not download)
    except Exception as e:  # offline without a cached snapshot, unknown or gated repo, network error
        if not download:
            return name
        who = f"{role} " if role else ""
        offline = " (HF_HUB_OFFLINE is set: only the cache is read)" if constants.HF_HUB_OFFLINE else ""
        raise HPDError(
            f"{who}model '{name}' is not on disk, and as a Hugging Face Hub id it is neither in the local cache "
            f"({constants.HF_HUB_CACHE}){offline} nor downloadable ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}): "
            f"check the id, download it where the Hub is reachable (`hf download {name}`) and point HF_HUB_CACHE at that "
            "cache, or pass a local model directory"
        ) from None

"""Hugging Face Hub datasets as data: `org/name`, `org/name:split` or `org/name:config:split`.

Any data option (`data.train`, `data.eval`, the files of `hpd cache-teacher`, ...) may name a Hub
dataset instead of a file. A local file or directory of that name always wins (as `hpd.models.hub` does
for models), and a name ending in a data-file extension (`.jsonl`, `.json`, `.parquet`) is always a
file. The dataset is read with `datasets.load_dataset`, which honours `HF_DATASETS_OFFLINE` /
`HF_HUB_OFFLINE` (offline: the datasets cache, `HF_DATASETS_CACHE`, default `$HF_HOME/datasets`,
must hold it from an earlier load) and `HF_TOKEN` for gated or private datasets. The split defaults
to `train` (or the only split); with a config the split is the third part (`org/name:config:` for
the default split). Columns are mapped by the same keys as for files: `data.prompt_field`,
`data.completion_field`, `data.messages_field`, `opsd.privileged_field`.

    >>> parse_hub_id("HuggingFaceH4/ultrachat_200k:train_sft")
    ('HuggingFaceH4/ultrachat_200k', None, 'train_sft')
    >>> parse_hub_id("openai/gsm8k:main:test")
    ('openai/gsm8k', 'main', 'test')
    >>> parse_hub_id("data/train.jsonl") is None   # a file name, never a Hub id
    True
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from typing import Any

from hpd.errors import HPDError

_PART = r"[A-Za-z0-9][A-Za-z0-9_.\-]*"
_HUB_ID = re.compile(rf"^(?P<repo>{_PART}/{_PART})(?::(?P<a>[A-Za-z0-9_.\-]*))?(?::(?P<b>[A-Za-z0-9_.\-]*))?$")
_FILE_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet", ".csv", ".txt", ".arrow")


def parse_hub_id(spec: str) -> tuple[str, str | None, str | None] | None:
    """`(repo, config, split)` of a Hub dataset id (None for parts not given), or None if `spec`
    cannot be one (a path with more than one `/`, a data-file name, an absolute path)."""
    m = _HUB_ID.match(spec)
    if m is None or m["repo"].lower().endswith(_FILE_SUFFIXES):
        return None
    a, b = m["a"], m["b"]
    if b is None:  # org/name or org/name:split
        return m["repo"], None, a or None
    return m["repo"], a or None, b or None


def is_hub_id(spec: str) -> bool:
    """Whether `spec` is read from the Hub: it has a Hub id's form and no local path has its name."""
    return not os.path.exists(spec) and parse_hub_id(spec) is not None


def _pick_split(ds: Any, spec: str, repo: str) -> Any:
    """The `train` split of a dataset dict, or its only one; an error listing them otherwise."""
    splits = list(ds.keys())
    if "train" in ds:
        return ds["train"]
    if len(splits) == 1:
        return ds[splits[0]]
    raise HPDError(f"Hub dataset {repo} has splits {splits} and none is called 'train': name one, "
                   f"'{repo}:<split>' (or '{repo}:<config>:<split>')")


def load_hub_dataset(spec: str, *, streaming: bool = False) -> Any:
    """The split `spec` names, as a `datasets.Dataset` (an `IterableDataset` when `streaming`)."""
    import datasets

    parsed = parse_hub_id(spec)
    if parsed is None:
        raise HPDError(f"{spec!r} is not a Hub dataset id (org/name, org/name:split or org/name:config:split)")
    repo, config, split = parsed
    try:
        ds = datasets.load_dataset(repo, config, split=split, streaming=streaming)
    except Exception as e:  # datasets raises ConnectionError, DatasetNotFoundError, ValueError, ...
        reason = " ".join(str(e).split())[:300] or type(e).__name__
        if isinstance(e, ValueError) and ("split" in reason.lower() or "config" in reason.lower()):
            raise HPDError(f"Hub dataset {spec}: {reason}") from None
        offline = bool(datasets.config.HF_HUB_OFFLINE)
        where = (f"offline (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE) and the datasets cache "
                 f"{datasets.config.HF_DATASETS_CACHE} does not hold it; load it once with the network and the same "
                 f"HF_HOME / HF_DATASETS_CACHE (python -c \"import datasets; datasets.load_dataset('{repo}')\")"
                 if offline else "check the id, the network, and HF_TOKEN for a gated or private dataset")
        raise HPDError(f"data {spec}: no local file or directory has that name, and the Hub dataset {repo} could not "
                       f"be loaded ({reason}): {where}; or point the option at a local .jsonl, .json or .parquet "
                       "file") from None
    if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        ds = _pick_split(ds, spec, repo)
    return ds


def hub_digest(spec: str) -> str:
    """A key of the Hub dataset's content for caches: `datasets`' fingerprint of the loaded split
    (it follows the dataset's revision and files), with the id."""
    import hashlib

    ds = load_hub_dataset(spec)
    return hashlib.sha256(f"{spec}:{getattr(ds, '_fingerprint', '')}".encode()).hexdigest()[:24]


def iter_hub_rows(spec: str, *, streaming: bool = False) -> Iterator[tuple[str, str, Any]]:
    """The rows of the Hub dataset `spec` as `hpd.data` reads rows: (location, source tag, row)."""
    for i, row in enumerate(load_hub_dataset(spec, streaming=streaming)):
        yield f"{spec} row index {i}", f"{spec}[{i}]", row


__all__ = ["hub_digest", "is_hub_id", "iter_hub_rows", "load_hub_dataset", "parse_hub_id"]

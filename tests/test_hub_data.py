"""Hub dataset ids as data (`hpd.data.hub`), read offline from a datasets cache built here.

Nothing is downloaded: `hub_cache` writes a tiny dataset into a temporary datasets cache exactly
where `datasets.load_dataset("acme/tiny-chat")` leaves a Hub dataset (`<cache>/acme___tiny-chat/
default/0.0.0/<hash>/`: arrow files and dataset_info.json), and the tests read it with
HF_DATASETS_OFFLINE on, as a user without network would.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hpd.data.rows import load_examples
from hpd.errors import HPDError
from hpd.data.hub import is_hub_id, parse_hub_id

pytestmark = pytest.mark.usefixtures("single_torch_thread")

TRAIN = [{"question": f"What is {i} + {i}?", "answer": f"{2 * i}", "topic": "sums"} for i in range(24)]
TEST = [{"question": "What is 100 + 1?", "answer": "101", "topic": "sums"}]


def write_hub_cache(cache: Path, repo: str, splits: dict[str, list[dict]]) -> Path:
    """Put `splits` into the datasets cache `cache` as a Hub dataset `repo` loaded once is left there."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets.packaged_modules.parquet.parquet import Parquet

    src = cache.parent / "hub-src" / repo.replace("/", "--")
    src.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, rows in splits.items():
        pq.write_table(pa.Table.from_pylist(rows), src / f"{split}.parquet")
        files[split] = str(src / f"{split}.parquet")
    builder = Parquet(cache_dir=str(cache.parent / "hub-build"), dataset_name=repo.split("/")[1], config_name="default",
                      data_files=files, hash="0123abcd")
    builder.download_and_prepare()
    dest = cache / repo.replace("/", "___") / "default" / "0.0.0" / "0123abcd"
    shutil.copytree(builder.cache_dir, dest)
    return dest


@pytest.fixture()
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An offline datasets cache holding acme/tiny-chat (train and test splits); datasets set offline."""
    import datasets

    cache = tmp_path / "hf" / "datasets"
    write_hub_cache(cache, "acme/tiny-chat", {"train": TRAIN, "test": TEST})
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


FIELDS = dict(prompt_field="question", completion_field="answer")


def test_hub_ids_are_told_from_paths():
    assert parse_hub_id("acme/tiny-chat") == ("acme/tiny-chat", None, None)
    assert parse_hub_id("acme/tiny-chat:test") == ("acme/tiny-chat", None, "test")
    assert parse_hub_id("acme/tiny-chat:main:") == ("acme/tiny-chat", "main", None)
    for path in ("data/train.jsonl", "a/b/c", "/abs/x", "train.parquet", "x.jsonl", "runs/x.parquet"):
        assert parse_hub_id(path) is None, path


def test_a_hub_id_reads_the_cached_dataset_offline_with_mapped_columns(hub_cache):
    examples, stats = load_examples("acme/tiny-chat", **FIELDS)
    assert stats.rows == len(TRAIN) and examples[3].prompt == "What is 3 + 3?" and examples[3].completion == "6"
    assert examples[3].source == "acme/tiny-chat[3]" and examples[3].extra == {"topic": "sums"}
    [test], _ = load_examples("acme/tiny-chat:test", **FIELDS)
    assert test.completion == "101"
    with pytest.raises(HPDError, match=r"acme/tiny-chat:validation: .*split"):
        load_examples("acme/tiny-chat:validation", **FIELDS)
    # A row error names the Hub dataset and the row, as for files.
    with pytest.raises(HPDError, match=r"acme/tiny-chat row index 0: field 'prompt' is missing"):
        load_examples("acme/tiny-chat")


def test_a_dataset_neither_on_the_hub_nor_in_the_cache_is_one_clear_error(hub_cache):
    with pytest.raises(HPDError) as e:
        load_examples("acme/not-there", **FIELDS)
    msg = str(e.value)
    assert "\n" not in msg
    assert "acme/not-there" in msg and "offline" in msg and str(hub_cache) in msg and "load_dataset('acme/not-there')" in msg
    assert "local .jsonl" in msg


def test_a_local_path_of_the_same_name_wins(hub_cache, tmp_path, monkeypatch):
    local = tmp_path / "work" / "acme" / "tiny-chat"
    local.parent.mkdir(parents=True)
    local.write_text(json.dumps({"question": "local?", "answer": "yes"}) + "\n")
    monkeypatch.chdir(tmp_path / "work")
    assert not is_hub_id("acme/tiny-chat")
    with pytest.raises(HPDError, match="don't know how to read acme/tiny-chat"):  # read as the local file it is
        load_examples("acme/tiny-chat", **FIELDS)


def test_hpd_train_trains_on_a_hub_id_offline(hub_cache, tmp_path, monkeypatch, repo_root):
    from hpd.config import load_config
    from hpd.training.trainer import train

    monkeypatch.chdir(repo_root)
    out = tmp_path / "run"
    train(load_config("configs/tiny.yaml", [f"output_dir={out}", "max_steps=2", "log.progress=false", "log.tensorboard=off",
                                            "save.every=0", "data.max_length=48", "data.train=acme/tiny-chat",
                                            "data.eval=acme/tiny-chat:test", "data.eval_fraction=0", "data.prompt_field=question",
                                            "data.completion_field=answer"]))
    info = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert info["train_rows"] == len(TRAIN) and info["eval_rows"] == 1


def test_the_command_line_honours_hf_home_and_hf_datasets_offline(tmp_path, repo_root):
    """The variables a user sets: HF_HOME locates the cache, HF_DATASETS_OFFLINE keeps datasets off the network."""
    write_hub_cache(tmp_path / "home" / "datasets", "acme/tiny-chat", {"train": TRAIN})
    env = {**os.environ, "HF_HOME": str(tmp_path / "home"), "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("HF_DATASETS_CACHE", None)
    cmd = [sys.executable, "-m", "hpd.apps.cli", "train", "configs/tiny.yaml", f"output_dir={tmp_path / 'run'}", "max_steps=1",
           "log.progress=false", "log.tensorboard=off", "save.every=0", "data.eval_fraction=0", "data.max_length=48",
           "data.prompt_field=question", "data.completion_field=answer"]
    ok = subprocess.run([*cmd, "data.train=acme/tiny-chat"], cwd=repo_root, env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])["train_rows"] == len(TRAIN)


def test_a_hub_dataset_streams_and_a_resumed_stream_sees_the_same_rows(hub_cache, tmp_path, monkeypatch, repo_root):
    import shutil as sh

    import torch
    from safetensors.torch import load_file

    from hpd.config import load_config
    from hpd.training.trainer import train

    monkeypatch.chdir(repo_root)
    common = ["max_steps=8", "log.progress=false", "log.tensorboard=off", "save.every=3", "save.keep_last=5",
              "data.max_length=48", "data.train=acme/tiny-chat", "data.eval_fraction=0", "data.prompt_field=question",
              "data.completion_field=answer", "data.streaming=true", "data.shuffle_buffer=5", "optim.batch_size=4",
              "log.eval_every=0", "save.dtype=fp32", "resume=auto"]
    ref = train(load_config("configs/tiny.yaml", [*common, f"output_dir={tmp_path / 'ref'}"]))
    stopped = tmp_path / "stopped"
    sh.copytree(ref, stopped)
    sh.rmtree(stopped / "final")
    sh.rmtree(stopped / "checkpoints" / "step-00000006")
    sh.rmtree(stopped / "checkpoints" / "step-00000008", ignore_errors=True)
    train(load_config("configs/tiny.yaml", [*common, f"output_dir={stopped}"]))
    a, b = load_file(str(ref / "final" / "model.safetensors")), load_file(str(stopped / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # 8 steps x 4 rows = 32 > 24 rows: the stream wrapped into a second epoch
    last = [json.loads(x) for x in (ref / "metrics.jsonl").read_text().splitlines() if '"train"' in x][-1]
    assert 1 < last["epoch"] < 2


def test_a_hub_dataset_has_a_content_key_for_caches(hub_cache):
    from hpd.data.rows import data_digest

    key = data_digest("acme/tiny-chat")
    assert len(key) == 24 and key == data_digest("acme/tiny-chat") and key != data_digest("acme/tiny-chat:test")

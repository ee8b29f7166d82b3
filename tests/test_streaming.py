"""Streaming training data (`data.streaming`, `hpd.data.streaming`): lazy, shuffled, and resumable.

The reference for resumption is the uninterrupted streamed run: a run stopped after a checkpoint
(its later checkpoints and final weights removed, as a kill leaves it) and resumed must end with
bitwise the same weights and per-step losses, also when the checkpoint falls on an epoch's end and
the stream wraps into the next epoch through the shuffle buffer.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hpd.config import DataConfig, load_config
from hpd.errors import HPDError
from hpd.data.streaming import StreamSampler, shuffled
from hpd.models.tokenizer import byte_tokenizer
from hpd.training.trainer import train

pytestmark = pytest.mark.usefixtures("single_torch_thread")

FAST = ["data.max_length=48", "log.progress=false", "log.tensorboard=off", "log.every=1", "log.eval_every=0",
        "data.streaming=true", "data.eval_fraction=0", "data.shuffle_buffer=16", "optim.batch_size=8", "save.dtype=fp32"]


@pytest.fixture(autouse=True)
def _at_repo_root(monkeypatch, repo_root):
    monkeypatch.chdir(repo_root)


def _rows(path: Path, n: int, tail: str = "") -> Path:
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"{i} + 1 =", "completion": f" {i + 1}"}) + "\n")
        f.write(tail)
    return path


def test_the_shuffle_buffer_is_a_seeded_permutation():
    a = list(shuffled(iter(range(100)), 10, seed=3))
    assert sorted(a) == list(range(100)) and a != list(range(100))
    assert a == list(shuffled(iter(range(100)), 10, seed=3)) and a != list(shuffled(iter(range(100)), 10, seed=4))
    assert list(shuffled(iter(range(5)), 0, seed=3)) == list(range(5))


def test_the_stream_visits_every_row_once_per_epoch_and_resumes_mid_epoch(tmp_path):
    path = _rows(tmp_path / "t.jsonl", 10)
    settings = DataConfig(max_length=32, shuffle_buffer=4)

    def sources(s, steps):
        return [[s[i].source.rsplit(":", 1)[1] for i in next(s)] for _ in range(steps)]

    s = StreamSampler(str(path), byte_tokenizer(), settings, batch_size=3, seed=1)
    first = sources(s, 3)  # 9 rows of epoch 0
    state = s.state_dict()
    rest = sources(s, 4)  # the last row of epoch 0, then epoch 1 (10 more), then 1 of epoch 2
    flat = [x for b in first + rest for x in b]
    assert sorted(flat[:10]) == sorted(str(i) for i in range(1, 11))  # each row once in epoch 0
    assert sorted(flat[10:20]) == sorted(str(i) for i in range(1, 11))
    assert flat[:10] != flat[10:20]  # a new order each epoch
    assert s.epoch == 2 and s.num_examples == 10
    t = StreamSampler(str(path), byte_tokenizer(), settings, batch_size=3, seed=1)
    t.load_state_dict(state)
    assert sources(t, 4) == rest
    # Two processes take the two halves of each global batch.
    r0 = StreamSampler(str(path), byte_tokenizer(), settings, batch_size=2, seed=1, num_replicas=2, rank=0)
    r1 = StreamSampler(str(path), byte_tokenizer(), settings, batch_size=2, seed=1, num_replicas=2, rank=1)
    one = StreamSampler(str(path), byte_tokenizer(), settings, batch_size=4, seed=1)
    assert [x for s_ in (r0, r1) for x in sources(s_, 1)[0]] == sources(one, 1)[0]


def test_rows_are_read_when_reached_not_before(tmp_path):
    """A stream reads no further than training needs: a bad row far down is not seen by a short run."""
    path = _rows(tmp_path / "t.jsonl", 40, tail='{"prompt": "cut')
    run = train(load_config("configs/tiny.yaml", [*FAST, f"output_dir={tmp_path / 'run'}", f"data.train={path}",
                                                  "max_steps=2", "save.every=0", "data.shuffle_buffer=0"]))
    assert (run / "final").is_dir()
    with pytest.raises(HPDError, match=r"t.jsonl line 41: invalid JSON: the row is truncated"):
        train(load_config("configs/tiny.yaml", [*FAST, f"output_dir={tmp_path / 'run2'}", f"data.train={path}",
                                                "max_steps=6", "save.every=0", "data.shuffle_buffer=0"]))


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "model.safetensors"))


def _losses(run: Path) -> list[tuple[int, float]]:
    from hpd.training.metrics_file import read_records  # metrics.jsonl is appended to: read as the run stands

    return [(r["step"], r["loss"]) for r in read_records(run / "metrics.jsonl", "train")]


@pytest.mark.parametrize("stop_at", [6, 12])  # mid-epoch; at the end of epoch 0 (12 x 8 = 96 rows, tiny.jsonl's count)
def test_a_streamed_run_resumed_from_a_checkpoint_ends_with_the_uninterrupted_weights(stop_at, tmp_path, capsys):
    common = [*FAST, "data.train=examples/tiny.jsonl", "max_steps=16", "save.every=6", "save.keep_last=5", "resume=auto"]
    reference = train(load_config("configs/tiny.yaml", [*common, f"output_dir={tmp_path / 'reference'}"]))
    # What a run killed after its step-`stop_at` checkpoint leaves: that checkpoint, no later one, no final/.
    stopped = tmp_path / "stopped"
    shutil.copytree(reference, stopped)
    shutil.rmtree(stopped / "final")
    for ckpt in (stopped / "checkpoints").iterdir():
        if int(ckpt.name.split("-")[1]) > stop_at:
            shutil.rmtree(ckpt)
    capsys.readouterr()
    train(load_config("configs/tiny.yaml", [*common, f"output_dir={stopped}"]))
    assert f"at step {stop_at}" in capsys.readouterr().out
    ref, res = _weights(reference), _weights(stopped)
    assert ref.keys() == res.keys()
    for k in ref:
        assert torch.equal(ref[k], res[k]), k
    assert _losses(stopped) == _losses(reference)


def test_what_needs_the_whole_data_is_refused_with_streaming(tmp_path):
    from hpd.training.trainer import Trainer

    for extra, why in ((["epochs=1"], "epochs"), (["data.eval_fraction=0.1"], "eval_fraction"),
                       (["regime.name=teacher"], "regime teacher")):
        with pytest.raises(HPDError, match=f"data.streaming=true: .*{why}"):
            Trainer(load_config("configs/tiny.yaml", [*FAST, f"output_dir={tmp_path / 'x'}", *extra]))
    with pytest.raises(HPDError, match="data file nowhere.jsonl not found"):
        Trainer(load_config("configs/tiny.yaml", [*FAST, f"output_dir={tmp_path / 'y'}", "data.train=nowhere.jsonl"]))
    assert not (tmp_path / "y" / "metrics.jsonl").exists()


def test_parquet_and_saved_datasets_stream_too(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": f"{i} + 1 =", "completion": f" {i + 1}"} for i in range(7)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet", row_group_size=3)
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    for path, tag in ((tmp_path / "t.parquet", "t.parquet[4]"), (tmp_path / "saved", "saved[4]")):
        s = StreamSampler(str(path), byte_tokenizer(), DataConfig(max_length=32, shuffle_buffer=0), batch_size=5)
        assert s[next(s)[4]].source.endswith(tag)

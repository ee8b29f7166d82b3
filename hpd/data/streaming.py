"""Streaming training data (`data.streaming=true`): rows read as training needs them, resumable.

For data larger than memory. The training source (a JSONL file read line by line, a saved
dataset, or a Hub dataset streamed through `datasets`' `IterableDataset`) is read in its order
through a seeded shuffle buffer of `data.shuffle_buffer` rows (0: the source's order), each row
parsed and tokenized when it is reached; at the end of the source the next epoch reads it again
with the buffer seeded anew. Only the current batch's examples are held.

`StreamSampler` stands where `hpd.data.order.EpochSampler` stands in the trainer: each call takes the
next global batch (`batch_size x processes` examples) from the stream and returns this process's
indices (running numbers of the stream), whose examples `stream[i]` gives. Its state (epoch and
the number of rows the shuffle buffer has handed out) is saved in checkpoints; a restored sampler
replays the epoch's stream up to that point (rows are read again, not parsed or tokenized), so a
resumed run sees the very rows an uninterrupted one sees.

    >>> import json, tempfile, os
    >>> from hpd.config import DataConfig
    >>> from hpd.models.tokenizer import byte_tokenizer
    >>> path = os.path.join(tempfile.mkdtemp(), "train.jsonl")
    >>> with open(path, "w") as f:
    ...     f.writelines(json.dumps({"prompt": f"{i}+1=", "completion": str(i + 1)}) + "\\n" for i in range(5))
    >>> s = StreamSampler(path, byte_tokenizer(), DataConfig(max_length=32, shuffle_buffer=0), batch_size=2, seed=0)
    >>> [s[i].completion_ids[:-1] for i in next(s)]   # the rows "1" and "2", without eos
    [[49], [50]]
    >>> state = s.state_dict(); after = [s[i].source for i in next(s)]
    >>> t = StreamSampler(path, byte_tokenizer(), DataConfig(max_length=32, shuffle_buffer=0), batch_size=2, seed=0)
    >>> t.load_state_dict(state); [t[i].source for i in next(t)] == after
    True
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

from hpd.data.encode import EncodedExample, add_teacher_prompts, encode_example
from hpd.data.rows import LoadStats, iter_rows, parse_rows
from hpd.errors import HPDError
from hpd.responses.regimes import derive_seed


def shuffled(rows: Iterator[Any], buffer: int, seed: int) -> Iterator[Any]:
    """`rows` through a shuffle buffer of `buffer` items seeded with `seed` (0: as they come).

    Each incoming row takes the place of a random one of the buffer, which is handed out; at the
    end the rest of the buffer comes out in random order. The same rows and seed give the same order.
    """
    if buffer <= 0:
        yield from rows
        return
    rng = random.Random(seed)
    held: list[Any] = []
    for row in rows:
        if len(held) < buffer:
            held.append(row)
            continue
        j = rng.randrange(buffer)
        out, held[j] = held[j], row
        yield out
    rng.shuffle(held)
    yield from held


class StreamSampler:
    """The next global batches of a streamed training source (see the module docstring).

    settings: the `data` section (`hpd.config.DataConfig`): its row fields, `on_bad_row`,
    `max_length`, `chat_template` and `shuffle_buffer`. teacher_tokenizer: across tokenizers, the
    teacher's; each example then gets its teacher prompt as `hpd.data.encode.encode_file` gives it.
    """

    def __init__(self, path: str, tokenizer: Any, settings: Any, *, batch_size: int, seed: int = 0,
                 num_replicas: int = 1, rank: int = 0, teacher_tokenizer: Any = None):
        if batch_size < 1:
            raise HPDError(f"batch_size must be >= 1, got {batch_size}")
        self.path, self.tokenizer, self.settings, self.teacher_tokenizer = path, tokenizer, settings, teacher_tokenizer
        self.batch_size, self.seed, self.num_replicas, self.rank = batch_size, seed, num_replicas, rank
        self.epoch = 0
        self.position = 0  # rows of this epoch the shuffle buffer has handed out (parsed or not)
        self.num_examples: int | None = None  # usable rows per epoch, once an epoch has been read whole
        self.stats = LoadStats()
        self._next_index = 0  # the running number of the next example in the stream
        self._held: dict[int, EncodedExample] = {}
        self._examples: Iterator[EncodedExample] | None = None
        self._epoch_examples = 0

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.num_replicas

    def check(self) -> None:
        """Open the source and read up to its first usable row, so a wrong path, an unreachable Hub
        dataset or a bad first row fails before training starts (the stream itself is untouched)."""
        position, stats, self.stats = self.position, self.stats, LoadStats()
        try:
            if next(self._epoch(), None) is None:
                raise HPDError(f"data stream {self.path} has no usable rows"
                               + (f" (e.g. {self.stats.skip_reasons[0]})" if self.stats.skip_reasons else ""))
        finally:
            self.position, self.stats = position, stats

    @property
    def progress(self) -> float:
        """Epochs read: whole ones, plus the fraction of this one once an epoch's size is known."""
        return self.epoch + (self._epoch_examples / self.num_examples if self.num_examples else 0.0)

    def _counted(self, rows: Iterator[Any]) -> Iterator[Any]:
        for row in rows:
            self.position += 1
            yield row

    def _rows(self, skip: int = 0) -> Iterator[Any]:
        """This epoch's shuffled raw rows after the first `skip` (read again, not parsed)."""
        rows = shuffled(iter_rows(self.path, streaming=True), self.settings.shuffle_buffer,
                        derive_seed(self.seed, "stream", self.epoch))
        for _ in range(skip):
            if next(rows, None) is None:
                raise HPDError(f"cannot resume the data stream: {self.path} has fewer rows than the checkpoint had "
                               f"read ({skip} in epoch {self.epoch}); resume with the same data")
        return rows

    def _epoch(self, skip: int = 0) -> Iterator[EncodedExample]:
        d = self.settings
        examples = parse_rows(self._counted(self._rows(skip)), prompt_field=d.prompt_field,
                              completion_field=d.completion_field, messages_field=d.messages_field,
                              on_bad_row=d.on_bad_row, stats=self.stats)
        for ex in examples:
            enc = encode_example(ex, self.tokenizer, max_length=d.max_length, chat_template=d.chat_template)
            if enc is None:
                self.stats.note_skip(f"{ex.source}: no completion to train on")
                continue
            self.stats.truncated += int(enc.truncated)
            if self.teacher_tokenizer is not None:
                add_teacher_prompts([enc], [ex], self.teacher_tokenizer, d)
            yield enc

    def _next_example(self) -> EncodedExample:
        for _ in range(2):
            if self._examples is None:
                self._examples, self._epoch_examples = self._epoch(), 0
            enc = next(self._examples, None)
            if enc is not None:
                self._epoch_examples += 1
                return enc
            if self._epoch_examples == 0:
                raise HPDError(f"data stream {self.path} has no usable rows"
                               + (f" (e.g. {self.stats.skip_reasons[0]})" if self.stats.skip_reasons else ""))
            self.num_examples = self._epoch_examples
            self.epoch, self.position, self._examples = self.epoch + 1, 0, None
        raise AssertionError("unreachable")

    def __next__(self) -> list[int]:
        """This process's next micro-batch: `batch_size` running indices, their examples in `self[i]`."""
        self._held.clear()
        start = self._next_index
        for k in range(self.global_batch_size):
            enc = self._next_example()
            if self.rank * self.batch_size <= k < (self.rank + 1) * self.batch_size:
                self._held[start + k] = enc
        self._next_index = start + self.global_batch_size
        return list(range(start + self.rank * self.batch_size, start + (self.rank + 1) * self.batch_size))

    def __iter__(self) -> Iterator[list[int]]:
        return self

    def __getitem__(self, index: int) -> EncodedExample:
        try:
            return self._held[index]
        except KeyError:
            raise HPDError(f"stream example {index} is not held any more: a streamed run reads each batch "
                           "once") from None

    def state_dict(self) -> dict[str, int]:
        return {"streaming": 1, "epoch": self.epoch, "position": self.position, "index": self._next_index,
                "epoch_examples": self._epoch_examples, "num_examples": self.num_examples or 0,
                "seed": self.seed, "shuffle_buffer": self.settings.shuffle_buffer}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a saved state: the epoch's stream is read again up to its position."""
        if not state.get("streaming"):
            raise HPDError("cannot resume: the checkpoint was written by a run that read its data whole, this one "
                           "streams it (data.streaming=true); resume with the data settings it was saved with")
        if state["seed"] != self.seed or state["shuffle_buffer"] != self.settings.shuffle_buffer:
            raise HPDError(f"cannot resume the data stream: the checkpoint used seed={state['seed']}, "
                           f"data.shuffle_buffer={state['shuffle_buffer']}, this run seed={self.seed}, "
                           f"data.shuffle_buffer={self.settings.shuffle_buffer}; resume with the same ones")
        self.epoch, self._next_index, self._held = int(state["epoch"]), int(state["index"]), {}
        self.num_examples = int(state["num_examples"]) or None
        self._examples, self._epoch_examples = self._epoch(skip=int(state["position"])), int(state["epoch_examples"])
        self.position = int(state["position"])  # the skipped rows are not counted again


def check_streaming(cfg: Any) -> None:
    """Refuse what needs the training data whole, with `data.streaming=true`."""
    r = cfg.regime
    why = None
    if cfg.epochs is not None:
        why = "epochs counts passes over a known number of rows: set max_steps"
    elif cfg.data.eval_fraction > 0:
        why = "data.eval_fraction holds rows out of the whole data: set data.eval_fraction=0 and name data.eval"
    elif cfg.teacher.cache:
        why = "a teacher cache is matched to the rows of a data file read whole: drop teacher.cache"
    elif r.name in ("teacher", "self") or (r.name == "mixed" and r.off_policy == "teacher"):
        why = f"regime {r.name}{' (off_policy teacher)' if r.name == 'mixed' else ''} reads the whole data first"
    elif r.minibatches * r.epochs > 1:
        why = "rollout reuse (regime.minibatches x regime.epochs > 1) keeps rows across steps: set both to 1"
    if why is not None:
        raise HPDError(f"data.streaming=true: {why}; or set data.streaming=false")


__all__ = ["StreamSampler", "check_streaming", "shuffled"]

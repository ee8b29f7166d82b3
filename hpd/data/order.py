"""The order of the training examples: `EpochSampler`, a seeded, resumable stream of index
batches that splits the same way across any number of data-parallel ranks.

    >>> s = EpochSampler(10, batch_size=4, seed=0)
    >>> first = next(s); state = s.state_dict()
    >>> again = EpochSampler(10, batch_size=4, seed=0); again.load_state_dict(state)
    >>> next(again) == next(s)
    True
"""

from __future__ import annotations

from __future__ import annotations

from collections.abc import Iterator

import torch

from hpd.errors import HPDError



class EpochSampler:
    """Seeded, resumable, data-parallel-consistent order of example indices.

    The order is one stream: the permutation of epoch 0 (torch.Generator seeded with `seed`),
    then epoch 1's (seed + 1), and so on forever. Each call takes the next global batch of
    `batch_size * num_replicas` indices from the stream (crossing into the next epoch when the
    current one runs out, so every batch is full) and returns rank `rank`'s contiguous slice of
    `batch_size`. Hence one process with batch B*R sees the same examples per step as R processes
    with B each, and every index appears once in each epoch's stretch of the stream.

    The state (epoch, position in the global stream) is the same on every rank, and a sampler
    restored with `load_state_dict` returns exactly the batch the saved one would have returned.

        >>> s = EpochSampler(10, batch_size=4, seed=0)
        >>> first = next(s); state = s.state_dict(); second = next(s)
        >>> t = EpochSampler(10, batch_size=4, seed=0); t.load_state_dict(state)
        >>> next(t) == second
        True
    """

    def __init__(
        self,
        num_examples: int,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if num_examples < 1:
            raise HPDError(f"EpochSampler needs at least one example, got {num_examples}")
        if batch_size < 1:
            raise HPDError(f"batch_size must be >= 1, got {batch_size}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise HPDError(
                f"rank must be in [0, num_replicas), got rank={rank}, num_replicas={num_replicas}"
            )
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self.position = 0  # indices of the current epoch already consumed (globally)
        self._order: list[int] | None = None
        self._order_epoch = -1

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.num_replicas

    @property
    def steps_per_epoch(self) -> float:
        """Global batches per epoch (fractional when the epoch size is not a multiple)."""
        return self.num_examples / self.global_batch_size

    def _epoch_order(self, epoch: int) -> list[int]:
        if self._order_epoch != epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed + epoch)
                self._order = torch.randperm(self.num_examples, generator=g).tolist()
            else:
                self._order = list(range(self.num_examples))
            self._order_epoch = epoch
        assert self._order is not None
        return self._order

    def next_global_batch(self) -> list[int]:
        """The next `batch_size * num_replicas` indices of the stream (all ranks' slices)."""
        out: list[int] = []
        while len(out) < self.global_batch_size:
            order = self._epoch_order(self.epoch)
            take = min(self.global_batch_size - len(out), self.num_examples - self.position)
            out.extend(order[self.position : self.position + take])
            self.position += take
            if self.position == self.num_examples:
                self.epoch, self.position = self.epoch + 1, 0
        return out

    def __next__(self) -> list[int]:
        """This rank's next micro-batch of `batch_size` example indices."""
        g = self.next_global_batch()
        return g[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]

    def __iter__(self) -> Iterator[list[int]]:
        return self

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "num_examples": self.num_examples,
            "shuffle": int(self.shuffle),
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a saved state; the data and seed must be the ones it was saved with."""
        if state["num_examples"] != self.num_examples:
            raise HPDError(
                f"cannot resume the data order: the checkpoint saw {state['num_examples']} "
                f"examples but the data now has {self.num_examples}; resume with the same data"
            )
        if state["seed"] != self.seed or bool(state.get("shuffle", 1)) != self.shuffle:
            raise HPDError(
                f"cannot resume the data order: the checkpoint used seed={state['seed']}, "
                f"shuffle={bool(state.get('shuffle', 1))} but this run has seed={self.seed}, "
                f"shuffle={self.shuffle}; resume with the same seed"
            )
        if not 0 <= state["position"] < self.num_examples:
            raise HPDError(f"corrupt sampler state: position {state['position']} out of range")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

"""Shuffled, sharded, packed rows of any dataset of items, resumable from three integers.

A dataset (PackedRows) numbers its items (text windows, conversations) and turns
one item into example(s) as a pure function of (seed, epoch, item). The items of an
epoch are shuffled with grain (seed derived from (seed, epoch)) and split into
`shard_count` disjoint streams (`slice(i::n)`) whose union is the epoch; examples
are packed in groups of `group_size` (best-fit decreasing). A stream's state is
(epoch, group, row): restoring it re-packs one group and yields exactly the batches
an uninterrupted run yields. A global batch takes batch_size / shard_count rows from
every stream, so it does not depend on how many processes read it.
"""

from __future__ import annotations

import functools

import grain
import numpy as np

from glm_jax.data import batch as batch_schema
from glm_jax.data import packing


class PackedRows:
    """Random access to the packed rows of one data shard. Subclasses define num_items, examples
    and no_examples_message; config needs seq_len, batch_size, seed and group_size."""

    def __init__(self, config, pad_id: int, shard_index: int = 0, shard_count: int = 1):
        if config.batch_size % shard_count:
            raise ValueError(f"DataConfig.batch_size {config.batch_size} must be divisible by the "
                             f"{shard_count} data shards (processes unless num_shards is set)")
        self.config, self.pad_id = config, pad_id
        self.shard_index, self.shard_count = shard_index, shard_count
        self.local_batch = config.batch_size // shard_count

    @property
    def num_items(self) -> int:
        raise NotImplementedError

    def examples(self, epoch: int, item: int) -> list[dict]:
        """The example(s) of one item (objective outputs: tokens, targets, loss_mask, positions, sep)."""
        raise NotImplementedError

    def no_examples_message(self) -> str:
        """What to tell the user when a whole epoch yields no example."""
        raise NotImplementedError

    # ------------------------------------------------------------- ordering
    @functools.lru_cache(maxsize=2)
    def epoch_items(self, epoch: int) -> np.ndarray:
        """This shard's item ids for `epoch`, in order (grain shuffle + shard)."""
        dataset = (grain.MapDataset.source(np.arange(self.num_items))
                   .shuffle(seed=_mix(self.config.seed, epoch))
                   .slice(slice(self.shard_index, None, self.shard_count)))
        return np.asarray([dataset[i] for i in range(len(dataset))], np.int64)

    def num_groups(self, epoch: int) -> int:
        return -(-len(self.epoch_items(epoch)) // self.config.group_size)

    @functools.lru_cache(maxsize=4)
    def group_rows(self, epoch: int, group: int) -> tuple[dict, ...]:
        """Packed rows of one group of `group_size` consecutive items."""
        size = self.config.group_size
        ids = self.epoch_items(epoch)[group * size:(group + 1) * size]
        examples = [ex for item in ids for ex in self.examples(epoch, int(item))]
        return tuple(packing.pack(examples, self.config.seq_len, self.pad_id))

    def iterator(self, state: dict | None = None) -> "BatchIterator":
        iterator = BatchIterator(self)
        if state is not None:
            iterator.set_state(state)
        return iterator


def _mix(seed: int, epoch: int) -> int:
    """A 32-bit seed per (seed, epoch) for grain's shuffle."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


STATE_FIELDS = ("epoch", "group", "row")


class BatchIterator:
    """Yields one shard's rows of each global batch ({key: [rows, ...]}); state is 3 integers."""

    def __init__(self, dataset: "PackedRows"):
        self.dataset = dataset
        self.epoch, self.group, self.row = 0, 0, 0
        self.rows_seen, self.real_tokens = 0, 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        rows = [self._next_row() for _ in range(self.dataset.local_batch)]
        batch = batch_schema.stack_rows(rows)
        self.rows_seen += len(rows)
        self.real_tokens += int((batch["segment_ids"] > 0).sum())
        return batch

    def _next_row(self) -> dict:
        empty_groups = 0
        while True:
            rows = self.dataset.group_rows(self.epoch, self.group)
            if self.row < len(rows):
                self.row += 1
                return rows[self.row - 1]
            empty_groups = empty_groups + 1 if not rows else 0
            if empty_groups > self.dataset.num_groups(self.epoch):  # a whole epoch without one example
                raise ValueError(self.dataset.no_examples_message())
            self.group, self.row = self.group + 1, 0
            if self.group >= self.dataset.num_groups(self.epoch):
                self.epoch, self.group = self.epoch + 1, 0

    @property
    def packing_efficiency(self) -> float:
        """Fraction of non-padding tokens in the rows yielded so far."""
        return self.real_tokens / max(1, self.rows_seen * self.dataset.config.seq_len)

    def get_state(self) -> dict:
        return dict(zip(STATE_FIELDS, (self.epoch, self.group, self.row)))

    def set_state(self, state: dict) -> None:
        self.epoch, self.group, self.row = (int(state[k]) for k in STATE_FIELDS)


def _mix(seed: int, epoch: int) -> int:
    """A 32-bit seed per (seed, epoch) for grain's shuffle."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


class LocalBatches:
    """This process's part of every global batch: the rows of its data shards, concatenated."""

    def __init__(self, iterators: list[BatchIterator]):
        self.iterators = iterators

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        parts = [next(it) for it in self.iterators]
        return batch_schema.concatenate(parts)

    @property
    def packing_efficiency(self) -> float:
        return float(np.mean([it.packing_efficiency for it in self.iterators]))

    def get_state(self) -> dict:
        return {"shards": [it.get_state() for it in self.iterators]}

    def state_array(self) -> np.ndarray:
        """The state as int64 [shards, 3] (epoch, group, row): what processes all-gather before a save."""
        return np.asarray([[s[k] for k in STATE_FIELDS] for s in self.get_state()["shards"]], np.int64)

    @staticmethod
    def state_from_array(array: np.ndarray) -> dict:
        """get_state()'s dict from state_array()'s rows."""
        return {"shards": [dict(zip(STATE_FIELDS, map(int, row))) for row in np.asarray(array)]}

    def rewind(self) -> None:
        """Back to the first batch (evaluation reads the same batches every time)."""
        for it in self.iterators:
            it.set_state({"epoch": 0, "group": 0, "row": 0})

    def set_state(self, state: dict) -> None:
        if len(state["shards"]) != len(self.iterators):
            raise ValueError(f"data state has {len(state['shards'])} shards but this process reads "
                             f"{len(self.iterators)}; keep DataConfig.num_shards and the process count "
                             "of the run being resumed (or set num_shards explicitly)")
        for it, shard_state in zip(self.iterators, state["shards"]):
            it.set_state(shard_state)

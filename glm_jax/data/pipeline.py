"""The GLM data pipeline: tokenised corpus -> windows -> corrupted examples -> packed rows -> batches.

Built on grain's random-access MapDataset: the windows of an epoch are shuffled
with a seed derived from (seed, epoch) and split into `num_shards` disjoint
streams (`slice(i::n)`) whose union is the epoch. A global batch takes
batch_size / num_shards rows from every stream, and each process reads only its
own streams, so the global batch does not depend on how many processes read it
(num_shards defaults to the process count). Every example is a pure function of
(seed, epoch, window id). Examples are packed in groups of `group_size`
(best-fit decreasing). A stream's state is three integers (epoch, group, row):
restoring it re-packs one group and yields exactly the batches an uninterrupted
run yields.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import grain
import numpy as np

from glm_jax.data import batch as batch_schema
from glm_jax.data import packing
from glm_jax.data.corpus import DEFAULT_CACHE, TokenizedCorpus, default_tokenizer, tokenize_corpus
from glm_jax.data.objectives import DocumentTooShort, Objective
from glm_jax.data.tokenizer import Tokenizer, load_tokenizer_file


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the text comes from and how batches are shaped.

    source: 'stdlib' | 'text:GLOB' | 'jsonl:GLOB' (glm_jax.data.corpus).
    text_split: documents of text files: 'blank_line' blocks or 'line's.
    seq_len, batch_size: rows are [seq_len]; batch_size is global (all processes).
    window_fraction: documents longer than window_fraction * seq_len are split into
      windows at sentence ends. None (default) sizes windows so that an average
      example fills 97% of a row after the objective's expansion.
    group_size: examples packed together (larger packs tighter).
    num_shards: independent data streams (None = one per process). Fix it to keep
      the same global batches when the process count changes.
    tokenizer_path: a SentencePiece .model with the GLM specials, an imported tokenizer.json or
      ChatGLM2/3 tokenizer.model (glm_jax.data.tokenizer.load_tokenizer_file); None trains one on
      the source (cached) with vocab_size pieces.
    skip_bad_input: skip (and count) malformed jsonl lines and non-UTF-8 files instead
      of stopping with the file and line.
    """

    source: str = "stdlib"
    text_split: str = "blank_line"
    seq_len: int = 512
    batch_size: int = 8
    seed: int = 0
    eval_fraction: float = 0.02
    vocab_size: int = 8192
    tokenizer_path: str | None = None
    cache_dir: str = str(DEFAULT_CACHE)
    window_fraction: float | None = None
    group_size: int = 64
    num_shards: int | None = None
    skip_bad_input: bool = False

    def __post_init__(self):
        if self.seq_len < 16:
            raise ValueError(f"DataConfig.seq_len {self.seq_len} is too short for even one span; use >= 16")
        if self.batch_size < 1 or self.group_size < 1:
            raise ValueError("DataConfig.batch_size and group_size must be positive")
        if self.window_fraction is not None and not 0.1 <= self.window_fraction <= 1.0:
            raise ValueError(f"DataConfig.window_fraction {self.window_fraction} must be in [0.1, 1]")


def load_tokenizer(config: DataConfig) -> Tokenizer:
    if config.tokenizer_path:
        return load_tokenizer_file(config.tokenizer_path)
    return default_tokenizer(config.source, config.vocab_size, split=config.text_split,
                             eval_fraction=config.eval_fraction, cache_dir=config.cache_dir,
                             skip_bad_input=config.skip_bad_input)


class GLMDataset:
    """Random access to the packed rows of one split, for one process."""

    def __init__(self, config: DataConfig, objective: Objective, tokenizer: Tokenizer, corpus: TokenizedCorpus,
                 shard_index: int = 0, shard_count: int = 1, windows: np.ndarray | None = None):
        if config.batch_size % shard_count:
            raise ValueError(f"DataConfig.batch_size {config.batch_size} must be divisible by the "
                             f"{shard_count} data shards (processes unless num_shards is set)")
        self.config, self.objective, self.tokenizer, self.corpus = config, objective, tokenizer, corpus
        self.specials = tokenizer.specials
        self.shard_index, self.shard_count = shard_index, shard_count
        self.local_batch = config.batch_size // shard_count
        fraction = config.window_fraction or 0.97 / objective.expected_expansion
        self.max_window = int(fraction * config.seq_len) - 2  # room for [CLS] and <eos>
        self.windows = self._make_windows() if windows is None else windows  # shards of one split share them
        if len(self.windows) < shard_count:
            raise ValueError(f"the {corpus_name(config)} corpus has {len(self.windows)} windows of text, fewer than "
                             f"its {shard_count} data shards; set DataConfig.num_shards to at most "
                             f"{max(len(self.windows), 1)} (it must divide DataConfig.batch_size) or add text")
        self.counts = {"skipped_too_short": 0, "split_overflow": 0}

    def _make_windows(self) -> np.ndarray:
        """[n, 3] (document, start, end) windows covering every document."""
        rows = []
        for d in range(self.corpus.num_documents):
            doc = self.corpus.document(d)
            ends = self.tokenizer.sentence_end[doc]
            rows.extend((d, s, e) for s, e in packing.split_windows(len(doc), self.max_window, ends))
        return np.asarray(rows, np.int64).reshape(-1, 3)

    # ------------------------------------------------------------- ordering
    @functools.lru_cache(maxsize=2)
    def epoch_windows(self, epoch: int) -> np.ndarray:
        """This shard's window ids for `epoch`, in order (grain shuffle + shard)."""
        dataset = (grain.MapDataset.source(np.arange(len(self.windows)))
                   .shuffle(seed=_mix(self.config.seed, epoch))
                   .slice(slice(self.shard_index, None, self.shard_count)))
        return np.asarray([dataset[i] for i in range(len(dataset))], np.int64)

    def num_groups(self, epoch: int) -> int:
        return -(-len(self.epoch_windows(epoch)) // self.config.group_size)

    # ------------------------------------------------------------- examples
    def window_tokens(self, window_id: int) -> np.ndarray:
        d, start, end = self.windows[window_id]
        doc = self.corpus.document(d)
        tail = [self.specials.eos] if end == len(doc) else []
        return np.concatenate([self.tokenizer.prefix, doc[start:end], tail]).astype(np.int32)

    def examples(self, epoch: int, window_id: int) -> list[dict]:
        """The corrupted example(s) of one window, a pure function of (seed, epoch, window)."""
        rng = np.random.default_rng([self.config.seed, epoch, window_id])
        return self._corrupt(self.window_tokens(window_id), rng)

    def _corrupt(self, tokens: np.ndarray, rng: np.random.Generator) -> list[dict]:
        try:
            example = self.objective(tokens, rng, self.specials, self.tokenizer.sentence_end)
        except DocumentTooShort:
            self.counts["skipped_too_short"] += 1
            return []
        if len(example["tokens"]) <= self.config.seq_len:
            return [example]
        # The objective's extra tokens overflow the row: cut where the first part
        # should fit; the rest becomes a short example that fills another row.
        self.counts["split_overflow"] += 1
        cut = max(1, int(len(tokens) * 0.97 * self.config.seq_len / len(example["tokens"])))
        return self._corrupt(tokens[:cut], rng) + self._corrupt(tokens[cut:], rng)

    @functools.lru_cache(maxsize=4)
    def group_rows(self, epoch: int, group: int) -> tuple[dict, ...]:
        """Packed rows of one group of `group_size` consecutive windows."""
        size = self.config.group_size
        ids = self.epoch_windows(epoch)[group * size:(group + 1) * size]
        examples = [ex for w in ids for ex in self.examples(epoch, int(w))]
        return tuple(packing.pack(examples, self.config.seq_len, self.specials.pad))

    def iterator(self, state: dict | None = None) -> "BatchIterator":
        iterator = BatchIterator(self)
        if state is not None:
            iterator.set_state(state)
        return iterator


STATE_FIELDS = ("epoch", "group", "row")


class BatchIterator:
    """Yields one shard's rows of each global batch ({key: [rows, ...]}); state is 3 integers."""

    def __init__(self, dataset: GLMDataset):
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
                raise ValueError(f"no document of the {corpus_name(self.dataset.config)} corpus makes a training "
                                 f"example: every one is too short for the objective ({self.dataset.counts}); "
                                 "use longer documents (e.g. DataConfig.text_split = 'blank_line' instead of "
                                 "'line') or an objective with shorter spans")
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


def corpus_name(config: DataConfig) -> str:
    return repr(config.source)


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


def _process() -> tuple[int, int]:
    import jax  # only here: the data package itself does not need jax

    return jax.process_index(), jax.process_count()


def _split_corpus(config: DataConfig, tokenizer: Tokenizer, split: str) -> TokenizedCorpus:
    if split not in ("train", "eval"):
        raise ValueError(f"split {split!r} is unknown; use 'train' or 'eval'")
    corpora = tokenize_corpus(config.source, tokenizer, split=config.text_split,
                              eval_fraction=config.eval_fraction, cache_dir=Path(config.cache_dir),
                              skip_bad_input=config.skip_bad_input)
    if corpora[split].num_documents == 0:
        raise ValueError(f"the {split} split of {config.source!r} is empty; raise DataConfig.eval_fraction "
                         "or add documents")
    return corpora[split]


def make_dataset(config: DataConfig, objective: Objective, split: str = "train",
                 shard_index: int = 0, shard_count: int = 1, tokenizer: Tokenizer | None = None) -> GLMDataset:
    """One data shard of `split` ('train' | 'eval')."""
    tokenizer = tokenizer or load_tokenizer(config)
    return GLMDataset(config, objective, tokenizer, _split_corpus(config, tokenizer, split), shard_index, shard_count)


def make_batches(config: DataConfig, objective: Objective, split: str = "train",
                 process_index: int | None = None, process_count: int | None = None,
                 tokenizer: Tokenizer | None = None, state: dict | None = None) -> LocalBatches:
    """This process's rows of every global batch (jax.process_index / process_count by default)."""
    if process_index is None or process_count is None:
        process_index, process_count = _process()
    shards = config.num_shards or process_count
    if shards % process_count:
        raise ValueError(f"DataConfig.num_shards {shards} must be a multiple of the {process_count} processes")
    per_process = shards // process_count
    tokenizer = tokenizer or load_tokenizer(config)
    corpus = _split_corpus(config, tokenizer, split)  # read once for all of this process's shards
    datasets: list[GLMDataset] = []
    for s in range(process_index * per_process, (process_index + 1) * per_process):
        windows = datasets[0].windows if datasets else None
        datasets.append(GLMDataset(config, objective, tokenizer, corpus, s, shards, windows))
    batches = LocalBatches([d.iterator() for d in datasets])
    if state is not None:
        batches.set_state(state)
    return batches

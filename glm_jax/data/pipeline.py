"""The GLM data pipeline: tokenised corpus -> windows -> corrupted examples -> packed rows -> batches.

The windows of an epoch are shuffled, sharded and packed by glm_jax.data.packed_rows
(grain's random-access MapDataset; a stream's state is three integers, so restoring
it yields exactly the batches an uninterrupted run yields). Each process reads only
its own `num_shards` streams (one per process by default), so the global batch does
not depend on how many processes read it. Every example is a pure function of
(seed, epoch, window id). A 'chat:GLOB' source reads conversations instead
(glm_jax.data.chat_source: supervised fine-tuning) through the same streams.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from glm_jax.data import packing
from glm_jax.data.chat_format import CHAT_FORMATS, PROMPT_ATTENTION, with_role_tokens
from glm_jax.data.chat_source import is_chat_source, make_chat_datasets
from glm_jax.data.corpus import DEFAULT_CACHE, SPLIT_HINT, TokenizedCorpus, default_tokenizer, tokenize_corpus
from glm_jax.data.objectives import DocumentTooShort, Objective
from glm_jax.data.packed_rows import BatchIterator, LocalBatches, PackedRows  # noqa: F401 (re-exported)
from glm_jax.data.tokenizer import Tokenizer, load_tokenizer_file


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the text comes from and how batches are shaped.

    source: 'stdlib' | 'text:GLOB' | 'jsonl:GLOB' (glm_jax.data.corpus), or 'chat:GLOB': jsonl
      conversations for supervised fine-tuning (glm_jax.data.chat_source; the objective is unused).
    chat_format: how a 'chat:' source's conversations become tokens: 'glm4' or 'chatglm3'
      (glm_jax.data.chat_format); the tokenizer gets the role tokens if it lacks them.
    chat_prompt_attention: 'causal' (what ChatGLM3 and GLM-4 use) or 'prefix': the conversation up
      to its first assistant reply attends bidirectionally (GLM's Part A).
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
    chat_format: str = "glm4"
    chat_prompt_attention: str = "causal"

    def __post_init__(self):
        if self.seq_len < 16:
            raise ValueError(f"DataConfig.seq_len {self.seq_len} is too short for even one span; use >= 16")
        if self.batch_size < 1 or self.group_size < 1:
            raise ValueError("DataConfig.batch_size and group_size must be positive")
        if self.window_fraction is not None and not 0.1 <= self.window_fraction <= 1.0:
            raise ValueError(f"DataConfig.window_fraction {self.window_fraction} must be in [0.1, 1]")
        if self.chat_format not in CHAT_FORMATS:
            raise ValueError(f"DataConfig.chat_format {self.chat_format!r} is unknown; use one of {list(CHAT_FORMATS)}")
        if self.chat_prompt_attention not in PROMPT_ATTENTION:
            raise ValueError(f"DataConfig.chat_prompt_attention {self.chat_prompt_attention!r} is unknown; use one "
                             f"of {list(PROMPT_ATTENTION)}")


def load_tokenizer(config: DataConfig) -> Tokenizer:
    """The run's tokenizer: DataConfig.tokenizer_path, or one trained on the source (cached). A chat
    source's tokenizer gets the four role tokens where it lacks them (chat_format.with_role_tokens)."""
    if config.tokenizer_path:
        tokenizer = load_tokenizer_file(config.tokenizer_path)
    else:
        tokenizer = default_tokenizer(config.source, config.vocab_size, split=config.text_split,
                                      eval_fraction=config.eval_fraction, cache_dir=config.cache_dir,
                                      skip_bad_input=config.skip_bad_input)
    return with_role_tokens(tokenizer) if is_chat_source(config.source) else tokenizer


class GLMDataset(PackedRows):
    """The corrupted, packed rows of one split's text windows, for one data shard."""

    def __init__(self, config: DataConfig, objective: Objective, tokenizer: Tokenizer, corpus: TokenizedCorpus,
                 shard_index: int = 0, shard_count: int = 1, windows: np.ndarray | None = None):
        super().__init__(config, tokenizer.specials.pad, shard_index, shard_count)
        self.objective, self.tokenizer, self.corpus = objective, tokenizer, corpus
        self.specials = tokenizer.specials
        objective.check_tokenizer(self.specials)  # before the first example, not inside the loader
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

    @property
    def num_items(self) -> int:
        return len(self.windows)

    epoch_windows = PackedRows.epoch_items  # items are windows here

    def no_examples_message(self) -> str:
        return (f"no document of the {corpus_name(self.config)} corpus makes a training example: every one is too "
                f"short for the objective ({self.counts}); use longer documents (e.g. DataConfig.text_split = "
                "'blank_line' instead of 'line') or an objective with shorter spans")

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

def corpus_name(config: DataConfig) -> str:
    return repr(config.source)


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
        raise ValueError(f"the {split} split of {config.source!r} is empty; {SPLIT_HINT}, so "
                         f"{'raise' if split == 'eval' else 'lower'} DataConfig.eval_fraction or add distinct documents")
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
    mine = range(process_index * per_process, (process_index + 1) * per_process)
    tokenizer = tokenizer or load_tokenizer(config)
    if is_chat_source(config.source):
        if split not in ("train", "eval"):
            raise ValueError(f"split {split!r} is unknown; use 'train' or 'eval'")
        datasets = make_chat_datasets(config, tokenizer, split, mine, shards)
    else:
        corpus = _split_corpus(config, tokenizer, split)  # read once for all of this process's shards
        datasets = []
        for s in mine:
            windows = datasets[0].windows if datasets else None
            datasets.append(GLMDataset(config, objective, tokenizer, corpus, s, shards, windows))
    batches = LocalBatches([d.iterator() for d in datasets])
    if state is not None:
        batches.set_state(state)
    return batches

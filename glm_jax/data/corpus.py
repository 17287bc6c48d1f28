"""Document sources, the train/eval split, and the on-disk token cache.

Sources (a string, so gin and the CLI can name them):
  'stdlib'               every .py file of the running Python's standard library
                         (sorted paths; site-packages excluded): the default corpus
  'text:GLOB[,GLOB]'     text files, one document per blank-line-separated block
                         (or per line with split='line')
  'jsonl:GLOB[,GLOB]'    JSON lines, one document per line from its 'text' field
  'chat:GLOB[,GLOB]'     JSON lines of conversations (glm_jax.data.chat_source reads them for
                         fine-tuning; here, their words train a tokenizer)
A document belongs to the eval split when a stable hash of its id falls below
eval_fraction. The id is a stdlib file's path under the standard library and, for every
other source, the document's own text (`content_id`): the split never changes with file
order, process count, or where the data lives and how its path is spelled ('data/x.jsonl'
and '/abs/data/x.jsonl' split alike), and copies of one document never straddle train and eval.
Tokenised corpora are cached as memory-mapped arrays keyed by the corpus
fingerprint and the tokenizer, so a second run starts instantly.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import shutil
import sys
import sysconfig
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np

from glm_jax.data.tokenizer import Tokenizer, train_tokenizer

DEFAULT_CACHE = Path(os.environ.get("GLM_JAX_CACHE", Path.home() / ".cache" / "glm_jax"))


@dataclasses.dataclass
class CorpusStats:
    """What reading a corpus skipped, so nothing is dropped without a count."""

    files: int = 0
    documents: int = 0
    skipped_non_utf8: int = 0
    skipped_empty: int = 0
    skipped_bad_json: int = 0
    examples: list = dataclasses.field(default_factory=list)  # the first few skipped inputs, 'file[:line]: why'

    def skip(self, where: str, why: str) -> None:
        if len(self.examples) < 3:
            self.examples.append(f"{where}: {why}")


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _expand(kind: str, patterns: str) -> list[Path]:
    """The files of comma-separated globs; directories a glob matches are not documents and are left out."""
    paths, missing = [], []
    for pattern in patterns.split(","):
        expanded = os.path.expanduser(pattern)
        if os.path.isdir(expanded):
            suffix = "txt" if kind == "text" else "jsonl"
            raise ValueError(f"data source {kind}:{pattern} is a directory; give a glob of its files, e.g. "
                             f"'{kind}:{pattern.rstrip('/')}/**/*.{suffix}'")
        found = [Path(p) for p in sorted(glob.glob(expanded, recursive=True)) if not os.path.isdir(p)]
        (paths.extend(found) if found else missing.append(pattern))
    if missing:
        raise FileNotFoundError(f"no files match {missing}; check the path (globs like data/*.txt work)")
    return paths


def source_files(source: str) -> list[Path]:
    """Sorted file list of a source string (see the module docstring)."""
    if source == "stdlib":
        root = stdlib_root()
        return sorted(p for p in root.rglob("*.py")
                      if not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts))
    kind, _, patterns = source.partition(":")
    if kind not in ("text", "jsonl", "chat") or not patterns:
        raise ValueError(f"data source {source!r} is not understood; use 'stdlib', 'text:GLOB', 'jsonl:GLOB' or "
                         "'chat:GLOB'")
    return _expand(kind, patterns)


SKIP_HINT = "or set DataConfig.skip_bad_input = True to skip such input (it is counted and reported)"


def read_documents(source: str, split: str = "blank_line", stats: CorpusStats | None = None,
                   skip_bad_input: bool = False) -> Iterator[tuple[str, str]]:
    """(document id, text) pairs of a source, in a stable order.

    A non-UTF-8 file, a malformed jsonl line or a record without a string 'text' field
    raises ValueError naming the file (and line) unless skip_bad_input, which counts
    them in `stats` instead. The standard library's few non-UTF-8 files are always skipped.
    """
    stats = stats if stats is not None else CorpusStats()
    kind = source.partition(":")[0]
    for path in source_files(source):
        stats.files += 1
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            if not (skip_bad_input or kind == "stdlib"):
                raise ValueError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start}); convert it "
                                 f"to UTF-8 or leave it out of the source, {SKIP_HINT}") from error
            stats.skipped_non_utf8 += 1
            stats.skip(str(path), f"not UTF-8 ({error.reason} at byte {error.start})")
            continue
        if kind == "stdlib":
            parts = [(str(path.relative_to(stdlib_root())), text)]
        elif kind == "jsonl":
            parts = list(_jsonl_documents(path, text, stats, skip_bad_input))
        elif kind == "chat":  # the words of each conversation (only a tokenizer is trained on them)
            from glm_jax.data.chat_source import conversation_text

            parts = [(content_id(line), conversation_text(line)) for line in text.splitlines()]
        elif split == "line":
            parts = [(content_id(line), line) for line in text.splitlines()]
        elif split == "blank_line":
            parts = [(content_id(block), block) for block in text.split("\n\n")]
        else:
            raise ValueError(f"text split {split!r} is unknown; use 'blank_line' or 'line'")
        for doc_id, doc in parts:
            if doc.strip():
                stats.documents += 1
                yield doc_id, doc
            else:
                stats.skipped_empty += 1


def _jsonl_documents(path: Path, text: str, stats: CorpusStats, skip_bad_input: bool):
    for i, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            problem = None
        except json.JSONDecodeError as error:
            record, problem = None, f"not valid JSON ({error.msg} at column {error.colno})"
        if problem is None and not (isinstance(record, dict) and isinstance(record.get("text"), str)):
            problem = "not a JSON object with a string 'text' field"
        if problem is None:
            yield content_id(record["text"]), record["text"]
        elif skip_bad_input:
            stats.skipped_bad_json += 1
            stats.skip(f"{path}:{i + 1}", problem)
        else:
            raise ValueError(f"{path}:{i + 1}: {problem}; fix the line, {SKIP_HINT}")


def report_skipped(source: str, stats: CorpusStats) -> None:
    """The counts and the first few examples on stderr when bad input was skipped (DataConfig.skip_bad_input)."""
    if stats.skipped_bad_json or (stats.skipped_non_utf8 and not source.startswith("stdlib")):
        examples = "".join(f"\n  {example}" for example in stats.examples)
        print(f"data source {source!r}: skipped {stats.skipped_bad_json} malformed jsonl lines and "
              f"{stats.skipped_non_utf8} non-UTF-8 files (DataConfig.skip_bad_input), e.g.:{examples}",
              file=sys.stderr)


SPLIT_HINT = ("documents are assigned to train or eval by a hash of their text (every copy of one document "
              "goes the same way)")
SPLIT_RULE = "content-v2"  # caches made under the earlier file:line ids are not reused


def content_id(text: str) -> str:
    """A document's split id: its text, hashed (see the module docstring for why not its file and line)."""
    return hashlib.sha256(text.encode()).hexdigest()


def in_eval_split(doc_id: str, eval_fraction: float) -> bool:
    """Stable hash split: the same document is always on the same side."""
    return zlib.crc32(doc_id.encode()) % 100_000 < eval_fraction * 100_000


def fingerprint(source: str, split: str) -> str:
    """Changes when any file of the source changes (path, size, mtime), or the split rule does."""
    h = hashlib.sha256(f"{source}|{split}|{SPLIT_RULE}".encode())
    for path in source_files(source):
        st = path.stat()
        h.update(f"{path}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


@dataclasses.dataclass
class TokenizedCorpus:
    """All documents of one split as one token array plus document offsets (memory-mapped)."""

    tokens: np.ndarray  # int32 [total]
    offsets: np.ndarray  # int64 [documents + 1]
    stats: dict

    @property
    def num_documents(self) -> int:
        return len(self.offsets) - 1

    def document(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]


def tokenize_corpus(source: str, tokenizer: Tokenizer, *, split: str = "blank_line", eval_fraction: float = 0.02,
                    cache_dir: str | Path = DEFAULT_CACHE, skip_bad_input: bool = False) -> dict[str, TokenizedCorpus]:
    """{'train': ..., 'eval': ...}, tokenised once and cached under cache_dir."""
    key = hashlib.sha256(f"{fingerprint(source, split)}|{eval_fraction}{'|skip' if skip_bad_input else ''}".encode()
                         + tokenizer.fingerprint).hexdigest()[:16]
    directory = Path(cache_dir).expanduser() / "tokens" / key
    if not (directory / "done.json").exists():
        _build_cache(directory, source, split, eval_fraction, tokenizer, skip_bad_input)
    stats = json.loads((directory / "done.json").read_text())
    return {name: TokenizedCorpus(np.load(directory / f"{name}_tokens.npy", mmap_mode="r"),
                                  np.load(directory / f"{name}_offsets.npy"), stats)
            for name in ("train", "eval")}


def _build_cache(directory: Path, source: str, split: str, eval_fraction: float, tokenizer: Tokenizer,
                 skip_bad_input: bool):
    stats = CorpusStats()
    texts = {"train": [], "eval": []}
    for doc_id, text in read_documents(source, split, stats, skip_bad_input):
        texts["eval" if in_eval_split(doc_id, eval_fraction) else "train"].append(text)
    report_skipped(source, stats)
    if not texts["train"]:
        raise ValueError(f"data source {source!r} has no training documents ({stats}); point it at "
                         "non-empty UTF-8 files")
    tmp = directory.with_name(directory.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    for name, docs in texts.items():
        ids = tokenizer.encode_batch(docs) if docs else []
        lengths = np.asarray([len(x) for x in ids], np.int64)
        np.save(tmp / f"{name}_tokens.npy", np.concatenate(ids).astype(np.int32) if ids else np.zeros(0, np.int32))
        np.save(tmp / f"{name}_offsets.npy", np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
    (tmp / "done.json").write_text(json.dumps({**dataclasses.asdict(stats), "source": source,
                                               "eval_documents": len(texts["eval"]),
                                               "train_documents": len(texts["train"])}))
    if directory.exists():  # another process finished first: keep its copy
        shutil.rmtree(tmp)
        return
    os.replace(tmp, directory)  # atomic: readers see a complete cache or none


def default_tokenizer(source: str, vocab_size: int, *, split: str = "blank_line", eval_fraction: float = 0.02,
                      cache_dir: str | Path = DEFAULT_CACHE, max_chars: int = 8_000_000,
                      skip_bad_input: bool = False) -> Tokenizer:
    """A tokenizer trained on (a stable sample of) the source's train split, cached."""
    key = f"{fingerprint(source, split)}-{eval_fraction}-{vocab_size}{'-skip' if skip_bad_input else ''}"
    path = Path(cache_dir).expanduser() / "tokenizers" / f"{key}.model"
    if path.exists():
        return Tokenizer.load(path)
    train = [(doc_id, text) for doc_id, text in read_documents(source, split, skip_bad_input=skip_bad_input)
             if not in_eval_split(doc_id, eval_fraction)]
    if not train:
        raise ValueError(f"data source {source!r} has no training documents to train a tokenizer on")
    # A stable quarter of the documents (all of them for a small corpus), up to max_chars.
    sample = [t for doc_id, t in train if zlib.crc32(doc_id.encode()) % 4 == 0] or [t for _, t in train]
    texts, total = [], 0
    for text in sample:
        if total > max_chars:
            break
        texts.append(text)
        total += len(text)
    tokenizer = train_tokenizer(texts, vocab_size)
    tokenizer.save(path)
    return tokenizer

"""GLM blank-infilling objectives: pure numpy functions of (document, rng).

The algorithm is the THUDM/GLM reference (docs/glm_objective.md):
spans are chosen, Part A is the document with each span replaced by one mask
token, Part B is the spans in shuffled order as `<sop> + span` -> `span + <eop>`,
with 2D positions and targets aligned to inputs (no shift).

Modes: 'token' ([MASK], Poisson spans), 'sentence' ([sMASK], whole sentences),
'document' ([gMASK], one long span: suffix form or anywhere), 'causal' (plain LM,
no prefix). Leading and trailing special tokens of a document ([CLS], <eos>) are
never inside a span. A document too short for its objective raises
`DocumentTooShort`, which the pipeline counts.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from glm_jax.data.tokenizer import SpecialTokens

INFILL_MODES = ("token", "sentence", "document")
MODES = (*INFILL_MODES, "causal")


class DocumentTooShort(ValueError):
    """The document cannot hold the objective's spans (the pipeline counts and skips it)."""


# --------------------------------------------------------------------------- core
def build_infill_example(doc: np.ndarray, spans: list[tuple[int, int]], order: np.ndarray,
                         mask_id: int, specials: SpecialTokens, end_with_eop: bool = True) -> dict:
    """Part A / Part B example from explicit spans (sorted, half-open) and a Part-B order.

    Part A: doc with every span replaced by ONE mask_id; positions arange(sep).
    Part B: for span i in `order`, inputs <sop> + span, targets span + <eop>; every
    token has the position of span i's mask and block positions 1..len+1.
    """
    pieces, mask_positions, cursor, length = [], [], 0, 0
    for start, end in spans:
        pieces += [doc[cursor:start], np.asarray([mask_id], doc.dtype)]
        length += start - cursor
        mask_positions.append(length)  # the mask's index in Part A
        length += 1
        cursor = end
    pieces.append(doc[cursor:])
    part_a = np.concatenate(pieces)
    sep = len(part_a)

    b_inputs, b_targets, b_pos, b_block = [], [], [], []
    for i in order:
        start, end = spans[i]
        span = doc[start:end]
        b_inputs.append(np.concatenate([[specials.sop], span]))
        b_targets.append(np.concatenate([span, [specials.eop]]) if end_with_eop else span)
        b_pos.append(np.full(len(span) + 1, mask_positions[i]))
        b_block.append(np.arange(1, len(span) + 2))
    tokens = np.concatenate([part_a, *b_inputs]).astype(np.int32)
    targets = np.concatenate([part_a, *b_targets]).astype(np.int32)
    positions = np.stack([np.concatenate([np.arange(sep), *b_pos]),
                          np.concatenate([np.zeros(sep, np.int64), *b_block])]).astype(np.int32)
    loss_mask = np.concatenate([np.zeros(sep), np.ones(len(tokens) - sep)]).astype(np.float32)
    return dict(tokens=tokens, targets=targets, loss_mask=loss_mask, positions=positions, sep=sep)


def replace_with_dblock(example: dict, rng: np.random.Generator, fraction: float, dblock_id: int) -> dict:
    """GLM-10B's [dBLOCK] corruption: each Part-B span token *input* becomes [dBLOCK] with probability
    `fraction`, independently (the reference's block_mask_prob, its 'bert' task only).

    Never replaced: Part A, and the <sop> that opens each span (block position 1). Targets are
    unchanged, so the model still predicts every span token, now without always seeing the one before.
    """
    tokens, sep = example["tokens"].copy(), example["sep"]
    span_inputs = np.flatnonzero((np.arange(len(tokens)) >= sep) & (example["positions"][1] >= 2))
    replaced = span_inputs[rng.random(len(span_inputs)) < fraction]
    tokens[replaced] = dblock_id
    return {**example, "tokens": tokens}


def interior(doc: np.ndarray, specials: SpecialTokens) -> tuple[int, int]:
    """[start, end) of the document without its leading / trailing special tokens."""
    is_special = np.isin(doc, specials.all_ids)
    start, end = 0, len(doc)
    while start < end and is_special[start]:
        start += 1
    while end > start and is_special[end - 1]:
        end -= 1
    return start, end


def truncated_poisson(lam: float, max_span: int) -> np.ndarray:
    """P(k) for k = 1..max_span of a Poisson(lam) with 0 excluded, renormalised."""
    k = np.arange(1, max_span + 1)
    log_pmf = k * math.log(lam) - lam - np.array([math.lgamma(i + 1) for i in k])
    pmf = np.exp(log_pmf)
    return pmf / pmf.sum()


# ---------------------------------------------------------------- span choosers
def token_spans(n: int, rng: np.random.Generator, ratio: float, lam: float, max_span: int,
                tries: int = 10) -> list[tuple[int, int]]:
    """Poisson span lengths until >= int(ratio * n) tokens (at least 1), placed uniformly
    over [0, n) with at least one unmasked token between two spans (sample_spans)."""
    target = max(1, int(ratio * n))
    probs = truncated_poisson(lam, max_span)
    for _ in range(tries):
        draws = rng.choice(np.arange(1, max_span + 1), size=target, p=probs)  # `target` draws always suffice
        count = int(np.searchsorted(np.cumsum(draws), target)) + 1
        lengths = draws[:count]
        free = n - int(lengths.sum()) - count + 1  # slots for the gaps
        if free >= 0:
            places = np.sort(rng.integers(0, free + 1, size=count))
            starts = places + np.concatenate([[0], np.cumsum(lengths[:-1] + 1)])
            return [(int(s), int(s + l)) for s, l in zip(starts, lengths)]
    raise DocumentTooShort(f"{n} tokens cannot hold {ratio:.0%} masked spans")


def sentence_spans(doc_interior: np.ndarray, rng: np.random.Generator, ratio: float,
                   sentence_end: np.ndarray) -> list[tuple[int, int]]:
    """Whole sentences, in random order, until >= int(ratio * n) tokens are covered."""
    n = len(doc_interior)
    ends = np.flatnonzero(sentence_end[doc_interior]) + 1
    bounds = np.unique(np.concatenate([[0], ends, [n]]))
    sentences = list(zip(bounds[:-1], bounds[1:]))
    if len(sentences) < 2:
        raise DocumentTooShort(f"{len(sentences)} sentence(s): sentence infilling needs at least 2")
    target, covered, chosen = max(1, int(ratio * n)), 0, []
    for i in rng.permutation(len(sentences)):
        chosen.append(sentences[i])
        covered += sentences[i][1] - sentences[i][0]
        if covered >= target:
            break
    if covered >= n:  # every sentence masked: no Part A context left
        chosen.pop()
    return sorted((int(s), int(e)) for s, e in chosen)


def gmask_length(n: int, rng: np.random.Generator, ratio_min: float) -> int:
    """Span length uniform over [ceil(ratio_min * n), n - 2]."""
    low, high = max(1, math.ceil(ratio_min * n)), n - 2
    if high < low:
        raise DocumentTooShort(f"{n} tokens cannot hold a [gMASK] span of >= {ratio_min:.0%} and keep 2")
    return int(rng.integers(low, high + 1))


# ------------------------------------------------------------------- objectives
def document_suffix(doc: np.ndarray, g: int, specials: SpecialTokens) -> dict:
    """Suffix [gMASK]: tokens x[:d] + [gMASK, <sop>] + x[d:-1], targets x[:d] + [gMASK] + x[d:]."""
    d = len(doc) - g
    tokens = np.concatenate([doc[:d], [specials.gmask, specials.sop], doc[d:-1]]).astype(np.int32)
    targets = np.concatenate([doc[:d], [specials.gmask], doc[d:]]).astype(np.int32)
    positions = np.stack([np.concatenate([np.arange(d), np.full(g + 1, d)]),
                          np.concatenate([np.zeros(d + 1, np.int64), np.arange(1, g + 1)])]).astype(np.int32)
    loss_mask = np.concatenate([np.zeros(d + 1), np.ones(g)]).astype(np.float32)
    return dict(tokens=tokens, targets=targets, loss_mask=loss_mask, positions=positions, sep=d + 1)


def causal(doc: np.ndarray) -> dict:
    """Plain next-token LM (ChatGLM2 / GLM-4 pretraining): no prefix, targets = doc[1:]."""
    L = len(doc) - 1
    if L < 1:
        raise DocumentTooShort("a causal example needs at least 2 tokens")
    positions = np.stack([np.arange(L), np.zeros(L, np.int64)]).astype(np.int32)
    return dict(tokens=doc[:-1].astype(np.int32), targets=doc[1:].astype(np.int32),
                loss_mask=np.ones(L, np.float32), positions=positions, sep=0)


def blank_infill(doc: np.ndarray, rng: np.random.Generator, specials: SpecialTokens, mode: str, *,
                 mask_ratio: float = 0.15, span_lambda: float = 3.0, max_span: int = 39,
                 sentence_end: np.ndarray | None = None, gmask_ratio_min: float = 0.5,
                 gpt_infill_prob: float = 0.5, dblock_fraction: float = 0.0) -> dict:
    """One GLM blank-infilling example from one document (the contract of docs/design.md).

    Args:
      doc: 1-D int token array (may start with [CLS] and end with <eos>).
      rng: the only randomness source.
      specials: GLM special token ids.
      mode: 'token' ([MASK] spans) | 'sentence' ([sMASK]) | 'document' ([gMASK]).
      mask_ratio: fraction of tokens masked in 'token' / 'sentence' modes (0.15).
      span_lambda, max_span: truncated Poisson(3) over 1..39 span lengths.
      sentence_end: bool[vocab] table (Tokenizer.sentence_end), needed by 'sentence'.
      gmask_ratio_min: min [gMASK] span fraction (paper 0.5; GLM-10B 0.25).
      gpt_infill_prob: in 'document' mode, the chance of the single long span being
        placed anywhere (ending with <eop>) instead of as the suffix.
      dblock_fraction: in 'token' mode, the chance that each Part-B span input is replaced by
        [dBLOCK] (GLM-10B: 0.1; replace_with_dblock). Drawn after everything else, so 0 leaves
        every example as it was.
    Returns:
      dict(tokens, targets, loss_mask, positions [2, L'], sep) for one example.
    """
    doc = np.asarray(doc, np.int32)
    start, end = interior(doc, specials)
    n = end - start
    if mode == "token":
        spans = token_spans(n, rng, mask_ratio, span_lambda, max_span)
        mask_id, eop = specials.mask, True
    elif mode == "sentence":
        if sentence_end is None:
            raise ValueError("mode 'sentence' needs sentence_end (the tokenizer's sentence_end table)")
        spans = sentence_spans(doc[start:end], rng, mask_ratio, sentence_end)
        mask_id, eop = specials.smask, True
    elif mode == "document":
        if rng.random() >= gpt_infill_prob:
            return document_suffix(doc, gmask_length(len(doc), rng, gmask_ratio_min), specials)
        g = gmask_length(n, rng, gmask_ratio_min)
        offset = int(rng.integers(0, n - g + 1))
        spans, mask_id, eop = [(offset, offset + g)], specials.gmask, True
    else:
        hint = "; a causal LM example is make_example(..., mode='causal')" if mode == "causal" else ""
        raise ValueError(f"blank-infilling mode {mode!r} is unknown; use one of {INFILL_MODES}{hint}")
    spans = [(s + start, e + start) for s, e in spans]
    example = build_infill_example(doc, spans, rng.permutation(len(spans)), mask_id, specials, eop)
    if mode == "token" and dblock_fraction > 0:
        if specials.dblock is None:
            raise ValueError(f"Objective.dblock_fraction = {dblock_fraction} needs a [dBLOCK] token and this "
                             "tokenizer has none (e.g. a ChatGLM tokenizer); set Objective.dblock_fraction = 0.0")
        example = replace_with_dblock(example, rng, dblock_fraction, specials.dblock)
    return example


def make_example(doc: np.ndarray, rng: np.random.Generator, specials: SpecialTokens, mode: str, **options) -> dict:
    """One training example of any mode: blank infilling (token / sentence / document) or 'causal' LM."""
    if mode == "causal":
        return causal(np.asarray(doc, np.int32))
    if mode not in MODES:
        raise ValueError(f"objective mode {mode!r} is unknown; use one of {MODES}")
    return blank_infill(doc, rng, specials, mode, **options)


# ---------------------------------------------------------------------- mixture
@dataclasses.dataclass(frozen=True)
class Objective:
    """A per-example mixture of modes and the options of make_example / blank_infill.

    One mode is drawn per example (the reference draws one per batch); per example
    keeps every example a pure function of its own seed, which makes sharding and
    resumption exact, and gives the same mixture in expectation.
    """

    token: float = 1.0
    sentence: float = 0.0
    document: float = 0.0
    causal: float = 0.0
    mask_ratio: float = 0.15
    span_lambda: float = 3.0
    max_span: int = 39
    gmask_ratio_min: float = 0.5
    gpt_infill_prob: float = 0.5
    dblock_fraction: float = 0.0

    def __post_init__(self):
        probs = self.probabilities
        if min(probs) < 0 or not math.isclose(sum(probs), 1.0, abs_tol=1e-6):
            raise ValueError(f"Objective mode probabilities {dict(zip(MODES, probs))} must be >= 0 and sum to 1")
        if not 0 < self.mask_ratio < 1:
            raise ValueError(f"Objective.mask_ratio {self.mask_ratio} must be in (0, 1)")
        if not 0 < self.gmask_ratio_min < 1:
            raise ValueError(f"Objective.gmask_ratio_min {self.gmask_ratio_min} must be in (0, 1)")
        if not 0 <= self.dblock_fraction < 1:
            raise ValueError(f"Objective.dblock_fraction {self.dblock_fraction} must be in [0, 1) (GLM-10B: 0.1)")

    @property
    def probabilities(self) -> tuple[float, ...]:
        return (self.token, self.sentence, self.document, self.causal)

    def options(self) -> dict:
        return dict(mask_ratio=self.mask_ratio, span_lambda=self.span_lambda, max_span=self.max_span,
                    gmask_ratio_min=self.gmask_ratio_min, gpt_infill_prob=self.gpt_infill_prob,
                    dblock_fraction=self.dblock_fraction)

    @property
    def expected_expansion(self) -> float:
        """Expected example length / window length, used to size windows.

        token: L + 2n with n = mask_ratio * L / mean span; sentence: spans are whole
        sentences (~10 pieces in code and prose); document, causal: about 1.
        """
        mean_span = float(np.sum(np.arange(1, self.max_span + 1) * truncated_poisson(self.span_lambda, self.max_span)))
        per_mode = (1 + 2 * self.mask_ratio / mean_span, 1 + 2 * self.mask_ratio / 10, 1.0, 1.0)
        return float(np.dot(self.probabilities, per_mode))

    def check_tokenizer(self, specials: SpecialTokens) -> None:
        """Refuses a mixture that needs a special token the tokenizer lacks."""
        if self.token > 0 and self.dblock_fraction > 0 and specials.dblock is None:
            raise ValueError(f"Objective.dblock_fraction = {self.dblock_fraction} needs a [dBLOCK] token and this "
                             "tokenizer has none (e.g. a ChatGLM tokenizer); set Objective.dblock_fraction = 0.0")

    def sample_mode(self, rng: np.random.Generator) -> str:
        return MODES[int(rng.choice(len(MODES), p=np.asarray(self.probabilities)))]

    def __call__(self, doc, rng, specials, sentence_end=None) -> dict:
        mode = self.sample_mode(rng)
        example = make_example(doc, rng, specials, mode, sentence_end=sentence_end, **self.options())
        return {**example, "mode": mode}

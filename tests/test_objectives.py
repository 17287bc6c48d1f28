"""GLM objectives: the golden examples of glm_objective.md, hypothesis properties, statistics."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from glm_jax.data import objectives
from glm_jax.data.tokenizer import SpecialTokens

SPECIALS = SpecialTokens(pad=1, eos=2, cls=3, mask=4, smask=5, gmask=6, sop=7, eop=8, dblock=9)
M, S, E, G = SPECIALS.mask, SPECIALS.sop, SPECIALS.eop, SPECIALS.gmask
FIRST_WORD = 20  # ordinary tokens are >= 20
SENTENCE_END = np.zeros(100, bool)
SENTENCE_END[20:25] = True  # tokens 20..24 end a sentence


def test_golden_token_example():
    x = np.arange(100, 107)  # x0..x6
    ex = objectives.build_infill_example(x, [(2, 3), (4, 6)], np.array([1, 0]), M, SPECIALS)
    x0, x1, x2, x3, x4, x5, x6 = x
    assert ex["tokens"].tolist() == [x0, x1, M, x3, M, x6, S, x4, x5, S, x2]
    assert ex["targets"].tolist() == [x0, x1, M, x3, M, x6, x4, x5, E, x2, E]
    assert ex["loss_mask"].tolist() == [0] * 6 + [1] * 5
    assert ex["positions"][0].tolist() == [0, 1, 2, 3, 4, 5, 4, 4, 4, 2, 2]
    assert ex["positions"][1].tolist() == [0, 0, 0, 0, 0, 0, 1, 2, 3, 1, 2]
    assert ex["sep"] == 6


def test_golden_gmask_example():
    C, a, b, c, d, e = SPECIALS.cls, 30, 31, 32, 33, 34
    ex = objectives.document_suffix(np.array([C, a, b, c, d, e]), 3, SPECIALS)
    assert ex["tokens"].tolist() == [C, a, b, G, S, c, d]
    assert ex["targets"].tolist() == [C, a, b, G, c, d, e]
    assert ex["positions"][0].tolist() == [0, 1, 2, 3, 3, 3, 3]
    assert ex["positions"][1].tolist() == [0, 0, 0, 0, 1, 2, 3]
    assert ex["loss_mask"].tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert ex["sep"] == 4


def part_b_spans(ex):
    """[(mask position, span tokens, block ids, position ids)] read back from Part B."""
    sep, tokens = ex["sep"], ex["tokens"]
    starts = [i for i in range(sep, len(tokens)) if tokens[i] == S]
    ends = starts[1:] + [len(tokens)]
    return [(int(ex["positions"][0, s]), ex["targets"][s:e - 1], ex["positions"][1, s:e], ex["positions"][0, s:e])
            for s, e in zip(starts, ends)]


def reinsert(ex, mask_id):
    part_a = list(ex["tokens"][:ex["sep"]])
    spans = dict((pos, span) for pos, span, _, _ in part_b_spans(ex))
    out = []
    for i, t in enumerate(part_a):
        out.extend(spans[i].tolist() if t == mask_id and i in spans else [t])
    return out


documents = st.builds(
    lambda body, cls, eos: np.array(([SPECIALS.cls] if cls else []) + body + ([SPECIALS.eos] if eos else [])),
    st.lists(st.integers(FIRST_WORD, 99), min_size=8, max_size=300), st.booleans(), st.booleans())


@settings(max_examples=150, deadline=None)
@given(doc=documents, seed=st.integers(0, 2 ** 32 - 1))
def test_token_infilling_invariants(doc, seed):
    try:
        ex = objectives.blank_infill(doc, np.random.default_rng(seed), SPECIALS, "token")
    except objectives.DocumentTooShort:
        return
    spans = part_b_spans(ex)
    n, L, lengths = len(spans), len(doc), [len(s) for _, s, _, _ in spans]
    assert len(ex["tokens"]) == L + 2 * n
    assert ex["sep"] == L - sum(lengths) + n
    assert ex["positions"][0, :ex["sep"]].tolist() == list(range(ex["sep"]))
    assert not ex["positions"][1, :ex["sep"]].any() and not ex["loss_mask"][:ex["sep"]].any()
    for _, span, block, pos in spans:
        assert block.tolist() == list(range(1, len(span) + 2)) and len(set(pos.tolist())) == 1
        assert not np.isin(span, SPECIALS.all_ids).any()  # no special token inside a span
    assert reinsert(ex, M) == doc.tolist()
    mask_positions = sorted(p for p, _, _, _ in spans)
    assert all(b - a >= 2 for a, b in zip(mask_positions, mask_positions[1:]))  # spans never touch
    interior = len(doc) - np.isin(doc, SPECIALS.all_ids).sum()
    target = max(1, int(0.15 * interior))
    assert target <= sum(lengths) < target + 39
    np.testing.assert_array_equal(ex["targets"][ex["sep"]:][np.array([len(s) for _, s, _, _ in spans]).cumsum()
                                                             + np.arange(n)], E)


@settings(max_examples=100, deadline=None)
@given(doc=documents, seed=st.integers(0, 2 ** 32 - 1), ratio=st.sampled_from([0.25, 0.5]))
def test_document_infilling_invariants(doc, seed, ratio):
    try:
        ex = objectives.blank_infill(doc, np.random.default_rng(seed), SPECIALS, "document",
                                     gmask_ratio_min=ratio)
    except objectives.DocumentTooShort:
        return
    if ex["targets"][-1] == E:  # the anywhere form: one span ending with <eop>
        (_, span, block, _), = part_b_spans(ex)
        n = len(doc) - np.isin(doc, SPECIALS.all_ids).sum()
        g = len(span)
        assert reinsert(ex, G) == doc.tolist()
    else:  # the suffix form
        n, g = len(doc), int(ex["loss_mask"].sum())
        assert ex["targets"].tolist() == doc[:ex["sep"] - 1].tolist() + [G] + doc[ex["sep"] - 1:].tolist()
        assert ex["positions"][0, ex["sep"]:].tolist() == [ex["sep"] - 1] * g
    assert math.ceil(ratio * n) <= g <= n - 2


@settings(max_examples=100, deadline=None)
@given(doc=documents, seed=st.integers(0, 2 ** 32 - 1))
def test_sentence_infilling_invariants(doc, seed):
    try:
        ex = objectives.blank_infill(doc, np.random.default_rng(seed), SPECIALS, "sentence",
                                     sentence_end=SENTENCE_END)
    except objectives.DocumentTooShort:
        return
    assert reinsert(ex, SPECIALS.smask) == doc.tolist()
    for _, span, _, _ in part_b_spans(ex):
        inner_ends = SENTENCE_END[span[:-1]]
        assert not inner_ends.any()  # a span is one whole sentence: no sentence end inside


def test_causal_mode():
    doc = np.arange(20, 30)
    ex = objectives.make_example(doc, np.random.default_rng(0), SPECIALS, "causal")
    assert ex["tokens"].tolist() == doc[:-1].tolist() and ex["targets"].tolist() == doc[1:].tolist()
    assert ex["sep"] == 0 and ex["loss_mask"].all()


def test_span_lengths_follow_truncated_poisson():
    probs = objectives.truncated_poisson(3.0, 39)
    expected_mean = float(np.sum(np.arange(1, 40) * probs))
    # Independently: Poisson(3) pmf renormalised over 1..39.
    pmf = np.array([math.exp(-3) * 3 ** k / math.factorial(k) for k in range(1, 40)])
    assert expected_mean == pytest.approx(float(np.sum(np.arange(1, 40) * pmf / pmf.sum())), rel=1e-12)
    rng = np.random.default_rng(0)
    lengths = [e - s for _ in range(10_000) for s, e in objectives.token_spans(1000, rng, 0.15, 3.0, 39)]
    assert np.mean(lengths) == pytest.approx(expected_mean, rel=0.02)


def test_span_starts_are_uniform_over_positions():
    rng = np.random.default_rng(1)
    n = 400
    starts = np.zeros(n)
    for _ in range(10_000):
        for s, _ in objectives.token_spans(n, rng, 0.15, 3.0, 39):
            starts[s] += 1
    # Chi-square over 10 bins. The last few positions are trimmed (a span of length
    # l cannot start in the last l - 1 slots) and the first as many for symmetry.
    counts = starts[10:-10].reshape(10, -1).sum(1)
    assert stats.chisquare(counts).pvalue > 0.001, counts
    assert stats.chisquare(starts[:n - n % 10].reshape(10, -1).sum(1)).pvalue < 0.001  # the test has power


def test_mixture_frequencies_match_configuration():
    mix = objectives.Objective(token=0.5, sentence=0.3, document=0.2)
    rng = np.random.default_rng(2)
    modes = [mix.sample_mode(rng) for _ in range(10_000)]
    for mode, p in (("token", 0.5), ("sentence", 0.3), ("document", 0.2)):
        assert modes.count(mode) / len(modes) == pytest.approx(p, abs=0.02)


def test_bad_objective_configuration_is_explained():
    with pytest.raises(ValueError, match="sum to 1"):
        objectives.Objective(token=0.5, sentence=0.3)
    with pytest.raises(ValueError, match="sentence_end"):
        objectives.blank_infill(np.arange(20, 60), np.random.default_rng(0), SPECIALS, "sentence")
    with pytest.raises(ValueError, match="unknown"):
        objectives.blank_infill(np.arange(20, 60), np.random.default_rng(0), SPECIALS, "span")
    with pytest.raises(objectives.DocumentTooShort):
        objectives.blank_infill(np.array([3, 20, 2]), np.random.default_rng(0), SPECIALS, "document")


# ----------------------------------------------------------------- [dBLOCK] (GLM-10B)
@settings(max_examples=100, deadline=None)
@given(doc=documents, seed=st.integers(0, 2 ** 32 - 1))
def test_dblock_replaces_only_span_inputs_and_leaves_targets(doc, seed):
    try:
        plain = objectives.blank_infill(doc, np.random.default_rng(seed), SPECIALS, "token")
    except objectives.DocumentTooShort:
        return
    ex = objectives.blank_infill(doc, np.random.default_rng(seed), SPECIALS, "token", dblock_fraction=0.5)
    for key in ("targets", "loss_mask", "positions"):  # the same example apart from its inputs
        np.testing.assert_array_equal(ex[key], plain[key])
    assert ex["sep"] == plain["sep"]
    changed = np.flatnonzero(ex["tokens"] != plain["tokens"])
    assert (ex["tokens"][changed] == SPECIALS.dblock).all()
    # The reference rule: only Part-B inputs that are span tokens, i.e. the previous position's
    # target within the same span; never Part A, never the <sop> that opens a span.
    assert (changed >= ex["sep"]).all() and (ex["positions"][1, changed] >= 2).all()
    np.testing.assert_array_equal(plain["tokens"][changed], plain["targets"][changed - 1])
    span_openers = (np.arange(len(ex["tokens"])) >= ex["sep"]) & (ex["positions"][1] == 1)
    assert (ex["tokens"][span_openers] == S).all()


def test_dblock_fraction_is_the_replaced_share_of_span_inputs():
    rng = np.random.default_rng(5)
    replaced = candidates = 0
    for _ in range(400):
        doc = rng.integers(FIRST_WORD, 100, size=200)
        ex = objectives.blank_infill(doc, rng, SPECIALS, "token", dblock_fraction=0.1)
        part_b = np.arange(len(ex["tokens"])) >= ex["sep"]
        candidates += int((part_b & (ex["positions"][1] >= 2)).sum())
        replaced += int((ex["tokens"] == SPECIALS.dblock).sum())
    assert candidates > 5000
    assert stats.binomtest(replaced, candidates, 0.1).pvalue > 0.001, (replaced, candidates)


def test_dblock_leaves_sentence_and_document_examples_alone():
    doc = np.concatenate([[SPECIALS.cls], np.tile(np.arange(20, 40), 6), [SPECIALS.eos]])
    for mode in ("sentence", "document"):
        for seed in range(20):
            plain = objectives.blank_infill(doc, np.random.default_rng(seed), SPECIALS, mode, sentence_end=SENTENCE_END)
            ex = objectives.blank_infill(doc, np.random.default_rng(seed), SPECIALS, mode, sentence_end=SENTENCE_END,
                                         dblock_fraction=0.9)
            np.testing.assert_array_equal(ex["tokens"], plain["tokens"])


def test_glm_10b_preset_sets_dblock_and_bad_settings_are_explained():
    from glm_jax import experiment

    (objective,) = experiment.read(["objectives/glm_10b.gin"], [], "Objective")
    assert objective.dblock_fraction == 0.1 and objective.token == 0.5
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match=r"dblock_fraction .* must be in \[0, 1\)"):
            objectives.Objective(dblock_fraction=bad)
    no_dblock = SpecialTokens(pad=1, eos=2, cls=3, mask=4, smask=5, gmask=6, sop=7, eop=8, dblock=None)
    with pytest.raises(ValueError, match=r"needs a \[dBLOCK\] token.*has none.*dblock_fraction = 0.0"):
        objective.check_tokenizer(no_dblock)
    with pytest.raises(ValueError, match="dblock_fraction = 0.0"):
        objectives.blank_infill(np.arange(20, 80), np.random.default_rng(0), no_dblock, "token", dblock_fraction=0.1)
    objectives.Objective(token=0.0, document=1.0, dblock_fraction=0.1).check_tokenizer(no_dblock)  # never used

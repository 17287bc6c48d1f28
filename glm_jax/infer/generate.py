"""KV-cache generation: one prefill pass, then a compiled while_loop of one-token steps.

    generator = Generator(config, params, tokenizer.specials)
    out = generator.generate(make_prompt_batch(prompts, specials, 'blank'), 'blank', max_new_tokens=32,
                             sampling=SamplingConfig(), seed=0)

Prefill runs the whole prompt through the training attention (GLM mask,
bidirectional context; flash kernel on GPU/TPU) and fills the context part of
the cache. Each decode step feeds one token per row at the next slot of the
generated part and attends over both parts under the same mask rule; only the
generated part is loop state (glm_jax/infer/cache.py says why). The loop is compiled once per (batch,
prompt bucket, mask bucket, max_new_tokens, mode): prompt lengths inside a
bucket and every sampling knob are traced values.

Causal rows can stop at more tokens (`stop_ids`: a chat reply ends at <|user|>
or <|observation|>), and `stream` hands every token to the host as the loop
makes it (an ordered host callback; the chat command prints replies with it).

Blank mode (GLM): rows start from <sop> at their first mask's position with
block position 1; when a row emits <eop> it moves to its next mask (fresh
<sop>, block position 1) and it stops after its last mask, on <eos>, or at
max_new_tokens. Causal mode: the first token comes from the prefill logits at
the prompt's last position; positions keep counting; stop on <eos> / <eop>.
"""

from __future__ import annotations

import contextlib
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from glm_jax.data.tokenizer import SpecialTokens, Tokenizer
from glm_jax.infer import prompts as prompt_lib
from glm_jax.infer.cache import init_cache, merge_context, split_context
from glm_jax.infer.sampling import SamplingConfig, sample
from glm_jax.model import GLM, ModelConfig, quantize_params
from glm_jax.model.scan_layout import unscan_params


class Generator:
    """A model, its parameters and the compiled generation programs."""

    def __init__(self, config: ModelConfig, params, specials: SpecialTokens, *, mesh=None, rules=(),
                 cache_dtype=None, token_limit: int | None = None, quant_bits: int | None = None,
                 quant_group_size: int | None = None):
        """token_limit: sample only ids below it (the tokenizer's size, when the model's embedding
        table is padded beyond it, as THUDM's are): an id the tokenizer lacks is never produced.
        quant_bits 8 | 4 (and quant_group_size): quantize float parameters' projections on the way
        in (glm_jax.model.quantization), as `glm_jax convert quantize` does to a run."""
        # Decoding never needs rematerialisation (no backward pass), and runs the layers
        # unscanned: a scanned stack rewrites its stacked cache every token (model/scan_layout.py).
        self.config = config.replace(remat_policy="none", scan_layers=False)
        self.params = unscan_params(params, config.num_layers)
        if quant_bits is not None:
            self.config, self.params = _quantized(self.config, self.params, quant_bits, quant_group_size)
        self.specials = specials
        self.mesh, self.rules = mesh, rules
        self.cache_dtype = cache_dtype
        self.token_limit = token_limit if token_limit is not None and token_limit < config.vocab_size else None
        self._compiled = {}

    def generate(self, batch: dict, mode: str, max_new_tokens: int,
                 sampling: SamplingConfig = SamplingConfig(), seed: int = 0, record_logits: bool = False,
                 ignore_stop: bool = False, stop_ids: tuple[int, ...] = (), stream=None) -> dict:
        """Runs prefill + decode on a batch from make_prompt_batch(..., mode).

        Returns numpy {'tokens': [B, max_new_tokens] (pad id after each row's end),
        'num_tokens': [B]}; blank-mode tokens include the <eop> closing each span.
        record_logits adds 'logits' [B, max_new_tokens, vocab]: the logits each
        token was sampled from (for tests and scoring; costs B x N x V floats).
        ignore_stop decodes exactly max_new_tokens per row (benchmarks): <eop>
        still moves a blank-mode row to its next mask, but nothing ends a row.
        stop_ids: more tokens that end a causal row (a chat reply ends at <|user|> /
        <|observation|>). stream: called as stream(step, tokens [B], live [B]) with each
        token as the loop produces it (the program has a host callback; compiled once
        for all stream functions).
        """
        if mode not in prompt_lib.MODES:
            raise ValueError(f"generation mode {mode!r} is unknown; use one of {prompt_lib.MODES}")
        self._check_lengths(batch, max_new_tokens, mode)
        inputs = {k: jnp.asarray(v) for k, v in batch.items()}
        program = self._program(mode, max_new_tokens, record_logits, ignore_stop, tuple(stop_ids), stream is not None)
        with _maybe_mesh(self.mesh, self.rules), _streaming_to(stream):
            out = program(self.params, inputs, jax.random.key(seed), sampling.as_arrays())
            out = {k: np.asarray(v) for k, v in out.items()}
            if stream is not None:
                jax.effects_barrier()  # every token has reached the stream before the call returns
        return out

    def lower(self, batch: dict, mode: str, max_new_tokens: int):
        """The generation program lowered for `batch` (arrays or jax.ShapeDtypeStructs, e.g. with
        shardings) without running it: .compile().memory_analysis() says what decoding needs."""
        program = self._program(mode, max_new_tokens, False, False)
        key, sampling = jax.eval_shape(lambda: (jax.random.key(0), SamplingConfig().as_arrays()))
        if self.mesh is not None:  # replicated, on the mesh's devices (which may be a described TPU pod)
            replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
            key, sampling = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                                         (key, sampling))
        with _maybe_mesh(self.mesh, self.rules):
            return program.lower(self.params, batch, key, sampling)

    def compilations(self) -> int:
        """How many programs have been compiled (for the no-recompilation tests)."""
        return sum(fn._cache_size() for fn in self._compiled.values())

    # ------------------------------------------------------------------ internals
    def _program(self, mode: str, max_new_tokens: int, record_logits: bool, ignore_stop: bool,
                 stop_ids: tuple[int, ...] = (), stream: bool = False):
        key = (mode, max_new_tokens, record_logits, ignore_stop, stop_ids, stream)
        if key not in self._compiled:
            self._compiled[key] = jax.jit(functools.partial(
                _generate, model=GLM(self.config), config=self.config, specials=self.specials, mode=mode,
                max_new_tokens=max_new_tokens, cache_dtype=self.cache_dtype, record_logits=record_logits,
                ignore_stop=ignore_stop, stops=(specials_stops(self.specials) + stop_ids), stream=stream,
                token_limit=self.token_limit))
        return self._compiled[key]

    def _check_lengths(self, batch: dict, max_new_tokens: int, mode: str):
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens is {max_new_tokens}; ask for at least 1")
        if self.config.position != "learned_2d":
            return
        limit, P = self.config.max_position, batch["tokens"].shape[1]
        longest = P + max_new_tokens if mode == "causal" else max(P, max_new_tokens + 2)
        if longest > limit:
            raise ValueError(f"prompt bucket {P} + max_new_tokens {max_new_tokens} needs position ids up to "
                             f"{longest} but the model's learned position tables have max_position={limit}; "
                             "shorten the prompt or max_new_tokens")


def _quantized(config: ModelConfig, params, bits: int, group_size: int | None):
    if config.quant_bits:
        raise ValueError(f"these parameters are already INT{config.quant_bits}-quantized (ModelConfig.quant_bits); "
                         "leave the Generator's quant_bits unset")
    config = config.replace(quant_bits=bits, quant_group_size=group_size)
    return config, quantize_params(params, config)


_STREAM = {"to": None}  # the stream function of the generate() call in progress (one at a time)


@contextlib.contextmanager
def _streaming_to(stream):
    _STREAM["to"] = stream
    try:
        yield
    finally:
        _STREAM["to"] = None


def _emit(step, tokens, live):
    if _STREAM["to"] is not None:
        _STREAM["to"](int(step), np.asarray(tokens), np.asarray(live))


def specials_stops(specials: SpecialTokens) -> tuple[int, ...]:
    """What ends a causal row by default: <eos> and <eop>."""
    return (specials.eos, specials.eop)


def _maybe_mesh(mesh, rules):
    if mesh is None:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(mesh))
    stack.enter_context(nn.logical_axis_rules(rules))
    return stack


def _generate(params, batch, key, sampling, *, model: GLM, config: ModelConfig, specials: SpecialTokens,
              mode: str, max_new_tokens: int, cache_dtype, record_logits: bool, ignore_stop: bool,
              stops: tuple[int, ...], stream: bool, token_limit: int | None = None):
    """Prefill, then the decode loop: the whole program the Generator compiles."""
    B, P = batch["tokens"].shape
    cache = init_cache(config, B, P, max_new_tokens, cache_dtype)
    last = batch["lengths"] - 1  # causal mode samples its first token at the prompt's last position
    logits, variables = model.apply({"params": params, "cache": cache}, batch["tokens"], batch["positions"],
                                    batch["segment_ids"], batch["prefix_mask"], cache_index=0, prefill=True,
                                    logits_at=last, mutable=["cache"])
    vocab = config.vocab_size if record_logits else None
    if mode == "blank":  # every row starts from <sop> at its first mask, block position 1
        context, state = decode_state(variables["cache"], P, jnp.full((B,), specials.sop, jnp.int32),
                             batch["mask_positions"][:, 0], jnp.ones((B,), jnp.int32), max_new_tokens,
                             specials.pad, vocab)
    else:  # token 0 comes from the prefill; it is fed next at the prompt's next position
        first = sample(_limited(logits[:, 0], token_limit), jax.random.fold_in(key, 0), **sampling)
        context, state = decode_state(variables["cache"], P, first, batch["lengths"], jnp.zeros((B,), jnp.int32),
                             max_new_tokens, specials.pad, vocab)
        state.update(step=jnp.int32(1), out=state["out"].at[:, 0].set(first), done=_is_stop(first, stops),
                     num_tokens=jnp.ones((B,), jnp.int32))
        if stream:
            jax.debug.callback(_emit, 0, first, jnp.ones((B,), bool), ordered=True)
        if record_logits:
            state["logits"] = state["logits"].at[:, 0].set(logits[:, 0])
    return decode_loop(params, context, state, batch["mask_positions"], batch["num_masks"], key, sampling, model=model,
                       specials=specials, mode=mode, max_new_tokens=max_new_tokens, record_logits=record_logits,
                       ignore_stop=ignore_stop, stops=stops, stream=stream, token_limit=token_limit)


def decode_state(cache, slot, token, position, block, max_new_tokens: int, pad: int, vocab: int | None = None):
    """(context cache, loop state) for rows whose next input is `token` ([B]) at cache slot `slot`.

    position / block: [B] position and block position ids of that input. vocab:
    also record each step's logits ([B, max_new_tokens, vocab]). The context part
    of the cache stays out of the loop state (glm_jax/infer/cache.py says why).
    """
    context, cache = split_context(cache)
    B = token.shape[0]
    zeros = jnp.zeros((B,), jnp.int32)
    logits = jnp.zeros((B, max_new_tokens, vocab) if vocab else (0,), jnp.float32)
    return context, dict(step=jnp.int32(0), slot=jnp.asarray(slot, jnp.int32), token=token, position=position,
                         block=block, span=zeros, done=jnp.zeros((B,), bool), num_tokens=zeros,
                         out=jnp.full((B, max_new_tokens), pad, jnp.int32), logits=logits, cache=cache)


def decode_loop(params, context: dict, state: dict, mask_positions, num_masks, key, sampling, *, model: GLM,
                specials: SpecialTokens, mode: str, max_new_tokens: int, record_logits: bool = False,
                ignore_stop: bool = False, stops: tuple[int, ...] | None = None, stream: bool = False,
                token_limit: int | None = None) -> dict:
    """One token per row per iteration of a lax.while_loop until every row is done.

    mask_positions [B, M] / num_masks [B]: blank mode's mask table (unused in causal mode).
    stops: the tokens that end a causal row (default <eos>, <eop>). stream: hand each step's
    tokens to the host as they are made (Generator.generate's stream function). token_limit:
    sample only ids below it.
    Returns {'tokens', 'num_tokens'} (+ 'logits' when recorded).
    """
    stops = specials_stops(specials) if stops is None else stops
    B = state["token"].shape[0]
    rows = jnp.arange(B)

    def keep_going(s):
        return (s["step"] < max_new_tokens) & (ignore_stop | ~jnp.all(s["done"]))

    def step(s):
        positions = jnp.stack([s["position"], s["block"]], axis=1)[:, :, None]
        weights = params
        if model.config.quant_bits:
            # Tie the weights to the step so XLA cannot hoist their dequantization out of the loop
            # (loop-invariant code motion would hold every layer's float weights at once).
            weights, _ = jax.lax.optimization_barrier((params, s["step"]))
        logits, variables = model.apply(
            {"params": weights, "cache": merge_context(context, s["cache"])}, s["token"][:, None], positions,
            jnp.ones((B, 1), jnp.int32), jnp.zeros((B, 1), bool), cache_index=s["slot"], mutable=["cache"])
        token = sample(_limited(logits[:, 0], token_limit), jax.random.fold_in(key, s["step"]), **sampling)
        live = ~s["done"] | ignore_stop
        out = s["out"].at[:, s["step"]].set(jnp.where(live, token, specials.pad))
        if stream:
            jax.debug.callback(_emit, s["step"], token, live, ordered=True)
        recorded = s["logits"].at[:, s["step"]].set(logits[:, 0]) if record_logits else s["logits"]
        nxt = dict(step=s["step"] + 1, slot=s["slot"] + 1, out=out, num_tokens=s["num_tokens"] + live,
                   logits=recorded, cache=split_context(variables["cache"])[1])
        if mode == "blank":
            ends_span = (token == specials.eop) | (token == specials.eos)
            span = s["span"] + ends_span
            next_mask = mask_positions[rows, jnp.minimum(span, mask_positions.shape[1] - 1)]
            nxt.update(token=jnp.where(ends_span, specials.sop, token),
                       position=jnp.where(ends_span, next_mask, s["position"]),
                       block=jnp.where(ends_span, 1, s["block"] + 1), span=span,
                       done=s["done"] | (token == specials.eos) | (ends_span & (span >= num_masks)))
        else:
            nxt.update(token=token, position=s["position"] + 1, block=s["block"], span=s["span"],
                       done=s["done"] | _is_stop(token, stops))
        return nxt

    final = jax.lax.while_loop(keep_going, step, state)
    result = {"tokens": final["out"], "num_tokens": final["num_tokens"]}
    if record_logits:
        result["logits"] = final["logits"]
    return result


def _limited(logits, token_limit: int | None):
    """Logits with the ids at and above token_limit ruled out (None: all allowed)."""
    if token_limit is None:
        return logits
    return jnp.where(jnp.arange(logits.shape[-1]) < token_limit, logits, -jnp.inf)


def _is_stop(token, stops: tuple[int, ...]):
    return functools.reduce(jnp.logical_or, [token == s for s in stops])


# ------------------------------------------------------------------ text helpers
def fill_blanks(generator: Generator, tokenizer: Tokenizer, prompts: list[str], max_new_tokens: int = 64,
                sampling: SamplingConfig = SamplingConfig(), seed: int = 0, length_bucket: int = 64) -> list[str]:
    """Each prompt with its [MASK] / [sMASK] / [gMASK] tokens replaced by the generated text.

    A prompt without a mask gets [gMASK] appended (open-ended generation). Prompts
    start with [CLS] like the training documents.
    """
    specials = tokenizer.specials
    encoded = []
    for text in prompts:
        ids = np.concatenate([tokenizer.prefix, tokenizer.encode(text)]).astype(np.int32)
        if not np.isin(ids, prompt_lib.mask_ids(specials)).any():
            ids = np.concatenate([ids, [specials.gmask]]).astype(np.int32)
        encoded.append(ids)
    batch = prompt_lib.make_prompt_batch(encoded, specials, "blank", length_bucket)
    out = generator.generate(batch, "blank", max_new_tokens, sampling, seed)
    texts = []
    for row, ids in enumerate(encoded):
        spans = prompt_lib.split_spans(out["tokens"][row, :out["num_tokens"][row]], specials)
        filled = prompt_lib.fill_in(ids[len(tokenizer.prefix):], spans, specials)  # drop the prefix
        texts.append(tokenizer.decode(filled[filled != specials.gmask]))
    return texts


def continue_text(generator: Generator, tokenizer: Tokenizer, prompts: list[str], max_new_tokens: int = 64,
                  sampling: SamplingConfig = SamplingConfig(), seed: int = 0, length_bucket: int = 64) -> list[str]:
    """Causal generation (ChatGLM2 / GLM-4 style): the text generated after each prompt."""
    specials = tokenizer.specials
    encoded = [np.concatenate([tokenizer.prefix, tokenizer.encode(t)]).astype(np.int32) for t in prompts]
    batch = prompt_lib.make_prompt_batch(encoded, specials, "causal", length_bucket)
    out = generator.generate(batch, "causal", max_new_tokens, sampling, seed)
    texts = []
    for row in range(len(prompts)):
        ids = out["tokens"][row, :out["num_tokens"][row]]
        texts.append(tokenizer.decode([i for i in ids if i not in (specials.eos, specials.eop)]))
    return texts

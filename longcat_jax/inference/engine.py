"""Batched generation over the compressed cache: jitted prefill and decode steps, and the loop.

    out = generate(model, variables, [[1, 72, 105], [1, 87]], max_new_tokens=32, temperature=0.0)
    out.tokens        # [batch, 32] new tokens; after a row's EOS: pad_token_id

Prompts of different lengths are right-padded to a power-of-two bucket (>= 16) and prefilled
together; each row's cache then holds its tokens at their true positions, and per-row `lengths`
say where the next token goes, so every row equals that prompt run alone. The cache is
preallocated to a fixed size, so the decode step compiles once per (batch, cache size) and the
prefill once per (batch, prompt bucket).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from longcat_jax.inference import speculative
from longcat_jax.inference.cache import pad_cache
from longcat_jax.inference.common import _ngram_context, decode_model, model_variables, ngram_context_size
from longcat_jax.inference.sampling import make_sampling, sample
from longcat_jax.model.attention import CACHE

MIN_PREFILL_BUCKET = 16
CACHE_MULTIPLE = 64


class Engine:
  """Compiled prefill and decode steps of one model (any `Sampling`: its values are traced).

  prefill(variables, tokens [B, S] right-padded, lengths [B], sampling, rng, cache_size)
      -> cache, next_tokens [B], logits [B, V] f32 (of the last prompt token), context [B, n]
  decode(variables, cache, tokens [B, T], lengths [B], context [B, n], sampling, rng)
      -> cache, next_tokens [B, T], logits [B, T, V] f32 (the cache is donated and updated in place)
  `context` is the n-gram context (n = 0 without n-gram embeddings). Compiles once per
  (B, prompt bucket, cache size) for prefill and once per (B, T, cache size) for decode.
  """

  def __init__(self, model):
    self.model = model
    self.context_size = ngram_context_size(model.config)
    self.prefill = jax.jit(self._prefill, static_argnames=("cache_size",))
    self.decode = jax.jit(self._decode, donate_argnames=("cache",))

  def _prefill(self, variables, tokens, lengths, sampling, rng, cache_size: int):
    model = self.model
    hidden, state = model.apply(model_variables(variables), tokens, method="prefill", mutable=[CACHE])
    last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]
    logits = model.apply(variables, last, method="logits").astype(jnp.float32)
    context = _ngram_context(tokens, lengths, self.context_size)
    return pad_cache(state[CACHE], cache_size, model.placement), sample(logits, rng, sampling), logits, context

  def _decode(self, variables, cache, tokens, lengths, context, sampling, rng):
    b, t = tokens.shape
    model = decode_model(self.model, b * t * self.model.config.top_k)
    hidden, state = model.apply({**model_variables(variables), CACHE: cache}, tokens, lengths,
                                context if self.context_size else None, method="decode", mutable=[CACHE])
    logits = model.apply(variables, hidden, method="logits").astype(jnp.float32)
    nxt = sample(logits.reshape(b * t, -1), rng, sampling).reshape(b, t)
    return state[CACHE], nxt, logits


_ENGINES: dict = {}


def engine_for(model) -> Engine:
  """A cached Engine per (model class, config, placement): repeated calls, and models loaded twice
  from the same checkpoint, reuse the compiled steps; the same model on another mesh does not."""
  key = (type(model), model.config.to_json(sort_keys=True), model.placement)
  if key not in _ENGINES:
    if len(_ENGINES) >= 16:
      _ENGINES.pop(next(iter(_ENGINES)))
    _ENGINES[key] = Engine(model)
  return _ENGINES[key]


# ---------------------------------------------------------------------------------------------
# The generation loop.


@dataclasses.dataclass
class Generation:
  """Result of `generate`.

  tokens: [B, max_new_tokens] int32 new tokens, EOS included, pad_token_id after it.
  num_tokens: [B] tokens generated per row (EOS included).
  prefill_seconds: time to the first token (includes compilation on a first call).
  decode_seconds: first token to last; decode_steps: decode (or speculative) steps run.
  steady_tokens / steady_seconds: tokens and time after the first decode step (which may compile).
  acceptance_rate: accepted / proposed draft tokens (speculative decoding), else None.
  """

  tokens: np.ndarray
  num_tokens: np.ndarray
  prefill_seconds: float
  decode_seconds: float
  decode_steps: int
  steady_tokens: int = 0
  steady_seconds: float = 0.0
  acceptance_rate: float | None = None

  @property
  def decode_tokens_per_second(self) -> float:
    """Decode throughput of all rows together, after the first (possibly compiling) step."""
    return self.steady_tokens / self.steady_seconds if self.steady_seconds > 0 else float("nan")


def as_prompts(input_ids, attention_mask=None) -> list[np.ndarray]:
  """Ragged prompts (list of sequences), a [B, S] array (with an optional HF-style
  `attention_mask`, left or right padding) or one [S] sequence -> list of int32 arrays."""
  if isinstance(input_ids, (list, tuple)) and input_ids and not np.isscalar(input_ids[0]):
    if attention_mask is not None:
      raise ValueError("attention_mask is only accepted with a [batch, seq] array of input_ids")
    prompts = [np.asarray(p, np.int32).reshape(-1) for p in input_ids]
  else:
    ids = np.asarray(input_ids, np.int32)
    if ids.ndim == 1:
      ids = ids[None]
    if ids.ndim != 2:
      raise ValueError(f"input_ids must be [batch, seq], one [seq] prompt or a list of prompts; got {ids.shape}")
    if attention_mask is None:
      prompts = list(ids)
    else:
      mask = np.asarray(attention_mask).astype(bool)
      if mask.shape != ids.shape:
        raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
      prompts = [row[m] for row, m in zip(ids, mask)]
  for i, p in enumerate(prompts):
    if p.size == 0:
      raise ValueError(f"prompt {i} is empty; generation needs at least one token (e.g. bos)")
  if not prompts:
    raise ValueError("no prompts given")
  return prompts


def check_prompts(prompts: Sequence[np.ndarray], config) -> None:
  """Raises ValueError naming the prompt (and position) with an id outside the vocabulary, or more
  tokens than the model has positions."""
  for i, p in enumerate(prompts):
    bad = (p < 0) | (p >= config.vocab_size)
    if bad.any():
      pos = int(np.argmax(bad))
      raise ValueError(f"prompt {i}, position {pos}: token id {int(p[pos])} is outside the vocabulary "
                       f"[0, {config.vocab_size})")
    if len(p) >= config.max_position_embeddings:
      raise ValueError(f"prompt {i} has {len(p)} tokens; the model has max_position_embeddings="
                       f"{config.max_position_embeddings} positions, which leaves no room for a new token")


def prefill_bucket(n: int) -> int:
  """Padded prompt length: the next power of two, at least MIN_PREFILL_BUCKET."""
  return max(MIN_PREFILL_BUCKET, 1 << (n - 1).bit_length())


def plan_cache_size(config, max_prompt_len: int, max_new_tokens: int, extra: int = 0) -> int:
  """Cache slots per row: prompt bucket, or prompt + new tokens (+ `extra` draft slots) rounded up."""
  need = max_prompt_len + max_new_tokens + extra
  if need > config.max_position_embeddings:
    raise ValueError(f"prompt ({max_prompt_len}) + max_new_tokens ({max_new_tokens}) = {need} tokens exceeds "
                     f"max_position_embeddings={config.max_position_embeddings}")
  return max(prefill_bucket(max_prompt_len), -(-need // CACHE_MULTIPLE) * CACHE_MULTIPLE)


def _eos_set(eos_token_id, config) -> frozenset[int]:
  if eos_token_id is None:
    eos_token_id = config.eos_token_id
  if eos_token_id is None:
    return frozenset()
  if isinstance(eos_token_id, (int, np.integer)):
    return frozenset([int(eos_token_id)])
  return frozenset(int(e) for e in eos_token_id)


class _Collector:
  """Per-row output tokens on the host: stops a row at EOS or max_new_tokens."""

  def __init__(self, batch: int, max_new_tokens: int, eos: frozenset[int], stream):
    self.rows = [[] for _ in range(batch)]
    self.max_new, self.eos, self.stream = max_new_tokens, eos, stream
    self.times = []  # (host time, tokens so far) after each add

  def done(self, i: int) -> bool:
    r = self.rows[i]
    return len(r) >= self.max_new or (bool(r) and r[-1] in self.eos)

  def add(self, per_row: Sequence[Sequence[int]]):
    emitted = []
    for i, toks in enumerate(per_row):
      new = []
      for t in toks:
        if self.done(i):
          break
        self.rows[i].append(int(t))
        new.append(int(t))
      emitted.append(new)
    if self.stream is not None:
      self.stream(emitted)
    self.times.append((time.perf_counter(), sum(map(len, self.rows))))

  def all_done(self) -> bool:
    return all(self.done(i) for i in range(len(self.rows)))

  def result(self, pad_id: int, t_start: float, steps: int, acceptance_rate=None) -> Generation:
    out = np.full((len(self.rows), self.max_new), pad_id, np.int32)
    for i, r in enumerate(self.rows):
      out[i, :len(r)] = r
    (t_first, _), (t_end, n_end) = self.times[0], self.times[-1]
    t_steady, n_steady = self.times[min(2, len(self.times) - 1)]  # after prefill and the first step
    return Generation(out, np.array([len(r) for r in self.rows], np.int32), prefill_seconds=t_first - t_start,
                      decode_seconds=t_end - t_first, decode_steps=steps, steady_tokens=n_end - n_steady,
                      steady_seconds=t_end - t_steady, acceptance_rate=acceptance_rate)


def generate(model, variables, input_ids, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None,
             eos_token_id: int | Sequence[int] | None = None, seed: int = 0, attention_mask=None,
             num_draft_tokens: int = 0, cache_size: int | None = None,
             stream: Callable[[list[list[int]]], None] | None = None) -> Generation:
  """Generates up to `max_new_tokens` tokens for a batch of prompts of different lengths.

  input_ids: list of token sequences, or [B, S] (with `attention_mask` [B, S], HF-style padding).
  temperature 0.0 is greedy; top_k / top_p filter before sampling. eos_token_id: id(s) that end a
  row (None: `model.config.eos_token_id`; () never stops). num_draft_tokens > 0 drafts that many
  tokens per step with the MTP head (`variables["params"]["mtp"]`) and verifies them in one main-model
  step (see `speculative.py`). stream(new) is called after each step with the new tokens per row.
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
  config = model.config
  sampling = make_sampling(temperature, top_k, top_p)
  prompts = as_prompts(input_ids, attention_mask)
  check_prompts(prompts, config)
  b, lens = len(prompts), np.array([len(p) for p in prompts], np.int32)
  bucket = prefill_bucket(int(lens.max()))
  size = cache_size or plan_cache_size(config, int(lens.max()), max_new_tokens, num_draft_tokens)
  if size < bucket or size < lens.max() + max_new_tokens + num_draft_tokens:
    raise ValueError(f"cache_size={size} is too small for prompts of {lens.max()} tokens (bucket {bucket}) "
                     f"+ {max_new_tokens} new tokens + {num_draft_tokens} draft tokens")
  tokens = np.full((b, bucket), config.pad_token_id, np.int32)
  for i, p in enumerate(prompts):
    tokens[i, :len(p)] = p
  collector = _Collector(b, max_new_tokens, _eos_set(eos_token_id, config), stream)
  key = jax.random.key(seed)
  if num_draft_tokens:
    return speculative.generate_speculative(model, variables, tokens, lens, collector, sampling, key,
                                            size, num_draft_tokens, config.pad_token_id)

  engine = engine_for(model)
  t0 = time.perf_counter()
  lengths = jnp.asarray(lens)
  cache, cur, _, context = engine.prefill(variables, tokens, lengths, sampling, jax.random.fold_in(key, 0),
                                          cache_size=size)
  cur = cur[:, None]
  steps = 0
  while True:
    # Dispatch the next step before reading this one's tokens, so host work overlaps the device.
    nxt = None
    if steps < max_new_tokens - 1:
      steps += 1
      cache, nxt, _ = engine.decode(variables, cache, cur, lengths, context, sampling, jax.random.fold_in(key, steps))
      if engine.context_size:
        context = jnp.concatenate([context, cur], axis=1)[:, -engine.context_size:]
      lengths = lengths + 1
    collector.add(np.asarray(cur))
    if nxt is None or collector.all_done():
      break
    cur = nxt
  return collector.result(config.pad_token_id, t0, steps)

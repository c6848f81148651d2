"""MTP speculative decoding: the MTP heads draft k tokens, the main model verifies them in one step.

One step, per row (m = tokens in the main cache, t_m the pending token, d_1..d_k the drafts):

    verify  main.decode([t_m, d_1..d_k]) at positions m..m+k -> p_0..p_k  (p_i predicts token m+i+1)
    accept  a = number of leading drafts accepted: greedy d_i == argmax p_{i-1}; sampling
            u < p_{i-1}(d_i) / q_i(d_i) (speculative sampling: the output follows the main model)
    emit    d_1..d_a, then argmax p_a (greedy), or a sample of norm(max(p_a - q_{a+1}, 0)), or of
            p_k when every draft was accepted: a + 1 tokens
    draft   MTP head j at positions m..m+k reads (head j-1's hidden, the token j ahead) and
            appends to its own cache; its output at position m+a drafts d'_j

So greedy speculative decoding emits exactly the plain greedy tokens. Head j (k = 1..N) follows
`longcat_jax.model.mtp`: head 1 reads the main model's final-normed hidden state, head j > 1 the
previous head's. Cache entries past a row's accepted tokens are overwritten by later steps before
anything attends to them. Approximation: for heads j >= 2 the entries of the last j - 1 positions
were written while the token j ahead was still a draft, and are not recomputed after a
rejection; this can only lower the acceptance rate, never change the output.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from longcat_jax.inference.cache import pad_cache
from longcat_jax.inference.common import _ngram_context, decode_model, model_variables, ngram_context_size
from longcat_jax.inference.sampling import Sampling, sample, token_probs
from longcat_jax.model.attention import CACHE
from longcat_jax.model.layers import rms_norm, rope_cos_sin
from longcat_jax.model.mtp import MTPLayer, step_names


class SpecState(NamedTuple):
  """Device state between speculative steps."""

  cache: dict            # main model cache (leaves [layers, B, M, D])
  mtp_caches: tuple      # one cache per MTP head used (leaves [B, M, D])
  lengths: jax.Array     # [B] tokens in the main cache
  pending: jax.Array     # [B] last emitted token, not yet in the cache
  drafts: jax.Array      # [B, k] drafted tokens for positions lengths + 1 ..
  draft_probs: jax.Array  # [B, k, V] the distributions the drafts were drawn from
  context: jax.Array     # [B, n] n-gram context before `pending`


def mtp_params(variables):
  """variables['params']['mtp'] (`layer_{j}` per head + the shared `final_norm`), or a clear error."""
  params = variables["params"]
  if "mtp" not in params:
    raise ValueError("speculative decoding needs the MTP head, but variables['params'] has no 'mtp' entry "
                     "(config.mtp_num_heads=0, or the checkpoint has no model.mtp.* tensors)")
  return params["mtp"]


def _embed(model, ids):
  """The MTP steps' token embedding, without n-grams (as `mtp_hidden`)."""
  return model.mtp_embed(ids)


def _at(x, index):
  """x [B, T, ...], index [B] -> x[b, index[b]]."""
  return jnp.take_along_axis(x, index.reshape((-1, 1) + (1,) * (x.ndim - 2)), axis=1)[:, 0]


def verify_drafts(logits, drafts, draft_probs, rng, sampling: Sampling):
  """Speculative acceptance (Leviathan et al. 2023). logits [B, k+1, V]: the main model at the
  pending token and the k drafts; drafts [B, k]; draft_probs [B, k, V]: the distributions q the
  drafts were drawn from -> accepted count a [B] and the token after the accepted drafts [B].

  Draft d_i is accepted with probability min(1, p(d_i) / q(d_i)); at the first rejection the
  token is drawn from norm(max(p - q, 0)), after k acceptances from p: every emitted token follows
  the main model's distribution p exactly. Greedy (temperature 0) makes p and q one-hot, so this
  accepts exactly the drafts equal to the main model's argmax and then emits that argmax.
  """
  k = drafts.shape[1]
  rng_u, rng_last = jax.random.split(rng)
  p = token_probs(logits, sampling)
  p_d = jnp.take_along_axis(p[:, :k], drafts[..., None], axis=-1)[..., 0]
  q_d = jnp.take_along_axis(draft_probs, drafts[..., None], axis=-1)[..., 0]
  a = jnp.cumprod(jax.random.uniform(rng_u, p_d.shape) * q_d < p_d, axis=1).sum(1)
  q_a = jnp.where((a < k)[:, None], _at(draft_probs, jnp.minimum(a, k - 1)), 0.0)
  resid = jnp.maximum(_at(p, a) - q_a, 0.0)
  resid = jnp.where(resid.sum(-1, keepdims=True) > 0, resid, _at(p, a))
  return a, jax.random.categorical(rng_last, jnp.log(resid), axis=-1).astype(jnp.int32)


class SpeculativeEngine:
  """Compiled prefill and speculative step for one model and draft length k (any `Sampling`).

  prefill(variables, tokens [B, S], lengths [B], sampling, rng, cache_size) -> SpecState, first [B]
  step(variables, state, active [B] bool, sampling, rng) -> SpecState, emitted [B, k+1],
      num_emitted [B], accepted [B]   (rows with active=False do not advance; state is donated)
  """

  def __init__(self, model, num_draft_tokens: int):
    c = model.config
    if not 1 <= num_draft_tokens <= c.mtp_num_heads:
      raise ValueError(f"num_draft_tokens={num_draft_tokens} needs that many MTP heads, but config.mtp_num_heads="
                       f"{c.mtp_num_heads} (head j drafts token j; see longcat_jax.model.mtp)")
    self.model, self.k = model, num_draft_tokens
    self.context_size = ngram_context_size(c)
    self.prefill = jax.jit(self._prefill, static_argnames=("cache_size",))
    self.step = jax.jit(self._step, donate_argnames=("state",))

  # -- drafting ---------------------------------------------------------------------------------

  def _draft(self, variables, hidden, known, n_valid, positions, caches, cache_mode, lengths, sampling, rng):
    """Runs the k MTP heads over T positions and drafts k tokens per row.

    hidden [B, T, H]: main final-normed hidden at `positions` [B, T]; known [B, T]: the token
    after each position, valid for the first n_valid[b] positions; the drafts come from position
    n_valid - 1. Head j reads the token j ahead: known where valid, else the drafts of heads < j.
    -> new caches (one per head), drafts [B, k], draft_probs [B, k, V].
    """
    model, c = self.model, self.model.config
    mtp = mtp_params(variables)
    cos, sin = rope_cos_sin(c, positions)
    b, t = known.shape
    h, drafts, probs, new_caches, indices = hidden, [], [], [], None
    names = step_names(c)
    for j in range(self.k):
      idx = jnp.arange(t)[None, :] + j  # head j+1 reads the token j+1 ahead
      toks = jnp.take_along_axis(known, jnp.minimum(idx, t - 1), axis=1)
      if drafts:
        from_drafts = jnp.take_along_axis(jnp.stack(drafts, 1), jnp.clip(idx - n_valid[:, None], 0, j - 1), axis=1)
        toks = jnp.where(idx < n_valid[:, None], toks, from_drafts)
      emb = model.apply(variables, toks, method=_embed)
      layer_vars = {"params": mtp[names[j]]}
      if caches is not None:
        layer_vars[CACHE] = caches[j]
      # LongCat-2.0: step 1's key selection serves every step (`dsa_mtp_cli`); None = dense.
      layer = MTPLayer(c, cache_mode=cache_mode, placement=self.model.placement)
      (x, indices), state = layer.apply(layer_vars, h, emb, cos, sin, None, lengths, indices, j > 0,
                                        mutable=[CACHE])
      h = rms_norm(x, mtp["final_norm"]["scale"], c.rms_norm_eps)  # the heads' shared final norm
      logits = model.apply(variables, _at(h, n_valid - 1), method="logits").astype(jnp.float32)
      rng, sub = jax.random.split(rng)
      drafts.append(sample(logits, sub, sampling))
      probs.append(token_probs(logits, sampling))
      new_caches.append(state[CACHE])
    return tuple(new_caches), jnp.stack(drafts, 1), jnp.stack(probs, 1)

  # -- prefill ----------------------------------------------------------------------------------

  def _prefill(self, variables, tokens, lengths, sampling, rng, cache_size: int):
    model = self.model
    b, s = tokens.shape
    hidden, state = model.apply(model_variables(variables), tokens, method="prefill", mutable=[CACHE])
    logits = model.apply(variables, _at(hidden, lengths - 1), method="logits").astype(jnp.float32)
    rng_first, rng_draft = jax.random.split(rng)
    first = sample(logits, rng_first, sampling)
    # The token after position i is tokens[i + 1], and the first generated token after the prompt.
    pos = jnp.arange(s)[None, :]
    known = jnp.where(pos == (lengths - 1)[:, None], first[:, None], jnp.roll(tokens, -1, axis=1))
    positions = jnp.broadcast_to(pos, (b, s)).astype(jnp.int32)
    mtp_caches, drafts, probs = self._draft(variables, hidden, known, lengths, positions, None, "prefill", None,
                                            sampling, rng_draft)
    spec = SpecState(pad_cache(state[CACHE], cache_size, model.placement),
                     pad_cache(mtp_caches, cache_size, model.placement), lengths, first,
                     drafts, probs, _ngram_context(tokens, lengths, self.context_size))
    return spec, first

  # -- one speculative step ---------------------------------------------------------------------

  def _step(self, variables, state: SpecState, active, sampling, rng):
    k = self.k
    model = decode_model(self.model, state.drafts.shape[0] * (k + 1) * self.model.config.top_k)
    rng_accept, rng_draft = jax.random.split(rng)
    m = state.lengths
    fed = jnp.concatenate([state.pending[:, None], state.drafts], axis=1)  # [B, k+1] at m..m+k
    hidden, new = model.apply({**model_variables(variables), CACHE: state.cache}, fed, m,
                              state.context if self.context_size else None, method="decode", mutable=[CACHE])
    logits = model.apply(variables, hidden, method="logits").astype(jnp.float32)
    a, last = verify_drafts(logits, state.drafts, state.draft_probs, rng_accept, sampling)
    i = jnp.arange(k + 1)[None, :]
    drafts_padded = jnp.concatenate([state.drafts, state.drafts[:, -1:]], axis=1)
    emitted = jnp.where(i < a[:, None], drafts_padded, last[:, None])  # valid for i <= a
    num = jnp.where(active, a + 1, 0)
    positions = m[:, None] + i
    mtp_caches, drafts, probs = self._draft(variables, hidden, emitted, a + 1, positions, state.mtp_caches, "decode",
                                            m, sampling, rng_draft)
    context = state.context
    if self.context_size:  # the n tokens before the new pending token
      window = jnp.concatenate([state.context, fed], axis=1)
      shifted = jnp.take_along_axis(window, (a + 1)[:, None] + jnp.arange(self.context_size), axis=1)
      context = jnp.where(active[:, None], shifted, state.context)
    new_state = SpecState(new[CACHE], mtp_caches, m + num, jnp.where(active, last, state.pending), drafts, probs,
                          context)
    return new_state, emitted, num, jnp.where(active, a, 0)


_ENGINES: dict = {}


def engine_for(model, num_draft_tokens: int) -> SpeculativeEngine:
  key = (type(model), model.config.to_json(sort_keys=True), model.placement, num_draft_tokens)
  if key not in _ENGINES:
    if len(_ENGINES) >= 8:
      _ENGINES.pop(next(iter(_ENGINES)))
    _ENGINES[key] = SpeculativeEngine(model, num_draft_tokens)
  return _ENGINES[key]


def generate_speculative(model, variables, tokens, lens, collector, sampling, key, cache_size, num_draft_tokens,
                         pad_id):
  """The loop behind `generate(..., num_draft_tokens=k)`; arguments prepared by `generate`."""
  engine = engine_for(model, num_draft_tokens)
  mtp_params(variables)  # fail early with a clear message
  t0 = time.perf_counter()
  state, first = engine.prefill(variables, tokens, jnp.asarray(lens), sampling, jax.random.fold_in(key, 0),
                                cache_size=cache_size)
  collector.add(np.asarray(first)[:, None])
  steps = proposed = accepted = 0
  while not collector.all_done():
    steps += 1
    active = np.array([not collector.done(i) for i in range(len(lens))])
    state, emitted, num, acc = engine.step(variables, state, jnp.asarray(active), sampling,
                                           jax.random.fold_in(key, steps))
    emitted, num, acc = np.asarray(emitted), np.asarray(num), np.asarray(acc)
    collector.add([emitted[i, :num[i]] for i in range(len(lens))])
    proposed += num_draft_tokens * int(active.sum())
    accepted += int(acc.sum())
  return collector.result(pad_id, t0, steps, accepted / proposed if proposed else None)

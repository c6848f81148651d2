"""Inference: compressed cache, absorbed decoding, batched generation, sampling, the CLI."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_reference import make_reference

import longcat_jax as lj
from longcat_jax import inference
from longcat_jax.inference import engine as engine_lib
from longcat_jax.inference.sampling import Sampling, filter_logits, sample

PROMPTS = [[5, 17, 33, 9, 100, 42, 7], [11, 12, 13]]  # different lengths: padding must not matter


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """A random HF reference with a nonzero expert bias, saved and loaded back."""
  ref = make_reference(seed=0, bias_scale=0.05)
  path = str(tmp_path_factory.mktemp("ref"))
  ref.save_pretrained(path)
  model, variables = lj.load_pretrained(path)
  return ref, path, model, variables


def _hf_greedy(ref, prompts, max_new_tokens, eos_token_id):
  """transformers generate(do_sample=False) on a left-padded batch -> the new tokens [B, N]."""
  s = max(map(len, prompts))
  ids = torch.tensor([[0] * (s - len(p)) + p for p in prompts])
  mask = torch.tensor([[0] * (s - len(p)) + [1] * len(p) for p in prompts])
  out = ref.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                     pad_token_id=0, eos_token_id=eos_token_id)
  return out[:, s:].numpy()


def test_greedy_matches_transformers(reference):
  ref, _, model, variables = reference
  vocab = ref.config.vocab_size
  free_run = _hf_greedy(ref, PROMPTS, 24, eos_token_id=vocab)  # an id never generated: no stop
  # Make row 0 stop early: its 9th token plays EOS. HF pads after EOS with 0, and so must we.
  eos = int(free_run[0, 8])
  theirs = _hf_greedy(ref, PROMPTS, 24, eos_token_id=eos)
  ours = inference.generate(model, variables, PROMPTS, 24, temperature=0.0, eos_token_id=eos)
  assert ours.tokens.shape == (2, 24)
  np.testing.assert_array_equal(ours.tokens, theirs)
  assert ours.num_tokens[0] <= 9 and (theirs[0, ours.num_tokens[0]:] == 0).all()
  ours_free = inference.generate(model, variables, PROMPTS, 24, temperature=0.0, eos_token_id=())
  np.testing.assert_array_equal(ours_free.tokens, free_run)
  # An HF-style left-padded batch with attention_mask gives the same result.
  ids = np.array([PROMPTS[0], [0] * 4 + PROMPTS[1]])
  mask = np.array([[1] * 7, [0] * 4 + [1] * 3])
  again = inference.generate(model, variables, ids, 24, temperature=0.0, attention_mask=mask, eos_token_id=eos)
  np.testing.assert_array_equal(again.tokens, theirs)
  # One decode compile (fixed cache size), reused for every token and both calls.
  engine = engine_lib.engine_for(model, Sampling(0.0))
  assert engine.decode._cache_size() == 1
  assert engine.prefill._cache_size() == 1


def test_cached_decoding_matches_full_recompute(reference):
  """Logits of prefill + absorbed decode steps equal the full (uncached) forward at every step."""
  _, _, model, variables = reference
  engine = engine_lib.engine_for(model, Sampling(0.0))
  lens = np.array([7, 3], np.int32)
  tokens = np.zeros((2, 16), np.int32)
  for i, p in enumerate(PROMPTS):
    tokens[i, :len(p)] = p
  seqs = [list(p) for p in PROMPTS]
  lengths = jnp.asarray(lens)
  cache, nxt, logits, context = engine.prefill(variables, tokens, lengths, jax.random.key(0), cache_size=64)
  full_fn = jax.jit(model.apply)

  def check(step_logits, at):
    """step_logits [B, V] for the token at positions `at` [B] of the growing sequences."""
    ids = np.array([s + [0] * (32 - len(s)) for s in seqs])  # right-padded (causal: no effect), one compile
    full = np.asarray(full_fn(variables, ids))
    want = full[np.arange(2), at]
    np.testing.assert_allclose(np.asarray(step_logits), want, atol=1e-4, rtol=0)

  check(logits, lens - 1)
  for step in range(12):
    for i in range(2):
      seqs[i].append(int(nxt[i]))
    cache, nxt2, logits, = engine.decode(variables, cache, nxt[:, None], lengths, context, jax.random.key(1))
    check(logits[:, 0], np.asarray(lengths))
    lengths, nxt = lengths + 1, nxt2[:, 0]
  # Several tokens in one step (as when verifying drafts): positions lengths .. lengths + 2.
  new = np.array([[3, 50, 77], [90, 4, 61]], np.int32)
  for i in range(2):
    seqs[i].extend(new[i].tolist())
  cache, _, logits = engine.decode(variables, cache, new, lengths, context, jax.random.key(1))
  for t in range(3):
    check(logits[:, t], np.asarray(lengths) + t)


def test_cache_holds_only_latent_and_rope_key():
  """Flash: 28 layers x 2 blocks x (512 + 64) values per token, nothing else (shapes only)."""
  c = lj.get_config("flash", dtype="bfloat16", param_dtype="bfloat16")
  assert inference.cache_values_per_token(c) == 28 * 2 * (512 + 64)
  assert inference.cache_bytes_per_token(c) == 28 * 2 * 576 * 2
  model = lj.LongcatForCausalLM(c)
  import flax.linen as nn
  shapes = jax.eval_shape(lambda: {k: nn.meta.unbox(v) for k, v in model.init(
      jax.random.key(0), jnp.zeros((1, 1), jnp.int32)).items() if k in ("params", "expert_bias")})
  engine = engine_lib.Engine(model, Sampling(0.0))
  cache = jax.eval_shape(lambda v: engine._prefill(v, jnp.zeros((2, 16), jnp.int32), jnp.full((2,), 16),
                                                   jax.random.key(0), cache_size=256)[0], shapes)
  leaves = jax.tree.leaves(cache)
  assert all(x.shape[:3] == (28, 2, 256) and x.dtype == jnp.bfloat16 for x in leaves)
  assert sum(x.shape[0] * x.shape[-1] for x in leaves) == inference.cache_values_per_token(c) // 1


def test_sampling_filters():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]]))
  finite = lambda s: np.isfinite(np.asarray(filter_logits(logits, s)))
  np.testing.assert_array_equal(finite(Sampling(1.0, top_k=2)), [[1, 1, 0, 0], [0, 0, 1, 1]])
  # top_p keeps the smallest prefix with mass >= p: 0.5 + 0.3 >= 0.7.
  np.testing.assert_array_equal(finite(Sampling(1.0, top_p=0.7)), [[1, 1, 0, 0], [0, 0, 1, 1]])
  np.testing.assert_array_equal(finite(Sampling(1.0, top_p=0.4)), [[1, 0, 0, 0], [0, 0, 0, 1]])
  np.testing.assert_array_equal(sample(logits, None, Sampling(0.0)), [0, 3])
  draws = np.asarray(jax.vmap(lambda k: sample(logits, k, Sampling(1.0, top_k=2)))(
      jax.random.split(jax.random.key(0), 2000)))
  assert set(np.unique(draws[:, 0])) == {0, 1}
  # Renormalised top-2 of row 0: p(0) = 0.5 / 0.8.
  assert abs((draws[:, 0] == 0).mean() - 0.625) < 0.05
  with pytest.raises(ValueError, match="top_p"):
    Sampling(1.0, top_p=0.0)
  with pytest.raises(ValueError, match="temperature"):
    Sampling(-1.0)


def test_sampled_generation_is_seeded(reference):
  _, _, model, variables = reference
  kw = dict(temperature=0.9, top_k=20, top_p=0.95, eos_token_id=())
  a = inference.generate(model, variables, PROMPTS, 6, seed=3, **kw)
  b = inference.generate(model, variables, PROMPTS, 6, seed=3, **kw)
  c = inference.generate(model, variables, PROMPTS, 6, seed=4, **kw)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  assert not np.array_equal(a.tokens, c.tokens)
  assert (a.num_tokens == 6).all()


def test_generate_errors_name_the_problem(reference):
  _, _, model, variables = reference
  with pytest.raises(ValueError, match="prompt 1 is empty"):
    inference.generate(model, variables, [[1, 2], []], 4)
  with pytest.raises(ValueError, match="max_position_embeddings"):
    inference.generate(model, variables, PROMPTS, model.config.max_position_embeddings)
  with pytest.raises(ValueError, match="attention_mask shape"):
    inference.generate(model, variables, np.ones((2, 3), np.int32), 4, attention_mask=np.ones((2, 4)))

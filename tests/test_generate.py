"""Inference: compressed cache, absorbed decoding, batched generation, sampling, the CLI."""

import importlib
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_reference import make_reference

import longcat_jax as lj
from longcat_jax import inference
from longcat_jax.inference import engine as engine_lib
from longcat_jax.inference.sampling import Sampling, filter_logits, make_sampling, sample

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
  # One decode compile (fixed cache size), reused for every token and every call.
  engine = engine_lib.engine_for(model)
  assert engine.decode._cache_size() == 1
  assert engine.prefill._cache_size() == 1


def test_cached_decoding_matches_full_recompute(reference):
  """Logits of prefill + absorbed decode steps equal the full (uncached) forward at every step."""
  _, _, model, variables = reference
  engine = engine_lib.engine_for(model)
  greedy = Sampling(0.0)
  lens = np.array([7, 3], np.int32)
  tokens = np.zeros((2, 16), np.int32)
  for i, p in enumerate(PROMPTS):
    tokens[i, :len(p)] = p
  seqs = [list(p) for p in PROMPTS]
  lengths = jnp.asarray(lens)
  cache, nxt, logits, context = engine.prefill(variables, tokens, lengths, greedy, jax.random.key(0), cache_size=64)
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
    cache, nxt2, logits = engine.decode(variables, cache, nxt[:, None], lengths, context, greedy, jax.random.key(1))
    check(logits[:, 0], np.asarray(lengths))
    lengths, nxt = lengths + 1, nxt2[:, 0]


def test_cache_holds_only_latent_and_rope_key():
  """Flash: 28 layers x 2 blocks x (512 + 64) values per token, nothing else (shapes only)."""
  c = lj.get_config("flash", dtype="bfloat16", param_dtype="bfloat16")
  assert inference.cache_values_per_token(c) == 28 * 2 * (512 + 64)
  assert inference.cache_bytes_per_token(c) == 28 * 2 * 576 * 2
  model = lj.LongcatForCausalLM(c)
  shapes = jax.eval_shape(lambda: {k: nn.meta.unbox(v) for k, v in model.init(
      jax.random.key(0), jnp.zeros((1, 1), jnp.int32)).items() if k in ("params", "expert_bias")})
  engine = engine_lib.Engine(model)
  cache = jax.eval_shape(lambda v: engine._prefill(v, jnp.zeros((2, 16), jnp.int32), jnp.full((2,), 16),
                                                   Sampling(0.0), jax.random.key(0), cache_size=256)[0], shapes)
  leaves = jax.tree.leaves(cache)
  assert all(x.shape[:3] == (28, 2, 256) and x.dtype == jnp.bfloat16 for x in leaves)
  assert sum(x.shape[0] * x.shape[-1] for x in leaves) == inference.cache_values_per_token(c)


def test_sampling_filters():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]]))
  finite = lambda s: np.isfinite(np.asarray(filter_logits(logits, s)))
  np.testing.assert_array_equal(finite(make_sampling(1.0, top_k=2)), [[1, 1, 0, 0], [0, 0, 1, 1]])
  # top_p keeps the smallest prefix with mass >= p: 0.5 + 0.3 >= 0.7.
  np.testing.assert_array_equal(finite(make_sampling(1.0, top_p=0.7)), [[1, 1, 0, 0], [0, 0, 1, 1]])
  np.testing.assert_array_equal(finite(make_sampling(1.0, top_p=0.4)), [[1, 0, 0, 0], [0, 0, 0, 1]])
  np.testing.assert_array_equal(finite(make_sampling(1.0, top_k=3, top_p=0.9)), [[1, 1, 1, 0], [0, 1, 1, 1]])
  np.testing.assert_array_equal(sample(logits, jax.random.key(0), make_sampling(0.0)), [0, 3])
  draws = np.asarray(jax.vmap(lambda k: sample(logits, k, make_sampling(1.0, top_k=2)))(
      jax.random.split(jax.random.key(0), 2000)))
  assert set(np.unique(draws[:, 0])) == {0, 1}
  # Renormalised top-2 of row 0: p(0) = 0.5 / 0.8.
  assert abs((draws[:, 0] == 0).mean() - 0.625) < 0.05
  with pytest.raises(ValueError, match="top_p"):
    make_sampling(1.0, top_p=0.0)
  with pytest.raises(ValueError, match="temperature"):
    make_sampling(-1.0)


def test_sampled_generation_is_seeded(reference):
  _, _, model, variables = reference
  kw = dict(temperature=0.9, top_k=20, top_p=0.95, eos_token_id=())
  a = inference.generate(model, variables, PROMPTS, 6, seed=3, **kw)
  b = inference.generate(model, variables, PROMPTS, 6, seed=3, **kw)
  c = inference.generate(model, variables, PROMPTS, 6, seed=4, **kw)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  assert not np.array_equal(a.tokens, c.tokens)
  assert (a.num_tokens == 6).all()
  # Sampling settings are traced values: greedy and sampled calls share one decode compile.
  inference.generate(model, variables, PROMPTS, 3, temperature=0.0)
  assert engine_lib.engine_for(model).decode._cache_size() == 1


def test_generate_errors_name_the_problem(reference):
  _, _, model, variables = reference
  with pytest.raises(ValueError, match="prompt 1 is empty"):
    inference.generate(model, variables, [[1, 2], []], 4)
  with pytest.raises(ValueError, match="max_position_embeddings"):
    inference.generate(model, variables, PROMPTS, model.config.max_position_embeddings)
  with pytest.raises(ValueError, match="attention_mask shape"):
    inference.generate(model, variables, np.ones((2, 3), np.int32), 4, attention_mask=np.ones((2, 4)))


# ---------------------------------------------------------------------------------------------
# MTP speculative decoding.


@pytest.fixture(scope="module")
def mtp_model():
  """Tiny model with 2 MTP heads, and YaRN + n-gram embeddings (LongCat-Flash-Lite features)."""
  c = lj.get_config("tiny", mtp_num_heads=2,
                    rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=16, beta_fast=32,
                                      beta_slow=1, mscale=1, mscale_all_dim=1),
                    ngram_embedding=dict(vocab_size_ratio=3, neighbor_num=3, split_num=2, row_multiple=64))
  model = lj.LongcatForCausalLM(c)
  return model, lj.init_variables(model, jax.random.key(0))


def test_greedy_with_ngram_embeddings_and_yarn_equals_full_recompute(mtp_model):
  """Decoding carries the n-gram context: greedy generate equals a greedy loop that recomputes
  the whole sequence for every token."""
  model, variables = mtp_model
  out = inference.generate(model, variables, PROMPTS, 10, temperature=0.0, eos_token_id=())
  full = jax.jit(model.apply)
  for row, prompt in zip(out.tokens, PROMPTS):
    seq = list(prompt)
    for _ in range(10):
      logits = full(variables, np.array([seq + [0] * (32 - len(seq))]))[0, len(seq) - 1]
      seq.append(int(jnp.argmax(logits)))
    np.testing.assert_array_equal(row, seq[len(prompt):])


def _bigram_drafter(model, variables, alpha):
  """Layer norm scales and n-gram projections x alpha (alpha = 0: every layer is the identity and
  the embedding E0[tok] / (1 + tables), so the model is a bigram lm_head(final_norm(E0[tok])))
  and MTP heads that are exact bigram drafters: eh_proj passes the normed embedding of the token
  ahead through, their attention/MLP inputs are zeroed, and they share the main final norm.
  alpha = 0 drafts perfectly; 0 < alpha < 1 partly."""
  c = model.config
  p = dict(variables["params"])
  p["ngram_embedding"] = {k: w * alpha if k.startswith("post_proj") else w for k, w in p["ngram_embedding"].items()}
  layers = dict(p["decoder"]["layers"])
  for n in ("input_norm_0", "input_norm_1", "post_attn_norm_0", "post_attn_norm_1"):
    layers[n] = {"scale": layers[n]["scale"] * alpha}
  p["decoder"] = {**p["decoder"], "layers": layers}
  mtp, h = dict(p["mtp"]), c.hidden_size
  for j in range(c.mtp_num_heads):
    mtp[f"layer_{j}"] = {**mtp[f"layer_{j}"], "eh_proj": jnp.concatenate([jnp.eye(h), jnp.zeros((h, h))]),
                         "enorm": {"scale": jnp.ones(h)}, "input_norm": {"scale": jnp.zeros(h)},
                         "post_attn_norm": {"scale": jnp.zeros(h)}}
  mtp["final_norm"] = p["final_norm"]
  p["mtp"] = mtp
  return {**variables, "params": p}


def test_speculative_greedy_equals_plain_greedy(mtp_model):
  model, variables = mtp_model
  for alpha in (0.0, 0.1):
    v = _bigram_drafter(model, variables, alpha)
    free = inference.generate(model, v, PROMPTS, 20, temperature=0.0, eos_token_id=())
    eos = int(free.tokens[0, 9])  # row 0 stops inside a speculative step
    plain = inference.generate(model, v, PROMPTS, 20, temperature=0.0, eos_token_id=eos)
    for k in (1, 2):
      spec = inference.generate(model, v, PROMPTS, 20, temperature=0.0, eos_token_id=eos, num_draft_tokens=k)
      np.testing.assert_array_equal(spec.tokens, plain.tokens, err_msg=f"alpha={alpha} k={k}")
      np.testing.assert_array_equal(spec.num_tokens, plain.num_tokens)
      if alpha == 0.0:  # perfect drafts: every draft accepted, k + 1 tokens per step
        assert spec.acceptance_rate == 1.0
        assert spec.decode_steps == math.ceil((plain.num_tokens.max() - 1) / (k + 1))
      else:
        assert 0.0 < spec.acceptance_rate < 1.0, spec.acceptance_rate
  with pytest.raises(ValueError, match="mtp_num_heads=2"):
    inference.generate(model, variables, PROMPTS, 4, temperature=0.0, num_draft_tokens=3)


def test_mtp_drafts_match_full_recompute(mtp_model):
  """Head 1's cached drafts equal the argmax of `mtp_hidden` on the full sequence, every step."""
  from longcat_jax.inference import speculative
  model, variables = mtp_model
  engine = speculative.engine_for(model, 1)
  lens = np.array([7, 3], np.int32)
  tokens = np.zeros((2, 16), np.int32)
  for i, p in enumerate(PROMPTS):
    tokens[i, :len(p)] = p
  state, first = engine.prefill(variables, tokens, jnp.asarray(lens), Sampling(0.0), jax.random.key(0),
                                cache_size=64)
  seqs = [list(p) + [int(t)] for p, t in zip(PROMPTS, np.asarray(first))]
  record = []  # (m, draft): the draft for position m + 1, made by head 1 at position m - 1
  for _ in range(10):
    record.append((np.asarray(state.lengths), np.asarray(state.drafts)[:, 0]))
    state, emitted, num, _ = engine.step(variables, state, jnp.ones(2, bool), Sampling(0.0), jax.random.key(1))
    for i in range(2):
      seqs[i].extend(np.asarray(emitted)[i, :int(num[i])].tolist())
  ids = np.array([s[:32] + [0] * (32 - len(s[:32])) for s in seqs])
  def head1_argmax(variables, ids):
    hidden = model.apply(variables, ids, return_hidden=True)
    head1 = model.apply(variables, hidden, ids, method="mtp_hidden")[0]
    return jnp.argmax(model.apply(variables, head1, method="logits"), -1)

  want = np.asarray(jax.jit(head1_argmax)(variables, ids))
  for m, drafts in record:
    np.testing.assert_array_equal(drafts, want[np.arange(2), m - 1])


def test_speculative_sampling_keeps_the_target_distribution():
  """verify_drafts: the first emitted token is distributed as the main model's p, whatever q is."""
  from longcat_jax.inference.speculative import verify_drafts
  sampling = Sampling(1.0)
  p_logits = jnp.log(jnp.array([[[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1]]]))
  q = jnp.array([[[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]]])

  def once(key):
    kd, kv = jax.random.split(key)
    drafts = jax.random.categorical(kd, jnp.log(q), axis=-1).astype(jnp.int32)
    a, last = verify_drafts(p_logits, drafts, q, kv, sampling)
    return jnp.where(a[0] > 0, drafts[0, 0], last[0]), a[0]

  first, a = jax.vmap(once)(jax.random.split(jax.random.key(0), 40000))
  freq = np.bincount(np.asarray(first), minlength=4) / first.shape[0]
  np.testing.assert_allclose(freq, [0.1, 0.2, 0.3, 0.4], atol=0.01)
  # Acceptance of the first draft: sum_x min(p, q) = 0.1 + 0.2 + 0.2 + 0.1.
  assert abs((np.asarray(a) > 0).mean() - 0.6) < 0.01


def test_cli_streams_text_and_reports_throughput(tmp_path, capsys, mtp_model):
  cli = importlib.import_module("longcat_jax.generate")  # the module; longcat_jax.generate is the function
  from longcat_jax.data.tokenizer import ByteTokenizer
  model, variables = mtp_model  # vocab 320 covers the byte tokenizer's 259 ids; MTP, n-grams, YaRN round-trip
  path = str(tmp_path / "ckpt")
  lj.save_pretrained(path, model, variables)
  prompt = "def f(x):"
  assert cli.main(["--checkpoint", path, "--prompt", prompt, "--max-new-tokens", "12", "--temperature", "0",
                   "--draft-tokens", "1"]) == 0
  out = capsys.readouterr()
  loaded, loaded_vars = lj.load_pretrained(path)
  tok = ByteTokenizer()
  want = inference.generate(loaded, loaded_vars, [[tok.bos_id] + tok.encode(prompt)], 12, temperature=0.0,
                            eos_token_id=tok.eos_id, num_draft_tokens=1)
  assert out.out == prompt + tok.decode(want.tokens[0, :want.num_tokens[0]]) + "\n"
  assert "tokens/s" in out.err and "MTP draft acceptance" in out.err
  # Importing the CLI module rebinds longcat_jax.generate to it; it must still generate.
  again = lj.generate(loaded, loaded_vars, [[tok.bos_id] + tok.encode(prompt)], 12, temperature=0.0,
                      eos_token_id=tok.eos_id, num_draft_tokens=1)
  np.testing.assert_array_equal(again.tokens, want.tokens)


def test_sharded_generation_equals_single_device(reference):
  """On a data x tensor mesh the cache is sharded along batch and the tokens do not change."""
  from longcat_jax.parallel import MeshPlacement, sharding
  _, _, model, variables = reference
  want = inference.generate(model, variables, PROMPTS, 8, temperature=0.0, eos_token_id=())
  pc = sharding.parallel_config(mesh=dict(data=2, tensor=4))
  mesh = sharding.make_mesh(pc)
  model = model.clone(placement=MeshPlacement.from_parallel(mesh, pc))
  shardings = sharding.variable_shardings(model, mesh)
  placed = {k: jax.device_put(variables[k], shardings[k]) for k in ("params", "expert_bias")}
  tokens = np.zeros((2, 16), np.int32)
  got = inference.generate(model, placed, PROMPTS, 8, temperature=0.0, eos_token_id=())
  cache = engine_lib.engine_for(model).prefill(placed, tokens, jnp.array([3, 3]), Sampling(0.0),
                                               jax.random.key(0), cache_size=64)[0]
  np.testing.assert_array_equal(got.tokens, want.tokens)
  for leaf in jax.tree.leaves(cache):  # [layers, batch, slots, features]
    assert leaf.sharding.spec[1] in ("data", ("data",)), leaf.sharding.spec

"""LongCat-Flash-Lite / LongCat-2.0 features: YaRN, n-gram embeddings, presets, sparse attention."""

import json
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_reference import make_reference, reference_logits
from transformers import LongcatFlashConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

import longcat_jax as lj
from longcat_jax import config as config_lib
from longcat_jax.interop import CheckpointError
from longcat_jax.model import layers, ngram

# ---------------------------------------------------------------------------------------------
# YaRN.

YARN_CASES = {  # (rope_theta, rope dim, rope_scaling)
    "lite": (5e6, 64, dict(factor=10.0, original_max_position_embeddings=32768, beta_fast=32, beta_slow=1,
                           mscale=1.0, mscale_all_dim=1.0)),
    "x120_uneven_mscale": (1e6, 64, dict(factor=120.0, original_max_position_embeddings=8192, beta_fast=32,
                                         beta_slow=1, mscale=1.0, mscale_all_dim=0.707)),
    "no_mscale": (1e4, 32, dict(factor=4.0, original_max_position_embeddings=4096)),
}


@pytest.mark.parametrize("name", sorted(YARN_CASES))
def test_yarn_matches_transformers(name):
  theta, dim, scaling = YARN_CASES[name]
  cfg = lj.get_config("tiny", rope_theta=theta, qk_rope_head_dim=dim,
                      rope_scaling=dict(type="yarn", **scaling))
  hf = LongcatFlashConfig(qk_rope_head_dim=dim, head_dim=dim,
                          rope_parameters={"rope_theta": theta, "rope_type": "yarn", **scaling})
  want_inv, want_factor = ROPE_INIT_FUNCTIONS["yarn"](hf)
  inv, factor = layers.rope_inv_freq(cfg)
  np.testing.assert_allclose(inv, want_inv.numpy(), rtol=3e-7, atol=0)
  assert factor == pytest.approx(want_factor, rel=1e-12)
  # Interpolated and extrapolated frequencies both occur, so the ramp is exercised.
  plain = 1.0 / theta ** (np.arange(0, dim, 2) / dim)
  assert np.isclose(inv[0], plain[0]) and np.isclose(inv[-1], plain[-1] / scaling["factor"], rtol=1e-5)
  # cos/sin (with the attention factor) equal the transformers rotary embedding's.
  from transformers.models.longcat_flash.modeling_longcat_flash import LongcatFlashRotaryEmbedding
  pos = np.array([[0, 1, 17, 1000, 4095]])
  cos_t, sin_t = LongcatFlashRotaryEmbedding(hf)(torch.zeros(1), torch.as_tensor(pos))
  cos, sin = layers.rope_cos_sin(cfg, jnp.asarray(pos))
  np.testing.assert_allclose(cos, cos_t.numpy()[..., :dim // 2], atol=5e-4)
  np.testing.assert_allclose(sin, sin_t.numpy()[..., :dim // 2], atol=5e-4)
  # Softmax scale: qk_head_dim**-0.5 * mscale(factor, mscale_all_dim)**2, as DeepSeek-V3 / LongCat.
  from transformers.models.longcat_flash.modeling_longcat_flash import yarn_apply_mscale
  want_scale = yarn_apply_mscale(hf.rope_parameters, config_lib.qk_head_dim(cfg) ** -0.5)
  assert config_lib.softmax_scale(cfg) == pytest.approx(want_scale, rel=1e-12)


def test_yarn_model_matches_transformers_via_config_json(tmp_path):
  """A YaRN checkpoint (rope_parameters in config.json) loads and matches transformers' logits."""
  rope = {"rope_theta": 10000.0, "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
          "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.5}
  ref = make_reference(seed=3, bias_scale=0.05, rope_parameters=rope, max_position_embeddings=64)
  ref.save_pretrained(str(tmp_path))
  model, variables = lj.load_pretrained(str(tmp_path))
  assert model.config.rope_scaling["factor"] == 4.0
  assert config_lib.softmax_scale(model.config) != config_lib.qk_head_dim(model.config) ** -0.5
  ids = np.random.RandomState(0).randint(0, ref.config.vocab_size, (2, 40))
  ours = np.asarray(jax.jit(model.apply)(variables, ids))
  np.testing.assert_allclose(ours, reference_logits(ref, ids), atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------
# N-gram embeddings.


def numpy_ngram_ids(tokens, vocab, m, neighbor_num, split_num):
  """Spec section 4, literally: int64, tokens before the start count as 0."""
  tokens = np.asarray(tokens, np.int64)
  b, s = tokens.shape
  out = []
  for n in range(2, neighbor_num + 1):
    for j in range(split_num):
      mod = m + 2 * ((n - 2) * split_num + j) + 1
      ids = np.zeros((b, s), np.int64)
      for i in range(s):
        v = tokens[:, i].copy()
        for d in range(1, n):
          prev = tokens[:, i - d] if i - d >= 0 else np.zeros(b, np.int64)
          v += prev * (vocab ** d % mod)
        ids[:, i] = v % mod
      out.append(ids)
  return np.stack(out)


NGRAM_DIMS = {"flash_lite": (131072, 78, 4, 4), "longcat2": (163840, 100.567, 5, 4), "tiny": (320, 3, 3, 4)}


@pytest.mark.parametrize("name", sorted(NGRAM_DIMS))
def test_ngram_ids_match_numpy_int64(name):
  vocab, ratio, n, k = NGRAM_DIMS[name]
  m = int(ratio * vocab)
  rng = np.random.RandomState(1)
  tokens = rng.randint(0, vocab, (3, 37))
  tokens[0, :6] = vocab - 1           # largest products
  tokens[1, :4] = 0
  moduli = [m + 2 * i + 1 for i in range(k * (n - 1))]
  want = numpy_ngram_ids(tokens, vocab, m, n, k)
  if name != "tiny":
    assert (vocab - 1) * max(moduli) > 2**31  # the int64 products would overflow a naive int32 hash
  ids = ngram.ngram_ids(jnp.asarray(tokens), vocab_size=vocab, moduli=moduli, neighbor_num=n, split_num=k)
  assert ids.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(ids), want)
  # Decoding in chunks with the n-gram cache gives the same ids as the whole stream at once.
  ctx = jnp.zeros((3, n - 1), jnp.int32)
  got = []
  for lo, hi in ((0, 1), (1, 2), (2, 9), (9, 10), (10, 37)):
    chunk = jnp.asarray(tokens[:, lo:hi])
    got.append(ngram.ngram_ids(chunk, vocab_size=vocab, moduli=moduli, neighbor_num=n, split_num=k,
                               context=ctx))
    ctx = ngram.update_ngram_context(ctx, chunk)
  np.testing.assert_array_equal(np.concatenate([np.asarray(g) for g in got], axis=-1), want)


def test_ngram_segments_reset_like_separate_documents():
  vocab, ratio, n, k = NGRAM_DIMS["flash_lite"]
  m = int(ratio * vocab)
  moduli = [m + 2 * i + 1 for i in range(k * (n - 1))]
  rng = np.random.RandomState(2)
  docs = [rng.randint(0, vocab, (1, L)) for L in (5, 2, 9)]
  packed = np.concatenate(docs, axis=1)
  seg = np.concatenate([np.full((1, d.shape[1]), i + 1) for i, d in enumerate(docs)], axis=1)
  ids = ngram.ngram_ids(jnp.asarray(packed), vocab_size=vocab, moduli=moduli, neighbor_num=n, split_num=k,
                        segment_ids=jnp.asarray(seg))
  want = np.concatenate([numpy_ngram_ids(d, vocab, m, n, k) for d in docs], axis=-1)
  np.testing.assert_array_equal(np.asarray(ids), want)


def ngram_tiny(**overrides):
  kw = dict(ngram_embedding=dict(vocab_size_ratio=3, neighbor_num=3, split_num=4, row_multiple=64))
  kw.update(overrides)
  return lj.get_config("tiny", **kw)


def random_variables(model, seed=0):
  """Random variables of the model's shapes without compiling its init (tests stay fast)."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
  rng = np.random.RandomState(seed)
  fill = lambda s: jnp.asarray(0.05 * rng.standard_normal(s.shape), s.dtype)
  return {k: jax.tree.map(fill, flax.linen.meta.unbox(shapes[k])) for k in ("params", "expert_bias")}


def test_ngram_embedding_matches_numpy_formula():
  cfg = ngram_tiny()
  module = ngram.NgramEmbedding(cfg)
  rng = np.random.RandomState(3)
  tokens = rng.randint(0, cfg.vocab_size, (2, 11))
  words = rng.standard_normal((2, 11, cfg.hidden_size)).astype(np.float32)
  params = module.init(jax.random.key(0), jnp.asarray(tokens), jnp.asarray(words))["params"]
  p = jax.tree.map(np.asarray, flax.linen.meta.unbox(params))
  apply = jax.jit(lambda t, w, ctx: module.apply({"params": params}, t, w, context=ctx))
  got = np.asarray(apply(tokens, words, None))
  m = int(3 * cfg.vocab_size)
  ids = numpy_ngram_ids(tokens, cfg.vocab_size, m, 3, 4)
  e = words.astype(np.float64)
  for i in range(8):
    table = p[f"table_{i}"]
    assert table.shape == (-(-(m + 2 * i + 1) // 64) * 64, cfg.hidden_size // 8)
    e = e + table[ids[i]].astype(np.float64) @ p[f"post_proj_{i}"]
  np.testing.assert_allclose(got, e / 9, atol=1e-6, rtol=1e-5)
  # An n-gram context (decoding) changes the first N - 1 positions only.
  with_ctx = np.asarray(apply(tokens, words, jnp.asarray([[5, 7], [9, 11]])))
  assert np.abs(with_ctx[:, :2] - got[:, :2]).max() > 1e-4
  np.testing.assert_allclose(with_ctx[:, 2:], got[:, 2:], atol=1e-6)


def test_ngram_model_embed_hook():
  """`LongcatForCausalLM.embed` adds the n-grams when `config.ngram_embedding` is set."""
  cfg = ngram_tiny()
  model = lj.LongcatForCausalLM(cfg)
  variables = random_variables(model)
  tokens = np.random.RandomState(5).randint(0, cfg.vocab_size, (1, 7))
  got = jax.jit(lambda v, t: model.apply(v, t, method=model.embed))(variables, tokens)
  words = variables["params"]["embed_tokens"][tokens]
  want = ngram.NgramEmbedding(cfg).apply({"params": variables["params"]["ngram_embedding"]}, tokens, words)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)


def test_ngram_checkpoint_keys_roundtrip(tmp_path):
  cfg = ngram_tiny()
  model = lj.LongcatForCausalLM(cfg)
  variables = random_variables(model, seed=1)
  lj.save_pretrained(str(tmp_path / "ck"), model, variables)
  with open(tmp_path / "ck" / "model.safetensors.index.json") as f:
    keys = json.load(f)["weight_map"]
  from safetensors import safe_open
  m = int(3 * cfg.vocab_size)
  with safe_open(str(tmp_path / "ck" / "model.safetensors"), "numpy") as f:
    for i in range(8):
      assert f.get_slice(f"model.ngram_embeddings.embedders.{i}.weight").get_shape() == [m + 2 * i + 1, 8]
      assert f.get_slice(f"model.ngram_embeddings.post_projs.{i}.weight").get_shape() == [cfg.hidden_size, 8]
  assert "model.embed_tokens.weight" in keys
  with open(tmp_path / "ck" / "config.json") as f:
    hf = json.load(f)
  assert (hf["model_type"], hf["ngram_vocab_size_ratio"], hf["emb_neighbor_num"], hf["emb_split_num"]) == (
      "longcat_flash_ngram", 3, 3, 4)
  model2, variables2 = lj.load_pretrained(str(tmp_path / "ck"))   # default row padding (1024)
  assert dict(model2.config.ngram_embedding) == dict(vocab_size_ratio=3, neighbor_num=3, split_num=4)
  a, b = variables["params"]["ngram_embedding"], variables2["params"]["ngram_embedding"]
  for i in range(8):
    rows = m + 2 * i + 1
    assert b[f"table_{i}"].shape == (1024, 8)
    np.testing.assert_array_equal(np.asarray(b[f"table_{i}"][:rows]), np.asarray(a[f"table_{i}"][:rows]))
    np.testing.assert_array_equal(np.asarray(b[f"post_proj_{i}"]), np.asarray(a[f"post_proj_{i}"]))
  np.testing.assert_array_equal(np.asarray(variables2["params"]["embed_tokens"]),
                                np.asarray(variables["params"]["embed_tokens"]))
  # A table with the wrong number of rows is refused, naming the tensor.
  from safetensors.numpy import load_file, save_file
  tensors = load_file(str(tmp_path / "ck" / "model.safetensors"))
  tensors["model.ngram_embeddings.embedders.3.weight"] = tensors["model.ngram_embeddings.embedders.3.weight"][:-1]
  save_file(tensors, str(tmp_path / "ck" / "model.safetensors"))
  with pytest.raises(CheckpointError, match=r"embedders\.3"):
    lj.load_pretrained(str(tmp_path / "ck"))


# ---------------------------------------------------------------------------------------------
# Presets and parameter counts (published totals: Lite model card; LongCat-2.0 announcement).


def test_flash_lite_count_matches_published():
  pc = lj.count_params(lj.get_config("flash_lite"))
  assert abs(pc.total / 68.5e9 - 1) < 0.01
  ngram_params = pc.embedding - 131072 * 3072
  assert abs(ngram_params / 31.4e9 - 1) < 0.01
  assert abs(pc.activated_min / 2.9e9 - 1) < 0.05 and abs(pc.activated_max / 4.5e9 - 1) < 0.05


def test_longcat2_count_matches_published():
  cfg = lj.get_config("longcat2")
  pc = lj.count_params(cfg)
  assert abs(pc.total / 1.6e12 - 1) < 0.05
  assert abs((pc.embedding - cfg.vocab_size * cfg.hidden_size) / 135e9 - 1) < 0.02
  assert abs(pc.activated_target / 48e9 - 1) < 0.05


# ---------------------------------------------------------------------------------------------
# Sparse attention: the kernel (pallas_kernels/sparse_attention.py) and the indexer.

from pallas_kernels import sparse_attention as sa  # noqa: E402
from longcat_jax.model import sparse_attention as lsa  # noqa: E402


def masked_dense_attention(q, k, v, indices, sm_scale):
  """Dense MQA attention over all T keys with every key not in `indices` masked out."""
  mask = sa.indices_to_mask(indices, k.shape[1])                       # [B, S, T]
  s = jnp.einsum("bshd,btd->bsht", q, k) * sm_scale
  s = jnp.where(mask[:, :, None, :], s, -jnp.inf)
  p = jax.nn.softmax(s, axis=-1)
  p = jnp.where(mask[:, :, None, :], p, 0.0)                           # rows with no key -> 0
  return jnp.einsum("bsht,btd->bshd", p, v)


@pytest.fixture(scope="module")
def sparse_problem():
  rng = np.random.RandomState(0)
  b, s, h, dk, dv, t, k = 2, 7, 4, 24, 16, 11, 5
  q = jnp.asarray(rng.randn(b, s, h, dk), jnp.float32)
  kk = jnp.asarray(rng.randn(b, t, dk), jnp.float32)
  v = jnp.asarray(rng.randn(b, t, dv), jnp.float32)
  idx = np.stack([np.stack([rng.permutation(t)[:k] for _ in range(s)]) for _ in range(b)]).astype(np.int32)
  idx[0, 0, 2:] = -1          # fewer visible keys than K
  idx[1, 3, :] = -1           # a row with no key at all
  return q, kk, v, jnp.asarray(idx)


@pytest.mark.parametrize("impl", ["xla", "interpret", "xla_chunked"])
def test_sparse_attention_equals_masked_dense(sparse_problem, impl, monkeypatch):
  q, k, v, idx = sparse_problem
  if impl == "xla_chunked":
    monkeypatch.setattr(sa, "XLA_CHUNK", 3)   # S = 7 -> three lax.map steps, one padded
  f = lambda q, k, v: sa.sparse_attention(q, k, v, idx, sm_scale=0.3, block_k=2,
                                          implementation="interpret" if impl == "interpret" else "xla")
  want = masked_dense_attention(q, k, v, idx, 0.3)
  got = f(q, k, v)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6)
  assert float(jnp.abs(got[1, 3]).max()) == 0.0
  loss = lambda fn: (lambda q, k, v: jnp.sum(fn(q, k, v) * jnp.cos(jnp.arange(16.0))))
  g = jax.grad(loss(f), argnums=(0, 1, 2))(q, k, v)
  g_want = jax.grad(loss(lambda q, k, v: masked_dense_attention(q, k, v, idx, 0.3)), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(g, g_want):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-6)


def test_select_topk_forces_sinks_and_local_window():
  b, s = 1, 12
  pos = jnp.broadcast_to(jnp.arange(s), (b, s))
  scores = jnp.asarray(np.random.RandomState(1).randn(b, s, s), jnp.float32)
  mask = lsa.visible_mask(pos, pos)
  idx = np.asarray(lsa.select_topk(scores, mask, pos, pos, top_k=5, init_tokens=1, local_tokens=2))
  for i in range(s):
    sel = set(idx[0, i][idx[0, i] >= 0].tolist())
    assert sel <= set(range(i + 1))                    # causal
    assert len(sel) == min(5, i + 1)
    assert {0, i, max(i - 1, 0)} <= sel                # sink + the local window
    free = sorted(set(range(1, i - 1)), key=lambda t: -float(scores[0, i, t]))
    assert sel - {0, i, i - 1} == set(free[:len(sel - {0, i, i - 1})])  # the rest by score


def test_chunked_selection_equals_whole(monkeypatch):
  """Query blocks (lax.map) and the head-by-head score sum select the same keys as one pass."""
  rng = np.random.RandomState(4)
  b, s, hi, di = 2, 37, 3, 8
  q, keys = jnp.asarray(rng.randn(b, s, hi, di), jnp.float32), jnp.asarray(rng.randn(b, s, di), jnp.float32)
  w = jnp.asarray(rng.randn(b, s, hi), jnp.float32)
  pos = jnp.broadcast_to(jnp.arange(s), (b, s))
  seg = jnp.asarray(np.repeat([[1] * 20 + [2] * 17], b, axis=0))
  kw = dict(top_k=6, init_tokens=1, local_tokens=2)
  whole = lsa.select_keys(q, w, keys, pos, pos, seg, seg, block_q=64, **kw)
  monkeypatch.setattr(lsa, "SCORE_BLOCK_ELEMENTS", 1)
  chunked = lsa.select_keys(q, w, keys, pos, pos, seg, seg, block_q=8, **kw)
  np.testing.assert_array_equal(np.asarray(chunked), np.asarray(whole))
  assert (np.asarray(whole)[:, 25] >= 20).all()  # query 25 sees only its own segment (keys 20..25)


# The indexer's formula (interleaved RoPE, scaled query latent) is tested against the released
# code's in tests/test_longcat2_release.py (mlx-lm longcat2.py); DeepSeek-V3.2's indexer ropes
# half-split, which LongCat-2.0 does not.


def sparse_tiny(top_k, **overrides):
  kw = dict(sparse_attention=dict(index_heads=2, index_dim=16, top_k=top_k, init_tokens=1, local_tokens=2),
            kernels="xla")
  kw.update(overrides)
  return lj.get_config("tiny", **kw)


def _ce_and_grads(model, variables, ids, seg=None):
  def loss(params):
    logits = model.apply({**variables, "params": params}, ids[:, :-1], None, None if seg is None else seg[:, :-1])
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
    return -jnp.take_along_axis(logp, ids[:, 1:, None], -1).mean(), logits
  (l, logits), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
  return l, logits, g


def test_sparse_model_with_large_top_k_equals_dense():
  """top_k >= S: every visible key is selected, so the sparse (absorbed, gathered) layers equal the
  dense MLA layers, forward and backward; the indexer gets no gradient from the LM loss."""
  sparse = lj.LongcatForCausalLM(sparse_tiny(top_k=32))
  dense = lj.LongcatForCausalLM(lj.get_config("tiny", kernels="xla"))
  variables = random_variables(sparse, seed=7)
  layers_p = variables["params"]["decoder"]["layers"]
  assert set(layers_p["indexer"]) == {"wq_b", "wk", "k_norm", "weights_proj"}
  dense_vars = {**variables, "params": {**variables["params"], "decoder": {"layers": {
      k: v for k, v in layers_p.items() if k != "indexer"}}}}
  ids = jnp.asarray(np.random.RandomState(8).randint(0, 320, (2, 21)))
  seg = jnp.asarray(np.repeat([[1] * 12 + [2] * 9], 2, axis=0))
  l_s, logits_s, g_s = _ce_and_grads(sparse, variables, ids, seg)
  l_d, logits_d, g_d = _ce_and_grads(dense, dense_vars, ids, seg)
  np.testing.assert_allclose(np.asarray(logits_s), np.asarray(logits_d), atol=2e-5)
  assert float(l_s) == pytest.approx(float(l_d), rel=1e-5)
  g_idx = g_s["decoder"]["layers"].pop("indexer")
  assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(g_idx))
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g_s)[0], jax.tree.leaves(g_d)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-3, err_msg=jax.tree_util.keystr(path))


def test_sparse_decode_selects_from_cache_like_prefill():
  """With top_k < S, decoding over the compressed cache (indexer keys cached too), one token at a
  time or several at once (speculative verification), gives the full forward's logits: the same
  keys are selected from the cache."""
  from longcat_jax.inference.cache import pad_cache
  from longcat_jax.model.attention import CACHE
  cfg = sparse_tiny(top_k=4)
  model = lj.LongcatForCausalLM(cfg)
  variables = random_variables(model, seed=9)
  ids = jnp.asarray(np.random.RandomState(10).randint(0, 320, (2, 14)))
  full = jax.jit(model.apply)(variables, ids)
  n_prompt = 6
  prefill = jax.jit(lambda v, t: model.apply(v, t, method="prefill", mutable=[CACHE]))
  hidden, state = prefill(variables, ids[:, :n_prompt])
  assert state[CACHE]["decoder"]["layers"]["indexer"]["index_k"].shape == (cfg.num_layers, 2, n_prompt, 16)
  cache = pad_cache(state[CACHE], 16)
  decode = jax.jit(lambda v, c, t, n: model.apply({**v, CACHE: c}, t, n, method="decode", mutable=[CACHE]))
  got = [model.apply(variables, hidden, method="logits")]
  lengths = jnp.full((2,), n_prompt, jnp.int32)
  for lo, hi in ((6, 7), (7, 8), (8, 9), (9, 10), (10, 14)):  # one token at a time, then 4 at once
    h, state = decode(variables, cache, ids[:, lo:hi], lengths)
    cache, lengths = state[CACHE], lengths + (hi - lo)
    got.append(model.apply(variables, h, method="logits"))
  got = np.concatenate([np.asarray(g) for g in got], axis=1)
  np.testing.assert_allclose(got, np.asarray(full), atol=2e-5)
  # And the selection really is sparse: a dense model's logits differ.
  dense_vars = {**variables, "params": {**variables["params"], "decoder": {"layers": {
      k: v for k, v in variables["params"]["decoder"]["layers"].items() if k != "indexer"}}}}
  dense = lj.LongcatForCausalLM(lj.get_config("tiny", kernels="xla"))
  assert float(jnp.abs(jax.jit(dense.apply)(dense_vars, ids) - full).max()) > 1e-3


def test_indexer_and_longcat2_config_roundtrip(tmp_path):
  """Indexer weights under `self_attn.0.indexer.*` (DeepSeek-V3.2 names) and the LongCat-2.0
  config.json fields (SGLang's LongcatFlashProConfig) map both ways."""
  cfg = sparse_tiny(top_k=4, ngram_embedding=dict(vocab_size_ratio=2.5, neighbor_num=3, split_num=2, eos_reset=True),
                    latent_norm_eps=1e-5)
  model = lj.LongcatForCausalLM(cfg)
  variables = random_variables(model, seed=11)
  lj.save_pretrained(str(tmp_path), model, variables)
  from safetensors import safe_open
  with safe_open(str(tmp_path / "model.safetensors"), "numpy") as f:
    assert f.get_slice("model.layers.1.self_attn.0.indexer.wq_b.weight").get_shape() == [2 * 16, cfg.q_lora_rank]
    assert f.get_slice("model.layers.0.self_attn.0.indexer.weights_proj.weight").get_shape() == [2, cfg.hidden_size]
  model2, variables2 = lj.load_pretrained(str(tmp_path), config_overrides=dict(kernels="xla"))
  assert dict(model2.config.sparse_attention) == dict(cfg.sparse_attention)
  a, b = variables["params"]["decoder"]["layers"]["indexer"], variables2["params"]["decoder"]["layers"]["indexer"]
  for k in a:
    np.testing.assert_array_equal(np.asarray(a[k], np.float32), np.asarray(b[k], np.float32))
  # A LongCat-2.0 config.json (field names of SGLang's LongcatFlashProConfig).
  hf = dict(vocab_size=163840, hidden_size=8192, num_layers=38, num_attention_heads=64, n_routed_experts=768,
            zero_expert_num=128, moe_topk=12, expert_ffn_hidden_size=2048, ffn_hidden_size=12288,
            routed_scaling_factor=9.0, ngram_vocab_size_ratio=None, oe_vocab_size_ratio=100.567, oe_neighbor_num=5,
            oe_split_num=4, use_longcat_dsa=True, index_n_heads=32, index_head_dim=128, index_topk=2048,
            index_init_tokens=16, index_local_tokens=1024, index_k_norm_type="rms", cli_factor=2,
            num_nextn_predict_layers=1, mtp_num_layers=3, architectures=["LongcatCausalLM"], max_position_embeddings=262144,
            rope_scaling=dict(rope_type="deepseek_yarn", factor=120.0, original_max_position_embeddings=8192,
                              beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0))
  c2 = config_lib.from_hf_config(hf)
  want = lj.get_config("longcat2")
  for f in ("vocab_size", "hidden_size", "num_layers", "num_ffn_experts", "zero_experts", "mtp_num_heads",
            "mtp_shared_module", "max_position_embeddings", "latent_norm_eps", "rope_scaling"):
    assert c2[f] == want[f], f
  assert dict(c2.ngram_embedding) == dict(want.ngram_embedding)
  assert dict(c2.sparse_attention) == dict(want.sparse_attention)
  with pytest.raises(ValueError, match="index_k_norm_type"):
    config_lib.from_hf_config({**hf, "index_k_norm_type": "layernorm"})

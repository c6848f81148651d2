"""LongCat-2.0 as the released weights compute it (docs/LONGCAT2.md): the parts no runnable
reference covers are tested against the formulas as the public sources write them, each test
naming its source; the checkpoint in the released layout loads, saves back bitwise and generates
with 3-token MTP speculation."""

import json

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import longcat_jax as lj
from longcat_jax import inference
from longcat_jax.model import layers, ngram
from longcat_jax.model import sparse_attention as lsa

MLX2 = "mlx-lm mlx_lm/models/longcat2.py (ml-explore/mlx-lm commit 9049ab3a)"


def v2_tiny(**overrides):
  """A tiny LongCat-2.0: sparse attention, OE n-grams stopping at EOS, one MTP module x 3."""
  kw = dict(kernels="xla", latent_norm_eps=1e-5, mtp_num_heads=3, mtp_shared_module=True,
            sparse_attention=dict(index_heads=2, index_dim=16, top_k=4, init_tokens=1, local_tokens=2),
            ngram_embedding=dict(vocab_size_ratio=2.5, neighbor_num=3, split_num=2, eos_reset=True, row_multiple=64))
  kw.update(overrides)
  return lj.get_config("tiny", **kw)


def random_variables(model, seed=0, scale=0.05):
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
  rng = np.random.RandomState(seed)
  fill = lambda s: jnp.asarray(scale * rng.standard_normal(s.shape), s.dtype)
  return {k: jax.tree.map(fill, flax.linen.meta.unbox(shapes[k])) for k in ("params", "expert_bias")}


# ---------------------------------------------------------------------------------------------
# The indexer (differences 1-3).


def _traditional_rope(x, inv_freq, pos, dims):
  """mlx `nn.RoPE(dims, traditional=True)`: rotates adjacent pairs (2i, 2i+1) of the first `dims`."""
  ang = pos[:, :, None] * inv_freq[None, None, :]                      # [B, S, dims/2]
  if x.ndim == 4:
    ang = ang[:, :, None, :]
  c, s = np.cos(ang), np.sin(ang)
  out = x.copy()
  x0, x1 = x[..., 0:dims:2], x[..., 1:dims:2]
  out[..., 0:dims:2], out[..., 1:dims:2] = x0 * c - x1 * s, x0 * s + x1 * c
  return out


def test_indexer_matches_mlx_longcat2_formula():
  """`Indexer.__call__` of mlx-lm longcat2.py: q = wq_b(qr) with qr the SCALED query latent
  (`Longcat2Attention.__call__`), k = rms_norm(wk x), traditional (interleaved) RoPE on the first
  qk_rope_head_dim dims, w = weights_proj(x) * Hi^-0.5 * Di^-0.5, I = sum_h w_h relu(q_h . k),
  init/local tokens forced to +inf, causal mask, top-k."""
  cfg = v2_tiny(sparse_attention=dict(index_heads=3, index_dim=16, top_k=5, init_tokens=1, local_tokens=2))
  b, s, h, r = 2, 13, cfg.hidden_size, cfg.q_lora_rank
  rng = np.random.RandomState(2)
  x = rng.randn(b, s, h).astype(np.float32)
  p = dict(q_a=0.2 * rng.randn(h, r), q_a_norm=1 + 0.1 * rng.randn(r), wq_b=0.2 * rng.randn(r, 3, 16),
           wk=0.2 * rng.randn(h, 16), k_norm=1 + 0.1 * rng.randn(16), weights_proj=rng.randn(h, 3))
  p = {k: v.astype(np.float32) for k, v in p.items()}
  # numpy, as mlx-lm writes it
  rms = lambda a, w: w * a / np.sqrt((a * a).mean(-1, keepdims=True) + cfg.rms_norm_eps)
  qr = rms(x @ p["q_a"], p["q_a_norm"]) * np.sqrt(h / r)
  pos = np.broadcast_to(np.arange(s, dtype=np.float32), (b, s))
  inv_freq = 1.0 / cfg.rope_theta ** (np.arange(0, cfg.qk_rope_head_dim, 2) / cfg.qk_rope_head_dim)
  q = _traditional_rope(np.einsum("bsr,rhd->bshd", qr, p["wq_b"]), inv_freq, pos, cfg.qk_rope_head_dim)
  k = _traditional_rope(rms(x @ p["wk"], p["k_norm"]), inv_freq, pos, cfg.qk_rope_head_dim)
  w = (x @ p["weights_proj"]) * 3 ** -0.5 * 16 ** -0.5
  want = np.einsum("bsh,bsht->bst", w, np.maximum(np.einsum("bshd,btd->bsht", q, k), 0))
  # ours: the model's own query latent (MLA.q_latent) feeds the indexer
  from longcat_jax.model.attention import MLA
  cos, sin = layers.rope_cos_sin(cfg, jnp.asarray(pos, jnp.int32))
  mla = MLA(cfg)
  mp = flax.linen.meta.unbox(jax.eval_shape(lambda: mla.init(jax.random.key(0), jnp.asarray(x), cos, sin))["params"])
  mp = {k: jnp.zeros(a.shape, a.dtype) for k, a in mp.items()} | {"q_a": p["q_a"], "q_a_norm": p["q_a_norm"]}
  lat = mla.apply({"params": mp}, jnp.asarray(x), method=lambda m, x: m.q_latent(x))
  ip = {k: p[k] for k in ("wq_b", "wk", "k_norm", "weights_proj")}
  indexer = lsa.Indexer(cfg)
  got = indexer.apply({"params": ip}, jnp.asarray(x), lat, cos, sin,
                      method=lambda m, x, q, c, s: m.scores(x, q, c, s, m.keys(x, c, s)))
  vis = np.tril(np.ones((s, s), bool))
  np.testing.assert_allclose(np.asarray(got)[:, vis], want[:, vis], rtol=2e-5, atol=2e-5)
  idx = np.asarray(indexer.apply({"params": ip}, jnp.asarray(x), lat, cos, sin))
  forced = (np.arange(s)[None, :] < 1) | (np.arange(s)[:, None] - np.arange(s)[None, :] < 2)
  for bi in range(b):
    for i in range(5, s):  # more visible keys than top_k
      sc = np.where(forced[i], np.inf, want[bi, i])[: i + 1]
      assert set(idx[bi, i].tolist()) == set(np.argsort(-sc, kind="stable")[:5].tolist()), (bi, i)


def test_no_more_keys_than_top_k_is_exactly_dense():
  """mlx-lm longcat2.py `Indexer.__call__`: `if k.shape[2] <= index_topk: return None` (dense)."""
  cfg = v2_tiny(mtp_num_heads=0, sparse_attention=dict(index_heads=2, index_dim=16, top_k=8))
  sparse = lj.LongcatForCausalLM(cfg)
  v = random_variables(sparse, seed=3)
  x = jnp.ones((1, 8, cfg.hidden_size))
  cos, sin = layers.rope_cos_sin(cfg, jnp.arange(8)[None])
  ip = jax.tree.map(lambda a: a[0], v["params"]["decoder"]["layers"]["indexer"])
  assert lsa.Indexer(cfg).apply({"params": ip}, x, jnp.ones((1, 8, cfg.q_lora_rank)), cos, sin) is None
  dense_cfg = v2_tiny(mtp_num_heads=0, sparse_attention=None)
  dense = lj.LongcatForCausalLM(dense_cfg)
  dv = {**v, "params": {**v["params"], "decoder": {"layers": {
      k: a for k, a in v["params"]["decoder"]["layers"].items() if k != "indexer"}}}}
  ids = jnp.asarray(np.random.RandomState(4).randint(0, 320, (2, 8)))
  np.testing.assert_array_equal(np.asarray(sparse.apply(v, ids)), np.asarray(dense.apply(dv, ids)))


def test_topk_pattern_is_read_and_checked():
  """index_topk_pattern (SGLang LongcatFlashProConfig / mlx-lm `ModelArgs.__post_init__`: 'C' if
  block % cli_factor == 0 else 'S'): the released pattern is accepted, any other names its block."""
  from longcat_jax import config as config_lib
  base = dict(architectures=["LongcatCausalLM"], vocab_size=320, hidden_size=64, num_layers=2, index_topk=4,
              index_n_heads=2, index_head_dim=16, qk_rope_head_dim=8)
  c = config_lib.from_hf_config({**base, "index_topk_pattern": ["C", "S", "C", "S"]})
  assert lsa.sparse_settings(c)["topk_pattern"] == "CSCS"
  c = config_lib.from_hf_config({**base, "index_topk_pattern": ["C", "S", "C", "C"]})
  with pytest.raises(ValueError, match="block 3 is 'C'"):
    lsa.sparse_settings(c)


# ---------------------------------------------------------------------------------------------
# N-gram ids stop at EOS (difference 4).


def numpy_ngram_ids_eos(tokens, vocab, moduli, n, k, eos):
  """mlx-lm 9049ab3a longcat_flash_ngram.py `NgramEmbedding.__call__` in int64: reach = t - (last
  EOS strictly before t); neighbour d is zeroed unless reach > d."""
  b, s = tokens.shape
  out = np.zeros((len(moduli), b, s), np.int64)
  for bi in range(b):
    for t in range(s):
      last = max([j for j in range(t) if tokens[bi, j] == eos], default=-1)
      prev = lambda d: int(tokens[bi, t - d]) if t - d >= 0 and t - last > d else 0
      for nn in range(2, n + 1):
        for j in range(k):
          idx = (nn - 2) * k + j
          m = moduli[idx]
          out[idx, bi, t] = (int(tokens[bi, t]) + sum(prev(d) * pow(vocab, d, m) for d in range(1, nn))) % m
  return out


def test_ngram_ids_stop_at_eos_like_released_code():
  cfg = v2_tiny()
  rng = np.random.RandomState(5)
  tokens = rng.randint(3, cfg.vocab_size, (2, 15))
  tokens[0, [3, 4, 10]] = cfg.eos_token_id   # two EOS in a row, and one later
  tokens[1, 0] = cfg.eos_token_id
  s = ngram.ngram_settings(cfg)
  want = numpy_ngram_ids_eos(tokens, cfg.vocab_size, ngram.ngram_moduli(cfg), s["neighbor_num"], s["split_num"],
                             cfg.eos_token_id)
  got = np.asarray(ngram.ngram_ids_for_config(cfg, jnp.asarray(tokens)))
  np.testing.assert_array_equal(got, want)
  # Lite's code does not reset: the same tokens without eos_reset give different ids after an EOS.
  lite = v2_tiny(ngram_embedding=dict(vocab_size_ratio=2.5, neighbor_num=3, split_num=2))
  assert (np.asarray(ngram.ngram_ids_for_config(lite, jnp.asarray(tokens)))[:, 0, 5] != want[:, 0, 5]).any()
  # Decoding in chunks with the carried context gives the same ids.
  ctx = ngram.init_ngram_context(cfg, 2)
  chunks = []
  for lo, hi in ((0, 4), (4, 5), (5, 11), (11, 15)):
    chunks.append(np.asarray(ngram.ngram_ids_for_config(cfg, jnp.asarray(tokens[:, lo:hi]), context=ctx)))
    ctx = ngram.update_ngram_context(ctx, jnp.asarray(tokens[:, lo:hi]))
  np.testing.assert_array_equal(np.concatenate(chunks, axis=2), want)


# ---------------------------------------------------------------------------------------------
# Positions, norms, counts (differences 6, 7).


def test_longcat2_preset_positions_and_counts():
  cfg = lj.get_config("longcat2")
  assert cfg.max_position_embeddings == 262144 and cfg.rope_scaling["factor"] == 120.0
  assert cfg.rope_scaling["original_max_position_embeddings"] == 8192
  assert cfg.latent_norm_eps == cfg.rms_norm_eps == 1e-5
  pc = lj.count_params(cfg)
  assert abs(pc.serialized / 1775.56e9 - 1) < 1e-4, pc.summary()   # released: 1,775.56B elements
  assert abs(pc.total / 1.6e12 - 1) < 0.05
  assert 33e9 < pc.activated_min < pc.activated_max < 57e9


# ---------------------------------------------------------------------------------------------
# MTP (difference 5) and the released checkpoint layout.


def test_mtp_is_one_module_applied_three_times():
  """One `layer` (own embed_tokens, indexer, dense MLP), applied 3 times: a step equals applying
  that layer by hand to the previous step's output, with step 1's key selection."""
  from longcat_jax.model.mtp import MTPLayer
  from longcat_jax.model.layers import rms_norm
  cfg = v2_tiny()
  model = lj.LongcatForCausalLM(cfg)
  v = random_variables(model, seed=6, scale=0.1)
  mtp = v["params"]["mtp"]
  assert set(mtp) == {"layer", "embed_tokens", "final_norm"}
  assert set(mtp["layer"]["indexer"]) == {"wq_b", "wk", "k_norm", "weights_proj"}
  ids = jnp.asarray(np.random.RandomState(7).randint(0, 320, (2, 12)))
  hidden = model.apply(v, ids, return_hidden=True)
  got = np.asarray(model.apply(v, hidden, ids, method=model.mtp_hidden))
  cos, sin = layers.rope_cos_sin(cfg, jnp.broadcast_to(jnp.arange(12), (2, 12)))
  h, idx = hidden, None
  for k in range(3):
    emb = jnp.take(mtp["embed_tokens"], jnp.pad(ids, ((0, 0), (0, k + 1)))[:, k + 1:], axis=0)
    x, idx = MTPLayer(cfg).apply({"params": mtp["layer"]}, h, emb, cos, sin, None, None, idx, k > 0)
    h = rms_norm(x, mtp["final_norm"]["scale"], cfg.rms_norm_eps)
    np.testing.assert_allclose(got[k], np.asarray(h), atol=1e-6)
  assert idx is not None and idx.shape == (2, 12, 4)
  # Its indexer trains like the main ones: the KL (step 1's selection) reaches only mtp/layer/indexer.
  def mtp_kl(params):
    _, out = model.apply({**v, "params": params}, hidden, ids, method=model.mtp_hidden, mutable=["indexer_kl"])
    return out["indexer_kl"]["mtp"]["layer"]["mtp_kl"][0]
  kl, g = jax.value_and_grad(mtp_kl)(v["params"])
  assert np.isfinite(float(kl)) and float(kl) >= 0
  moved = {jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_flatten_with_path(g)[0] if float(jnp.abs(x).max()) > 0}
  assert moved and all("['mtp']['layer']['indexer']" in p for p in moved), moved


def _bigram_mtp(model, v):
  """MTP module that drafts exactly what a bigram main model predicts (layer norms zeroed)."""
  p = jax.tree.map(lambda a: a, v["params"])
  lay = dict(p["decoder"]["layers"])
  for n in ("input_norm_0", "input_norm_1", "post_attn_norm_0", "post_attn_norm_1"):
    lay[n] = {"scale": jnp.zeros_like(lay[n]["scale"])}
  p["decoder"] = {"layers": lay}
  p["ngram_embedding"] = {k: w * 0 if k.startswith("post_proj") else w for k, w in p["ngram_embedding"].items()}
  h = model.config.hidden_size
  layer = dict(p["mtp"]["layer"], eh_proj=jnp.concatenate([jnp.eye(h), jnp.zeros((h, h))]),
               enorm={"scale": jnp.ones(h)}, input_norm={"scale": jnp.zeros(h)}, post_attn_norm={"scale": jnp.zeros(h)})
  p["mtp"] = {"layer": layer, "embed_tokens": p["embed_tokens"], "final_norm": p["final_norm"]}
  return {**v, "params": p}


def test_released_layout_checkpoint_loads_saves_bitwise_and_speculates(tmp_path):
  cfg = v2_tiny()
  model = lj.LongcatForCausalLM(cfg)
  v = random_variables(model, seed=8, scale=0.1)
  rng = np.random.RandomState(9)
  unused = {f"model.mtp.oe_embed_tokens{i}.weight": rng.randn(5, 4).astype(np.float32) for i in range(2)}
  lj.save_pretrained(str(tmp_path / "a"), model, v, extra_tensors=unused)
  hf = json.loads((tmp_path / "a" / "config.json").read_text())
  assert hf["architectures"] == ["LongcatCausalLM"] and "model_type" not in hf and "use_longcat_dsa" not in hf
  assert hf["mtp_num_layers"] == 3 and hf["oe_vocab_size_ratio"] == 2.5 and hf["index_topk"] == 4
  keys = set(json.loads((tmp_path / "a" / "model.safetensors.index.json").read_text())["weight_map"])
  for k in ("model.oe_embed_tokens0.weight", "model.oe_embed_proj3.weight", "model.layers.1.self_attn.0.indexer.wq_b.weight",
            "model.mtp.layers.0.self_attn.indexer.wk.weight", "model.mtp.layers.0.self_attn.q_b_proj.weight",
            "model.mtp.layers.0.transformer_layer.mlp.down_proj.weight", "model.mtp.layers.0.enorm.m.weight",
            "model.mtp.embed_tokens.weight", "model.mtp.norm.weight"):
    assert k in keys, k
  assert not any(k.startswith(("model.mtp.layers.1.", "model.ngram_embeddings")) or "self_attn.1.indexer" in k
                 for k in keys)
  model2, v2 = lj.load_pretrained(str(tmp_path / "a"), config_overrides=dict(kernels="xla"))
  assert model2.config.mtp_shared_module and model2.config.ngram_embedding["eos_reset"]
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(v)[0], jax.tree.leaves(v2)):
    a, b = np.asarray(a), np.asarray(b)
    if "table_" in jax.tree_util.keystr(path):  # stored rows only (padding to row_multiple differs)
      rows = ngram.ngram_moduli(cfg)[int(jax.tree_util.keystr(path).split("table_")[1][0])]
      a, b = a[:rows], b[:rows]
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
  aside = lj.interop.hf.read_mtp_tensors(str(tmp_path / "a"))
  extra = {k: a for k, a in aside.items() if "oe_embed" in k}
  assert set(extra) == set(unused)
  lj.save_pretrained(str(tmp_path / "b"), model2, v2, extra_tensors=extra)
  from safetensors.numpy import load_file
  ta, tb = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
  assert set(ta) == set(tb)
  for k in ta:
    assert ta[k].tobytes() == tb[k].tobytes(), k
  # Generation with 3 drafted tokens per step: greedy speculation equals plain greedy.
  prompts = [[5, 17, 33, 9, 100, 42, 7], [11, 12, 13]]
  for name, variables in (("random MTP", v2), ("bigram MTP", _bigram_mtp(model2, v2))):
    plain = inference.generate(model2, variables, prompts, 12, temperature=0.0, eos_token_id=())
    spec = inference.generate(model2, variables, prompts, 12, temperature=0.0, eos_token_id=(), num_draft_tokens=3)
    np.testing.assert_array_equal(spec.tokens, plain.tokens, err_msg=name)
    print(f"{name}: MTP acceptance rate {spec.acceptance_rate:.3f} over {spec.decode_steps} steps (3 drafts/step)")
    assert 0.0 <= spec.acceptance_rate <= 1.0
    if name == "bigram MTP":
      assert spec.acceptance_rate == 1.0

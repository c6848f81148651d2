"""LongCat Sparse Attention: the indexer that picks, per query, the keys attention reads.

DeepSeek-V3.2's lightning indexer with LongCat-2.0's changes, as the released weights compute it
(mlx-lm `mlx_lm/models/longcat2.py` `Indexer`, commit 9049ab3a; SGLang-FluentLLM
`nsa_indexer.IndexerBf16`; docs/LONGCAT2.md section 3):

    q_I   = wq_b(q_latent)              [B, S, Hi, Di]   q_latent: attn_0's SCALED query latent (what q_b reads)
    k_I   = rms_norm(wk(x))             [B, T, Di]       one key per token, shared by the Hi heads
    (interleaved RoPE on the first qk_rope_head_dim dims of both, as the main MLA's; theta and YaRN as the model's)
    w     = weights_proj(x) * Hi**-0.5  [B, S, Hi]       float32
    I_st  = sum_h w_sh * relu(q_I[s, h] . k_I[t] * Di**-0.5)     causal (and same segment)
    keep  = top_k(I_s + inf * [t < init_tokens or s - t < local_tokens])  -> [B, S, top_k], -1 = empty

With no more keys than `top_k` the indexer selects nothing and attention is exactly dense
(`Indexer.select` returns None). One indexer per ScMoE layer, in the first attention block
("C"ompute), its selection reused by the second ("S"hare): `index_topk_pattern`
(`sparse_attention.topk_pattern`, default C/S alternating, `cli_factor=2`). The first
`init_tokens` (attention sinks) and the last `local_tokens` keys are always kept within the
`top_k` budget (streaming-aware indexing). The selection has no gradient; the indexer learns from
`indexer_kl` (DeepSeek-V3.2: KL from the main attention's head-summed distribution to
softmax(I)), sown by the layer when the train step asks for it (`INDEXER_KL`).

`config.sparse_attention = dict(index_heads, index_dim, top_k, init_tokens=0, local_tokens=0,
[block_q=256], [topk_pattern="CS" * num_layers])`; `block_q` queries are indexed at a time, so
memory is O(block_q * S), not O(S^2).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from pallas_kernels.sparse_attention import indices_to_mask
from longcat_jax.config import ConfigDict, dtype_of, softmax_scale
from longcat_jax.model.experts import kernel_impl
from longcat_jax.model.layers import apply_rope, param, rms_norm
from longcat_jax.model.placement import LOCAL, Placement

INDEX_CACHE = "cache"  # decoding: the indexer keys of the cached tokens, `cache/index_k` [B, L, Di]
INDEXER_KL = "indexer_kl"  # training: per layer `kl` and `recall` of the indexer against attention
SCORE_BLOCK_ELEMENTS = 2**26  # above this many [S, Hi, T] logits the scores are summed head by head


def sparse_settings(config: ConfigDict) -> dict:
  s = dict(config.sparse_attention)
  for f in ("index_heads", "index_dim", "top_k"):
    if f not in s or int(s[f]) <= 0:
      raise ValueError(f"sparse_attention.{f} must be a positive integer (have {sorted(s)})")
  s.setdefault("init_tokens", 0)
  s.setdefault("local_tokens", 0)
  s.setdefault("dense", False)  # True: attention dense (the indexer's dense warm-up stage of training)
  pattern = "".join(s.get("topk_pattern") or "CS" * config.num_layers)
  if pattern != "CS" * config.num_layers:
    bad = next(i for i, ch in enumerate(pattern + "?" * 2 * config.num_layers) if ch != "CS"[i % 2])
    raise ValueError(f"sparse_attention.topk_pattern={pattern!r}: block {bad} is {pattern[bad:bad + 1]!r}; only the "
                     f"released pattern is supported (block 2l computes, 2l+1 shares: 'CS' * num_layers="
                     f"{config.num_layers}), as the scanned layers share one structure")
  s["topk_pattern"] = pattern
  if s["index_dim"] < config.qk_rope_head_dim:
    raise ValueError(f"sparse_attention.index_dim={s['index_dim']} is smaller than qk_rope_head_dim="
                     f"{config.qk_rope_head_dim} (the indexer ropes its first qk_rope_head_dim dims)")
  return s


def apply_rope_prefix(x, cos, sin):
  """Interleaved RoPE (`layers.apply_rope`) on the first 2 * cos.shape[-1] dims of x [B, S, (Hi,) Di].

  LongCat-2.0's indexer ropes adjacent pairs like the main MLA (mlx-lm longcat2.py `Indexer`:
  `initialize_rope(..., traditional=indexer_rope_interleave=True)`; FluentLLM `IndexerBf16`:
  `is_rope_neox_style=False`). The rotated dims come out de-interleaved as in `apply_rope`; q and k
  share the layout, so the scores are those of the interleaved convention.
  """
  r = 2 * cos.shape[-1]
  return jnp.concatenate([apply_rope(x[..., :r], cos, sin), x[..., r:]], axis=-1)


def visible_mask(q_pos, k_pos, q_seg=None, k_seg=None):
  """[B, S, T]: key position <= query position (and the same segment)."""
  mask = k_pos[:, None, :] <= q_pos[:, :, None]
  if q_seg is not None:
    mask &= q_seg[:, :, None] == k_seg[:, None, :]
  return mask


def select_topk(scores, mask, q_pos, k_pos, *, top_k: int, init_tokens: int = 0, local_tokens: int = 0):
  """scores [B, S, T] f32, mask [B, S, T] -> indices [B, S, min(top_k, T)] int32, -1 for empty slots.

  Visible keys among the first `init_tokens` or the last `local_tokens` positions are forced in.
  """
  forced = (k_pos[:, None, :] < init_tokens) | (q_pos[:, :, None] - k_pos[:, None, :] < local_tokens)
  s = jnp.where(forced, jnp.float32(3e38), scores.astype(jnp.float32))
  s = jnp.where(mask, s, -jnp.inf)
  k = min(top_k, scores.shape[-1])
  vals, idx = jax.lax.top_k(s, k)
  return jnp.where(vals > -jnp.inf, idx, -1).astype(jnp.int32)


def index_scores(q, w, keys):
  """I [B, S, T] f32 = sum_h w[b, s, h] relu(q[b, s, h] . keys[b, t]) for q [B, S, Hi, Di] (scaled)."""
  if q.shape[1] * q.shape[2] * keys.shape[1] <= SCORE_BLOCK_ELEMENTS:
    logits = jnp.einsum("bshd,btd->bsht", q, keys, preferred_element_type=jnp.float32)
    return jnp.einsum("bsh,bsht->bst", w, jax.nn.relu(logits))

  def head(acc, h):  # long sequences: one head at a time, never [S, Hi, T]
    qh, wh = jnp.take(q, h, axis=2), jnp.take(w, h, axis=2)
    return acc + wh[..., None] * jax.nn.relu(jnp.einsum("bsd,btd->bst", qh, keys,
                                                        preferred_element_type=jnp.float32)), None

  init = jnp.zeros(q.shape[:2] + keys.shape[1:2], jnp.float32)
  return jax.lax.scan(head, init, jnp.arange(q.shape[2]))[0]


def select_keys(q, w, keys, q_pos, k_pos, q_seg=None, k_seg=None, *, top_k: int, init_tokens: int = 0,
                local_tokens: int = 0, block_q: int = 256, placement: Placement = LOCAL):
  """Top-k keys per query: q [B, S, Hi, Di], w [B, S, Hi], keys [B, T, Di] -> [B, S, K] int32.

  Queries are taken `block_q` at a time (`lax.map`), so memory is O(block_q * T), not O(S * T):
  what lets a 1M-token sequence be indexed. No gradient flows through the selection. When the
  mesh splits the sequence into P chunks (context parallelism), every step takes `block_q`
  queries of each chunk ([B, P * block_q]), so the loop runs over an axis that is not split and
  each device indexes its own queries (a loop over the split axis would gather them all).
  """
  q, w, keys = (jax.lax.stop_gradient(a) for a in (q, w, keys))
  kw = dict(top_k=top_k, init_tokens=init_tokens, local_tokens=local_tokens)
  tokens = lambda a: placement.constrain(a, ("batch", "length") + (None,) * (a.ndim - 2))

  def local(q, w, q_pos, keys, k_pos, q_seg=None, k_seg=None):
    mask = visible_mask(q_pos, k_pos, q_seg, k_seg)
    return select_topk(index_scores(q, w, keys), mask, q_pos, k_pos, **kw)

  def one(q, w, q_pos, q_seg):
    """One block of queries [B, P * block_q, ...] against every key -> [B, P * block_q, K]."""
    args = (q, w, q_pos, keys, k_pos) + (() if q_seg is None else (q_seg, k_seg))
    # Per device under a mesh: GSPMD would gather top_k's operand over the batch ([B, block_q, T]
    # float32 on every device), so the scores and the selection run on each device's own queries.
    out = jax.ShapeDtypeStruct(q.shape[:2] + (min(top_k, keys.shape[1]),), jnp.int32)
    return placement.per_token_block(local, args, token_args=(0, 1, 2, 5), out_shape=out)

  b, s = q.shape[:2]
  p = placement.length_shards(s, b)
  if s // p <= block_q:
    return one(q, w, q_pos, q_seg)
  chunk = s // p
  pad = -chunk % block_q
  n = (chunk + pad) // block_q

  def blocks(a):  # [B, S, ...] -> [n, B, P * block_q, ...]: step i holds block i of every chunk
    a = a.reshape(b, p, chunk, *a.shape[2:])
    a = jnp.pad(a, [(0, 0), (0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 3))
    a = a.reshape(b, p, n, block_q, *a.shape[3:])
    return jnp.moveaxis(a, 2, 0).reshape(n, b, p * block_q, *a.shape[4:])

  seg = None if q_seg is None else blocks(q_seg)
  out = jax.lax.map(lambda xs: one(*xs), (blocks(q), blocks(w), blocks(q_pos), seg))  # [n, B, P*bq, K]
  out = jnp.moveaxis(out.reshape(n, b, p, block_q, -1), 0, 2).reshape(b, p, n * block_q, -1)
  return tokens(out[:, :, :chunk].reshape(b, s, -1))


class Indexer(nn.Module):
  """Scores every visible key cheaply and keeps the top-k per query (module docstring)."""

  config: ConfigDict
  placement: Placement = LOCAL

  def setup(self):
    c, s = self.config, sparse_settings(self.config)
    hi, di = s["index_heads"], s["index_dim"]
    self.wq_b = param(self, "wq_b", (c.q_lora_rank, hi, di), ("q_lora", "index_heads", "index_dim"))
    self.wk = param(self, "wk", (c.hidden_size, di), ("embed", "index_dim"))
    self.k_norm = param(self, "k_norm", (di,), ("norm",), nn.initializers.ones)
    self.weights_proj = param(self, "weights_proj", (c.hidden_size, hi), ("embed", "index_heads"), dtype=jnp.float32)

  def keys(self, x, cos, sin):
    """x [B, T, hidden] -> indexer keys [B, T, Di] (normed, roped)."""
    dt = dtype_of(self.config.dtype)
    k = rms_norm(x @ self.wk.astype(dt), self.k_norm, self.config.rms_norm_eps)
    return apply_rope_prefix(k, cos, sin)

  def queries(self, x, q_latent, cos, sin):
    """-> q [B, S, Hi, Di] (roped, times Di**-0.5) and head weights w [B, S, Hi] f32 (times Hi**-0.5)."""
    dt = dtype_of(self.config.dtype)
    hi, di = self.wq_b.shape[1:]
    q = jnp.einsum("bsr,rhd->bshd", q_latent.astype(dt), self.wq_b.astype(dt))
    q = apply_rope_prefix(q, cos, sin) * jnp.asarray(di ** -0.5, dt)
    w = jnp.dot(x.astype(jnp.float32), self.weights_proj.astype(jnp.float32)) * hi ** -0.5
    return q, w

  def scores(self, x, q_latent, cos, sin, keys):
    """Index scores I [B, S, T] float32 of queries (x, q_latent [B, S, .]) against keys [B, T, Di]."""
    return index_scores(*self.queries(x, q_latent, cos, sin), keys)

  def _select(self, x, q_latent, cos, sin, keys, q_pos, k_pos, q_seg=None, k_seg=None):
    st = sparse_settings(self.config)
    q, w = self.queries(x, q_latent, cos, sin)
    return select_keys(q, w, keys, q_pos, k_pos, q_seg, k_seg, top_k=st["top_k"], init_tokens=st["init_tokens"],
                       local_tokens=st["local_tokens"], block_q=st.get("block_q", 256), placement=self.placement)

  def __call__(self, x, q_latent, cos, sin, segment_ids=None):
    """Training / prefill: x [B, S, hidden], q_latent [B, S, q_lora] -> indices [B, S, K] into 0..S-1,
    or None (dense attention) when S <= top_k."""
    b, s_len = x.shape[:2]
    pos = jnp.broadcast_to(jnp.arange(s_len, dtype=jnp.int32), (b, s_len))
    # Every query scores every earlier key: under context parallelism the keys are all-gathered.
    keys = self.placement.constrain(self.keys(x, cos, sin), ("batch", None, None))
    if self.is_mutable_collection(INDEX_CACHE) and not self.is_initializing():
      self.put_variable(INDEX_CACHE, "index_k", keys)
    if s_len <= sparse_settings(self.config)["top_k"]:
      return None  # no more keys than top_k: exactly dense (mlx-lm longcat2.py `Indexer.__call__`)
    k_pos = self.placement.constrain(pos, ("batch", None))
    k_seg = None if segment_ids is None else self.placement.constrain(segment_ids, ("batch", None))
    return self._select(x, q_latent, cos, sin, keys, pos, k_pos, segment_ids, k_seg)

  def select(self, x, q_latent, cos, sin, segment_ids=None, cache_mode=None, lengths=None):
    """The selected keys [B, S, K] for the layer's attention blocks, in the model's cache mode (None: dense)."""
    if sparse_settings(self.config)["dense"] and cache_mode is None:
      return None
    if cache_mode == "decode":
      return self.decode(x, q_latent, cos, sin, lengths)
    return self(x, q_latent, cos, sin, segment_ids)

  def distill(self, x, q_latent, cos, sin, attn_probs, keep, dense_probs, visible):
    """DeepSeek-V3.2's indexer training signal for one layer: x [B, S, hidden], q_latent [B, S, q_lora]
    (the indexer's inputs, detached here), attn_probs [B, S, T] (the main attention's distribution
    summed over heads, no gradient) over `keep` [B, S, T] (all visible keys in the dense warm-up, the
    selected ones in the sparse stage) -> (KL, top-k recall of the dense distribution `dense_probs`
    over the `visible` keys), float32 scalars."""
    x, q_latent = jax.lax.stop_gradient(x), jax.lax.stop_gradient(q_latent)
    scores = self.scores(x, q_latent, cos, sin, self.keys(x, cos, sin))
    return indexer_kl(scores, attn_probs, keep), topk_recall(scores, dense_probs, visible,
                                                             sparse_settings(self.config)["top_k"])

  def decode(self, x, q_latent, cos, sin, lengths):
    """x [B, T, hidden] at positions lengths[b] + t: appends their keys to `cache/index_k`
    [B, L, Di] and selects from the cache -> indices [B, T, min(top_k, L)] into cache positions."""
    keys = self.keys(x, cos, sin)
    put = lambda c, k, i: jax.lax.dynamic_update_slice_in_dim(c, k.astype(c.dtype), i, axis=0)
    cache = jax.vmap(put)(self.get_variable(INDEX_CACHE, "index_k"), keys, lengths)
    self.put_variable(INDEX_CACHE, "index_k", cache)
    b, cache_len = cache.shape[:2]
    if cache_len <= sparse_settings(self.config)["top_k"]:
      return None  # every cached key fits in the budget: dense
    q_pos = lengths[:, None] + jnp.arange(x.shape[1], dtype=jnp.int32)
    k_pos = jnp.broadcast_to(jnp.arange(cache_len, dtype=jnp.int32), (b, cache_len))
    return self._select(x, q_latent, cos, sin, cache, q_pos, k_pos)


def attend(q, k, v, indices, *, config: ConfigDict, placement: Placement = LOCAL):
  """MLA's call of the sparse attention op: q [B, S, H, R + rope], k [B, T, R + rope], v [B, T, R].

  When the sequence is split over devices (training/prefill under context parallelism), the
  compressed keys are all-gathered and each device attends its own queries (indices are global
  positions).
  """
  b, s = q.shape[:2]
  if k.shape[1] == s and placement.length_shards(s, b) > 1:
    k, v = placement.gather_sequence(k), placement.gather_sequence(v)
  return placement.sparse_attention(q, k, v, indices, sm_scale=softmax_scale(config),
                                    implementation=kernel_impl(config))


def distill_indexer(module, indexer, mla, x, cos, sin, segment_ids, indices, prefix: str = ""):
  """Sows (collection `INDEXER_KL`, names `{prefix}kl`, `{prefix}recall`) the indexer's KL to the
  attention block `mla` reading x [B, S, hidden], and its top-k recall (training only): over all
  visible keys when attention is dense (the warm-up, indices None), over the selected keys when
  sparse (DeepSeek-V3.2's two stages; train/step.py). `module` is the Flax module that sows."""
  b, s = x.shape[:2]
  pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
  visible = visible_mask(pos, pos, segment_ids, segment_ids)
  dense = mla.attention_probs(x, cos, sin, visible)
  keep, probs = visible, dense
  if indices is not None:
    keep = visible & indices_to_mask(indices, s)
    probs = mla.attention_probs(x, cos, sin, keep)
  kl, recall = indexer.distill(x, mla.q_latent(x), cos, sin, probs, keep, dense, visible)
  module.sow(INDEXER_KL, f"{prefix}kl", kl)
  module.sow(INDEXER_KL, f"{prefix}recall", recall)


def indexer_kl(index_scores, attn_probs, keep):
  """KL(p || softmax(I)) over the kept keys, mean over queries with a kept key (DeepSeek-V3.2, eq. 3/4).

  index_scores [B, S, T] float32, attn_probs [B, S, T] (head-summed attention, no gradient; renormalised
  over `keep` [B, S, T] here). Gradient flows only into index_scores."""
  p = jax.lax.stop_gradient(jnp.where(keep, attn_probs.astype(jnp.float32), 0.0))
  p = p / jnp.maximum(p.sum(-1, keepdims=True), 1e-30)
  log_q = jax.nn.log_softmax(jnp.where(keep, index_scores, -jnp.inf), axis=-1)
  terms = jnp.where(keep & (p > 0), p * (jnp.log(jnp.where(p > 0, p, 1.0)) - jnp.where(keep, log_q, 0.0)), 0.0)
  rows = keep.any(-1)
  return jnp.sum(terms.sum(-1) * rows) / jnp.maximum(rows.sum(), 1)


def topk_recall(index_scores, attn_probs, keep, top_k: int):
  """Share of the attention's top_k highest-weight keys that the indexer's top_k also holds, over
  the queries with more than top_k kept keys (fewer are selected whole; chance = top_k / kept)."""
  k = min(top_k, index_scores.shape[-1])
  neg = jnp.float32(-jnp.inf)
  _, by_attn = jax.lax.top_k(jnp.where(keep, attn_probs.astype(jnp.float32), neg), k)
  _, by_index = jax.lax.top_k(jnp.where(keep, index_scores, neg), k)
  hit = (by_attn[..., :, None] == by_index[..., None, :]).any(-1).mean(-1)     # [B, S]
  rows = keep.sum(-1) > k
  return jnp.sum(hit * rows) / jnp.maximum(rows.sum(), 1)
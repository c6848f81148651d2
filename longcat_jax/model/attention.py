"""Multi-head latent attention with LongCat's variance-alignment scales (spec section 2)."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

import pallas_kernels
from pallas_kernels.mla_attention import CHUNKED_MIN_SEQ
from longcat_jax.config import ConfigDict, dtype_of, qk_head_dim, softmax_scale
from longcat_jax.model import sparse_attention
from longcat_jax.model.experts import kernel_impl
from longcat_jax.model.layers import apply_rope, param, rms_norm, token_matmul
from longcat_jax.model.placement import LOCAL, Placement


CACHE = "cache"  # Flax collection of the compressed KV cache (latent + rope key per token).


def _append(cache, new, lengths):
  """cache [B, L, D], new [B, T, D] -> cache with new[b] written at rows lengths[b]..lengths[b]+T-1."""
  put = lambda c, x, i: jax.lax.dynamic_update_slice_in_dim(c, x, i, axis=0)
  return jax.vmap(put)(cache, new.astype(cache.dtype), lengths)


class MLA(nn.Module):
  """q = q_b(norm(q_a(x))) * sqrt(hidden/q_lora); latent c = norm(kv_a(x)) * sqrt(hidden/kv_lora).

  Methods are split along what decoding needs: `queries` and `latents` produce what the
  compressed cache stores (latent `c` [B, S, R] and roped shared key [B, S, Dr]); `expand` turns
  latents into per-head keys and values for prefill/training; `out_proj` maps heads back.
  """

  config: ConfigDict
  placement: Placement = LOCAL

  def setup(self):
    c = self.config
    nh, qk, r = c.num_heads, qk_head_dim(c), c.kv_lora_rank
    self.q_a = param(self, "q_a", (c.hidden_size, c.q_lora_rank), ("embed", "q_lora"))
    self.q_a_norm = param(self, "q_a_norm", (c.q_lora_rank,), ("norm",), nn.initializers.ones)
    self.q_b = param(self, "q_b", (c.q_lora_rank, nh, qk), ("q_lora", "heads", "qk_dim"))
    self.kv_a = param(self, "kv_a", (c.hidden_size, r + c.qk_rope_head_dim), ("embed", "kv_lora"))
    self.kv_a_norm = param(self, "kv_a_norm", (r,), ("norm",), nn.initializers.ones)
    self.kv_b = param(self, "kv_b", (r, nh, c.qk_nope_head_dim + c.v_head_dim), ("kv_lora", "heads", "kv_dim"))
    self.o = param(self, "o", (nh, c.v_head_dim, c.hidden_size), ("heads", "kv_dim", "embed"))

  @property
  def q_scale(self) -> float:
    c = self.config
    return math.sqrt(c.hidden_size / c.q_lora_rank) if c.mla_scale_q_lora else 1.0

  @property
  def kv_scale(self) -> float:
    c = self.config
    return math.sqrt(c.hidden_size / c.kv_lora_rank) if c.mla_scale_kv_lora else 1.0

  def q_latent(self, x):
    """x [B, S, hidden] -> the scaled query latent norm(q_a(x)) * sqrt(hidden / q_lora) [B, S, q_lora_rank]:
    what q_b reads, and the sparse indexer's query input (mlx-lm longcat2.py: `qr`)."""
    dt = dtype_of(self.config.dtype)
    lat = rms_norm(self._matmul(x, self.q_a.astype(dt)), self.q_a_norm, self.config.latent_norm_eps)
    return lat * jnp.asarray(self.q_scale, dt)

  def _matmul(self, x, w, contract: int = 1):
    return token_matmul(x, w, contract, placement=self.placement)

  def queries(self, x, cos, sin):
    """x [B, S, hidden] -> q_nope [B, S, H, nope], q_rope [B, S, H, rope] (scaled, rotated)."""
    c, dt = self.config, dtype_of(self.config.dtype)
    q = self._matmul(self.q_latent(x), self.q_b.astype(dt))
    q = self.placement.constrain(q, ("batch", "length", "act_heads", None))
    q_nope, q_rope = q[..., :c.qk_nope_head_dim], q[..., c.qk_nope_head_dim:]
    return q_nope, apply_rope(q_rope, cos, sin)

  def latents(self, x, cos, sin):
    """x [B, S, hidden] -> latent c [B, S, R] (normed, scaled), k_rope [B, S, rope] (rotated)."""
    c, dt = self.config, dtype_of(self.config.dtype)
    ckv = self._matmul(x, self.kv_a.astype(dt))
    lat, k_rope = ckv[..., :c.kv_lora_rank], ckv[..., c.kv_lora_rank:]
    lat = rms_norm(lat, self.kv_a_norm, c.latent_norm_eps) * jnp.asarray(self.kv_scale, dt)
    return lat, apply_rope(k_rope, cos, sin)

  def expand(self, lat, k_rope, q_heads: int | None = None):
    """latent [B, S, R], k_rope [B, S, rope] -> k [B, S, H, nope+rope], v [B, S, H, v]."""
    c, dt = self.config, dtype_of(self.config.dtype)
    kv = self._matmul(lat, self.kv_b.astype(dt))
    k_nope, v = kv[..., :c.qk_nope_head_dim], kv[..., c.qk_nope_head_dim:]
    k_rope = jnp.broadcast_to(k_rope[:, :, None, :], k_nope.shape[:3] + (c.qk_rope_head_dim,))
    return jnp.concatenate([k_nope, k_rope], axis=-1), v

  def attention_probs(self, x, cos, sin, keep):
    """The attention distribution summed over heads, [B, S, T] float32, no gradient: softmax of
    this block's scores over the keys in `keep` [B, S, T] (visible, and selected when sparse), the
    target of the indexer's KL (DeepSeek-V3.2). Materialises [B, H, S, T]: for small-scale training."""
    q_nope, q_rope = self.queries(x, cos, sin)
    k, _ = self.expand(*self.latents(x, cos, sin))
    q = jnp.concatenate([q_nope, q_rope], axis=-1)
    s = jnp.einsum("bshd,bthd->bhst", q, k, preferred_element_type=jnp.float32) * softmax_scale(self.config)
    p = jax.nn.softmax(jnp.where(keep[:, None], s, -jnp.inf), axis=-1)
    return jax.lax.stop_gradient(jnp.where(keep[:, None], p, 0.0).sum(1))

  def out_proj(self, attn):
    """attn [B, S, H, v] -> [B, S, hidden]."""
    return self._matmul(attn, self.o.astype(dtype_of(self.config.dtype)), contract=2)

  def __call__(self, x, cos, sin, segment_ids=None, indices=None, *, cache_mode=None, cache_lengths=None):
    """x [B, S, hidden] -> [B, S, hidden]; causal within each segment. `indices` [B, S, K]: the
    sparse indexer's selected keys (LongCat Sparse Attention); None = dense attention.
    `cache_mode` "prefill" / "decode" routes to `prefill` / `decode` (with `cache_lengths` [B])."""
    if cache_mode == "prefill":
      return self.prefill(x, cos, sin, indices=indices)
    if cache_mode == "decode":
      return self.decode(x, cos, sin, cache_lengths, indices=indices)
    if cache_mode is not None:
      raise ValueError(f"cache_mode={cache_mode!r} must be None, 'prefill' or 'decode'")
    lat, k_rope = self.latents(x, cos, sin)
    if indices is not None:
      return self._attend_sparse(x, cos, sin, lat, k_rope, indices)
    return self._attend_dense(x, cos, sin, lat, k_rope, segment_ids)

  def prefill(self, x, cos, sin, indices=None):
    """Like `__call__` on a fresh prompt (positions 0..S-1, right-padded), and stores the
    compressed cache: `cache/latent` [B, S, R] and `cache/k_rope` [B, S, rope]. The caller pads
    them along S to the cache size."""
    lat, k_rope = self.latents(x, cos, sin)
    self.put_variable(CACHE, "latent", lat)
    self.put_variable(CACHE, "k_rope", k_rope)
    if indices is not None:
      return self._attend_sparse(x, cos, sin, lat, k_rope, indices)
    return self._attend_dense(x, cos, sin, lat, k_rope, None)

  def decode(self, x, cos, sin, lengths, indices=None):
    """Absorbed decoding of T new tokens against the compressed cache.

    x [B, T, hidden] holds the tokens at positions lengths[b] + t (cos/sin built for them),
    lengths [B] int32 = cached tokens per row. Appends their latents to `cache/latent`
    [B, L, R] and `cache/k_rope` [B, L, rope], then attends without expanding the cache: the key
    up-projection is folded into the query (q_latent = q_nope . W_uk, [B, H, R]) and the value
    up-projection is applied to the attended latent. -> [B, T, hidden].
    """
    c, dt = self.config, dtype_of(self.config.dtype)
    q_nope, q_rope = self.queries(x, cos, sin)
    lat, k_rope = self.latents(x, cos, sin)
    cache_lat = _append(self.get_variable(CACHE, "latent"), lat, lengths)
    cache_rope = _append(self.get_variable(CACHE, "k_rope"), k_rope, lengths)
    cache_lat = self.placement.constrain(cache_lat, ("batch", None, None))
    cache_rope = self.placement.constrain(cache_rope, ("batch", None, None))
    self.put_variable(CACHE, "latent", cache_lat)
    self.put_variable(CACHE, "k_rope", cache_rope)
    if indices is not None:  # sparse: indices [B, T, K] select cache positions
      return self._attend_sparse(x, cos, sin, cache_lat, cache_rope, indices)
    kv_b = self.kv_b.astype(dt)
    w_uk, w_uv = kv_b[..., :c.qk_nope_head_dim], kv_b[..., c.qk_nope_head_dim:]
    q_lat = jnp.einsum("bthd,rhd->bthr", q_nope, w_uk)
    # One kernel call per new token (T is 1, or 1 + draft tokens when verifying a speculation);
    # token t sees the cache up to and including itself.
    with self.placement.kernels():
      out_lat = jnp.stack([
          pallas_kernels.mla_decode_attention(q_lat[:, t], q_rope[:, t], cache_lat, cache_rope, lengths + t + 1,
                                              sm_scale=softmax_scale(c), implementation=kernel_impl(c),
                                              block_k=c.attention_block_k)
          for t in range(x.shape[1])], axis=1)
    attn = jnp.einsum("bthr,rhd->bthd", out_lat, w_uv)
    return self.out_proj(self.placement.constrain(attn, ("batch", "length", "act_heads", None)))

  def _attend_dense(self, x, cos, sin, lat, k_rope, segment_ids):
    """Causal attention over every visible key: context-parallel when the sequence is split, the
    absorbed (MQA) form on XLA:CPU (`_absorbed_on_cpu`), else expanded per-head keys and values."""
    c = self.config
    q_nope, q_rope = self.queries(x, cos, sin)
    if self.placement.length_shards(x.shape[1], x.shape[0]) > 1:
      return self._attend_context_parallel(q_nope, q_rope, lat, k_rope, segment_ids)
    if self._absorbed_on_cpu(x.shape[1]):
      return self._attend_absorbed(q_nope, q_rope, lat, k_rope, lambda q, k, v: pallas_kernels.mqa_attention(
          q, k, v, segment_ids=segment_ids, sm_scale=softmax_scale(c)))
    k, v = self.expand(lat, k_rope)
    q = jnp.concatenate([q_nope, q_rope], axis=-1)
    with self.placement.kernels():
      out = pallas_kernels.mla_attention(q, k, v, segment_ids=segment_ids, causal=True,
                                         sm_scale=softmax_scale(c), implementation=kernel_impl(c),
                                         block_q=c.attention_block_q, block_k=c.attention_block_k)
    out = self.placement.constrain(out, ("batch", "length", "act_heads", None))
    return self.out_proj(out)

  def _absorbed_on_cpu(self, seq_len: int) -> bool:
    """Automatic kernels on XLA:CPU at the lengths its query-blocked path takes: the heads share
    one key prefix per query block (pallas_kernels/mqa_attention.py says why that is faster there;
    `small`, 4 x 512: forward and training step both faster). Accelerators keep the expanded form,
    which their flash kernels are written for."""
    return (self.config.kernels == "auto" and seq_len <= CHUNKED_MIN_SEQ
            and pallas_kernels.current_platform() == "cpu")

  def _attend_context_parallel(self, q_nope, q_rope, lat, k_rope, segment_ids):
    """Context parallelism (the sequence split over mesh axes): all-gather the compressed KV
    (R + rope values per token) and attend the local queries to it in absorbed form, as
    `_attend_sparse`: W_uk folded into the queries, one [latent | rope] row per key shared by
    every head, W_uv after. The whole sequence's per-head keys and values never exist (at 1M
    tokens and 64 heads they would be 40 GiB per device, and their float32 gradients 80 GiB)."""
    c, p = self.config, self.placement
    lat, k_rope = p.gather_sequence(lat), p.gather_sequence(k_rope)
    return self._attend_absorbed(q_nope, q_rope, lat, k_rope, lambda q, k, v: p.context_attention(
        q, k, v, segment_ids, sm_scale=softmax_scale(c), block_k=c.attention_block_k))

  def _attend_absorbed(self, q_nope, q_rope, lat, k_rope, attend):
    """MQA form of MLA: queries [W_uk^T q_nope | q_rope], keys [latent | rope] shared by every
    head, values the latents; `attend(q, k, v)` -> [B, S, H, R], then W_uv and the output projection."""
    c, dt = self.config, dtype_of(self.config.dtype)
    kv_b = self.kv_b.astype(dt)
    w_uk, w_uv = kv_b[..., :c.qk_nope_head_dim], kv_b[..., c.qk_nope_head_dim:]
    q = jnp.concatenate([jnp.einsum("bshd,rhd->bshr", q_nope, w_uk), q_rope], axis=-1)
    k = jnp.concatenate([lat, k_rope.astype(lat.dtype)], axis=-1)
    attn = jnp.einsum("bshr,rhd->bshd", attend(q, k, lat), w_uv)
    return self.out_proj(self.placement.constrain(attn, ("batch", "length", "act_heads", None)))

  def _attend_sparse(self, x, cos, sin, lat, k_rope, indices):
    """Absorbed MLA over the indexer-selected keys: scores q_nope . W_uk c_j + q_rope . r_j, output
    W_uv sum_j p_j c_j, so keys are the shared [latent | rope] rows (MQA form, no expansion).

    lat [B, T, R], k_rope [B, T, rope] (T = S, or the cache), indices [B, S, K] into T.
    """
    q_nope, q_rope = self.queries(x, cos, sin)
    return self._attend_absorbed(q_nope, q_rope, lat, k_rope, lambda q, k, v: sparse_attention.attend(
        q, k, v, indices, config=self.config, placement=self.placement))

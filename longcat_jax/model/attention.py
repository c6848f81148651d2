"""Multi-head latent attention with LongCat's variance-alignment scales (spec section 2)."""

from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp

import pallas_kernels
from longcat_jax.config import ConfigDict, dtype_of, qk_head_dim, softmax_scale
from longcat_jax.model.layers import apply_rope, constrain, param, rms_norm


def kernel_impl(config: ConfigDict):
  """`config.kernels` -> the `implementation=` argument of the pallas_kernels entry points."""
  return None if config.kernels == "auto" else config.kernels


class MLA(nn.Module):
  """q = q_b(norm(q_a(x))) * sqrt(hidden/q_lora); latent c = norm(kv_a(x)) * sqrt(hidden/kv_lora).

  Methods are split along what decoding needs: `queries` and `latents` produce what the
  compressed cache stores (latent `c` [B, S, R] and roped shared key [B, S, Dr]); `expand` turns
  latents into per-head keys and values for prefill/training; `out_proj` maps heads back.
  """

  config: ConfigDict

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

  def queries(self, x, cos, sin):
    """x [B, S, hidden] -> q_nope [B, S, H, nope], q_rope [B, S, H, rope] (scaled, rotated)."""
    c, dt = self.config, dtype_of(self.config.dtype)
    q = rms_norm(x @ self.q_a.astype(dt), self.q_a_norm, c.latent_norm_eps)
    q = jnp.einsum("bsr,rhd->bshd", q, self.q_b.astype(dt)) * jnp.asarray(self.q_scale, dt)
    q = constrain(q, ("batch", "length", "act_heads", None))
    q_nope, q_rope = q[..., :c.qk_nope_head_dim], q[..., c.qk_nope_head_dim:]
    return q_nope, apply_rope(q_rope, cos, sin)

  def latents(self, x, cos, sin):
    """x [B, S, hidden] -> latent c [B, S, R] (normed, scaled), k_rope [B, S, rope] (rotated)."""
    c, dt = self.config, dtype_of(self.config.dtype)
    ckv = x @ self.kv_a.astype(dt)
    lat, k_rope = ckv[..., :c.kv_lora_rank], ckv[..., c.kv_lora_rank:]
    lat = rms_norm(lat, self.kv_a_norm, c.latent_norm_eps) * jnp.asarray(self.kv_scale, dt)
    return lat, apply_rope(k_rope, cos, sin)

  def expand(self, lat, k_rope, q_heads: int | None = None):
    """latent [B, S, R], k_rope [B, S, rope] -> k [B, S, H, nope+rope], v [B, S, H, v]."""
    c, dt = self.config, dtype_of(self.config.dtype)
    kv = jnp.einsum("bsr,rhd->bshd", lat, self.kv_b.astype(dt))
    k_nope, v = kv[..., :c.qk_nope_head_dim], kv[..., c.qk_nope_head_dim:]
    k_rope = jnp.broadcast_to(k_rope[:, :, None, :], k_nope.shape[:3] + (c.qk_rope_head_dim,))
    return jnp.concatenate([k_nope, k_rope], axis=-1), v

  def out_proj(self, attn):
    """attn [B, S, H, v] -> [B, S, hidden]."""
    return jnp.einsum("bshd,hde->bse", attn, self.o.astype(dtype_of(self.config.dtype)))

  def __call__(self, x, cos, sin, segment_ids=None):
    """x [B, S, hidden] -> [B, S, hidden]; causal within each segment."""
    c = self.config
    q_nope, q_rope = self.queries(x, cos, sin)
    lat, k_rope = self.latents(x, cos, sin)
    k, v = self.expand(lat, k_rope)
    q = jnp.concatenate([q_nope, q_rope], axis=-1)
    out = pallas_kernels.mla_attention(q, k, v, segment_ids=segment_ids, causal=True,
                                       sm_scale=softmax_scale(c), implementation=kernel_impl(c),
                                       block_q=c.attention_block_q, block_k=c.attention_block_k)
    out = constrain(out, ("batch", "length", "act_heads", None))
    return self.out_proj(out)

"""Causal attention for MLA prefill/training, with Dqk != Dv and packed-document segment ids.

`mla_attention(q [B, S, H, Dqk], k [B, S, H, Dqk], v [B, S, H, Dv], *, segment_ids [B, S] | None,
causal=True, sm_scale=None) -> [B, S, H, Dv]`.

A query attends to keys at positions <= its own (causal) that carry the same segment id, so
packed documents never see each other. The XLA reference materialises the [S, S] scores; the
Pallas kernels (flash attention, online softmax) never do.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.registry import Op

mla_attention_op = Op("mla_attention")


def mla_attention(q, k, v, *, segment_ids=None, causal: bool = True, sm_scale: float | None = None,
                  implementation: str | None = None, block_q: int = 512, block_k: int = 512):
  if q.ndim != 4 or k.shape[:3] != q.shape[:3] or v.shape[:3] != q.shape[:3] or k.shape[-1] != q.shape[-1]:
    raise ValueError(f"mla_attention: want q, k [B, S, H, Dqk] and v [B, S, H, Dv]; got q {q.shape}, "
                     f"k {k.shape}, v {v.shape}")
  if segment_ids is not None and segment_ids.shape != q.shape[:2]:
    raise ValueError(f"mla_attention: segment_ids shape {segment_ids.shape} != [batch, seq] {q.shape[:2]}")
  if sm_scale is None:
    sm_scale = q.shape[-1] ** -0.5
  return mla_attention_op(q, k, v, segment_ids=segment_ids, causal=causal, sm_scale=sm_scale,
                          implementation=implementation, block_q=block_q, block_k=block_k)


def attention_mask(segment_ids, seq_len: int, causal: bool, batch: int):
  """[B, 1, S, S] boolean mask: True where query i may attend key j."""
  mask = jnp.ones((batch, 1, seq_len, seq_len), bool)
  if causal:
    mask &= jnp.tril(jnp.ones((seq_len, seq_len), bool))[None, None]
  if segment_ids is not None:
    mask &= (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
  return mask


@mla_attention_op.register("xla", kind="xla")
def mla_attention_reference(q, k, v, *, segment_ids=None, causal=True, sm_scale=None, block_q=None,
                            block_k=None):
  b, s = q.shape[:2]
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * sm_scale
  scores = jnp.where(attention_mask(segment_ids, s, causal, b), scores, -1e30)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v, preferred_element_type=jnp.float32).astype(q.dtype)

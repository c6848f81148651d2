"""Absorbed-MLA decode attention over the compressed cache (the FlashMLA idea).

`mla_decode_attention(q_latent [B, H, R], q_rope [B, H, Dr], cache_latent [B, L, R],
cache_rope [B, L, Dr], lengths [B], *, sm_scale) -> [B, H, R]`

The key up-projection is folded into `q_latent` and the value up-projection is applied by the
caller afterwards, so the cache is never expanded: score_j = (q_latent . c_j + q_rope . r_j) *
sm_scale over positions j < lengths[b]; the output is sum_j p_j c_j, in latent space.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.registry import Op

mla_decode_op = Op("mla_decode_attention")


def mla_decode_attention(q_latent, q_rope, cache_latent, cache_rope, lengths, *, sm_scale: float,
                         implementation: str | None = None, block_k: int = 512):
  b, h, r = q_latent.shape
  if (q_rope.shape[:2] != (b, h) or cache_latent.shape[0] != b or cache_latent.shape[2] != r
      or cache_rope.shape[:2] != cache_latent.shape[:2] or cache_rope.shape[2] != q_rope.shape[2]
      or lengths.shape != (b,)):
    raise ValueError(f"mla_decode_attention: shapes disagree: q_latent {q_latent.shape}, q_rope {q_rope.shape}, "
                     f"cache_latent {cache_latent.shape}, cache_rope {cache_rope.shape}, lengths {lengths.shape}")
  return mla_decode_op(q_latent, q_rope, cache_latent, cache_rope, lengths, sm_scale=sm_scale,
                       implementation=implementation, block_k=block_k)


@mla_decode_op.register("xla", kind="xla")
def mla_decode_reference(q_latent, q_rope, cache_latent, cache_rope, lengths, *, sm_scale, block_k=None):
  f32 = jnp.float32
  scores = (jnp.einsum("bhr,blr->bhl", q_latent, cache_latent, preferred_element_type=f32)
            + jnp.einsum("bhd,bld->bhl", q_rope, cache_rope, preferred_element_type=f32)) * sm_scale
  valid = jnp.arange(cache_latent.shape[1])[None, None, :] < lengths[:, None, None]
  probs = jax.nn.softmax(jnp.where(valid, scores, -1e30), axis=-1)
  out = jnp.einsum("bhl,blr->bhr", probs.astype(cache_latent.dtype), cache_latent, preferred_element_type=f32)
  return out.astype(q_latent.dtype)

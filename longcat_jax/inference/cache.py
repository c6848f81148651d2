"""The compressed KV cache of absorbed MLA decoding (spec section 2).

Per attention block and token only the normed, scaled latent `c` [kv_lora_rank] and the roped
shared key `k_rope` [qk_rope_head_dim] are kept: 2 blocks x num_layers x (512 + 64) = 32,256 values
per token for LongCat-Flash (64.5 KB in bf16). The cache is the Flax `cache` collection the model
writes in `prefill`/`decode`; every leaf is [layers, batch, cache_size, features], preallocated to
a fixed `cache_size` so the decode step compiles once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from longcat_jax.config import ConfigDict, dtype_of
from longcat_jax.model.placement import LOCAL, Placement


def cache_axes(ndim: int) -> tuple:
  """Logical axes of a cache leaf: [layers, batch, cache_size, features] for the scanned decoder,
  [batch, cache_size, features] for an MTP head. Sharded along batch."""
  return ("layers",) * (ndim - 3) + ("batch", None, None)


def cache_values_per_token(config: ConfigDict) -> int:
  """Cached values per token for the whole model: 2 blocks x layers x (kv_lora_rank + rope)."""
  return 2 * config.num_layers * (config.kv_lora_rank + config.qk_rope_head_dim)


def cache_bytes_per_token(config: ConfigDict) -> int:
  """Bytes per cached token at the compute dtype (`config.dtype`)."""
  return cache_values_per_token(config) * np.dtype(dtype_of(config.dtype)).itemsize


def pad_cache(cache, cache_size: int, placement: Placement = LOCAL):
  """A prefill cache (leaves [..., batch, prompt_len, features]) padded to `cache_size` slots
  (sharded along batch by `placement`, the model's)."""

  def pad(x):
    if x.shape[-2] > cache_size:
      raise ValueError(f"prompt length {x.shape[-2]} exceeds cache_size={cache_size}")
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, cache_size - x.shape[-2]), (0, 0)])
    return placement.constrain(x, cache_axes(x.ndim))

  return jax.tree.map(pad, cache)

"""Exact, layout-independent checksums of arrays: for checkpoint integrity and the SDC check.

    sums = tree_checksums(state)        # host: {"params/decoder/.../kernel": "16 hex digits"}
    c = tree_checksum(grads)            # inside jit: uint32 [2] for a whole tree

Each array's checksum is of its GLOBAL value, computed on device with integer sums mod 2^32. Integer
addition is associative, so the result does not depend on the reduction order: it is the same for
any mesh, sharding or process count (a checkpoint saved on one layout verifies on another), and
only a few bytes come back to the host.
"""

from __future__ import annotations

import hashlib
import json

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils


def _words(x) -> jax.Array:
  """Every element of `x` as uint32 bits (same shape): the input of the checksum."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  size = x.dtype.itemsize
  if size == 4:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  if size in (1, 2):
    return jax.lax.bitcast_convert_type(x, jnp.uint8 if size == 1 else jnp.uint16).astype(jnp.uint32)
  if size == 8:  # [..., 2] words; fold the high word in with an odd multiplier (every bit still counts)
    w = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return w[..., 0] + w[..., 1] * jnp.uint32(0x01000193)
  raise TypeError(f"no checksum for dtype {x.dtype}")


def array_checksum(x) -> jax.Array:
  """uint32 [2]: (sum of words, sum of words * odd hash of their flat index), both mod 2^32.

  A single flipped bit changes the first sum by +-2^b, never 0 mod 2^32; the second sum makes the
  checksum position-sensitive (swapped chunks are caught). Integer addition is associative, so
  the value does not depend on how a sharded reduction is ordered.
  """
  w = _words(x)
  idx = jnp.zeros(w.shape, jnp.uint32)
  stride = 1
  for d in reversed(range(w.ndim)):
    idx = idx + jax.lax.broadcasted_iota(jnp.uint32, w.shape, d) * jnp.uint32(stride % (1 << 32))
    stride *= w.shape[d]
  h = (idx * jnp.uint32(0x9E3779B1)) ^ (idx >> 15) | jnp.uint32(1)
  return jnp.stack([jnp.sum(w, dtype=jnp.uint32), jnp.sum(w * h, dtype=jnp.uint32)])


@jax.jit
def _checksums_jit(leaves):
  return jnp.stack([array_checksum(x) for x in leaves]) if leaves else jnp.zeros((0, 2), jnp.uint32)


def _host(x) -> np.ndarray:
  """A small (replicated) jax.Array to numpy on every process."""
  if getattr(x, "is_fully_replicated", True):
    return np.asarray(x.addressable_shards[0].data if hasattr(x, "addressable_shards") else x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def tree_checksums(tree) -> dict[str, str]:
  """{key path: 16 hex digits} of every array leaf of `tree` (global values; see module docstring)."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  if not flat:
    return {}
  sums = _host(_checksums_jit([jnp.asarray(v) for _, v in flat]))
  return {key_name(k): f"{int(a):08x}{int(b):08x}" for (k, _), (a, b) in zip(flat, sums)}


def key_name(path) -> str:
  """'params/decoder/layers/moe/router/kernel': a key path, the same for a dataclass or a dict."""
  parts = []
  for p in path:
    for attr in ("name", "key", "idx"):
      if hasattr(p, attr):
        parts.append(str(getattr(p, attr)))
        break
  return "/".join(parts)


def json_checksum(obj) -> str:
  """SHA-256 of the canonical JSON of `obj` (the data-iterator state)."""
  return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def tree_checksum(tree) -> jax.Array:
  """uint32 [2] for a whole tree (traceable: use inside jit), position-sensitive over leaves too."""
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.zeros((2,), jnp.uint32)
  return array_checksum(jnp.stack([array_checksum(x) for x in leaves]))

"""Absorbed-MLA decode attention over the compressed cache (the FlashMLA idea).

`mla_decode_attention(q_latent [B, H, R], q_rope [B, H, Dr], cache_latent [B, L, R],
cache_rope [B, L, Dr], lengths [B], *, sm_scale) -> [B, H, R]` (R = 512, Dr = 64 for Flash).

The key up-projection is folded into `q_latent` and the value up-projection is applied by the
caller afterwards, so the cache is never expanded: score_j = (q_latent . c_j + q_rope . r_j) *
sm_scale over positions j < lengths[b] (lengths >= 1); the output is sum_j p_j c_j, in latent
space. Inference only: no VJP.

Implementations, in dispatch order:
  "triton" (Pallas, GPU; also the interpret-mode kernel). Split-K flash decoding: the cache of
      each sequence is cut into `num_splits` contiguous ranges of `block_k`-position blocks; grid
      (B, num_splits); a program holds all H heads' queries ([H, R] is the M side of the matmul,
      as in FlashMLA) and runs the online softmax over its blocks, stopping at lengths[b]
      (blocks past the length are never read). It writes its unnormalised partial output
      [H, R], running max and sum; a jnp epilogue merges the splits by log-sum-exp. Compiled, the
      cache tile is capped at 64 positions (TRITON_MAX_BLOCK_K). L is padded to a multiple of
      block_k (a copy of the cache: allocate caches in multiples of block_k).
  "xla" the reference below: dense [B, H, L] scores.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.mla_attention import (MASK_VALUE, _dot_nt, _online_softmax_step, _softmax_init,
                                          pad_to_multiple)
from pallas_kernels.registry import Op

mla_decode_op = Op("mla_decode_attention")
TRITON_MAX_BLOCK_K = 64  # compiled: a [64, 512] cache tile (FlashMLA's block); interpret: as asked


def mla_decode_attention(q_latent, q_rope, cache_latent, cache_rope, lengths, *, sm_scale: float,
                         implementation: str | None = None, block_k: int = 512,
                         num_splits: int | None = None):
  """See the module docstring. num_splits: cache ranges per sequence (None: up to 8)."""
  b, h, r = q_latent.shape
  if (q_rope.shape[:2] != (b, h) or cache_latent.shape[0] != b or cache_latent.shape[2] != r
      or cache_rope.shape[:2] != cache_latent.shape[:2] or cache_rope.shape[2] != q_rope.shape[2]
      or lengths.shape != (b,)):
    raise ValueError(f"mla_decode_attention: shapes disagree: q_latent {q_latent.shape}, q_rope {q_rope.shape}, "
                     f"cache_latent {cache_latent.shape}, cache_rope {cache_rope.shape}, lengths {lengths.shape}")
  return mla_decode_op(q_latent, q_rope, cache_latent, cache_rope, lengths, sm_scale=sm_scale,
                       implementation=implementation, block_k=block_k, num_splits=num_splits)


def mla_decode_reference(q_latent, q_rope, cache_latent, cache_rope, lengths, *, sm_scale, block_k=None,
                         num_splits=None):
  """The definition (XLA path)."""
  f32 = jnp.float32
  scores = (jnp.einsum("bhr,blr->bhl", q_latent, cache_latent, preferred_element_type=f32)
            + jnp.einsum("bhd,bld->bhl", q_rope, cache_rope, preferred_element_type=f32)) * sm_scale
  valid = jnp.arange(cache_latent.shape[1])[None, None, :] < lengths[:, None, None]
  probs = jax.nn.softmax(jnp.where(valid, scores, -1e30), axis=-1)
  out = jnp.einsum("bhl,blr->bhr", probs.astype(cache_latent.dtype), cache_latent, preferred_element_type=f32)
  return out.astype(q_latent.dtype)


# ---------------------------------------------------------------------------------------------
# Pallas kernel.


def _decode_kernel(len_ref, ql_ref, qr_ref, cl_ref, cr_ref, acc_ref, m_ref, l_ref, *,
                   sm_scale: float, block_k: int, blocks_per_split: int):
  b, split = pl.program_id(0), pl.program_id(1)
  length = len_ref[b]
  ql, qr = ql_ref[...], qr_ref[...]                          # [H, R], [H, Dr]

  def k_step(j, carry):
    rows = pl.ds(j * block_k, block_k)
    c = cl_ref[rows, :]                                      # [bk, R]: keys and values
    s = (_dot_nt(ql, c) + _dot_nt(qr, cr_ref[rows, :])) * sm_scale  # [H, bk]
    pos = j * block_k + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
    return _online_softmax_step(carry, jnp.where(pos < length, s, MASK_VALUE), c)

  first = split * blocks_per_split
  last = jnp.minimum(first + blocks_per_split, pl.cdiv(length, block_k))
  acc, m, l = jax.lax.fori_loop(first, last, k_step, _softmax_init(*ql.shape))
  acc_ref[...], m_ref[...], l_ref[...] = acc, m, l


def mla_decode_pallas(q_latent, q_rope, cache_latent, cache_rope, lengths, *, sm_scale, block_k=512,
                      num_splits=None, interpret=False):
  (b, h, r), dr, length = q_latent.shape, q_rope.shape[-1], cache_latent.shape[1]
  heads, width = h, r  # the caller's; the compiled kernel may see padded ones
  if not interpret:
    block_k = min(block_k, TRITON_MAX_BLOCK_K)
  bk = min(block_k, pl.next_power_of_2(length))
  if not interpret and (bk != pl.next_power_of_2(bk) or bk < 16):
    raise NotImplementedError(f"triton needs a power-of-two block_k >= 16, got {bk}")
  if not interpret:  # Triton dots need dims >= 16: zero heads / columns, sliced off below
    q_latent, q_rope = (pad_to_multiple(pad_to_multiple(x, 1), 2) for x in (q_latent, q_rope))
    cache_latent, cache_rope = (pad_to_multiple(x, 2) for x in (cache_latent, cache_rope))
    (_, h, r), dr = q_latent.shape, q_rope.shape[-1]
  num_blocks = pl.cdiv(length, bk)
  splits = min(num_splits or 8, num_blocks)
  per_split = pl.cdiv(num_blocks, splits)
  l_pad = num_blocks * bk
  if l_pad != length:
    pad = ((0, 0), (0, l_pad - length), (0, 0))
    cache_latent, cache_rope = jnp.pad(cache_latent, pad), jnp.pad(cache_rope, pad)

  acc, m, l = pl.pallas_call(
      functools.partial(_decode_kernel, sm_scale=float(sm_scale), block_k=bk, blocks_per_split=per_split),
      grid=(b, splits),
      in_specs=[pl.no_block_spec,
                pl.BlockSpec((None, h, r), lambda i, s: (i, 0, 0)),
                pl.BlockSpec((None, h, dr), lambda i, s: (i, 0, 0)),
                pl.BlockSpec((None, l_pad, r), lambda i, s: (i, 0, 0)),
                pl.BlockSpec((None, l_pad, dr), lambda i, s: (i, 0, 0))],
      out_specs=[pl.BlockSpec((None, None, h, r), lambda i, s: (i, s, 0, 0)),
                 pl.BlockSpec((None, None, h), lambda i, s: (i, s, 0)),
                 pl.BlockSpec((None, None, h), lambda i, s: (i, s, 0))],
      out_shape=[jax.ShapeDtypeStruct((b, splits, h, r), jnp.float32),
                 jax.ShapeDtypeStruct((b, splits, h), jnp.float32),
                 jax.ShapeDtypeStruct((b, splits, h), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=8, num_stages=2),
      interpret=interpret,
      name="mla_decode",
  )(lengths.astype(jnp.int32), q_latent, q_rope, cache_latent, cache_rope)

  # Merge the splits: a split that saw no position has m = -inf and l = 0, so weight 0.
  m_all = jnp.max(m, axis=1, keepdims=True)
  w = jnp.where(l > 0, jnp.exp(m - m_all), 0.0)
  out = jnp.sum(acc * w[..., None], axis=1) / jnp.sum(l * w, axis=1)[..., None]
  return out[:, :heads, :width].astype(q_latent.dtype)


# ---------------------------------------------------------------------------------------------
# Dispatch order.

mla_decode_op.register("triton", kind="pallas", platforms=("gpu",))(mla_decode_pallas)
mla_decode_op.register("xla", kind="xla")(mla_decode_reference)

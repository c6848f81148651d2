"""Absorbed-MLA decoding over the compressed cache on TPU: a Mosaic split-K flash-decoding kernel.

Same contract as `mla_decode_attention` (pallas_kernels/mla_decode.py): q_latent [B, H, R],
q_rope [B, H, Dr], cache_latent [B, L, R], cache_rope [B, L, Dr], lengths [B] -> [B, H, R].

TPU layout: grid (B, num_splits, blocks_per_split), the last axis a reduction ("arbitrary").
`lengths` is a scalar-prefetch operand (SMEM), so the cache BlockSpecs' index maps clamp a block
index past lengths[b] to the sequence's last block: the pipeline sees the same block index again
and issues no DMA, so the cache past a sequence's length is never read from HBM. Each program
holds all H heads' queries ([H, R] is the M side of both matmuls, as in FlashMLA) and one
[block_k, R] cache tile (keys and values at once), folding it into an online softmax kept in
VMEM scratch; the split's last step writes its unnormalised [H, R] output, running max and sum,
and a jnp epilogue merges the splits by log-sum-exp (as the Triton kernel does). L is padded to a
multiple of block_k (a copy: allocate caches in multiples of block_k).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.mla_attention import MASK_VALUE, _dot, _dot_nt
from pallas_kernels.mla_decode import mla_decode_op
from pallas_kernels.tpu_common import interpret_params, on_each_device, round_up


def _decode_kernel(len_ref, ql_ref, qr_ref, cl_ref, cr_ref, acc_out, m_out, l_out, acc_sc, m_sc,
                   l_sc, *, sm_scale: float, block_k: int, per_split: int):
  b, split, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  length = len_ref[b]
  block = split * per_split + j

  @pl.when(j == 0)
  def _():
    acc_sc[...] = jnp.zeros_like(acc_sc)
    m_sc[...] = jnp.full_like(m_sc, -jnp.inf)
    l_sc[...] = jnp.zeros_like(l_sc)

  @pl.when(block * block_k < length)
  def _():
    c = cl_ref[...]                                              # [bk, R]: keys and values
    s = (_dot_nt(ql_ref[...], c) + _dot_nt(qr_ref[...], cr_ref[...])) * sm_scale  # [H, bk]
    pos = block * block_k + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
    s = jnp.where(pos < length, s, MASK_VALUE)
    m_prev = m_sc[...]                                           # [H, 1]
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=-1, keepdims=True))
    p = jnp.exp(s - m_new)
    corr = jnp.exp(m_prev - m_new)
    l_sc[...] = l_sc[...] * corr + jnp.sum(p, axis=-1, keepdims=True)
    acc_sc[...] = acc_sc[...] * corr + _dot(p.astype(c.dtype), c)
    m_sc[...] = m_new

  @pl.when(j == per_split - 1)
  def _():
    acc_out[...], m_out[...], l_out[...] = acc_sc[...], m_sc[...], l_sc[...]


def mla_decode_mosaic(q_latent, q_rope, cache_latent, cache_rope, lengths, *, sm_scale, block_k=512,
                      num_splits=None, interpret=False):
  """See the module docstring. block_k is rounded to a multiple of 8 (TPU sublanes). Under a mesh
  each device decodes its own sequences and heads (`tpu_common.on_each_device`)."""
  local = functools.partial(_decode_local, sm_scale=float(sm_scale), block_k=block_k,
                            num_splits=num_splits, interpret=interpret_params(interpret))
  q, c = ("B", "H", None), ("B", None, None)
  return on_each_device(local, (q_latent, q_rope, cache_latent, cache_rope, lengths),
                        (q, q, c, c, ("B",)), q)


def _decode_local(q_latent, q_rope, cache_latent, cache_rope, lengths, *, sm_scale, block_k, num_splits,
                  interpret):
  (b, h, r), dr, length = q_latent.shape, q_rope.shape[-1], cache_latent.shape[1]
  bk = min(round_up(block_k, 8), round_up(length, 8))
  num_blocks = -(-length // bk)
  splits = min(num_splits or 8, num_blocks)
  per_split = -(-num_blocks // splits)
  l_pad = num_blocks * bk
  if l_pad != length:
    pad = ((0, 0), (0, l_pad - length), (0, 0))
    cache_latent, cache_rope = jnp.pad(cache_latent, pad), jnp.pad(cache_rope, pad)

  def cache_block(i, s, j, lens):  # clamped to the last block holding a position: no new DMA
    last = jnp.maximum(pl.cdiv(lens[i], bk) - 1, 0)
    return i, jnp.minimum(s * per_split + j, last), 0

  query = lambda d: pl.BlockSpec((None, h, d), lambda i, s, j, lens: (i, 0, 0))
  per_split_out = lambda d: pl.BlockSpec((None, None, h, d), lambda i, s, j, lens: (i, s, 0, 0))
  acc, m, l = pl.pallas_call(
      functools.partial(_decode_kernel, sm_scale=float(sm_scale), block_k=bk, per_split=per_split),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1, grid=(b, splits, per_split),
          in_specs=[query(r), query(dr), pl.BlockSpec((None, bk, r), cache_block),
                    pl.BlockSpec((None, bk, dr), cache_block)],
          out_specs=[per_split_out(r), per_split_out(1), per_split_out(1)],
          scratch_shapes=[pltpu.VMEM((h, r), jnp.float32), pltpu.VMEM((h, 1), jnp.float32),
                          pltpu.VMEM((h, 1), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct((b, splits, h, r), jnp.float32),
                 jax.ShapeDtypeStruct((b, splits, h, 1), jnp.float32),
                 jax.ShapeDtypeStruct((b, splits, h, 1), jnp.float32)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="mla_decode_tpu",
  )(lengths.astype(jnp.int32), q_latent, q_rope, cache_latent, cache_rope)

  # Merge the splits: a split that saw no position has m = -inf and l = 0, so weight 0.
  m, l = m[..., 0], l[..., 0]
  m_all = jnp.max(m, axis=1, keepdims=True)
  w = jnp.where(l > 0, jnp.exp(m - m_all), 0.0)
  out = jnp.sum(acc * w[..., None], axis=1) / jnp.sum(l * w, axis=1)[..., None]
  return out.astype(q_latent.dtype)


# After the GPU kernel: the registry orders kernels of one kind by registration, and they never
# compete (each runs on its own platform).
mla_decode_op.register("mosaic", kind="pallas", platforms=("tpu",))(mla_decode_mosaic)

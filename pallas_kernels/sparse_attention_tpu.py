"""Attention over indexer-selected keys on TPU: a Mosaic kernel that gathers rows by DMA.

Same contract as `sparse_attention` (pallas_kernels/sparse_attention.py): q [B, S, H, Dk], shared
keys k [B, T, Dk] and values v [B, T, Dv] (MQA, absorbed MLA), indices [B, S, K] (-1 = empty).

A TPU vector unit cannot gather rows from VMEM by a vector of indices, so the kernel leaves k and
v in HBM (`memory_space=pl.ANY`) and copies the selected rows itself: grid (B, S, K / block_k),
the last axis a reduction; the indices of the current block arrive twice, in SMEM (scalars: the
DMA addresses) and in VMEM (a [1, block_k] vector: the validity mask), and for each the program starts one row DMA of k and one of v into
[block_k, 1, Dk] / [block_k, 1, Dv] VMEM buffers (one row per (8, 128) tile, and k, v viewed as
[B, T, 1, D]: Mosaic DMAs may not start inside a tile, and a row offset into [T, D] would), all
signalling one DMA semaphore, then waits for them and folds the block into an online softmax over all H heads at once (heads are the M side
of the matmul, as in FlashMLA's sparse decode). Empty slots (-1) copy row 0 and are masked. A row
with no key at all returns zeros. Backward: the XLA path's (recompute + scatter-add), as for the
Triton kernel.

Cost: 2 * K row DMAs per query position; at LongCat shapes (K = 2048 rows of 576 / 512 bf16)
each is ~1 KiB, small for a DMA engine, which is why FlashMLA-style kernels on GPU gather per
query too. Double buffering across blocks is left out (one buffer, waits before compute).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.sparse_attention import (MASK_VALUE, XLA_CHUNK, _dot, _dot_nt, _xla_bwd, _xla_fwd,
                                             sparse_attention_op)
from pallas_kernels.tpu_common import LANES, interpret_params, on_each_device, round_up


def _sparse_kernel(idx_ref, idx_vec_ref, q_ref, k_hbm, v_hbm, o_ref, kbuf, vbuf, sem, acc_sc, m_sc, l_sc, *,
                   sm_scale: float, block_k: int):
  b, j = pl.program_id(0), pl.program_id(2)

  @pl.when(j == 0)
  def _():
    acc_sc[...] = jnp.zeros_like(acc_sc)
    m_sc[...] = jnp.full_like(m_sc, MASK_VALUE)
    l_sc[...] = jnp.zeros_like(l_sc)

  def row_copies(i):
    row = jnp.maximum(idx_ref[i], 0)
    return (pltpu.make_async_copy(k_hbm.at[b, row], kbuf.at[i], sem),
            pltpu.make_async_copy(v_hbm.at[b, row], vbuf.at[i], sem))

  def start(i, carry):
    for c in row_copies(i):
      c.start()
    return carry

  def wait(i, carry):
    for c in row_copies(i):
      c.wait()
    return carry

  jax.lax.fori_loop(0, block_k, start, 0)
  jax.lax.fori_loop(0, block_k, wait, 0)

  ok = idx_vec_ref[...] >= 0                                           # [1, bk] (VMEM copy)
  keys, values = kbuf[...][:, 0], vbuf[...][:, 0]                     # [bk, Dk], [bk, Dv]
  s = jnp.where(ok, _dot_nt(q_ref[...], keys) * sm_scale, MASK_VALUE)  # [H, bk]
  m_prev = m_sc[...]
  m_new = jnp.maximum(m_prev, jnp.max(s, axis=-1, keepdims=True))
  p = jnp.where(ok, jnp.exp(s - m_new), 0.0)
  corr = jnp.exp(m_prev - m_new)
  l_sc[...] = l_sc[...] * corr + jnp.sum(p, axis=-1, keepdims=True)
  acc_sc[...] = acc_sc[...] * corr + _dot(p.astype(values.dtype), values)
  m_sc[...] = m_new

  @pl.when(j == pl.num_programs(2) - 1)
  def _():
    l = l_sc[...]
    o_ref[...] = (acc_sc[...] / jnp.where(l > 0, l, 1.0)).astype(o_ref.dtype)


def _sparse_call(q, k, v, indices, sm_scale: float, block_k: int, interpret):
  b, s, h, dk = q.shape
  dv, kk = v.shape[-1], indices.shape[-1]
  return pl.pallas_call(
      functools.partial(_sparse_kernel, sm_scale=sm_scale, block_k=block_k),
      grid=(b, s, kk // block_k),
      in_specs=[pl.BlockSpec((None, None, None, block_k), lambda i, t, j: (i, t, 0, j),
                             memory_space=pltpu.SMEM),
                pl.BlockSpec((None, None, 1, block_k), lambda i, t, j: (i, t, 0, j)),
                pl.BlockSpec((None, None, h, dk), lambda i, t, j: (i, t, 0, 0)),
                pl.BlockSpec(memory_space=pl.ANY), pl.BlockSpec(memory_space=pl.ANY)],
      out_specs=pl.BlockSpec((None, None, h, dv), lambda i, t, j: (i, t, 0, 0)),
      out_shape=jax.ShapeDtypeStruct((b, s, h, dv), q.dtype),
      scratch_shapes=[pltpu.VMEM((block_k, 1, dk), k.dtype), pltpu.VMEM((block_k, 1, dv), v.dtype),
                      pltpu.SemaphoreType.DMA(()), pltpu.VMEM((h, dv), jnp.float32),
                      pltpu.VMEM((h, 1), jnp.float32), pltpu.VMEM((h, 1), jnp.float32)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret_params(interpret),
      name="sparse_attention_tpu",
  )(indices[:, :, None, :], indices[:, :, None, :], q, k[:, :, None], v[:, :, None])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _sparse_mosaic(q, k, v, indices, sm_scale, block_k, interpret):
  return _sparse_call(q, k, v, indices, sm_scale, block_k, interpret)


def _sparse_mosaic_fwd(q, k, v, indices, sm_scale, block_k, interpret):
  return _sparse_call(q, k, v, indices, sm_scale, block_k, interpret), (q, k, v, indices)


def _sparse_mosaic_bwd(sm_scale, block_k, interpret, res, do):
  q, k, v, indices = res
  out, lse = _xla_fwd(q, k, v, indices, sm_scale, XLA_CHUNK)  # recomputed (the kernel keeps no lse)
  return (*_xla_bwd(q, k, v, indices, out, lse, do, sm_scale, XLA_CHUNK), None)


_sparse_mosaic.defvjp(_sparse_mosaic_fwd, _sparse_mosaic_bwd)


def sparse_attention_mosaic(q, k, v, indices, *, sm_scale, block_k=128, interpret=False):
  """See the module docstring. block_k (selected indices per step): K itself (rounded to 8) when
  K <= 128, else a multiple of 128 (the lane width of the VMEM index vector). Under a mesh each
  device attends its own sequences and heads (`tpu_common.on_each_device`)."""
  kk = indices.shape[-1]
  bk = round_up(kk, 8) if kk <= LANES else round_up(max(block_k, LANES), LANES)
  if kk % bk:
    indices = jnp.pad(indices, ((0, 0), (0, 0), (0, -kk % bk)), constant_values=-1)
  local = lambda q, k, v, i: _sparse_mosaic(q, k, v, i, float(sm_scale), bk, interpret_params(interpret))
  kv = ("B", None, None)  # keys and values are shared by the heads
  return on_each_device(local, (q, k, v, indices), (("B", None, "H", None), kv, kv, kv), ("B", None, "H", None))


sparse_attention_op.register("mosaic", kind="pallas", platforms=("tpu",))(sparse_attention_mosaic)

"""Attention over indexer-selected keys (LongCat Sparse Attention; DeepSeek-V3.2's DSA), MQA form.

`sparse_attention(q [B, S, H, Dk], k [B, T, Dk], v [B, T, Dv], indices [B, S, K] int32, *, sm_scale)
-> [B, S, H, Dv]`

Query (b, s) attends only to the keys k[b, indices[b, s, :]]; an index of -1 is an empty slot
(fewer visible keys than K). A row with no key at all returns zeros. Keys and values are shared by
the H heads (MLA in absorbed form: k = [latent | roped key], v = latent, Dk = R + rope), so one
gathered key serves every head and the gather costs K * Dk per query, not K * H * Dk:

    s_j = q . k[idx_j] * sm_scale (masked where idx_j < 0);  p = softmax(s);  out = sum_j p_j v[idx_j]

The training/prefill path and the decoding path are the same call: for decoding, S = new tokens
and T = the compressed cache.

Implementations, in dispatch order:
  "triton" (Pallas, GPU; also the interpret-mode kernel): grid (B, S), one query position and all
      its heads per program (the heads are the rows of the matmul, as in FlashMLA's sparse decode);
      a loop over blocks of `block_k` selected indices gathers their key/value rows and folds them
      into an online softmax. Dk is split into power-of-two column chunks (576 = 512 + 64) for
      Triton. Backward: the XLA path's backward (no Pallas backward kernel yet).
  "xla" (jnp, any backend): gathers [K, Dk] keys per query and does a dense softmax over them,
      `XLA_CHUNK` queries at a time (`lax.map`), so the gathered keys stay O(chunk * K * Dk).
      Custom VJP: the backward recomputes each chunk's probabilities from the saved log-sum-exp
      and scatter-adds dk, dv at the gathered rows (never O(S * K * Dk) residuals).
`sparse_attention_reference` is the plain-jnp definition (autodiff), for tests.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from pallas_kernels.registry import Op

sparse_attention_op = Op("sparse_attention")

MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
XLA_CHUNK = 256  # queries per lax.map step of the XLA path (when S is larger)


def sparse_attention(q, k, v, indices, *, sm_scale: float, implementation: str | None = None,
                     block_k: int = 64):
  """See the module docstring."""
  if q.ndim != 4 or k.ndim != 3 or v.ndim != 3 or indices.ndim != 3:
    raise ValueError(f"sparse_attention: want q [B, S, H, Dk], k [B, T, Dk], v [B, T, Dv], indices [B, S, K]; "
                     f"got q {q.shape}, k {k.shape}, v {v.shape}, indices {indices.shape}")
  b, s, _, dk = q.shape
  if k.shape[0] != b or k.shape[2] != dk or v.shape[:2] != k.shape[:2] or indices.shape[:2] != (b, s):
    raise ValueError(f"sparse_attention: shapes disagree: q {q.shape}, k {k.shape}, v {v.shape}, "
                     f"indices {indices.shape}")
  if block_k <= 0:
    raise ValueError(f"sparse_attention: block_k={block_k} must be positive")
  return sparse_attention_op(q, k, v, indices.astype(jnp.int32), sm_scale=float(sm_scale),
                             implementation=implementation, block_k=block_k)


def indices_to_mask(indices, num_keys: int):
  """[B, S, K] selected indices (-1 = none) -> [B, S, T] boolean mask of the selected keys."""
  hit = indices[..., None] == jnp.arange(num_keys)[None, None, None, :]
  return jnp.any(hit & (indices[..., None] >= 0), axis=2)


# ---------------------------------------------------------------------------------------------
# XLA path: gathered keys, query chunks, custom VJP with a chunked recompute backward.


def _gather_rows(x, indices):
  """x [T, D], indices [..., K] (-1 = none) -> rows [..., K, D] (row 0 for empty slots), valid mask."""
  valid = indices >= 0
  return jnp.take(x, jnp.where(valid, indices, 0), axis=0), valid


def _chunk_fwd(q, k, v, indices, sm_scale):
  """One batch row, one query chunk: q [c, H, Dk], k [T, Dk], v [T, Dv], indices [c, K]
  -> out [c, H, Dv], lse [c, H] (0 for rows without keys)."""
  kg, valid = _gather_rows(k, indices)
  vg, _ = _gather_rows(v, indices)
  s = jnp.einsum("chd,ckd->chk", q, kg, preferred_element_type=jnp.float32) * sm_scale
  s = jnp.where(valid[:, None, :], s, -jnp.inf)
  m = jnp.max(s, axis=-1)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.exp(s - m[..., None])
  l = jnp.sum(p, axis=-1)
  safe_l = jnp.where(l > 0, l, 1.0)
  out = jnp.einsum("chk,ckd->chd", (p / safe_l[..., None]).astype(v.dtype), vg, preferred_element_type=jnp.float32)
  return out.astype(q.dtype), jnp.where(l > 0, m + jnp.log(safe_l), 0.0)


def _chunks(x, chunk):
  """[B, S, ...] -> [n, B, chunk, ...] (S padded to a multiple of chunk; indices pad with -1)."""
  s = x.shape[1]
  pad = -s % chunk
  x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=-1 if x.dtype == jnp.int32 else 0)
  return jnp.moveaxis(x.reshape(x.shape[0], -1, chunk, *x.shape[2:]), 1, 0)


def _unchunk(x, s):
  """[n, B, chunk, ...] -> [B, S, ...]."""
  x = jnp.moveaxis(x, 0, 1)
  return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :s]


def _xla_fwd(q, k, v, indices, sm_scale, chunk):
  s = q.shape[1]
  one = jax.vmap(functools.partial(_chunk_fwd, sm_scale=sm_scale))
  if s <= chunk:
    return one(q, k, v, indices)
  out, lse = jax.lax.map(lambda xs: one(xs[0], k, v, xs[1]), (_chunks(q, chunk), _chunks(indices, chunk)))
  return _unchunk(out, s), _unchunk(lse, s)


def _xla_bwd(q, k, v, indices, out, lse, do, sm_scale, chunk):
  """Recomputes each query chunk's probabilities from lse; dk, dv are scatter-added at the
  gathered rows, so memory is O(chunk * K * D) beyond the inputs."""
  delta = jnp.einsum("bshd,bshd->bsh", out.astype(jnp.float32), do.astype(jnp.float32))
  s = q.shape[1]
  c = min(chunk, s)
  xs = tuple(_chunks(a, c) for a in (q, indices, do, lse, delta))

  def row(k, v, q, idx, do, lse, delta):  # one batch row, scanned over its query chunks
    def step(carry, x):
      dk, dv = carry
      qi, ii, doi, lsei, di = x
      kg, valid = _gather_rows(k, ii)
      vg, _ = _gather_rows(v, ii)
      sc = jnp.einsum("chd,ckd->chk", qi, kg, preferred_element_type=jnp.float32) * sm_scale
      p = jnp.where(valid[:, None, :], jnp.exp(sc - lsei[..., None]), 0.0)
      dof = doi.astype(jnp.float32)
      dvg = jnp.einsum("chk,chd->ckd", p, dof)
      ds = p * (jnp.einsum("chd,ckd->chk", dof, vg.astype(jnp.float32)) - di[..., None]) * sm_scale
      dq = jnp.einsum("chk,ckd->chd", ds, kg.astype(jnp.float32))
      dkg = jnp.einsum("chk,chd->ckd", ds, qi.astype(jnp.float32))
      flat = jnp.where(valid, ii, 0).reshape(-1)
      keep = valid.reshape(-1, 1)
      dk = dk.at[flat].add(jnp.where(keep, dkg.reshape(flat.shape[0], -1), 0.0))
      dv = dv.at[flat].add(jnp.where(keep, dvg.reshape(flat.shape[0], -1), 0.0))
      return (dk, dv), dq

    init = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    (dk, dv), dq = jax.lax.scan(step, init, (q, idx, do, lse, delta))
    return dk, dv, dq

  per_row = lambda a: jnp.moveaxis(a, 1, 0)  # [n, B, ...] -> [B, n, ...]
  dk, dv, dq = jax.vmap(row)(k, v, *(per_row(a) for a in xs))
  dq = _unchunk(jnp.moveaxis(dq, 1, 0), s)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _sparse_xla(q, k, v, indices, sm_scale, chunk):
  return _xla_fwd(q, k, v, indices, sm_scale, chunk)[0]


def _sparse_xla_fwd(q, k, v, indices, sm_scale, chunk):
  out, lse = _xla_fwd(q, k, v, indices, sm_scale, chunk)
  return out, (q, k, v, indices, out, lse)


def _sparse_xla_bwd(sm_scale, chunk, res, do):
  q, k, v, indices, out, lse = res
  return (*_xla_bwd(q, k, v, indices, out, lse, do, sm_scale, chunk), None)


_sparse_xla.defvjp(_sparse_xla_fwd, _sparse_xla_bwd)


@sparse_attention_op.register("xla", kind="xla")
def sparse_attention_xla(q, k, v, indices, *, sm_scale, block_k=None):
  return _sparse_xla(q, k, v, indices, float(sm_scale), XLA_CHUNK)


def sparse_attention_reference(q, k, v, indices, *, sm_scale):
  """The definition, plain jnp (autodiff): gathered keys and a dense softmax over them."""
  return jax.vmap(lambda q, k, v, i: _chunk_fwd(q, k, v, i, sm_scale)[0])(q, k, v, indices)


# ---------------------------------------------------------------------------------------------
# Pallas kernel.


class _Cfg(NamedTuple):
  sm_scale: float
  block_k: int
  interpret: bool


def _pow2_chunks(d: int) -> tuple[tuple[int, int], ...]:
  """(start, width) power-of-two column chunks covering d, widest first: 576 -> (0, 512), (512, 64)."""
  out, start = [], 0
  while start < d:
    w = 1 << ((d - start).bit_length() - 1)
    out.append((start, w))
    start += w
  return tuple(out)


def _dot_nt(a, b):
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot(a, b):
  return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _sparse_fwd_kernel(q_ref, k_ref, v_ref, idx_ref, o_ref, *, cfg: _Cfg, chunks):
  """One query position: q [H, Dk], k [T, Dk], v [T, Dv], idx [K] -> o [H, Dv]."""
  bk = cfg.block_k
  h, dv = q_ref.shape[0], v_ref.shape[-1]
  qs = tuple(q_ref[:, pl.ds(c0, cw)] for c0, cw in chunks)

  def step(j, carry):
    acc, m, l = carry
    idx = idx_ref[pl.ds(j * bk, bk)]                                   # [bk]
    valid = idx >= 0
    rows = jnp.where(valid, idx, 0)
    s = sum(_dot_nt(qc, k_ref[rows, pl.ds(c0, cw)]) for qc, (c0, cw) in zip(qs, chunks)) * cfg.sm_scale
    s = jnp.where(valid[None, :], s, MASK_VALUE)                       # [H, bk]
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    p = jnp.where(valid[None, :], jnp.exp(s - m_new[:, None]), 0.0)
    corr = jnp.exp(m - m_new)
    l = l * corr + jnp.sum(p, axis=-1)
    acc = acc * corr[:, None] + _dot(p.astype(v_ref.dtype), v_ref[rows, :])
    return acc, m_new, l

  init = (jnp.zeros((h, dv), jnp.float32), jnp.full((h,), MASK_VALUE, jnp.float32), jnp.zeros((h,), jnp.float32))
  acc, _, l = jax.lax.fori_loop(0, idx_ref.shape[0] // bk, step, init)
  o_ref[...] = (acc / jnp.where(l > 0, l, 1.0)[:, None]).astype(o_ref.dtype)


def _sparse_fwd_call(q, k, v, indices, cfg: _Cfg):
  b, s, h, dk = q.shape
  t, dv, kk = k.shape[1], v.shape[-1], indices.shape[-1]
  return pl.pallas_call(
      functools.partial(_sparse_fwd_kernel, cfg=cfg, chunks=_pow2_chunks(dk)),
      grid=(b, s),
      in_specs=[pl.BlockSpec((None, None, h, dk), lambda i, j: (i, j, 0, 0)),
                pl.BlockSpec((None, t, dk), lambda i, j: (i, 0, 0)),
                pl.BlockSpec((None, t, dv), lambda i, j: (i, 0, 0)),
                pl.BlockSpec((None, None, kk), lambda i, j: (i, j, 0))],
      out_specs=pl.BlockSpec((None, None, h, dv), lambda i, j: (i, j, 0, 0)),
      out_shape=jax.ShapeDtypeStruct((b, s, h, dv), q.dtype),
      interpret=cfg.interpret,
      name="sparse_attention_fwd",
  )(q, k, v, indices)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _sparse_pallas(q, k, v, indices, cfg: _Cfg):
  return _sparse_fwd_call(q, k, v, indices, cfg)


def _sparse_pallas_fwd(q, k, v, indices, cfg):
  return _sparse_fwd_call(q, k, v, indices, cfg), (q, k, v, indices)


def _sparse_pallas_bwd(cfg, res, do):
  q, k, v, indices = res
  out, lse = _xla_fwd(q, k, v, indices, cfg.sm_scale, XLA_CHUNK)  # recomputed (the kernel keeps no lse)
  return (*_xla_bwd(q, k, v, indices, out, lse, do, cfg.sm_scale, XLA_CHUNK), None)


_sparse_pallas.defvjp(_sparse_pallas_fwd, _sparse_pallas_bwd)


@sparse_attention_op.register("triton", kind="pallas", platforms=("gpu",))
def sparse_attention_pallas(q, k, v, indices, *, sm_scale, block_k=64, interpret=False):
  kk = indices.shape[-1]
  bk = min(block_k, pl.next_power_of_2(kk))
  h = q.shape[2]
  if not interpret and (h < 16 or h != pl.next_power_of_2(h) or bk < 16):
    raise NotImplementedError(f"triton needs a power-of-two number of heads >= 16 (got {h}) and "
                              f"block_k >= 16 (got {bk})")
  pad = -kk % bk
  if pad:
    indices = jnp.pad(indices, ((0, 0), (0, 0), (0, pad)), constant_values=-1)
  return _sparse_pallas(q, k, v, indices, _Cfg(float(sm_scale), bk, interpret))

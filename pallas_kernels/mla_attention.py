"""Causal attention for MLA prefill/training, with Dqk != Dv and packed-document segment ids.

`mla_attention(q [B, S, H, Dqk], k [B, S, H, Dqk], v [B, S, H, Dv], *, segment_ids [B, S] | None,
causal=True, sm_scale=None) -> [B, S, H, Dv]` (Dqk = 192, Dv = 128 for LongCat-Flash).

A query attends to keys at positions <= its own (causal) that carry the same segment id, so
packed documents never see each other. Every row must see at least one key (itself, with causal
or segments), which holds for every model input.

Flash attention (FlashAttention-2): for a block of `block_q` queries, loop over blocks of
`block_k` keys keeping the running max m, the running sum l and the unnormalised output acc:

    s = q k^T * sm_scale (masked);  m' = max(m, rowmax s);  p = exp(s - m')
    l = l e^(m - m') + rowsum p;    acc = acc e^(m - m') + p v;   out = acc / l, lse = m + log l

Causal: a query block stops at the last key block it can see. Backward (lse saved by the
forward): delta = rowsum(out * dout); per block p = exp(s - lse), dv += p^T dout,
ds = p (dout v^T - delta), dq += ds k * sm_scale, dk += ds^T q * sm_scale. The [S, S] matrix is
never formed. Masked scores use a large finite negative value, not -inf, so that a block with no
visible key cannot produce NaN.

Implementations, in dispatch order:
  "cudnn" (GPU, auto only): cuDNN's fused attention through `jax.nn.dot_product_attention`, V
      zero-padded to Dqk; unpacked bf16/f16 inputs only (see `mla_attention_cudnn`).
  "triton" (Pallas, GPU; also the interpret-mode kernel). Forward grid (B, H, S/block_q), one
      query block per program looping over key blocks; backward = two kernels: dk/dv with grid
      (B, H, S/block_k) looping over query blocks from the causal diagonal, dq with grid
      (B, H, S/block_q). Custom VJP; delta is a jnp reduction. Compiled, tiles are capped at
      128 x 64 (TRITON_MAX_BLOCK_Q/K); interpret mode uses the requested blocks. S is padded to a
      multiple of the blocks (padded keys masked and skipped, padded queries sliced off: their
      cotangent is zero). Triton needs power-of-two tiles: the head dims are handled as
      power-of-two column chunks (192 = 128 + 64, MLA's nope | rope split), not padded to 256.
  "xla_chunked" (jnp). S > 1024, any backend: the same algorithm with `lax.map` over query
      blocks and `lax.fori_loop` over key blocks, vmapped over batch and heads, forward and
      backward under a custom VJP, so memory is O(B H block_q block_k) per step and [S, S] never
      exists (this is what the ahead-of-time memory planner compiles for long sequences).
      S <= 1024 on CPU: `query_blocked_attention`, static query blocks of CPU_BLOCK_Q rows, each
      against its causal key prefix only (dense scores per block, no key loop), under a custom
      VJP that saves (out, lse) and recomputes the probabilities in the backward: causal blocks
      above the diagonal are skipped (10/16 of the score FLOPs at S = 512) and no [B, H, S, S]
      probabilities are kept for the backward (XLA-CPU's cost there is mostly touching fresh
      memory). Elsewhere at S <= 1024: NotImplementedError, the dense reference runs.
  "xla" the dense reference: materialises [B, H, S, S] scores; exact, for short sequences/tests.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.registry import Op, current_platform

mla_attention_op = Op("mla_attention")

MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)  # finite: exp(MASK - m) = 0, never NaN
CHUNKED_MIN_SEQ = 1024  # the chunked XLA path takes sequences longer than this
# Query rows per block of `query_blocked_attention` (CPU, S <= CHUNKED_MIN_SEQ). At the `small`
# bench shape (B 4, S 512, 8 heads) 128 measured best: 64 loses to dot efficiency, 256 to fewer
# skipped causal blocks, 512 is the dense computation.
CPU_BLOCK_Q = 128
# Compiled Triton tiles are capped here (the config's 512 x 512 suits the chunked XLA path, but a
# 512 x 192 query tile plus 512 x 512 f32 scores does not fit one SM); interpret mode honours the
# requested blocks. FlashAttention-2's Triton kernels use 128 x 64 forward tiles.
TRITON_MAX_BLOCK_Q, TRITON_MAX_BLOCK_K = 128, 64
# Triton's tl.dot wants every operand dimension >= 16. Below that a 16-bit dot is silently wrong
# (measured on an H200, JAX 0.11.2: bf16 attention with Dqk = 24, i.e. column chunks 16 + 8, was
# off by 44-125% of the output's scale, Dqk = 32 within 3e-3), so compiled kernels zero-pad head
# dimensions (and, for decode, the head count) to a multiple of TRITON_MIN_DIM; real LongCat shapes
# (192, 128, 512, 64) are already multiples and pay nothing.
TRITON_MIN_DIM = 16


def pad_to_multiple(x, axis: int, multiple: int = TRITON_MIN_DIM):
  """Zero-pads axis of x up to a multiple of `multiple` (a no-op when it already is one)."""
  extra = -x.shape[axis] % multiple
  if not extra:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths)


def mla_attention(q, k, v, *, segment_ids=None, causal: bool = True, sm_scale: float | None = None,
                  implementation: str | None = None, block_q: int = 512, block_k: int = 512):
  """See the module docstring. sm_scale defaults to Dqk**-0.5; block sizes are clipped to S."""
  if q.ndim != 4 or k.shape[:3] != q.shape[:3] or v.shape[:3] != q.shape[:3] or k.shape[-1] != q.shape[-1]:
    raise ValueError(f"mla_attention: want q, k [B, S, H, Dqk] and v [B, S, H, Dv]; got q {q.shape}, "
                     f"k {k.shape}, v {v.shape}")
  if segment_ids is not None and segment_ids.shape != q.shape[:2]:
    raise ValueError(f"mla_attention: segment_ids shape {segment_ids.shape} != [batch, seq] {q.shape[:2]}")
  if block_q <= 0 or block_k <= 0:
    raise ValueError(f"mla_attention: block_q={block_q} and block_k={block_k} must be positive")
  if sm_scale is None:
    sm_scale = q.shape[-1] ** -0.5
  return mla_attention_op(q, k, v, segment_ids=segment_ids, causal=causal, sm_scale=sm_scale,
                          implementation=implementation, block_q=block_q, block_k=block_k)


# ---------------------------------------------------------------------------------------------
# Dense reference.


def attention_mask(segment_ids, seq_len: int, causal: bool, batch: int):
  """[B, 1, S, S] boolean mask: True where query i may attend key j."""
  mask = jnp.ones((batch, 1, seq_len, seq_len), bool)
  if causal:
    mask &= jnp.tril(jnp.ones((seq_len, seq_len), bool))[None, None]
  if segment_ids is not None:
    mask &= (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
  return mask


def mla_attention_reference(q, k, v, *, segment_ids=None, causal=True, sm_scale=None, block_q=None,
                            block_k=None):
  """The definition: dense [B, H, S, S] scores (XLA path for short sequences)."""
  if sm_scale is None:
    sm_scale = q.shape[-1] ** -0.5
  b, s = q.shape[:2]
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * sm_scale
  scores = jnp.where(attention_mask(segment_ids, s, causal, b), scores, -1e30)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v, preferred_element_type=jnp.float32).astype(q.dtype)


# ---------------------------------------------------------------------------------------------
# Block math shared by the Pallas kernels and the chunked XLA path. Query/key head vectors are
# tuples of column chunks ([rows, d_c] each) so that Triton only sees power-of-two widths.


class _Cfg(NamedTuple):
  causal: bool
  sm_scale: float
  block_q: int
  block_k: int
  seq_len: int  # real (unpadded) length: keys at or past it are masked
  interpret: bool = False


def _dot_nt(a, b):
  """a [m, d] . b [n, d]^T -> [m, n] float32."""
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_tn(a, b):
  """a [m, p]^T . b [m, n] -> [p, n] float32."""
  return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _dot(a, b):
  return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _pow2_chunks(d: int) -> tuple[tuple[int, int], ...]:
  """(start, width) power-of-two column chunks covering d, widest first: 192 -> (0,128), (128,64)."""
  out, start = [], 0
  while start < d:
    w = 1 << ((d - start).bit_length() - 1)
    out.append((start, w))
    start += w
  return tuple(out)


def _scores(qs, ks, cfg: _Cfg, q_start, k_start, q_seg, k_seg):
  """Scaled, masked scores [bq, bk] for query rows from q_start and key rows from k_start."""
  s = sum(_dot_nt(qc, kc) for qc, kc in zip(qs, ks)) * cfg.sm_scale
  bq, bk = s.shape
  q_pos = q_start + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
  k_pos = k_start + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
  mask = k_pos < cfg.seq_len
  if cfg.causal:
    mask &= q_pos >= k_pos
  if q_seg is not None:
    mask &= q_seg[:, None] == k_seg[None, :]
  return jnp.where(mask, s, MASK_VALUE), mask


def _online_softmax_step(carry, s, v):
  """Folds one key block (scores s [bq, bk], values v [bk, Dv]) into (acc, m, l)."""
  acc, m, l = carry
  m_new = jnp.maximum(m, jnp.max(s, axis=-1))
  correction = jnp.exp(m - m_new)
  p = jnp.exp(s - m_new[:, None])
  l = l * correction + jnp.sum(p, axis=-1)
  acc = acc * correction[:, None] + _dot(p.astype(v.dtype), v)
  return acc, m_new, l


def _softmax_init(rows: int, dv: int):
  return (jnp.zeros((rows, dv), jnp.float32), jnp.full((rows,), -jnp.inf, jnp.float32),
          jnp.zeros((rows,), jnp.float32))


def _block_grads(s, mask, lse, delta, do, v):
  """p and ds = p * (dout v^T - delta), both [bq, bk], for one block pair (ds not yet * sm_scale)."""
  p = jnp.where(mask, jnp.exp(s - lse[:, None]), 0.0)
  dp = _dot_nt(do, v)
  return p, p * (dp - delta[:, None])


def _k_blocks_end(q_block, cfg: _Cfg):
  """One past the last key block a query block needs: the diagonal (causal) or the real length."""
  end = pl.cdiv(cfg.seq_len, cfg.block_k)  # blocks wholly in the padding are skipped
  if not cfg.causal:
    return end
  return jnp.minimum(pl.cdiv((q_block + 1) * cfg.block_q, cfg.block_k), end)


def _q_blocks_range(k_block, cfg: _Cfg):
  """Query blocks that see a key block: from the diagonal (causal) to the real length."""
  end = pl.cdiv(cfg.seq_len, cfg.block_q)  # padded queries have zero cotangent
  return ((k_block * cfg.block_k) // cfg.block_q if cfg.causal else 0), end


# ---------------------------------------------------------------------------------------------
# Pallas kernels.


def _chunks(ref, rows, widths):
  return tuple(ref[rows, pl.ds(c0, cw)] for c0, cw in widths)


def _fwd_kernel(*refs, cfg: _Cfg, qk_chunks, has_segments: bool):
  if has_segments:
    q_ref, k_ref, v_ref, segq_ref, segk_ref, o_ref, lse_ref = refs
  else:
    (q_ref, k_ref, v_ref, o_ref, lse_ref), segq_ref, segk_ref = refs, None, None
  bq, bk = cfg.block_q, cfg.block_k
  i = pl.program_id(2)
  qs = _chunks(q_ref, slice(None), qk_chunks)
  q_seg = segq_ref[...] if has_segments else None

  def k_step(j, carry):
    rows = pl.ds(j * bk, bk)
    k_seg = segk_ref[rows] if has_segments else None
    s, _ = _scores(qs, _chunks(k_ref, rows, qk_chunks), cfg, i * bq, j * bk, q_seg, k_seg)
    return _online_softmax_step(carry, s, v_ref[rows, :])

  acc, m, l = jax.lax.fori_loop(0, _k_blocks_end(i, cfg), k_step, _softmax_init(bq, v_ref.shape[-1]))
  o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log(l)


def _dkv_kernel(*refs, cfg: _Cfg, qk_chunks, has_segments: bool):
  if has_segments:
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, segq_ref, segk_ref, dk_ref, dv_ref = refs
  else:
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref), segq_ref, segk_ref = refs, None, None
  bq, bk = cfg.block_q, cfg.block_k
  j = pl.program_id(2)
  ks, v = _chunks(k_ref, slice(None), qk_chunks), v_ref[...]
  k_seg = segk_ref[...] if has_segments else None

  def q_step(i, carry):
    dks, dv = carry
    rows = pl.ds(i * bq, bq)
    qs = _chunks(q_ref, rows, qk_chunks)
    q_seg = segq_ref[rows] if has_segments else None
    s, mask = _scores(qs, ks, cfg, i * bq, j * bk, q_seg, k_seg)
    do = do_ref[rows, :]
    p, ds = _block_grads(s, mask, lse_ref[rows], delta_ref[rows], do, v)
    dv = dv + _dot_tn(p.astype(do.dtype), do)
    ds = (ds * cfg.sm_scale).astype(qs[0].dtype)
    return tuple(a + _dot_tn(ds, qc) for a, qc in zip(dks, qs)), dv

  init = (tuple(jnp.zeros((bk, cw), jnp.float32) for _, cw in qk_chunks),
          jnp.zeros((bk, v_ref.shape[-1]), jnp.float32))
  dks, dv = jax.lax.fori_loop(*_q_blocks_range(j, cfg), q_step, init)
  for (c0, cw), dk in zip(qk_chunks, dks):
    dk_ref[:, pl.ds(c0, cw)] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(*refs, cfg: _Cfg, qk_chunks, has_segments: bool):
  if has_segments:
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, segq_ref, segk_ref, dq_ref = refs
  else:
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref), segq_ref, segk_ref = refs, None, None
  bq, bk = cfg.block_q, cfg.block_k
  i = pl.program_id(2)
  qs, do = _chunks(q_ref, slice(None), qk_chunks), do_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]
  q_seg = segq_ref[...] if has_segments else None

  def k_step(j, dqs):
    rows = pl.ds(j * bk, bk)
    ks = _chunks(k_ref, rows, qk_chunks)
    k_seg = segk_ref[rows] if has_segments else None
    s, mask = _scores(qs, ks, cfg, i * bq, j * bk, q_seg, k_seg)
    _, ds = _block_grads(s, mask, lse, delta, do, v_ref[rows, :])
    ds = (ds * cfg.sm_scale).astype(ks[0].dtype)
    return tuple(a + _dot(ds, kc) for a, kc in zip(dqs, ks))

  dqs = jax.lax.fori_loop(0, _k_blocks_end(i, cfg), k_step,
                          tuple(jnp.zeros((bq, cw), jnp.float32) for _, cw in qk_chunks))
  for (c0, cw), dq in zip(qk_chunks, dqs):
    dq_ref[:, pl.ds(c0, cw)] = dq.astype(dq_ref.dtype)


def _block_specs(s_pad: int):
  """BlockSpec makers over grid (b, h, n): `block` tiles the sequence by n; None = all of it."""

  def seq(d, block=None):  # [B, S, H, d] arrays
    if block:
      return pl.BlockSpec((None, block, None, d), lambda b, h, n: (b, n, h, 0))
    return pl.BlockSpec((None, s_pad, None, d), lambda b, h, n: (b, 0, h, 0))

  def rows(block=None):  # [B, H, S] arrays (lse, delta)
    if block:
      return pl.BlockSpec((None, None, block), lambda b, h, n: (b, h, n))
    return pl.BlockSpec((None, None, s_pad), lambda b, h, n: (b, h, 0))

  def seg(block=None):  # [B, S]
    if block:
      return pl.BlockSpec((None, block), lambda b, h, n: (b, n))
    return pl.BlockSpec((None, s_pad), lambda b, h, n: (b, 0))

  return seq, rows, seg


def _flash_fwd_call(q, k, v, seg, cfg: _Cfg):
  (b, s_pad, h, dqk), dv = q.shape, v.shape[-1]
  has_seg, bq = seg is not None, cfg.block_q
  seq, rows, seg_spec = _block_specs(s_pad)
  seg_specs = [seg_spec(bq), seg_spec()] if has_seg else []  # query side, key side
  return pl.pallas_call(
      functools.partial(_fwd_kernel, cfg=cfg, qk_chunks=_pow2_chunks(dqk), has_segments=has_seg),
      grid=(b, h, s_pad // cfg.block_q),
      in_specs=[seq(dqk, bq), seq(dqk), seq(dv), *seg_specs],
      out_specs=[seq(dv, bq), rows(bq)],
      out_shape=[jax.ShapeDtypeStruct((b, s_pad, h, dv), q.dtype),
                 jax.ShapeDtypeStruct((b, h, s_pad), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=4 if dqk <= 64 else 8, num_stages=2),
      interpret=cfg.interpret,
      name="mla_attention_fwd",
  )(q, k, v, *((seg, seg) if has_seg else ()))


def _flash_bwd_call(q, k, v, seg, out, lse, do, cfg: _Cfg):
  (b, s_pad, h, dqk), dv = q.shape, v.shape[-1]
  has_seg = seg is not None
  chunks = _pow2_chunks(dqk)
  delta = jnp.einsum("bshd,bshd->bhs", out.astype(jnp.float32), do.astype(jnp.float32))
  seg_args = (seg, seg) if has_seg else ()
  params = plgpu.CompilerParams(num_warps=8, num_stages=2)

  seq, rows, seg_spec = _block_specs(s_pad)
  bq, bk = cfg.block_q, cfg.block_k
  dk, dv_ = pl.pallas_call(
      functools.partial(_dkv_kernel, cfg=cfg, qk_chunks=chunks, has_segments=has_seg),
      grid=(b, h, s_pad // cfg.block_k),
      in_specs=[seq(dqk), seq(dqk, bk), seq(dv, bk), seq(dv), rows(), rows(),
                *([seg_spec(), seg_spec(bk)] if has_seg else [])],
      out_specs=[seq(dqk, bk), seq(dv, bk)],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=params, interpret=cfg.interpret, name="mla_attention_dkv",
  )(q, k, v, do, lse, delta, *seg_args)

  dq = pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg, qk_chunks=chunks, has_segments=has_seg),
      grid=(b, h, s_pad // cfg.block_q),
      in_specs=[seq(dqk, bq), seq(dqk), seq(dv), seq(dv, bq), rows(bq), rows(bq),
                *([seg_spec(bq), seg_spec()] if has_seg else [])],
      out_specs=seq(dqk, bq),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=params, interpret=cfg.interpret, name="mla_attention_dq",
  )(q, k, v, do, lse, delta, *seg_args)
  return dq, dk, dv_


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash_pallas(q, k, v, seg, cfg: _Cfg):
  return _flash_fwd_call(q, k, v, seg, cfg)[0]


def _flash_pallas_fwd(q, k, v, seg, cfg):
  out, lse = _flash_fwd_call(q, k, v, seg, cfg)
  return out, (q, k, v, seg, out, lse)


def _flash_pallas_bwd(cfg, res, do):
  q, k, v, seg, out, lse = res
  return (*_flash_bwd_call(q, k, v, seg, out, lse, do, cfg), None)


_flash_pallas.defvjp(_flash_pallas_fwd, _flash_pallas_bwd)


def _padded_problem(q, k, v, segment_ids, block_q, block_k, causal, sm_scale, interpret):
  """Clips blocks to the sequence, pads S to a common multiple of both blocks."""
  s = q.shape[1]
  bq = min(block_q, pl.next_power_of_2(s))
  bk = min(block_k, pl.next_power_of_2(s))
  s_pad = -(-s // math.lcm(bq, bk)) * math.lcm(bq, bk)
  pad = lambda x: x if s_pad == s else jnp.pad(x, [(0, 0), (0, s_pad - s)] + [(0, 0)] * (x.ndim - 2))
  seg = None if segment_ids is None else pad(segment_ids.astype(jnp.int32))
  cfg = _Cfg(bool(causal), float(sm_scale), bq, bk, s, interpret)
  return pad(q), pad(k), pad(v), seg, cfg


def mla_attention_pallas(q, k, v, *, segment_ids=None, causal=True, sm_scale=None, block_q=512,
                         block_k=512, interpret=False):
  if sm_scale is None:
    sm_scale = q.shape[-1] ** -0.5
  if not interpret:
    block_q, block_k = min(block_q, TRITON_MAX_BLOCK_Q), min(block_k, TRITON_MAX_BLOCK_K)
  qp, kp, vp, seg, cfg = _padded_problem(q, k, v, segment_ids, block_q, block_k, causal, sm_scale,
                                         interpret)
  if not interpret and any(b != pl.next_power_of_2(b) or b < 16 for b in (cfg.block_q, cfg.block_k)):
    raise NotImplementedError(f"triton needs power-of-two blocks >= 16, got {cfg.block_q}, {cfg.block_k}")
  if not interpret:  # zero columns change no score; the padded value columns are sliced off
    qp, kp, vp = pad_to_multiple(qp, 3), pad_to_multiple(kp, 3), pad_to_multiple(vp, 3)
  return _flash_pallas(qp, kp, vp, seg, cfg)[:, :q.shape[1], :, :v.shape[-1]]


# ---------------------------------------------------------------------------------------------
# Chunked XLA path: the kernel's algorithm in jnp, one (batch, head) at a time under vmap.


def _chunked_fwd_one(q, k, v, seg, cfg: _Cfg):
  """q, k [S, Dqk], v [S, Dv], seg [S] | None -> out [S, Dv], lse [S]."""
  s_pad, bq, bk = q.shape[0], cfg.block_q, cfg.block_k

  def q_block(i):
    qi = jax.lax.dynamic_slice_in_dim(q, i * bq, bq)
    q_seg = None if seg is None else jax.lax.dynamic_slice_in_dim(seg, i * bq, bq)

    def k_step(j, carry):
      kj, vj = (jax.lax.dynamic_slice_in_dim(x, j * bk, bk) for x in (k, v))
      k_seg = None if seg is None else jax.lax.dynamic_slice_in_dim(seg, j * bk, bk)
      s, _ = _scores((qi,), (kj,), cfg, i * bq, j * bk, q_seg, k_seg)
      return _online_softmax_step(carry, s, vj)

    acc, m, l = jax.lax.fori_loop(0, _k_blocks_end(i, cfg), k_step, _softmax_init(bq, v.shape[-1]))
    return (acc / l[:, None]).astype(q.dtype), m + jnp.log(l)

  out, lse = jax.lax.map(q_block, jnp.arange(s_pad // bq))
  return out.reshape(s_pad, -1), lse.reshape(s_pad)


def _chunked_bwd_one(q, k, v, seg, out, lse, do, cfg: _Cfg):
  s_pad, bq, bk = q.shape[0], cfg.block_q, cfg.block_k
  num_q, num_k = s_pad // bq, s_pad // bk
  delta = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
  sl = jax.lax.dynamic_slice_in_dim
  seg_at = lambda start, size: None if seg is None else sl(seg, start, size)

  def dq_block(i):
    qi, doi, lse_i, delta_i = sl(q, i * bq, bq), sl(do, i * bq, bq), sl(lse, i * bq, bq), sl(delta, i * bq, bq)

    def k_step(j, dq):
      kj, vj = sl(k, j * bk, bk), sl(v, j * bk, bk)
      s, mask = _scores((qi,), (kj,), cfg, i * bq, j * bk, seg_at(i * bq, bq), seg_at(j * bk, bk))
      _, ds = _block_grads(s, mask, lse_i, delta_i, doi, vj)
      return dq + _dot((ds * cfg.sm_scale).astype(kj.dtype), kj)

    dq = jax.lax.fori_loop(0, _k_blocks_end(i, cfg), k_step, jnp.zeros((bq, q.shape[-1]), jnp.float32))
    return dq.astype(q.dtype)

  def dkv_block(j):
    kj, vj = sl(k, j * bk, bk), sl(v, j * bk, bk)

    def q_step(i, carry):
      dk, dv = carry
      qi, doi = sl(q, i * bq, bq), sl(do, i * bq, bq)
      s, mask = _scores((qi,), (kj,), cfg, i * bq, j * bk, seg_at(i * bq, bq), seg_at(j * bk, bk))
      p, ds = _block_grads(s, mask, sl(lse, i * bq, bq), sl(delta, i * bq, bq), doi, vj)
      dv = dv + _dot_tn(p.astype(doi.dtype), doi)
      return dk + _dot_tn((ds * cfg.sm_scale).astype(qi.dtype), qi), dv

    init = (jnp.zeros(kj.shape, jnp.float32), jnp.zeros(vj.shape, jnp.float32))
    dk, dv = jax.lax.fori_loop(*_q_blocks_range(j, cfg), q_step, init)
    return dk.astype(k.dtype), dv.astype(v.dtype)

  dq = jax.lax.map(dq_block, jnp.arange(num_q)).reshape(q.shape)
  dk, dv = jax.lax.map(dkv_block, jnp.arange(num_k))
  return dq, dk.reshape(k.shape), dv.reshape(v.shape)


def _chunked_fwd(q, k, v, seg, cfg):
  f = lambda q, k, v, seg: _chunked_fwd_one(q, k, v, seg, cfg)
  return jax.vmap(jax.vmap(f, in_axes=(1, 1, 1, None), out_axes=(1, 0)),
                  in_axes=(0, 0, 0, 0 if seg is not None else None), out_axes=(0, 0))(q, k, v, seg)


def _chunked_bwd(q, k, v, seg, out, lse, do, cfg):
  f = lambda q, k, v, seg, out, lse, do: _chunked_bwd_one(q, k, v, seg, out, lse, do, cfg)
  seg_ax = 0 if seg is not None else None
  return jax.vmap(jax.vmap(f, in_axes=(1, 1, 1, None, 1, 0, 1), out_axes=(1, 1, 1)),
                  in_axes=(0, 0, 0, seg_ax, 0, 0, 0), out_axes=(0, 0, 0))(q, k, v, seg, out, lse, do)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash_xla(q, k, v, seg, cfg: _Cfg):
  return _chunked_fwd(q, k, v, seg, cfg)[0]


def _flash_xla_fwd(q, k, v, seg, cfg):
  out, lse = _chunked_fwd(q, k, v, seg, cfg)
  return out, (q, k, v, seg, out, lse)


def _flash_xla_bwd(cfg, res, do):
  q, k, v, seg, out, lse = res
  return (*_chunked_bwd(q, k, v, seg, out, lse, do, cfg), None)


_flash_xla.defvjp(_flash_xla_fwd, _flash_xla_bwd)


def flash_attention_xla(q, k, v, *, segment_ids=None, causal=True, sm_scale=None, block_q=512,
                        block_k=512):
  """The chunked path at any length (tests call it directly on short sequences)."""
  if sm_scale is None:
    sm_scale = q.shape[-1] ** -0.5
  qp, kp, vp, seg, cfg = _padded_problem(q, k, v, segment_ids, block_q, block_k, causal, sm_scale,
                                         False)
  return _flash_xla(qp, kp, vp, seg, cfg)[:, :q.shape[1]]


# ---------------------------------------------------------------------------------------------
# Query-blocked XLA path for short sequences on CPU: static query blocks, each against the key
# prefix it can see, one dense [B, H, rows, keys] score block at a time.


def _query_blocks(s: int, block_q: int, causal: bool):
  """(first row, end row, keys seen) per static query block."""
  return [(q0, min(q0 + block_q, s), min(q0 + block_q, s) if causal else s) for q0 in range(0, s, block_q)]


def _block_mask(seg, q0: int, q1: int, kend: int, causal: bool):
  """[B | 1, 1, q1 - q0, kend] True where query row i may attend key j (seg [B, S] | None)."""
  mask = jnp.ones((1, 1, q1 - q0, kend), bool)
  if causal:
    q_pos = q0 + jax.lax.broadcasted_iota(jnp.int32, (q1 - q0, kend), 0)
    mask &= (q_pos >= jax.lax.broadcasted_iota(jnp.int32, (q1 - q0, kend), 1))[None, None]
  if seg is not None:
    mask &= seg[:, None, q0:q1, None] == seg[:, None, None, :kend]
  return mask


def _block_scores(q, k, seg, q0, q1, kend, causal, sm_scale):
  """Scaled, masked scores [B, H, q1 - q0, kend] (float32) and their mask; q, k [B, H, S, D]."""
  s = jnp.einsum("bhqd,bhkd->bhqk", q[:, :, q0:q1], k[:, :, :kend], preferred_element_type=jnp.float32)
  mask = _block_mask(seg, q0, q1, kend, causal)
  return jnp.where(mask, s * sm_scale, MASK_VALUE), mask


def _qblocked_fwd(q, k, v, seg, causal, sm_scale, block_q):
  """q, k [B, H, S, Dqk], v [B, H, S, Dv] -> out [B, H, S, Dv], lse [B, H, S] float32."""
  outs, lses = [], []
  for q0, q1, kend in _query_blocks(q.shape[2], block_q, causal):
    s, _ = _block_scores(q, k, seg, q0, q1, kend, causal, sm_scale)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - m)  # masked entries: exp(MASK - m) = 0 (every row sees itself)
    l = jnp.sum(p, axis=-1, keepdims=True)
    o = jnp.einsum("bhqk,bhkd->bhqd", p.astype(v.dtype), v[:, :, :kend], preferred_element_type=jnp.float32)
    outs.append((o / l).astype(q.dtype))
    lses.append((m + jnp.log(l))[..., 0])
  return jnp.concatenate(outs, axis=2), jnp.concatenate(lses, axis=2)


def _qblocked_bwd(q, k, v, seg, out, lse, do, causal, sm_scale, block_q):
  """FlashAttention-2's backward per query block (module docstring), probabilities recomputed."""
  s_len = q.shape[2]
  delta = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
  dq, dk, dv = [], jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)
  for q0, q1, kend in _query_blocks(s_len, block_q, causal):
    qi, doi, ki, vi = q[:, :, q0:q1], do[:, :, q0:q1], k[:, :, :kend], v[:, :, :kend]
    s, mask = _block_scores(q, k, seg, q0, q1, kend, causal, sm_scale)
    p = jnp.where(mask, jnp.exp(s - lse[:, :, q0:q1, None]), 0.0)
    dp = jnp.einsum("bhqd,bhkd->bhqk", doi, vi, preferred_element_type=jnp.float32)
    ds = (p * (dp - delta[:, :, q0:q1, None]) * sm_scale).astype(q.dtype)
    dq.append(jnp.einsum("bhqk,bhkd->bhqd", ds, ki, preferred_element_type=jnp.float32).astype(q.dtype))
    to_s = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, s_len - kend), (0, 0)))  # keys past kend: 0
    dk = dk + to_s(jnp.einsum("bhqk,bhqd->bhkd", ds, qi, preferred_element_type=jnp.float32))
    dv = dv + to_s(jnp.einsum("bhqk,bhqd->bhkd", p.astype(do.dtype), doi, preferred_element_type=jnp.float32))
  return jnp.concatenate(dq, axis=2), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _qblocked(q, k, v, seg, causal, sm_scale, block_q):
  return _qblocked_fwd(q, k, v, seg, causal, sm_scale, block_q)[0]


def _qblocked_vjp_fwd(q, k, v, seg, causal, sm_scale, block_q):
  out, lse = _qblocked_fwd(q, k, v, seg, causal, sm_scale, block_q)
  return out, (q, k, v, seg, out, lse)


def _qblocked_vjp_bwd(causal, sm_scale, block_q, res, do):
  q, k, v, seg, out, lse = res
  return (*_qblocked_bwd(q, k, v, seg, out, lse, do, causal, sm_scale, block_q), None)


_qblocked.defvjp(_qblocked_vjp_fwd, _qblocked_vjp_bwd)


def query_blocked_attention(q, k, v, *, segment_ids=None, causal=True, sm_scale=None,
                            block_q: int = CPU_BLOCK_Q):
  """The S <= 1024 CPU path of "xla_chunked" (module docstring), at any length and backend
  (tests call it directly). Same shapes and arguments as `mla_attention`."""
  if sm_scale is None:
    sm_scale = q.shape[-1] ** -0.5
  heads_major = lambda x: x.transpose(0, 2, 1, 3)  # [B, S, H, D] <-> [B, H, S, D]
  seg = None if segment_ids is None else segment_ids.astype(jnp.int32)
  out = _qblocked(heads_major(q), heads_major(k), heads_major(v), seg, bool(causal), float(sm_scale),
                  int(block_q))
  return heads_major(out)


def mla_attention_chunked(q, k, v, *, segment_ids=None, causal=True, sm_scale=None, block_q=512,
                          block_k=512):
  if q.shape[1] <= CHUNKED_MIN_SEQ:
    if current_platform() == "cpu":
      return query_blocked_attention(q, k, v, segment_ids=segment_ids, causal=causal, sm_scale=sm_scale,
                                     block_q=min(block_q, CPU_BLOCK_Q))
    raise NotImplementedError(f"S={q.shape[1]} <= {CHUNKED_MIN_SEQ}: the dense reference is exact and cheap")
  return flash_attention_xla(q, k, v, segment_ids=segment_ids, causal=causal, sm_scale=sm_scale,
                             block_q=block_q, block_k=block_k)


# ---------------------------------------------------------------------------------------------
# cuDNN's fused attention (GPU), where it takes the call.


def mla_attention_cudnn(q, k, v, *, segment_ids=None, causal=True, sm_scale=None, block_q=None,
                        block_k=None):
  """`jax.nn.dot_product_attention(implementation="cudnn")` with V zero-padded to Dqk (cuDNN wants
  Dv == Dqk; the padded output columns are sliced off). On an H200 at S = 4096, 64 heads, 192/128
  this ran fwd+bwd in 4.63 ms against the Triton kernel's 5.96 (BENCHMARKS.md). Declines packed
  segments (no segment mask in that API; the Triton kernel takes them), float32, Dqk > 256."""
  del block_q, block_k
  dqk, dv = q.shape[-1], v.shape[-1]
  if segment_ids is not None:
    raise NotImplementedError("cudnn: no packed-segment mask through jax.nn.dot_product_attention")
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    raise NotImplementedError(f"cudnn: fused attention wants bf16/f16, got {q.dtype}")
  if dv > dqk or dqk > 256 or dqk % 8:
    raise NotImplementedError(f"cudnn: head dims Dqk={dqk}, Dv={dv} (wants Dv <= Dqk <= 256, Dqk % 8 == 0)")
  vp = jnp.pad(v, [(0, 0)] * 3 + [(0, dqk - dv)])
  out = jax.nn.dot_product_attention(q, k, vp, is_causal=causal, implementation="cudnn",
                                     scale=dqk ** -0.5 if sm_scale is None else sm_scale)
  return out[..., :dv]


# ---------------------------------------------------------------------------------------------
# Dispatch order (the registry puts library calls first, then Pallas kernels, then XLA paths).

mla_attention_op.register("cudnn", kind="library", platforms=("gpu",))(mla_attention_cudnn)
mla_attention_op.register("triton", kind="pallas", platforms=("gpu",))(mla_attention_pallas)
mla_attention_op.register("xla_chunked", kind="xla")(mla_attention_chunked)
mla_attention_op.register("xla", kind="xla")(mla_attention_reference)

"""Causal attention with keys and values shared by every query head (MQA): MLA's absorbed form.

`mqa_attention(q [B, S, H, D], k [B, S, D], v [B, S, Dv], *, segment_ids [B, S] | None,
causal=True, sm_scale) -> [B, S, H, Dv]`.

MLA's attention can run in two exact forms. Expanded: the latent c [S, R] is up-projected to
per-head keys and values (k_h = c W_uk,h, v_h = c W_uv,h) and each head attends on its own, B x H
small problems. Absorbed: W_uk folds into the queries (q'_h = W_uk,h^T q_h) and W_uv into the output,
so every head attends to the same keys [c | k_rope] and values c. Here the heads then fold into the
query rows: a block of `block_q` positions is block_q x H rows against one shared key prefix, one
[block_q H, D] x [D, keys] product per batch row instead of H products of block_q rows each. On
XLA:CPU at the `small` training shape (B 4, S 512, 8 heads of 96 / 64 expanded, 160 / 128 absorbed)
that is what makes the absorbed form faster, although it does ~1.7x the score FLOPs: the per-head
products ran at 40-110 GFLOP/s, the folded ones near the machine's matmul rate.

The algorithm is `query_blocked_attention`'s (mla_attention.py): static query blocks, each against
its causal key prefix with dense scores, a custom VJP that saves (out, lse) and recomputes the
probabilities per block in the backward (FlashAttention-2's backward equations).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.mla_attention import MASK_VALUE, _query_blocks

# Positions per query block (x H rows). At the `small` bench shape 64 positions x 8 heads = 512
# rows measured best on CPU (fwd+bwd, against 32 and 128).
MQA_BLOCK_Q = 64


def _rows(x, q0, q1):
  """[B, S, H, D] -> the rows of positions q0..q1-1, [B, (q1 - q0) H, D] (position-major)."""
  b, _, h, d = x.shape
  return x[:, q0:q1].reshape(b, (q1 - q0) * h, d)


def _scores(q, k, seg, q0, q1, kend, causal, sm_scale):
  """Scaled, masked scores [B, (q1 - q0) H, kend] float32 and the mask."""
  h = q.shape[2]
  s = jnp.einsum("bqd,bkd->bqk", _rows(q, q0, q1), k[:, :kend], preferred_element_type=jnp.float32)
  rows = (q1 - q0) * h
  mask = jnp.ones((1, rows, kend), bool)
  if causal:
    pos = q0 + jax.lax.broadcasted_iota(jnp.int32, (rows, kend), 0) // h
    mask &= (pos >= jax.lax.broadcasted_iota(jnp.int32, (rows, kend), 1))[None]
  if seg is not None:
    mask &= jnp.repeat(seg[:, q0:q1], h, axis=1)[:, :, None] == seg[:, None, :kend]
  return jnp.where(mask, s * sm_scale, MASK_VALUE), mask


def _fwd(q, k, v, seg, causal, sm_scale, block_q):
  b, s_len, h, _ = q.shape
  outs, lses = [], []
  for q0, q1, kend in _query_blocks(s_len, block_q, causal):
    s, _ = _scores(q, k, seg, q0, q1, kend, causal, sm_scale)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - m)  # masked entries: exp(MASK - m) = 0 (every row sees itself)
    l = jnp.sum(p, axis=-1, keepdims=True)
    o = jnp.einsum("bqk,bkd->bqd", p.astype(v.dtype), v[:, :kend], preferred_element_type=jnp.float32)
    outs.append((o / l).astype(q.dtype).reshape(b, q1 - q0, h, -1))
    lses.append((m + jnp.log(l))[..., 0])
  return jnp.concatenate(outs, axis=1), jnp.concatenate(lses, axis=1)   # [B, S, H, Dv], [B, S H]


def _bwd(q, k, v, seg, out, lse, do, causal, sm_scale, block_q):
  b, s_len, h, _ = q.shape
  delta = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1).reshape(b, s_len * h)
  dq, dk, dv = [], jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)
  for q0, q1, kend in _query_blocks(s_len, block_q, causal):
    r0, r1 = q0 * h, q1 * h
    qi, doi, ki, vi = _rows(q, q0, q1), _rows(do, q0, q1), k[:, :kend], v[:, :kend]
    s, mask = _scores(q, k, seg, q0, q1, kend, causal, sm_scale)
    p = jnp.where(mask, jnp.exp(s - lse[:, r0:r1, None]), 0.0)
    dp = jnp.einsum("bqd,bkd->bqk", doi, vi, preferred_element_type=jnp.float32)
    ds = (p * (dp - delta[:, r0:r1, None]) * sm_scale).astype(q.dtype)
    dq.append(jnp.einsum("bqk,bkd->bqd", ds, ki, preferred_element_type=jnp.float32)
              .astype(q.dtype).reshape(b, q1 - q0, h, -1))
    dk = dk.at[:, :kend].add(jnp.einsum("bqk,bqd->bkd", ds, qi, preferred_element_type=jnp.float32))
    dv = dv.at[:, :kend].add(jnp.einsum("bqk,bqd->bkd", p.astype(do.dtype), doi,
                                        preferred_element_type=jnp.float32))
  return jnp.concatenate(dq, axis=1), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _mqa(q, k, v, seg, causal, sm_scale, block_q):
  return _fwd(q, k, v, seg, causal, sm_scale, block_q)[0]


def _mqa_vjp_fwd(q, k, v, seg, causal, sm_scale, block_q):
  out, lse = _fwd(q, k, v, seg, causal, sm_scale, block_q)
  return out, (q, k, v, seg, out, lse)


def _mqa_vjp_bwd(causal, sm_scale, block_q, res, do):
  q, k, v, seg, out, lse = res
  return (*_bwd(q, k, v, seg, out, lse, do, causal, sm_scale, block_q), None)


_mqa.defvjp(_mqa_vjp_fwd, _mqa_vjp_bwd)


def mqa_attention(q, k, v, *, segment_ids=None, causal: bool = True, sm_scale: float | None = None,
                  block_q: int = MQA_BLOCK_Q):
  """q [B, S, H, D], k [B, S, D], v [B, S, Dv] -> [B, S, H, Dv]; see the module docstring."""
  if q.ndim != 4 or k.shape != (q.shape[0], q.shape[1], q.shape[3]) or v.shape[:2] != q.shape[:2] or v.ndim != 3:
    raise ValueError(f"mqa_attention: want q [B, S, H, D], k [B, S, D], v [B, S, Dv]; got q {q.shape}, "
                     f"k {k.shape}, v {v.shape}")
  if segment_ids is not None and segment_ids.shape != q.shape[:2]:
    raise ValueError(f"mqa_attention: segment_ids shape {segment_ids.shape} != [batch, seq] {q.shape[:2]}")
  if sm_scale is None:
    sm_scale = q.shape[-1] ** -0.5
  seg = None if segment_ids is None else segment_ids.astype(jnp.int32)
  return _mqa(q, k, v, seg, bool(causal), float(sm_scale), int(block_q))


def mqa_attention_reference(q, k, v, *, segment_ids=None, causal=True, sm_scale=None):
  """Dense: [B, H, S, S] scores."""
  if sm_scale is None:
    sm_scale = q.shape[-1] ** -0.5
  s_len = q.shape[1]
  s = jnp.einsum("bshd,btd->bhst", q, k, preferred_element_type=jnp.float32) * sm_scale
  mask = jnp.ones((1, 1, s_len, s_len), bool)
  if causal:
    mask &= jnp.tril(jnp.ones((s_len, s_len), bool))[None, None]
  if segment_ids is not None:
    mask &= (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
  p = jax.nn.softmax(jnp.where(mask, s, -jnp.inf), axis=-1)
  return jnp.einsum("bhst,btd->bshd", p, v.astype(jnp.float32)).astype(q.dtype)

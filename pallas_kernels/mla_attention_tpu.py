"""MLA flash attention on TPU: JAX's splash attention (a Mosaic kernel), forward and backward.

Same contract as `mla_attention` (pallas_kernels/mla_attention.py): q, k [B, S, H, Dqk],
v [B, S, H, Dv] with Dqk != Dv (192 / 128 for LongCat-Flash), causal, packed-document segment
ids [B, S]. Splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`) takes all of
it natively: separate q/k and v head dims in its forward, dq and dkv kernels; segment ids; a
causal mask whose fully-masked blocks are skipped (block-sparse mask info computed at trace
time). Unlike the cuDNN path, V needs no zero padding.

What this wrapper adds: the softmax scale is folded into q (splash has no scale argument); the
[B, S, H, D] layout becomes splash's per-example [H, S, D] (vmapped over the batch); S is padded
up to a multiple of the blocks, which splash wants multiples of 128 (the padded positions get
their own segment id, so no real query sees them with or without causality, and their rows are
sliced off). Splash runs on one device (XLA cannot partition a Mosaic call): under a mesh each
device runs it on its own sequences and heads (`tpu_common.on_each_device`, a shard_map).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

from pallas_kernels.mla_attention import mla_attention_op
from pallas_kernels.tpu_common import LANES, interpret_params, on_each_device, round_up


def _block(requested: int, s: int) -> int:
  """A splash block: a multiple of 128 lanes, no larger than the (rounded-up) sequence."""
  return max(LANES, min(round_up(requested, LANES), round_up(s, LANES)))


def _kernel(s_pad: int, heads: int, causal: bool, bq: int, bk: int, interpret):
  """The splash kernel for one [H, S_pad, D] example. Built per call, not cached: its mask-info
  arrays are created in the caller's trace (a cached one leaks tracers out of scan/remat)."""
  one = splash_mask.CausalMask((s_pad, s_pad)) if causal else splash_mask.FullMask((s_pad, s_pad))
  sizes = splash.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq,
                            block_kv_dkv=bk, block_kv_dkv_compute=bk, block_q_dq=bq, block_kv_dq=bk)
  return splash.make_splash_mha(splash_mask.MultiHeadMask([one] * heads), block_sizes=sizes,
                                head_shards=1, q_seq_shards=1, interpret=interpret)


def mla_attention_splash(q, k, v, *, segment_ids=None, causal=True, sm_scale=None, block_q=512,
                         block_k=512, interpret=False):
  """See the module docstring. Blocks are rounded to multiples of 128 and clipped to S. Under a
  mesh, each device runs splash on its own sequences and heads (`tpu_common.on_each_device`)."""
  b, s, h, dqk = q.shape
  if sm_scale is None:
    sm_scale = dqk ** -0.5
  has_seg = segment_ids is not None
  seg = segment_ids.astype(jnp.int32) if has_seg else jnp.zeros((b, s), jnp.int32)
  local = functools.partial(_splash_local, causal=bool(causal), has_seg=has_seg, sm_scale=float(sm_scale),
                            bq=_block(block_q, s), bk=_block(block_k, s), interpret=interpret_params(interpret))
  qkv = ("B", None, "H", None)
  return on_each_device(local, (q, k, v, seg), (qkv, qkv, qkv, ("B", None)), qkv)


def _splash_local(q, k, v, seg, *, causal, has_seg, sm_scale, bq, bk, interpret):
  """One device's sequences and heads: q, k [b, S, h, Dqk], v [b, S, h, Dv], seg [b, S]."""
  b, s, h, _ = q.shape
  s_pad = round_up(s, math.lcm(bq, bk))
  pad = s_pad - s
  if pad:  # padded positions: one segment of their own
    seg = jnp.concatenate([seg, jnp.broadcast_to(jnp.max(seg) + 1, (b, pad))], axis=1)
  heads_major = lambda x: jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
  qh = heads_major((q * jnp.asarray(sm_scale, jnp.float32)).astype(q.dtype))
  kh, vh = heads_major(k), heads_major(v)
  needs_seg = has_seg or (pad and not causal)
  kernel = _kernel(s_pad, h, causal, bq, bk, interpret)
  one = lambda q, k, v, g: kernel(q, k, v, segment_ids=splash.SegmentIds(q=g, kv=g) if needs_seg else None)
  if interpret:  # the TPU interpreter cannot run a vmapped splash (its grid gains an axis that
    out = jax.lax.map(lambda xs: one(*xs), (qh, kh, vh, seg))  # the dimension semantics lack)
  else:
    out = jax.vmap(one)(qh, kh, vh, seg)
  return out.transpose(0, 2, 1, 3)[:, :s].astype(q.dtype)


mla_attention_op.register("splash", kind="pallas", platforms=("tpu",))(mla_attention_splash)

"""Context parallelism: one sequence split over the `context` mesh axis (training and prefill).

Activations are sharded along `length` (`("length", "context")` in the logical-axis table), so
every device holds a contiguous chunk of S / n queries. Attention needs every earlier key, and MLA
makes that cheap: what is all-gathered is the compressed KV (latent c and roped key, R + rope =
576 values per token for LongCat), not the per-head keys and values (H * (192 + 128) = 20,480),
and the attention runs in MLA's absorbed form, so the per-head keys are never built at all:

    lat, k_rope = gather_sequence(lat), gather_sequence(k_rope)  # all-gather over `context`
    q = [q_nope @ W_uk | q_rope]                                 # local queries [s, H, R + rope]
    out = attention(q, [lat | k_rope], lat) @ W_uv               # keys shared by all heads; causal
                                                                 # at global positions

`attention` runs under `shard_map`: each device computes its query chunk against the gathered
keys with flash-style blocks (online softmax over key blocks, stopping at the causal diagonal
of its chunk), forward and backward in jnp under a custom VJP, so no [S, S] matrix exists. The
key/value gradients of the chunks are summed over `context` by the shard_map transpose.
`sparse_attention` (LongCat Sparse Attention) needs no offsets: the indexer's selected indices
are global positions into the gathered compressed cache.

The same code runs whenever the rules shard `length` over any mesh axes (e.g. fsdp x expert, when
`sharding.fit_batch_rules` gives a batch too small for them to the sequence): the chunk offset is
the device's linear index over those axes. The model takes this path when its placement splits
sequences (`MeshPlacement.length_shards(S, B) > 1`), its ordinary path otherwise.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.sparse_attention import sparse_attention as sparse_op

CONTEXT_AXIS = "context"
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def _specs(placement, q_shape, k_shape, v_shape):
  b, s = q_shape[:2]
  spec = placement.spec
  q_spec = spec(("batch", "length", "act_heads", None), q_shape)
  kv_names = ("batch", None, "act_heads", None) if len(k_shape) == 4 else ("batch", None, None)
  seg_q, seg_k = spec(("batch", "length"), (b, s)), spec(("batch", None), (b, s))
  return q_spec, spec(kv_names, k_shape), spec(kv_names, v_shape), seg_q, seg_k


def _chunk_offset(length_axes, s_local: int):
  """Global position of this device's first query: its linear index over the length axes * chunk."""
  idx = 0
  for a in length_axes:
    idx = idx * jax.lax.axis_size(a) + jax.lax.axis_index(a)
  return idx * s_local


def attention(q, k, v, segment_ids=None, *, placement, sm_scale: float, block_k: int = 512):
  """Causal attention of length-sharded queries against all keys (see the module docstring).

  q [B, S, H, Dqk] (sharded along S over `context`), k [B, S, H, Dqk], v [B, S, H, Dv] (full
  length; the caller gathers the compressed KV first), segment_ids [B, S] | None -> [B, S, H, Dv].
  Keys shared by every head (MLA's absorbed form: k [B, S, R + rope], v [B, S, R]) are taken
  as they are, so nothing per-head of the whole sequence exists; out [B, S, H, R].
  """
  b, s, h, d = q.shape
  length_axes = placement.length_axes(s, b)
  q_spec, k_spec, v_spec, seg_q, seg_k = _specs(placement, q.shape, k.shape, v.shape)
  if segment_ids is None:
    segment_ids = jnp.zeros((b, s), jnp.int32)

  def local(q, k, v, sq, sk):
    off = _chunk_offset(length_axes, q.shape[1])
    bk = min(block_k, k.shape[1])
    return jax.vmap(functools.partial(_flash_local, sm_scale=float(sm_scale), block_k=bk),
                    in_axes=(0, 0, 0, 0, 0, None))(q, k, v, sq, sk, off)

  return jax.shard_map(local, mesh=placement.mesh, in_specs=(q_spec, k_spec, v_spec, seg_q, seg_k),
                       out_specs=q_spec, check_vma=False)(q, k, v, segment_ids, segment_ids)


def sparse_attention(q, k, v, indices, *, placement, sm_scale: float, implementation=None, block_k: int = 64):
  """`pallas_kernels.sparse_attention` with q [B, S, H, Dk] and indices [B, S, K] sharded along S,
  k [B, T, Dk], v [B, T, Dv] gathered (indices are global positions, so no offsets)."""
  spec = placement.spec
  q_spec = spec(("batch", "length", "act_heads", None), q.shape)
  idx_spec = spec(("batch", "length", None), indices.shape)
  kv = lambda x: spec(("batch", None, None), x.shape)
  fn = functools.partial(sparse_op, sm_scale=sm_scale, implementation=implementation, block_k=block_k)
  return jax.shard_map(lambda q, k, v, i: fn(q, k, v, i), mesh=placement.mesh,
                       in_specs=(q_spec, kv(k), kv(v), idx_spec), out_specs=q_spec,
                       check_vma=False)(q, k, v, indices)


# ---------------------------------------------------------------------------------------------
# Per device: a query chunk at global offset `off` against all keys (one batch row).


def _pad_keys(k, v, sk, block_k):
  t = k.shape[0]
  pad = -t % block_k
  if pad:
    k = jnp.pad(k, ((0, pad),) + ((0, 0),) * (k.ndim - 1))
    v = jnp.pad(v, ((0, pad),) + ((0, 0),) * (v.ndim - 1))
    sk = jnp.pad(sk, (0, pad), constant_values=-1)
  return k, v, sk


def _num_blocks(off, sq: int, t: int, block_k: int):
  """Key blocks up to the causal diagonal of the chunk's last query."""
  return jnp.minimum(-(-(off + sq) // block_k), -(-t // block_k))


def _kh(x) -> str:
  """Einsum letters of a key block: [bk, H, D] per head, or [bk, D] shared by the heads."""
  return "khd" if x.ndim == 3 else "kd"


def _block_scores(q, kj, sq_ids, skj, off, j, sm_scale, block_k):
  """q [Sq, H, D], kj [bk, H, D] or [bk, D] -> scores [H, Sq, bk] f32 (masked), the mask [Sq, bk]."""
  s = jnp.einsum(f"qhd,{_kh(kj)}->hqk", q, kj, preferred_element_type=jnp.float32) * sm_scale
  q_pos = off + jnp.arange(q.shape[0])
  k_pos = j * block_k + jnp.arange(kj.shape[0])
  mask = (k_pos[None, :] <= q_pos[:, None]) & (sq_ids[:, None] == skj[None, :])
  return jnp.where(mask[None], s, MASK_VALUE), mask


def _fwd(q, k, v, sq, sk, off, sm_scale, block_k):
  k, v, sk = _pad_keys(k, v, sk, block_k)
  n_q, h = q.shape[:2]

  def body(j, carry):
    acc, m, l = carry
    kj, vj = (jax.lax.dynamic_slice_in_dim(x, j * block_k, block_k) for x in (k, v))
    s, mask = _block_scores(q, kj, sq, jax.lax.dynamic_slice_in_dim(sk, j * block_k, block_k), off, j,
                            sm_scale, block_k)
    m_new = jnp.maximum(m, s.max(-1))
    p = jnp.where(mask[None], jnp.exp(s - m_new[..., None]), 0.0)
    corr = jnp.exp(m - m_new)
    l = l * corr + p.sum(-1)
    acc = acc * corr[..., None] + jnp.einsum(f"hqk,{_kh(vj)}->hqd", p.astype(vj.dtype), vj,
                                             preferred_element_type=jnp.float32)
    return acc, m_new, l

  init = (jnp.zeros((h, n_q, v.shape[-1]), jnp.float32), jnp.full((h, n_q), MASK_VALUE, jnp.float32),
          jnp.zeros((h, n_q), jnp.float32))
  acc, m, l = jax.lax.fori_loop(0, _num_blocks(off, n_q, k.shape[0], block_k), body, init)
  l = jnp.where(l > 0, l, 1.0)
  out = jnp.transpose(acc / l[..., None], (1, 0, 2)).astype(q.dtype)   # [Sq, H, Dv]
  return out, m + jnp.log(l)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _flash_local(q, k, v, sq, sk, off, sm_scale, block_k):
  return _fwd(q, k, v, sq, sk, off, sm_scale, block_k)[0]


def _flash_local_fwd(q, k, v, sq, sk, off, sm_scale, block_k):
  out, lse = _fwd(q, k, v, sq, sk, off, sm_scale, block_k)
  return out, (q, k, v, sq, sk, off, out, lse)


def _flash_local_bwd(sm_scale, block_k, res, do):
  q, k, v, sq, sk, off, out, lse = res
  t = k.shape[0]
  kp, vp, skp = _pad_keys(k, v, sk, block_k)
  do_h = jnp.transpose(do, (1, 0, 2)).astype(jnp.float32)                 # [H, Sq, Dv]
  delta = jnp.einsum("qhd,qhd->hq", out.astype(jnp.float32), do.astype(jnp.float32))

  def body(j, carry):
    dq, dk, dv = carry
    kj, vj = (jax.lax.dynamic_slice_in_dim(x, j * block_k, block_k) for x in (kp, vp))
    s, mask = _block_scores(q, kj, sq, jax.lax.dynamic_slice_in_dim(skp, j * block_k, block_k), off, j,
                            sm_scale, block_k)
    p = jnp.where(mask[None], jnp.exp(s - lse[..., None]), 0.0)            # [H, Sq, bk]
    dvj = jnp.einsum(f"hqk,hqd->{_kh(vj)}", p, do_h)
    dp = jnp.einsum(f"hqd,{_kh(vj)}->hqk", do_h, vj.astype(jnp.float32))
    ds = p * (dp - delta[..., None]) * sm_scale
    dq = dq + jnp.einsum(f"hqk,{_kh(kj)}->qhd", ds, kj.astype(jnp.float32))
    dkj = jnp.einsum(f"hqk,qhd->{_kh(kj)}", ds, q.astype(jnp.float32))
    dk = jax.lax.dynamic_update_slice_in_dim(dk, dkj, j * block_k, axis=0)
    dv = jax.lax.dynamic_update_slice_in_dim(dv, dvj, j * block_k, axis=0)
    return dq, dk, dv

  init = (jnp.zeros(q.shape, jnp.float32), jnp.zeros(kp.shape, jnp.float32), jnp.zeros(vp.shape, jnp.float32))
  dq, dk, dv = jax.lax.fori_loop(0, _num_blocks(off, q.shape[0], kp.shape[0], block_k), body, init)
  return (dq.astype(q.dtype), dk[:t].astype(k.dtype), dv[:t].astype(v.dtype), None, None, None)


_flash_local.defvjp(_flash_local_fwd, _flash_local_bwd)

